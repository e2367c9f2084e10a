"""Hand-made cases with known values for the baselines and the shared pieces."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.methods.connectors import Connector, build_connectors, pair_levels
from detkd.methods.defeat import split_mean
from detkd.methods.fgfi import imitation_masks
from detkd.methods.kd import dense_soft_count
from detkd.methods.losses import bernoulli_kl, box_masks, masked_mse, softmax_kl
from detkd.models.outputs import DenseHead, DetOutputs, FeatureSpec


def test_softmax_kl_known_value_and_zero():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # p_t = (0.75, 0.25), p_s = (0.5, 0.5)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert softmax_kl(s, t).item() == pytest.approx(expected, abs=1e-6)
    # Temperature: logits divided by T, result scaled by T^2.
    assert softmax_kl(2 * s, 2 * t, temperature=2.0).item() == pytest.approx(4 * expected, abs=1e-6)
    x = torch.randn(5, 7)
    assert softmax_kl(x, x).abs().max() < 1e-6


def test_bernoulli_kl_known_value_and_zero():
    s = torch.tensor([[math.log(3.0)]])  # q = 0.75
    t = torch.tensor([[0.0]])  # p = 0.5
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert bernoulli_kl(s, t).item() == pytest.approx(expected, abs=1e-6)
    x = torch.randn(2, 9, 4) * 10  # saturated logits stay finite and exactly zero when equal
    assert bernoulli_kl(x, x).abs().max() < 1e-5
    assert torch.isfinite(bernoulli_kl(x, -x)).all()


def test_box_masks_cell_centres_and_small_boxes():
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 4.0]]), torch.tensor([[13.0, 13.0, 14.0, 14.0]]), torch.zeros(0, 4)]
    m = box_masks(boxes, (4, 4), stride=4)
    # Box 1 covers cell centres x in {2, 6}, y in {2}: cells (0,0) and (0,1).
    assert m[0].nonzero().tolist() == [[0, 0], [0, 1]]
    # A 1-pixel box covers no centre; the cell holding its centre is still marked.
    assert m[1].nonzero().tolist() == [[3, 3]]
    assert m[2].sum() == 0
    painted = box_masks(
        [torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 16.0, 16.0]])], (4, 4), 4, values=[torch.tensor([0.3, 0.8])]
    )
    assert painted[0, 1, 1] == pytest.approx(0.8)  # overlap keeps the max
    assert painted[0, 0, 0] == pytest.approx(0.3)


def test_masked_mse():
    diff2 = torch.ones(1, 3, 2, 2)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert masked_mse(diff2, mask).item() == pytest.approx(3.0)  # summed over channels, one cell
    assert masked_mse(diff2, torch.zeros(1, 2, 2)).item() == 0.0


def test_connectors_pairing_identity_start_and_resize():
    s = [FeatureSpec("p3", 32, 8), FeatureSpec("p4", 32, 16)]
    t = [FeatureSpec("p4", 64, 16), FeatureSpec("p5", 64, 32)]
    assert [(a.name, b.name) for a, b in pair_levels(s, t)] == [("p4", "p4")]
    with pytest.raises(Exception, match=r"student has p3\[32ch, stride 8\]"):
        pair_levels(s, t, ["p3"])
    conns = build_connectors(s, t)
    out = conns["p4"](torch.randn(2, 32, 5, 5), (10, 10))
    assert out.shape == (2, 64, 10, 10)
    same = Connector(FeatureSpec("p3", 8, 8), FeatureSpec("p3", 8, 8), kernel=3)
    x = torch.randn(1, 8, 6, 6)
    assert torch.allclose(same(x), x, atol=1e-6)


def test_fgfi_masks_hand_case():
    # One level, 2x2 cells, one anchor per cell; anchors are 4x4 boxes at the four cells.
    anchors = {"p3": torch.tensor([[0.0, 0, 4, 4], [4, 0, 8, 4], [0, 4, 4, 8], [4, 4, 8, 8]])}
    gt = [torch.tensor([[0.0, 0.0, 6.0, 4.0]])]
    # IoUs: 16/24, 8/32, 0, 0 -> max 2/3; psi=0.5 keeps > 1/3 (first only), psi=0.3 keeps > 0.2 (first two).
    m = imitation_masks(anchors, {"p3": (2, 2)}, gt, psi=0.5)
    assert m["p3"][0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    m = imitation_masks(anchors, {"p3": (2, 2)}, gt, psi=0.3)
    assert m["p3"][0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    empty = imitation_masks(anchors, {"p3": (2, 2)}, [torch.zeros(0, 4)], psi=0.5)
    assert empty["p3"].sum() == 0


def test_defeat_split_mean():
    values = torch.tensor([1.0, 2.0, 3.0, 6.0])
    pos, neg = split_mean(values, torch.tensor([True, False, False, True]))
    assert pos.item() == pytest.approx(3.5) and neg.item() == pytest.approx(2.5)
    pos, neg = split_mean(values, torch.zeros(4, dtype=torch.bool))
    assert pos.item() == 0.0 and neg.item() == pytest.approx(3.0)


def test_dense_soft_count():
    logits = torch.full((1, 10, 3), -100.0)
    logits[0, 2, 1] = 100.0
    logits[0, 5, 0] = 100.0
    assert dense_soft_count(logits).item() == pytest.approx(2.0)
    assert dense_soft_count(torch.full((1, 4, 2), -100.0)).item() == 1.0  # never below 1


def _fake_pair(name: str):
    from tests.conftest import tiny

    return tiny(name), tiny(name)


def test_fitnet_known_value():
    from detkd.methods.fitnet import FitNet, FitNetConfig

    student, teacher = _fake_pair("retinanet_r18")
    fitnet = FitNet(FitNetConfig(), student, teacher)
    t_feats = {f.name: torch.randn(2, f.channels, 4, 4) for f in teacher.feature_info}
    s_feats = {k: v + 1.0 for k, v in t_feats.items()}  # identity adapter at start: error 1 per element
    out = fitnet(DetOutputs(s_feats), DetOutputs(t_feats), [], 0)
    assert out["kd_feat"].item() == pytest.approx(1.0, abs=1e-5)


def test_kd_dense_known_value():
    from detkd.methods.kd import KD, KDConfig

    student, teacher = _fake_pair("retinanet_r18")
    kd = KD(KDConfig(temperature=1.0), student, teacher)
    t_logits = torch.full((1, 4, 2), -30.0)
    t_logits[0, 0, 0] = 0.0  # teacher: one anchor with p = 0.5 in class 0, soft count = 0.5 -> clamped to 1
    s_logits = t_logits.clone()
    s_logits[0, 0, 0] = math.log(3.0)

    def dense(logits):
        return DetOutputs({}, DenseHead(logits, torch.zeros(1, 4, 4), [torch.zeros(4, 4)], [4]))

    out = kd(dense(s_logits), dense(t_logits), [], 0)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert out["kd_cls"].item() == pytest.approx(expected, abs=1e-5)
