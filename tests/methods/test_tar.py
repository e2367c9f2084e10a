"""TAR (task adaptive regularization): Gaussian masks, the regression gate, the decay, and zero terms when the
student equals the teacher, on hand-made tensors and tiny detectors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detkd.config import from_dict
from detkd.distillation import DistillModel, build_distillers
from detkd.errors import ConfigError
from detkd.methods.tar import TARConfig, gaussian_masks, pairwise_iou, regression_gate
from detkd.models.outputs import DetOutputs, RoIOutputs, TwoStageHead
from tests.conftest import make_batch, tiny

# ------------------------------------------------------------------------------------------------ Gaussian mask


def test_mask_is_one_at_the_centre_and_exp_minus_two_at_the_edges():
    # Stride 4; the box spans cells 1.5 .. 9.5 on both axes (8 cells), centred on cell 5's centre (5.5).
    box = torch.tensor([[1.5, 1.5, 9.5, 9.5]]) * 4
    m = gaussian_masks([box], (12, 12), stride=4, beta=0.25)[0]
    assert m[5, 5] == pytest.approx(1.0)
    for y, x in [(5, 1), (5, 9), (1, 5), (9, 5)]:  # the cell centres on the four edges
        assert m[y, x] == pytest.approx(math.exp(-2), rel=1e-5)
    assert m[1, 1] == pytest.approx(math.exp(-4), rel=1e-5)  # a corner: both axes at the edge
    assert m[5, 11] > 0  # not truncated outside the box
    assert m.max() == pytest.approx(1.0)


def test_mask_sigma_follows_beta_and_each_axis():
    # A wide, flat box: sigma_x = beta*w, sigma_y = beta*h separately.
    box = torch.tensor([[0.5, 4.5, 16.5, 8.5]])  # w = 16, h = 4 cells, centre (8.5, 6.5), stride 1
    m = gaussian_masks([box], (12, 18), stride=1, beta=0.5)[0]
    assert m[6, 12] == pytest.approx(math.exp(-(4**2) / (2 * 8.0**2)), rel=1e-5)
    assert m[8, 8] == pytest.approx(math.exp(-(2**2) / (2 * 2.0**2)), rel=1e-5)


def test_mask_takes_the_max_over_boxes_and_is_zero_without_boxes():
    a = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    b = torch.tensor([[4.0, 4.0, 16.0, 16.0]])
    ma = gaussian_masks([a], (16, 16), 1, 0.25)[0]
    mb = gaussian_masks([b], (16, 16), 1, 0.25)[0]
    both = gaussian_masks([torch.cat([a, b]), torch.zeros(0, 4)], (16, 16), 1, 0.25)
    assert torch.allclose(both[0], torch.maximum(ma, mb))
    assert both[1].abs().sum() == 0


def test_zero_size_box_is_finite():
    m = gaussian_masks([torch.tensor([[4.5, 4.5, 4.5, 4.5]])], (8, 8), 1, 0.25)
    assert torch.isfinite(m).all() and m.max() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- the gate


def test_gate_selects_exactly_the_rois_where_the_teacher_is_closer():
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]]).repeat(4, 1)
    rois = torch.tensor([[12.0, 12.0, 52.0, 52.0]]).repeat(4, 1)
    t_boxes = torch.tensor(
        [
            [10.0, 10.0, 50.0, 50.0],  # teacher perfect, student off: gated
            [20.0, 20.0, 60.0, 60.0],  # teacher off, student perfect: not gated
            [11.0, 11.0, 51.0, 51.0],  # both equally off: not gated (strictly closer only)
            [11.0, 10.0, 51.0, 50.0],  # teacher slightly better: gated
        ]
    )
    s_boxes = torch.tensor(
        [[15.0, 15.0, 55.0, 55.0], [10.0, 10.0, 50.0, 50.0], [9.0, 9.0, 49.0, 49.0], [12.0, 10.0, 52.0, 50.0]]
    )
    gated, t_iou = regression_gate(t_boxes, s_boxes, rois, gt, "student")
    assert gated.tolist() == [True, False, False, True]
    assert t_iou[0] == pytest.approx(1.0)
    # Against the proposal: RoI 1's teacher box (off by 10) is worse than the RoI (off by 2); RoI 2's is better.
    gated, _ = regression_gate(t_boxes, s_boxes, rois, gt, "proposal")
    assert gated.tolist() == [True, False, True, True]


def test_pairwise_iou():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert pairwise_iou(a, b).tolist() == pytest.approx([50 / 150, 0.0])


def two_stage_pair(same_weights: bool = False, **options):
    student = tiny("frcnn_r18")
    teacher = copy.deepcopy(student) if same_weights else tiny("frcnn_r34")
    return build_distillers(["tar"], {"tar": options} if options else {}, student, teacher)["tar"], student, teacher


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kd_reg_on_hand_made_rois_uses_only_gated_rois_and_teacher_deltas(tau):
    tar, student, teacher = two_stage_pair(gate="student", temperature=tau)
    coder = student.model.roi_heads.box_coder
    C1 = student.num_classes + 1
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    rois = torch.tensor([[12.0, 12.0, 52.0, 52.0], [8.0, 14.0, 48.0, 54.0], [12.0, 8.0, 44.0, 52.0], [0, 0, 5, 5]])
    labels = torch.tensor([2, 2, 2, 0])  # three positives of class 2, one background RoI
    perfect = coder.encode_single(gt.repeat(4, 1), rois)  # deltas that land exactly on the GT
    s_d = torch.zeros(4, C1, 4)
    t_d = torch.zeros(4, C1, 4)
    s_d[0, 2], t_d[0, 2] = 0.0, perfect[0]  # teacher perfect, student = the RoI: gated
    s_d[1, 2], t_d[1, 2] = perfect[1], 0.0  # student perfect: not gated
    s_d[2, 2], t_d[2, 2] = 0.5 * perfect[2], perfect[2]  # student halfway, teacher perfect: gated
    s_d[3], t_d[3] = 5.0, -5.0  # background: never distilled
    t_d[:, 1] = 3.0  # another class's deltas: ignored
    s_logits = torch.randn(4, C1, requires_grad=True)
    t_logits = torch.randn(4, C1)
    s_deltas = s_d.reshape(4, -1).requires_grad_()
    feats = {f.name: torch.zeros(1, f.channels, 64 // f.stride, 64 // f.stride) for f in student.feature_info}
    t_feats = {k: v.clone() for k, v in feats.items()}
    s_out = DetOutputs(
        features=feats,
        head=TwoStageHead(
            [],
            [],
            rois=[rois],
            roi_labels=[labels],
            roi_matched_gt=[gt.repeat(4, 1)],
            roi_logits=s_logits,
            roi_deltas=s_deltas,
        ),
        image_sizes=[(64, 64)],
    )
    t_out = DetOutputs(features=t_feats, on_student_rois=RoIOutputs(t_logits, t_d.reshape(4, -1)))
    targets = [{"boxes": gt, "labels": torch.tensor([2])}]
    terms = tar(s_out, t_out, targets, step=0)

    assert tar.stats["positive_rois"] == 3
    assert tar.stats["gate_pass"] == pytest.approx(2 / 3)
    pos = [0, 1, 2]
    expected_reg = sum(F.smooth_l1_loss(s_d[i, 2], t_d[i, 2], reduction="sum", beta=1 / 9) for i in (0, 2)) / len(pos)
    assert float(terms["kd_reg"].detach()) == pytest.approx(float(expected_reg), rel=1e-5)
    p_t = F.softmax(t_logits[pos] / tau, -1)
    log_p_s = F.log_softmax(s_logits[pos].detach() / tau, -1)
    expected_cls = tau**2 * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    assert float(terms["kd_cls"].detach()) == pytest.approx(float(expected_cls), rel=1e-5)
    assert float(terms["kd_feat"].detach()) == 0.0
    # The gradient of kd_reg reaches exactly the gated RoIs' GT-class deltas.
    terms["kd_reg"].backward()
    grad = s_deltas.grad.reshape(4, C1, 4)
    assert grad[0, 2].abs().sum() > 0 and grad[2, 2].abs().sum() > 0
    assert grad[1].abs().sum() == 0 and grad[3].abs().sum() == 0 and grad[:, 1].abs().sum() == 0


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="gate"):
        two_stage_pair(gate="teacher")
    with pytest.raises(ConfigError, match="beta"):
        two_stage_pair(beta=0.0)


# ------------------------------------------------------------------------------------------------------- decay


def test_default_decay_is_linear_per_epoch_start_middle_end():
    schedule = TARConfig().schedule
    assert (schedule.decay, schedule.decay_unit) == ("linear", "epoch")
    total, per_epoch = 120, 10  # 12 epochs: r(t) = 1 - (t-1)/12 for epoch t = 1..12
    assert schedule.factor(0, total, per_epoch) == pytest.approx(1.0)
    assert schedule.factor(9, total, per_epoch) == pytest.approx(1.0)  # constant within the first epoch
    assert schedule.factor(60, total, per_epoch) == pytest.approx(0.5)  # epoch 7 of 12
    assert schedule.factor(119, total, per_epoch) == pytest.approx(1 / 12)  # last epoch


def test_iteration_decay_start_middle_end():
    schedule = from_dict(TARConfig, {"schedule": {"decay_unit": "iter"}}).schedule
    assert schedule.decay == "linear"  # a partial override keeps TAR's other schedule defaults
    assert schedule.factor(0, 100, 10) == pytest.approx(1.0)
    assert schedule.factor(50, 100, 10) == pytest.approx(0.5)
    assert schedule.factor(99, 100, 10) == pytest.approx(0.01)


def test_decay_applies_to_every_term_unless_exempt():
    student = tiny("frcnn_r18")
    teacher = tiny("frcnn_r34")
    options = {"tar": {"schedule": {"exempt": ["kd_feat"]}}}
    distillers = build_distillers(["tar"], options, student, teacher)
    assert distillers["tar"].cfg.schedule.decay == "linear"
    model = DistillModel(student, teacher, distillers, total_iters=100, iters_per_epoch=10)
    model.train()
    images, targets = make_batch(n=2, empty_last=False)
    losses, stats = model(images, targets, step=50)
    assert stats["tar.schedule"] == pytest.approx(0.5)
    for term in ("kd_cls", "kd_reg", "kd_feat"):
        raw = stats[f"raw.tar.{term}"]
        expected = raw if term == "kd_feat" else 0.5 * raw
        assert float(losses[f"tar.{term}"].detach()) == pytest.approx(expected, rel=1e-5, abs=1e-8)


# ------------------------------------------------------------------------------------------- detector-level


def equal_pair(kind: str):
    name = {"two_stage": "frcnn_r18", "one_stage": "retinanet_r18"}[kind]
    student = tiny(name)
    teacher = copy.deepcopy(student)
    model = DistillModel(
        student, teacher, build_distillers(["tar"], {}, student, teacher), total_iters=100, iters_per_epoch=10
    )
    model.train()
    for m in model.student.modules():  # identical features need BatchNorm in inference mode on both sides
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


@pytest.mark.parametrize("kind", ["two_stage", "one_stage"])
def test_all_terms_zero_when_student_equals_teacher(kind):
    model = equal_pair(kind)
    images, targets = make_batch(n=2, empty_last=False)
    losses, stats = model(images, targets, step=0)
    terms = {k: v for k, v in losses.items() if k.startswith("tar.")}
    expected = {"tar.kd_feat", "tar.kd_cls"} | ({"tar.kd_reg"} if kind == "two_stage" else set())
    assert set(terms) == expected
    for key, value in ((k, v.detach()) for k, v in terms.items()):
        assert abs(float(value)) < 1e-5, f"{key} = {float(value)} although student == teacher"
    assert stats["tar.mask_sum"] > 0
    if kind == "two_stage":
        assert stats["tar.positive_rois"] > 0  # the zero is not for want of positives
        assert stats["tar.gate_pass"] == 0.0


def test_terms_positive_for_a_different_teacher():
    tar, student, teacher = two_stage_pair()
    model = DistillModel(student, teacher, {"tar": tar}, total_iters=100, iters_per_epoch=10)
    model.train()
    images, targets = make_batch(n=2, empty_last=True)
    losses, stats = model(images, targets, step=0)
    assert losses["tar.kd_feat"].item() > 0 and losses["tar.kd_cls"].item() > 0
    assert 0.0 <= stats["tar.gate_pass"] <= 1.0
    assert 0.0 < stats["tar.mask_coverage"] < 1.0


@pytest.mark.parametrize("kind", ["two_stage", "one_stage"])
def test_visualize_returns_pictures(kind):
    name = {"two_stage": "frcnn_r18", "one_stage": "retinanet_r18"}[kind]
    student, teacher = tiny(name), tiny(name.replace("r18", "r34"))
    model = DistillModel(
        student, teacher, build_distillers(["tar"], {}, student, teacher), total_iters=100, iters_per_epoch=10
    )
    model.train()
    images, targets = make_batch(n=2, empty_last=False)
    batch, targets = student.preprocess(images, targets)
    t_out = model.run_teacher(batch)
    s_out = student(batch, targets)
    model.share_rois(s_out, t_out)
    tar = model.distillers["tar"]
    pictures = tar.visualize(images[0], s_out, t_out, targets)
    expected = {"gaussian_mask", "gated_rois"} if kind == "two_stage" else {"gaussian_mask"}
    assert set(pictures) == expected
    for pic in pictures.values():
        assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3 and min(pic.shape[:2]) >= 384
