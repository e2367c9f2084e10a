"""LGD: descriptors, masks, the per-image attention, phases, parameter groups and the exported student."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.config import OptimConfig
from detkd.distillation import DistillModel, build_distillers
from detkd.engine.launch import build_optimizer
from detkd.methods.base import RunContext
from detkd.methods.lgd import (
    LGDConfig,
    cell_masks,
    instance_norm_mse,
    label_descriptors,
    lgd_phases,
    same_image_mask,
)
from tests.conftest import make_batch, tiny

TOTAL = 90  # with the default fractions: backbone frozen for steps 0-9, adapter only for 0-14


def build(name: str = "retinanet_r18", options: dict | None = None, **kw) -> DistillModel:
    student = tiny(name, **kw)
    distillers = build_distillers(["lgd"], {"lgd": options or {}}, student, None)
    model = DistillModel(student, None, distillers, total_iters=TOTAL)
    model.train()
    model.distillers["lgd"].on_epoch_start(0, RunContext(None, torch.device("cpu"), 2, 10, TOTAL, None))
    return model


# ----------------------------------------------------------------------------------------------- pure tensors


def test_label_descriptors_known_values():
    boxes = [torch.tensor([[0.0, 16.0, 32.0, 80.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)]
    desc, clamped, image, is_ctx = label_descriptors(boxes, labels, 3, (64, 128), context=True)
    # y2 = 80 is clamped to H - 1 = 63, then everything is divided by the padded size (W 128, H 64).
    expected_box = torch.tensor([0.0, 16 / 64, 32 / 128, 63 / 64]) * 2 - 1
    assert torch.allclose(desc[0], torch.cat([expected_box, torch.tensor([-1.0, 1.0, -1.0])]))
    # Context rows: the whole padded image (clamped), class part all -1; the empty image keeps its context.
    ctx = torch.cat([torch.tensor([0.0, 0.0, 127 / 128, 63 / 64]) * 2 - 1, torch.full((3,), -1.0)])
    assert torch.allclose(desc[1], ctx) and torch.allclose(desc[2], ctx)
    assert image.tolist() == [0, 0, 1] and is_ctx.tolist() == [False, True, True]
    assert clamped[0].tolist() == [0.0, 16.0, 32.0, 63.0]
    # Per-image normalisation (the documented alternative).
    desc_img, *_ = label_descriptors(boxes[:1], labels[:1], 3, (64, 128), False, image_sizes=[(64, 64)])
    assert torch.allclose(desc_img[0, :4], torch.tensor([0.0, 16 / 64, 32 / 64, 63 / 64]) * 2 - 1)
    desc0, *_ = label_descriptors([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)], 3, (64, 64), False)
    assert desc0.shape == (0, 7)


def test_cell_masks_use_integer_cells_and_padded_size():
    # Padded batch 64x64, level 8x8 (stride 8). Box (0, 0, 8, 8) -> (0, 0, 1, 1) in cells: centre 0.5, half 0.5,
    # so with integer indices (no +0.5) cells 0 and 1 are inside on both axes.
    m = cell_masks(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), (64, 64), (8, 8))
    expected = torch.zeros(1, 8, 8)
    expected[0, :2, :2] = 1
    assert torch.equal(m, expected)
    # A 16x24 box at x 16..40, y 8..24 -> cells x 2..5 (centre 3.5, half 1.5 -> 2, 3, 4, 5), y 1..3 (centre 2, half 1).
    m = cell_masks(torch.tensor([[16.0, 8.0, 40.0, 24.0]]), (64, 64), (8, 8))
    assert torch.nonzero(m[0].any(1)).flatten().tolist() == [1, 2, 3]
    assert torch.nonzero(m[0].any(0)).flatten().tolist() == [2, 3, 4, 5]
    # Scaling uses the padded size: a non-square batch scales x and y differently.
    m = cell_masks(torch.tensor([[0.0, 0.0, 16.0, 16.0]]), (32, 64), (4, 4))  # x /16, y /8 -> (0,0,1,2)
    assert torch.nonzero(m[0].any(1)).flatten().tolist() == [0, 1, 2]
    assert torch.nonzero(m[0].any(0)).flatten().tolist() == [0, 1]
    # Zero-size boxes cover nothing (the official |c - i| / size <= 0.5 is false for them).
    assert cell_masks(torch.tensor([[8.0, 8.0, 8.0, 20.0]]), (64, 64), (8, 8)).sum() == 0


def test_same_image_mask():
    mask = same_image_mask(torch.tensor([0, 0, 1, 2, 2]))
    assert mask.tolist() == [
        [False, False, True, True, True],
        [False, False, True, True, True],
        [True, True, False, True, True],
        [True, True, True, False, False],
        [True, True, True, False, False],
    ]


def test_instance_norm_mse_known_values():
    t = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2)
    assert float(instance_norm_mse([t], [t * 3 + 5])) < 1e-8  # invariant to scale and shift
    # IN(t) = +-0.5 / sqrt(0.25 + 1e-5); IN(-t) is its negation, so every squared difference is 1 / (0.25 + 1e-5).
    assert math.isclose(float(instance_norm_mse([t], [-t])), 1 / (0.25 + 1e-5), rel_tol=1e-5)
    # Levels are concatenated: the mean is over all elements, not a mean of per-level means.
    big = torch.zeros(1, 1, 4, 4)
    mixed = float(instance_norm_mse([t, big], [-t, big]))
    assert math.isclose(mixed, 4 / (0.25 + 1e-5) / 20, rel_tol=1e-5)
    # A 1x1 map normalises to 0 on both sides instead of raising.
    assert float(instance_norm_mse([torch.ones(2, 3, 1, 1)], [torch.randn(2, 3, 1, 1)])) == 0.0


def test_phases_are_fractions_of_the_run():
    cfg = LGDConfig()
    assert lgd_phases(0, 180, cfg) == (True, False)
    assert lgd_phases(19, 180, cfg) == (True, False)
    assert lgd_phases(20, 180, cfg) == (False, False)
    assert lgd_phases(30, 180, cfg) == (False, True)
    assert lgd_phases(179, 180, cfg) == (False, True)
    late = LGDConfig(late_stop_frac=50 / 180)
    assert lgd_phases(129, 180, late) == (False, True) and lgd_phases(130, 180, late) == (False, False)
    assert lgd_phases(0, None, cfg) == (False, True)  # run length unknown: no phase


# -------------------------------------------------------------------------------------------------- modules


def test_attention_never_mixes_images():
    model = build()
    lgd = model.distillers["lgd"]
    images, targets = make_batch(n=2, empty_last=False)
    batch, targets = model.student.preprocess(images, targets)
    out = model.student(batch, targets)
    maps, _ = lgd.label_teacher(out.features, targets, out.batch_shape, out.image_sizes)
    # Other labels and other pixels in image 1 leave image 0's teacher maps unchanged ...
    other = [dict(t) for t in targets]
    other[1] = {**other[1], "boxes": other[1]["boxes"][:1] * 0.5, "labels": torch.tensor([2])}
    features = {k: torch.cat([v[:1], torch.randn_like(v[1:])]) for k, v in out.features.items()}
    maps2, _ = lgd.label_teacher(features, other, out.batch_shape, out.image_sizes)
    for level in maps:
        assert torch.allclose(maps[level][0], maps2[level][0], atol=1e-5), level
        assert not torch.allclose(maps[level][1], maps2[level][1], atol=1e-5), level
    # ... and no gradient flows from image 0's maps into image 1's features.
    features = {k: v.detach().requires_grad_(True) for k, v in out.features.items()}
    maps, _ = lgd.label_teacher(features, targets, out.batch_shape, out.image_sizes)
    # Random weights: a plain sum of a group-normalised map is constant, so it would have no gradient at all.
    sum((m[0] * torch.randn_like(m[0])).sum() for m in maps.values()).backward()
    assert all(f.grad[1].abs().sum() == 0 for f in features.values())
    assert any(f.grad[0].abs().sum() > 0 for f in features.values())
    pictures = lgd.visualize(images[0], out, None, targets)
    assert [p.shape[-1] for p in pictures.values()] == [3]


@pytest.mark.parametrize("context_box", [True, False])
def test_images_without_boxes(context_box):
    model = build(options={"context_box": context_box})
    images, targets = make_batch(n=2, empty_last=True)
    losses, stats = model(images, targets, step=TOTAL // 2)
    assert stats["lgd.objects"] == 2.0
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    targets = [targets[1], targets[1]]  # no box in the batch at all
    losses, stats = model(images, targets, step=TOTAL // 2)
    assert stats["lgd.objects"] == 0.0
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_sizes_come_from_the_detector():
    model = build("frcnn_r18", num_classes=5, fpn_channels=32)
    teacher = model.distillers["lgd"].label_teacher
    assert teacher.label_encoder.local.in_features == 4 + 5
    assert teacher.attention.embed_dim == 32
    assert not teacher.context_box and teacher.detach_appearance  # the official two-stage settings
    images, targets = make_batch(n=2, empty_last=True)
    targets[0]["labels"] = torch.tensor([1, 5])
    losses, stats = model(images, targets, step=TOTAL // 2)
    assert all(torch.isfinite(v) for v in losses.values())
    assert {"lgd.teacher_det.loss_rpn_cls", "lgd.teacher_det.loss_cls"} <= set(stats)


def test_fcos_and_slim_label_encoder():
    model = build("fcos_r18", options={"stn": False, "encoder_dims": [32, 32, 64], "heads": 4})
    images, targets = make_batch(n=2, empty_last=True)
    losses, stats = model(images, targets, step=TOTAL // 2)
    assert set(k for k in losses if k.startswith("lgd.")) == {"lgd.loss_teacher_det", "lgd.kd_feat"}
    assert "lgd.teacher_det.loss_ctrness" in stats
    sum(losses.values()).backward()


def test_gradient_routing_by_phase():
    model = build()
    lgd = model.distillers["lgd"]
    images, targets = make_batch(n=2, empty_last=True)
    fpn = list(model.student.model.backbone.fpn.parameters())
    for step, distilled in ((5, False), (TOTAL // 2, True)):
        model.zero_grad()
        losses, stats = model(images, targets, step=step)
        assert stats["lgd.phase.distilled"] == float(distilled)
        losses["lgd.kd_feat"].backward()
        # The teacher learns only from its detection loss, never from the distillation term.
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lgd.label_teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lgd.adapter.parameters())
        reached = any(p.grad is not None and p.grad.abs().sum() > 0 for p in fpn)
        assert reached == distilled, step


def test_backbone_frozen_by_dropping_its_gradients():
    model = build()
    lgd = model.distillers["lgd"]
    body = list(model.student.model.backbone.body.parameters())
    fpn = list(model.student.model.backbone.fpn.parameters())
    images, targets = make_batch(n=2, empty_last=True)
    for step, frozen in ((0, True), (TOTAL // 2, False)):
        model.zero_grad()
        losses, stats = model(images, targets, step=step)
        assert stats["lgd.phase.frozen"] == float(frozen)
        sum(losses.values()).backward()
        lgd.before_optimizer_step(step)
        assert all(p.grad is None for p in body) == frozen
        assert all(p.grad is not None for p in fpn)


def test_teacher_modules_have_their_own_param_group():
    model = build(options={"teacher_lr_scale": 0.5, "teacher_weight_decay": 0.0})
    lgd = model.distillers["lgd"]
    opt = build_optimizer(OptimConfig(lr=0.02), model)
    own = {id(p) for p in lgd.label_teacher.parameters()}
    groups = [g for g in opt.param_groups if {id(p) for p in g["params"]} == own]
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(0.01) and groups[0]["weight_decay"] == 0.0
    # The adapter is trained with the student, in the default groups.
    default = {id(p) for g in opt.param_groups if g is not groups[0] for p in g["params"]}
    assert {id(p) for p in lgd.adapter.parameters()} <= default


def test_exported_student_has_no_lgd_parameters_and_predicts_the_same(tmp_path):
    from detkd.engine.checkpoint import load_detector, save_student

    model = build()
    opt = torch.optim.SGD(model.trainable_module.parameters(), lr=0.01)
    images, targets = make_batch(n=2, empty_last=True)
    losses, _ = model(images, targets, step=TOTAL // 2)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    state = model.student.state_dict()
    fresh = tiny("retinanet_r18").state_dict()
    assert set(state) == set(fresh)
    assert not any("label_teacher" in k or "adapter" in k for k in state)
    assert any(k.startswith("distillers.lgd.label_teacher.") for k in model.trainable_module.state_dict())

    save_student(tmp_path / "student.pt", model.student, ["a", "b", "c"])
    loaded, _ = load_detector(tmp_path / "student.pt")
    assert not any("label_teacher" in k for k in loaded.state_dict())
    # Untrained scores sit below the default threshold; keep every candidate so the comparison has content.
    model.student.model.score_thresh = loaded.model.score_thresh = 0.0
    before = model.student.predict(images)
    after = loaded.predict(images)
    assert model.student.training  # predict restores the training mode
    for a, b in zip(before, after):
        assert len(a["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key]), key
