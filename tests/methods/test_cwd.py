"""CWD: each channel's spatial softmax of the student pulled to the teacher's with KL, blind to offsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detkd.distillation import build_distillers
from detkd.errors import ConfigError
from detkd.methods.cwd import channel_kl
from tests.conftest import make_batch, tiny


def _reference(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    """The paper's formula written out with numpy, channel by channel."""
    n, c = s.shape[:2]
    total = 0.0
    for i in range(n):
        for j in range(c):
            ps = np.exp(s[i, j].ravel() / tau)
            ps /= ps.sum()
            pt = np.exp(t[i, j].ravel() / tau)
            pt /= pt.sum()
            total += float((pt * np.log(pt / ps)).sum())
    return tau**2 * total / (n * c)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_known_value_against_the_formula(tau):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    assert channel_kl(s, t, tau).item() == pytest.approx(_reference(s.numpy(), t.numpy(), tau), rel=1e-5)
    assert channel_kl(t, t, tau).item() == pytest.approx(0.0, abs=1e-6)


def test_a_constant_added_to_a_channel_changes_nothing():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    offset = torch.tensor([5.0, -3.0, 0.0, 100.0])[None, :, None, None]
    assert channel_kl(s + offset, t - offset).item() == pytest.approx(channel_kl(s, t).item(), rel=1e-4)


def test_defaults_follow_the_released_configs_and_train_the_student():
    images, targets = make_batch(n=2, size=64, empty_last=False)
    student, teacher = tiny("retinanet_r18", 3), tiny("retinanet_r50", 3)
    cwd = build_distillers(["cwd"], {}, student, teacher)["cwd"]
    assert list(cwd.connectors) == [f.name for f in student.feature_info] and cwd.cfg.level_weight == 10.0
    assert not list(cwd.parameters())
    teacher.eval().requires_grad_(False)
    batch, tg = student.preprocess(images, targets)
    s_out = student(batch, tg)
    with torch.no_grad():
        t_out = teacher(batch, None)
    loss = cwd(s_out, t_out, tg, 0)["kd_feat"]
    loss.backward()
    expected = 10.0 * sum(channel_kl(s_out.features[k], t_out.features[k]) for k in cwd.connectors)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    narrow = build_distillers(["cwd"], {}, tiny("frcnn_r18", 3, fpn_channels=16), tiny("frcnn_r50", 3))["cwd"]
    assert all(isinstance(c.net, torch.nn.Sequential) for c in narrow.connectors.values())
    with pytest.raises(ConfigError, match="tau"):
        build_distillers(["cwd"], {"cwd": {"tau": 0.0}}, tiny("frcnn_r18", 3), tiny("frcnn_r50", 3))
