from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detkd.distillation import DistillModel, build_distillers
from detkd.errors import ConfigError
from detkd.methods.ida import (
    band_cells,
    band_mask,
    candidate_boxes,
    code_discrepancy,
    entropy_loss,
    keep_count,
    mahalanobis_discrepancy,
    pair_entropy_loss,
    select_regions,
    select_top,
)
from tests.conftest import make_batch, tiny

# ---- pure tensors -------------------------------------------------------------------------------------------------


def test_candidate_boxes_threshold_nms_and_top_up():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [40, 40, 50, 50.0]])
    scores = torch.tensor([0.9, 0.95, 0.86, 0.5])
    kept, passed = candidate_boxes(boxes, scores, 0.85, 0.1, min_keep=0)
    assert passed == 2 and torch.equal(kept, boxes[[1, 2]])  # box 0 suppressed by box 1; box 3 below threshold
    kept, passed = candidate_boxes(boxes, scores, 0.99, 0.1, min_keep=2)
    assert passed == 0 and torch.equal(kept, boxes[[1, 2]])  # none passes: the 2 best NMS survivors
    kept, _ = candidate_boxes(boxes, scores, 0.99, 0.1, min_keep=0)
    assert len(kept) == 0
    kept, _ = candidate_boxes(boxes[:0], scores[:0], 0.85, 0.1, min_keep=2)
    assert kept.shape == (0, 4)


@pytest.mark.parametrize("gamma", [0.6, 0.25, 1.0])
def test_selection_keeps_exactly_round_gamma_n(gamma):
    scores = [torch.rand(n) for n in range(12)]
    for s, idx in zip(scores, select_top(scores, gamma)):
        assert len(idx) == round(gamma * len(s)) == keep_count(len(s), gamma)
        if len(idx):
            assert set(idx.tolist()) == set(s.argsort(descending=True)[: len(idx)].tolist())


def test_discrepancies_known_values():
    # softmax([0, log 3]) = [1/4, 3/4]: mean 1/2, unbiased var 1/8 -> d = 2; softmax([0, log 7]) -> d = 8/9.
    t = torch.tensor([[[0.0, math.log(3)]]])
    s = torch.tensor([[[0.0, math.log(7)]]])
    assert code_discrepancy(t, s).item() == pytest.approx(abs(2 - 8 / 9) / 2, rel=1e-5)
    # z = 2 * softmax: [0.5, 1.5] and [0.25, 1.75]; mean sq diff 1/16; pooled var (1/4 + 9/16) / 2.
    assert mahalanobis_discrepancy(t, s).item() == pytest.approx((1 / 16) / ((1 / 4 + 9 / 16) / 2), rel=1e-5)
    x = torch.randn(3, 4, 9)
    assert torch.allclose(code_discrepancy(x, x), torch.zeros(3))
    assert torch.allclose(mahalanobis_discrepancy(x, x), torch.zeros(3))
    assert (mahalanobis_discrepancy(x, torch.randn(3, 4, 9)) <= 4 * 4).all()  # at most 4 per channel


