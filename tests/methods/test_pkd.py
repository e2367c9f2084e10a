"""PKD: the loss is one minus the Pearson correlation of each channel, blind to the teacher's scale and offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detkd.distillation import build_distillers
from detkd.errors import ConfigError
from detkd.methods.pkd import pearson_loss
from detkd.models.outputs import DetOutputs
from tests.conftest import make_batch, tiny


def test_the_loss_is_one_minus_the_pearson_correlation_of_each_channel():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g)
    t = 0.5 * s + torch.randn(2, 3, 4, 5, generator=g)
    n = 2 * 4 * 5
    # Independent: numpy's correlation of each channel's N*H*W values.
    r = [np.corrcoef(s[:, c].flatten().numpy(), t[:, c].flatten().numpy())[0, 1] for c in range(3)]
    expected = np.mean([(n - 1) / n * (1 - rc) for rc in r])  # unbiased std: sum of squares n - 1
    assert pearson_loss(s, t).item() == pytest.approx(expected, rel=1e-4)
    assert pearson_loss(s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_the_teachers_scale_and_offset_per_channel_do_not_matter():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    scale = torch.tensor([0.1, 1.0, 50.0, 7.0])[None, :, None, None]
    offset = torch.tensor([5.0, -3.0, 0.0, 100.0])[None, :, None, None]
    assert pearson_loss(s, t * scale + offset).item() == pytest.approx(pearson_loss(s, t).item(), rel=1e-4)


def test_maps_of_different_sizes_compare_at_the_smaller():
    t = torch.randn(1, 2, 4, 4)
    s = torch.nn.functional.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)
    small = torch.nn.functional.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False)
    assert pearson_loss(s, t).item() == pytest.approx(pearson_loss(small, t).item(), abs=1e-6)


def test_defaults_follow_the_released_configs_and_gradients_reach_only_the_student():
    images, targets = make_batch(n=2, size=64, empty_last=False)
    for name, levels, weight in (
        ("frcnn_r18", ["p2", "p3", "p4", "p5"], 6.0),
        ("retinanet_r18", ["p3", "p4", "p5", "p6"], 10.0),
    ):
        student, teacher = tiny(name, 3), tiny(name.replace("r18", "r50"), 3)
        pkd = build_distillers(["pkd"], {}, student, teacher)["pkd"]
        assert list(pkd.connectors) == levels and pkd.level_weight == weight
        assert not list(pkd.parameters())  # equal FPN widths: nothing to learn but the student
        teacher.eval().requires_grad_(False)
        batch, tg = student.preprocess(images, targets)
        s_out = student(batch, tg)
        with torch.no_grad():
            t_out: DetOutputs = teacher(batch, None)
        loss = pkd(s_out, t_out, tg, 0)["kd_feat"]
        loss.backward()
        assert loss.item() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    narrow = build_distillers(["pkd"], {}, tiny("frcnn_r18", 3, fpn_channels=16), tiny("frcnn_r50", 3))["pkd"]
    assert all(isinstance(c.net, torch.nn.Sequential) for c in narrow.connectors.values())  # 1x1 convs to 32+ ch
    with pytest.raises(ConfigError, match="num_levels"):
        build_distillers(["pkd"], {"pkd": {"num_levels": 0}}, tiny("frcnn_r18", 3), tiny("frcnn_r50", 3))
