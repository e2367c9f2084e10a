"""GKD options of the official recipe: the strict density cut, fp32 selection, the uncapped per-class sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from detkd.methods.gkd import GKD, GKDConfig, select_prototypes
from tests.conftest import tiny


def official_candidates(s: torch.Tensor, t: torch.Tensor, width: float = 0.1, quantile: float = 0.4) -> set[int]:
    """The official density filter, written out: strictly above the value at sorted index floor(0.4 N)."""
    out = []
    for x in (F.normalize(s.double(), dim=1), F.normalize(t.double(), dim=1)):
        dens = torch.exp(-(((1 - x @ x.T) / width) ** 2)).sum(1)
        out.append(dens > dens.sort().values[int(quantile * len(x))])
    return set((out[0] & out[1]).nonzero()[:, 0].tolist())


def test_strict_cut_picks_only_official_candidates():
    g = torch.Generator().manual_seed(3)
    centre = torch.randn(1, 8, generator=g)
    s = centre + 0.3 * torch.randn(40, 8, generator=g)
    t = centre[:, :6] + 0.3 * torch.randn(40, 6, generator=g)
    allowed = official_candidates(s, t)
    assert 0 < len(allowed) < 40
    strict = select_prototypes(s, t, num=40, alpha=10.0, strict=True)
    assert set(strict.tolist()) <= allowed
    # With 40 rounds the ">=" cut also picks its extra candidates at the quantile itself.
    loose = select_prototypes(s, t, num=40, alpha=10.0)
    assert not set(loose.tolist()) <= allowed


def test_strict_cut_on_ties_leaves_no_prototype():
    tied_s, tied_t = torch.ones(5, 4), torch.ones(5, 3)
    assert len(select_prototypes(tied_s, tied_t, num=10, alpha=10.0, strict=True)) == 0
    assert len(select_prototypes(tied_s, tied_t, num=10, alpha=10.0)) == 1


def test_selection_runs_in_fp32_whatever_the_input_precision():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(30, 8, generator=g), torch.randn(30, 6, generator=g)
    half = select_prototypes(s.half().float(), t.half().float(), num=10, alpha=10.0)
    assert torch.equal(select_prototypes(s.half(), t.half(), num=10, alpha=10.0), half)


def test_uncapped_sample_takes_every_qualifying_image_and_box():
    class Many(torch.utils.data.Dataset):
        classes = ["a", "b", "c"]

        def __len__(self):
            return 30

        def __getitem__(self, i):
            labels = [1, 1] + ([3] if i % 3 == 0 else [])
            boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * len(labels))
            return torch.zeros(3, 16, 16), {"boxes": boxes, "labels": torch.tensor(labels)}

    student, teacher = tiny("frcnn_r18"), tiny("frcnn_r18")
    cfg = GKDConfig(max_images=None, max_images_per_class=800, max_instances_per_class=None)
    sample = GKD(cfg, student, teacher)._draw_sample(Many(), (0, 0))
    assert sample.images == list(range(30))
    assert int((sample.labels == 1).sum()) == 60 and int((sample.labels == 3).sum()) == 10