def _hand_made_maps():
    """Teacher and student equal except cells [0:4, 0:4] (image pixels 0..16), where the student is sharper."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 4, 16, 16, generator=g)
    s = t.clone()
    s[:, :, 0:4, 0:4] *= 4
    boxes = torch.tensor(
        [
            [32, 32, 48, 48],  # untouched region: discrepancy 0
            [0, 0, 16, 16],  # exactly the changed region
            [40, 0, 56, 16],  # untouched
            [8, 8, 24, 24],  # partly over the changed region
            [0, 40, 16, 56.0],  # untouched
        ]
    )
    return t, s, boxes


@pytest.mark.parametrize("discrepancy", ["code", "mahalanobis"])
def test_selection_keeps_the_most_discrepant_regions(discrepancy):
    t, s, boxes = _hand_made_maps()
    chosen = select_regions(t, s, [boxes], stride=4, gamma=0.4, discrepancy=discrepancy)
    assert sorted(chosen.indices[0].tolist()) == [1, 3]
    # Box mask: cells whose centre is inside a kept box: [0:4]^2 and [2:6]^2 overlap in [2:4]^2.
    expected = torch.zeros(16, 16)
    expected[0:4, 0:4] = 1
    expected[2:6, 2:6] = 1
    assert torch.equal(chosen.mask[0], expected)
    assert torch.allclose(chosen.cells[0], boxes[chosen.indices[0]] / 4)


def test_band_geometry_reproduces_the_official_mask():
    # The image is 32 high and 64 wide inside a padded 64x64 batch; the map is 16x16.
    box = torch.tensor([[16.0, 4.0, 48.0, 12.0]])
    cells = band_cells(box, (32, 64), (16, 16))
    # rows from x (/64 * 16): 4..12; columns from y (/32 * 16): 2..6.
    assert cells.tolist() == [[2.0, 4.0, 6.0, 12.0]]
    mask = band_mask([cells], (16, 16))[0]
    rows = mask.any(1)
    assert rows.tolist() == [2 <= r < 12 for r in range(16)]
    assert bool((mask.sum(1)[rows] == 16).all())  # full-width bands
    t, s, boxes = _hand_made_maps()
    chosen = select_regions(t, s, [boxes], 4, 0.4, geometry="band", image_sizes=[(64, 64)])
    assert len(chosen.indices[0]) == 2 and bool((chosen.mask[0].sum(1) % 16 == 0).all())


def test_entropy_loss_zero_when_features_match_and_sigma_fixed():
    t = torch.randn(2, 3, 5, 5)
    mask = (torch.rand(2, 5, 5) > 0.5).float()
    assert entropy_loss(t, t.clone(), mask, torch.tensor(1.0)).item() == 0.0
    assert entropy_loss(t, t + 1, torch.zeros(2, 5, 5), torch.tensor(2.0)).item() == 0.0  # empty mask: 0


def test_entropy_loss_known_value():
    t = torch.zeros(1, 2, 2, 2)
    s = t.clone()
    s[0, :, 0, 0] = 1.0  # d^2 = 1 in the masked cell, both channels
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, 0] = 1
    # sum M d^2 = 2 over |M| = 2 elements -> 1; (1 + 1/4); log term 1e-3 * log 4 * numel 8 / |M| 2.
    expected = 1.25 + 1e-3 * math.log(4) * 4
    assert entropy_loss(t, s, mask, torch.tensor(2.0)).item() == pytest.approx(expected, rel=1e-6)
    masked = entropy_loss(t, s, mask, torch.tensor(2.0), log_norm="masked").item()
    assert masked == pytest.approx(1.25 + 1e-3 * math.log(4), rel=1e-6)


def test_pair_entropy_loss():
    t = torch.randn(3, 2, 9)
    assert pair_entropy_loss(t, t.clone()).item() == 0.0
    assert pair_entropy_loss(t[:0], t[:0]).item() == 0.0
    # t = [1, -1], s = t / 2: Cov = E[st] - E[s]E[t] = 1/2; d^2 = 1/4 -> mean d^2 (1 + 1/Cov) = 3/4.
    t = torch.tensor([[[1.0, -1.0]]])
    assert pair_entropy_loss(t, t / 2).item() == pytest.approx(0.75, rel=1e-6)


# ---- the distiller --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    student = tiny("frcnn_bireal18", binary_neck=True)
    teacher = tiny("frcnn_r18")
    return student, teacher


def _model(pair, **options):
    student, teacher = pair
    distillers = build_distillers(["ida"], {"ida": options}, student, teacher)
    model = DistillModel(student, teacher, distillers, total_iters=10)
    model.train()
    return model


def test_binary_student_step_with_stats(pair):
    model = _model(pair, score_thresh=1.0)  # nothing passes: each model gives its min_keep = 2 best boxes
    images, targets = make_batch(n=2, empty_last=True)
    losses, stats = model(images, targets)
    assert torch.isfinite(losses["ida.kd_feat"]) and losses["ida.kd_feat"].item() > 0
    assert stats["ida.candidates_teacher"] == 2 and stats["ida.candidates_student"] == 2
    assert stats["ida.below_thresh"] == 4
    for level in ("p2", "p3", "p4", "p5", "p6"):
        assert stats[f"ida.selected_{level}"] == keep_count(4, 0.6) == 2
    assert stats["ida.sigma"] == 1.0
    losses["ida.kd_feat"].backward()
    assert model.distillers["ida"].sigma.grad is not None
    student = model.student
    assert student.model.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "options",
    [
        {"discrepancy": "mahalanobis", "covariance": "per_pair"},
        {"geometry": "band", "adapter_init": "code", "log_norm": "masked"},
    ],
)
def test_options_run(pair, options):
    model = _model(pair, **options)
    images, targets = make_batch(n=2)
    losses, stats = model(images, targets)
    assert torch.isfinite(losses["ida.kd_feat"]) and losses["ida.kd_feat"].item() != 0.0
    losses["ida.kd_feat"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.distillers["ida"].parameters())


def test_nothing_confident_nothing_distilled_without_min_keep(pair):
    """The official code's behaviour (``min_keep: 0``): no proposal above the threshold, an empty mask, loss 0."""
    model = _model(pair, min_keep=0, score_thresh=1.0)
    images, targets = make_batch(n=2)
    losses, stats = model(images, targets)
    assert stats["ida.candidates_teacher"] == stats["ida.candidates_student"] == 0
    assert losses["ida.kd_feat"].item() == 0.0 and stats["ida.selected_p2"] == 0


def test_bad_option_is_a_config_error(pair):
    with pytest.raises(ConfigError, match="geometry"):
        _model(pair, geometry="circle")


def test_visualize(pair):
    model = _model(pair)
    student, teacher = pair
    images, targets = make_batch(n=2)
    batch, targets = student.preprocess(images, targets)
    with torch.no_grad():
        s_out = student(batch, targets)
        t_out = model.run_teacher(batch)
    pictures = model.distillers["ida"].visualize(images[0], s_out, t_out, targets)
    picture = pictures["ida_selection"]
    assert isinstance(picture, np.ndarray) and picture.dtype == np.uint8 and picture.ndim == 3
