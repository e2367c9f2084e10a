"""GKD: prototype selection, robust weights and losses on hand-made tensors; the PGM and RDM on tiny detectors."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detkd.distillation import DistillModel, share_rois
from detkd.methods.base import RunContext
from detkd.methods.gkd import (
    GKD,
    GKDConfig,
    assign_levels,
    box_means,
    decoupled_feature_loss,
    density,
    joint_matching_pursuit,
    prototype_relation_loss,
    robust_weights,
    select_prototypes,
)
from tests.conftest import make_batch, tiny

# ---------------------------------------------------------------------------------------------------------------
# Pure tensors.


def test_box_means_equal_slice_averages():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 9, 11, generator=g) + 5.0
    boxes = [torch.tensor([[0.0, 0.0, 7.9, 3.0], [10.0, 12.0, 21.0, 35.0]]), torch.tensor([[4.0, 8.0, 43.0, 35.9]])]
    got = box_means(feat, boxes, stride=4)
    expected = []
    for i, bs in enumerate(boxes):
        for x0, y0, x1, y1 in bs.tolist():
            rows = slice(int(y0 // 4), int(y1 // 4) + 1)
            cols = slice(int(x0 // 4), int(x1 // 4) + 1)
            expected.append(feat[i, :, rows, cols].mean((1, 2)))
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


def test_box_means_of_degenerate_boxes_are_finite_with_finite_gradients():
    feat = torch.randn(1, 4, 5, 5, requires_grad=True)
    boxes = [
        torch.tensor(
            [
                [8.0, 8.0, 8.0, 8.0],  # zero size: the cell holding it
                [12.0, 12.0, 4.0, 4.0],  # x2 < x1
                [-30.0, -30.0, -10.0, -10.0],  # left of and above the map
                [100.0, 100.0, 200.0, 200.0],  # beyond the map
                [float("nan"), 0.0, 4.0, 4.0],
            ]
        )
    ]
    out = box_means(feat, boxes, stride=4)
    assert out.shape == (5, 4) and torch.isfinite(out).all()
    assert torch.allclose(out[0], feat[0, :, 2, 2], atol=1e-6)  # (8, 8) lies in cell (2, 2)
    assert torch.allclose(out[3], feat[0, :, 4, 4], atol=1e-6)  # clamped to the last cell
    out.sum().backward()
    assert torch.isfinite(feat.grad).all()
    assert box_means(feat, [torch.zeros(0, 4)], stride=4).shape == (0, 4)


def test_assign_levels_follows_the_roi_level_rule():
    # sqrt((w+1)(h+1)) = 9, 56, 112, 224, 1000 -> floor(log2(s / 56)) = -3, 0, 1, 2, 4 -> clamped to [0, 3]
    boxes = torch.tensor([[0, 0, 8, 8], [0, 0, 55, 55], [0, 0, 111, 111], [0, 0, 223, 223], [0, 0, 999, 999.0]])
    assert assign_levels(boxes, 56.0, 4).tolist() == [0, 0, 1, 2, 3]
    assert assign_levels(torch.tensor([[5.0, 5.0, 1.0, 1.0]]), 56.0, 4).tolist() == [0]  # degenerate: finest


def test_density_known_values():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    far = math.exp(-((1 / 0.1) ** 2))
    assert torch.allclose(density(x, 0.1, chunk=2), torch.tensor([2 + far, 2 + far, 1 + 2 * far]))


def explicit_energy(a_k, b_k, res_a, res_b, w_a, w_b, alpha):
    """The matching-pursuit objective with every tensor materialised."""
    return (
        (a_k[None] * w_a[:, None] - res_a).pow(2).sum()
        + (b_k[None] * w_b[:, None] - res_b).pow(2).sum()
        + alpha * (w_a - w_b).pow(2).sum()
    )


def test_matching_pursuit_closed_form_minimises_the_objective():
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    b = F.normalize(torch.randn(6, 7, generator=g), dim=1)
    alpha = 3.0
    energies = []
    for k in range(6):
        u_a, u_b = a @ a[k], b @ b[k]
        w_a = (alpha * (u_a + u_b) + u_a) / (1 + 2 * alpha)
        w_b = (alpha * (u_a + u_b) + u_b) / (1 + 2 * alpha)
        best = explicit_energy(a[k], b[k], a, b, w_a, w_b, alpha)
        for _ in range(5):  # any other coefficients do worse
            da, db = 0.05 * torch.randn(6, generator=g), 0.05 * torch.randn(6, generator=g)
            assert explicit_energy(a[k], b[k], a, b, w_a + da, w_b + db, alpha) > best
        energies.append(float(best))
    picks = joint_matching_pursuit(a, b, torch.arange(6), 1, alpha, chunk=4)  # chunks of 4 and 2 candidates
    assert picks == [int(np.argmin(energies))]


def planted_atoms(seed: int, clusters: int = 4, per: int = 12, noise: float = 0.25):
    """Clusters around shared atoms: instance ``planted[k]`` is atom ``k`` itself in both spaces."""
    g = torch.Generator().manual_seed(seed)
    atoms_s = F.normalize(torch.randn(clusters, 32, generator=g), dim=1)
    atoms_t = F.normalize(torch.randn(clusters, 40, generator=g), dim=1)
    s, t, planted = [], [], []
    for k in range(clusters):
        planted.append(len(s))
        s.append(atoms_s[k])
        t.append(atoms_t[k])
        for _ in range(per):
            s.append(atoms_s[k] + noise * torch.randn(32, generator=g) / 32**0.5)
            t.append(atoms_t[k] + noise * torch.randn(40, generator=g) / 40**0.5)
    # Raw vectors of any scale: selection normalises them.
    return torch.stack(s) * 3.0, torch.stack(t) * 0.5, planted, atoms_s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_pursuit_recovers_planted_shared_atoms(seed):
    s, t, planted, _ = planted_atoms(seed)
    picks = select_prototypes(s, t, num=4, alpha=10.0)
    assert sorted(picks.tolist()) == planted


def test_matching_pursuit_needs_the_instance_in_both_spaces():
    s, t, planted, atoms_s = planted_atoms(0)
    # A decoy equal to atom 0 in the student space but unrelated in the teacher space.
    decoy = len(s)
    s = torch.cat([s, atoms_s[:1]])
    t = torch.cat([t, F.normalize(torch.randn(1, 40, generator=torch.Generator().manual_seed(9)), dim=1)])
    a, b = F.normalize(s, dim=1), F.normalize(t, dim=1)
    picks = joint_matching_pursuit(a, b, torch.arange(len(s)), 4, alpha=10.0)
    assert decoy not in picks and sorted(picks) == planted


def test_select_prototypes_small_and_tied_inputs():
    one = select_prototypes(torch.ones(1, 4), torch.ones(1, 3), num=10, alpha=10.0)
    assert one.tolist() == [0]
    tied = select_prototypes(torch.ones(5, 4), torch.ones(5, 3), num=10, alpha=10.0)  # every density equal
    assert len(tied) == 1  # picked again and again, kept once
    assert len(select_prototypes(torch.zeros(0, 4), torch.zeros(0, 3), num=10, alpha=10.0)) == 0


def test_robust_weight_known_values():
    s_protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t_protos = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, -1.0]])
    proto_labels = torch.tensor([1, 1, 2])
    s_vecs = torch.tensor([[5.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # best student cosines: 1, 1, 1
    t_vecs = torch.tensor([[1.0, 0.0], [0.5, 3**0.5 / 2], [0.0, 1.0]])  # best teacher cosines: 1, cos 30 deg, -0.7
    r = robust_weights(s_vecs, t_vecs, s_protos, t_protos, proto_labels, torch.tensor([1, 1, 5]))
    # Class 5 has no prototype: trusted (r = 1).
    assert torch.allclose(r, torch.tensor([1.0, 1 - (1 - 3**0.5 / 2), 1.0]), atol=1e-6)
    far = robust_weights(s_vecs[:1], -s_vecs[:1], s_protos, t_protos, proto_labels, torch.tensor([1]))
    assert float(far) == 0.0  # 1 - |1 - (-1)| = -1, clamped


def test_robust_weight_is_one_for_identical_features_and_prototypes():
    g = torch.Generator().manual_seed(3)
    vecs, protos = torch.randn(7, 16, generator=g), torch.randn(5, 16, generator=g)
    labels, proto_labels = torch.tensor([1, 1, 2, 2, 3, 3, 3]), torch.tensor([1, 2, 2, 3, 3])
    r = robust_weights(vecs, vecs.clone(), protos, protos.clone(), proto_labels, labels)
    assert torch.equal(r, torch.ones(7))
    none = robust_weights(vecs, -vecs, protos[:0], protos[:0], proto_labels[:0], labels)
    assert torch.equal(none, torch.ones(7))


def test_decoupled_feature_loss_known_values():
    s = torch.zeros(1, 2, 2, 2)
    t = torch.zeros(1, 2, 2, 2)
    t[0, :, 0, 0] = 1.0  # squared error 2 (summed over channels) at cell (0, 0)
    t[0, :, 1, 1] = 2.0  # 8 at cell (1, 1)
    mask = torch.tensor([[[0.5, 0.0], [0.0, 0.0]]])
    fg, bg = decoupled_feature_loss(s, t, mask)
    assert float(fg) == pytest.approx(0.5 * 2 / max(1.0, 2 * 2 * 0.5))
    assert float(bg) == pytest.approx(8 / (2 * 2 * 3))
    zero_fg, _ = decoupled_feature_loss(s, t, torch.zeros(1, 2, 2))
    assert float(zero_fg) == 0.0


def test_prototype_relation_loss_known_value():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0]])
    r = torch.tensor([0.5])
    # cosines [1, 0] vs [0, 1], times 0.5: differences 0.5 -> smooth L1 0.5 * 0.25 = 0.125 each
    loss = prototype_relation_loss(s, t, protos, protos, r)
    assert float(loss.detach()) == pytest.approx(0.125)
    loss.backward()
    assert s.grad.abs().sum() > 0
    assert float(prototype_relation_loss(t, t, protos, protos, r)) == 0.0
    assert float(prototype_relation_loss(s, t, protos[:0], protos[:0], r).detach()) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The method on tiny detectors.


class TinyData(torch.utils.data.Dataset):
    """Four 64-px images; class 2 never appears, one box is a 1-px sliver (below ``min_box``), one image is empty."""

    classes = ["a", "b", "c"]

    def __init__(self):
        self.images, self.targets = make_batch(n=4, empty_last=True, seed=5)
        self.targets[1] = dict(self.targets[1], boxes=torch.tensor([[4.0, 6.0, 30.0, 28.0], [40.0, 10.0, 41.0, 50.0]]))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def context() -> RunContext:
    return RunContext(TinyData(), torch.device("cpu"), 2, 10, 100, None)


def set_bn_eval(detector, frozen: bool) -> None:
    """Eval-mode BatchNorm gives the student exactly the (eval-mode) teacher's features; train mode does not."""
    detector.train()
    for m in detector.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train(not frozen)


def outputs(student, teacher, images, targets, teacher_head=False):
    """Training outputs of both detectors on one batch, as DistillModel produces them."""
    batch, resized = student.preprocess(images, targets)
    with torch.no_grad():
        t_out = teacher(batch, None) if teacher_head else teacher.run_teacher(batch)
    s_out = student(batch, resized)
    share_rois(teacher, s_out, t_out)  # a no-op unless the student is two-stage, as in DistillModel
    return s_out, t_out, resized


def run(gkd, s_out, t_out, targets, step=50):
    gkd.stats = {}
    return gkd(s_out, t_out, targets, step), dict(gkd.stats)


def with_prototypes_of(source, **options):
    gkd = GKD(GKDConfig(**options), source.student, source.teacher)
    gkd.prototypes = source.prototypes
    return gkd


@pytest.fixture(scope="module")
def frcnn():
    """A tiny Faster R-CNN, an identical teacher, and a GKD (global loss on) whose PGM ran on TinyData."""
    student = tiny("frcnn_r18")
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    teacher.run_teacher = DistillModel(student, teacher).run_teacher
    set_bn_eval(student, frozen=True)
    gkd = GKD(GKDConfig(global_loss=True), student, teacher)
    gkd.on_epoch_start(0, context())
    return student, teacher, gkd


def test_r_is_one_when_student_and_teacher_are_the_same(frcnn):
    student, teacher, gkd = frcnn
    counts = gkd.prototype_counts()
    assert set(counts) == {"p2", "p3", "p4", "p5", "p6"}
    assert all(set(per) == {1, 3} for per in counts.values())  # class 2 is empty; the 1-px sliver is dropped
    set_bn_eval(student, frozen=True)
    terms, stats = run(gkd, *outputs(student, teacher, *make_batch(n=2, empty_last=False)))
    for level in counts:
        assert stats[f"r_{level}"] == pytest.approx(1.0)
    assert stats["r_cls"] == pytest.approx(1.0) and stats["positives"] > 0
    for key in ("kd_feat_fg", "kd_feat_bg", "kd_global", "kd_cls"):
        assert abs(float(terms[key].detach())) < 1e-5, key


def test_global_loss_switch_prototype_fallback_and_gradient(frcnn):
    student, teacher, on = frcnn
    set_bn_eval(student, frozen=False)  # now the student's features differ from the teacher's
    student.zero_grad(set_to_none=True)
    s_out, t_out, targets = outputs(student, teacher, *make_batch(n=2, empty_last=False))
    terms, stats = run(on, s_out, t_out, targets)
    assert float(terms["kd_global"].detach()) > 0 and stats["r_p2"] < 1.0
    off_terms, _ = run(with_prototypes_of(on), s_out, t_out, targets)
    assert "kd_global" not in off_terms
    assert float(off_terms["kd_feat_fg"].detach()) == pytest.approx(float(terms["kd_feat_fg"].detach()))
    # No prototypes: every instance is trusted and the global loss has nothing to compare.
    bare_terms, bare_stats = run(
        GKD(GKDConfig(global_loss=True, regen_every=0), student, teacher), s_out, t_out, targets
    )
    assert all(bare_stats[f"r_p{i}"] == 1.0 for i in range(2, 7)) and float(bare_terms["kd_global"].detach()) == 0.0
    terms["kd_global"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_empty_class_and_degenerate_boxes_give_finite_terms(frcnn):
    student, teacher, gkd = frcnn
    set_bn_eval(student, frozen=False)
    student.zero_grad(set_to_none=True)
    images, targets = make_batch(n=2, empty_last=True)
    # Class 2 has no prototype; a zero-size box and a box beyond the image. torchvision adds the ground truth to
    # the RoIs, so these reach GKD as positive RoIs.
    targets[0] = {
        "boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0], [20.0, 20.0, 20.0, 20.0], [50.0, 50.0, 90.0, 90.0]]),
        "labels": torch.tensor([2, 1, 3]),
        "image_id": 0,
    }
    terms, stats = run(gkd, *outputs(student, teacher, images, targets))
    assert all(torch.isfinite(v) for v in terms.values())
    assert all(math.isfinite(v) for v in stats.values()) and stats["instances"] >= 3
    sum(terms.values()).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    grads += [p.grad for p in gkd.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_attenuation_is_the_epoch_schedule_without_the_soft_labels():
    schedule = GKDConfig().schedule
    assert schedule.factor(step=90, total_iters=100, iters_per_epoch=10) == pytest.approx(0.1)  # a_e = 1 - 9/10
    assert schedule.factor(step=9, total_iters=100, iters_per_epoch=10) == 1.0
    assert schedule.exempt == ["kd_cls"]


def test_pgm_caches_teacher_regenerates_on_schedule_and_logs_its_time(frcnn, caplog):
    student, teacher, _ = frcnn
    gkd = GKD(GKDConfig(regen_every=2), student, teacher)
    calls = []
    original = teacher.extract
    teacher.extract = lambda batch: calls.append(1) or original(batch)
    ctx = context()
    set_bn_eval(student, frozen=False)
    try:
        with caplog.at_level(logging.INFO, logger="detkd"):
            gkd.on_epoch_start(0, ctx)
            teacher_passes = len(calls)
            first = gkd.prototypes
            gkd.on_epoch_start(1, ctx)  # not a regeneration epoch
            assert gkd.prototypes is first
            gkd.on_epoch_start(2, ctx)
    finally:
        del teacher.extract
    assert teacher_passes == 2  # 3 images in batches of 2
    assert len(calls) == teacher_passes  # the second regeneration used the cached teacher vectors
    assert gkd.prototypes is not first
    messages = [r.getMessage() for r in caplog.records if "prototypes for epoch" in r.getMessage()]
    assert len(messages) == 2 and "teacher pooled" in messages[0] and "teacher cached" in messages[1]
    assert student.training and all(m.training for m in student.modules())  # each module's mode restored
    gkd.stats = {}
    gkd.stats.update(gkd._pgm_stats)
    assert gkd.stats["pgm_time_s"] > 0 and gkd.stats["pgm_instances"] == 5 and gkd.stats["protos_p2"] >= 2


def test_sample_is_balanced_bounded_and_seeded(frcnn):
    class Many(torch.utils.data.Dataset):
        classes = ["a", "b", "c"]

        def __len__(self):
            return 30

        def __getitem__(self, i):
            # Class 1 in every image, class 3 in every third image, class 2 in image 29 only.
            labels = [1] + ([3] if i % 3 == 0 else []) + ([2] if i == 29 else [])
            boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * len(labels))
            return torch.zeros(3, 16, 16), {"boxes": boxes, "labels": torch.tensor(labels)}

    student, teacher, _ = frcnn
    gkd = GKD(GKDConfig(max_images=6, max_images_per_class=3, max_instances_per_class=4), student, teacher)
    sample = gkd._draw_sample(Many(), (0, 0))
    assert len(sample.images) <= 6
    assert 29 in sample.images  # the rare class is drawn despite the common one
    assert (sample.labels == 3).sum() >= 2
    assert (sample.labels == 1).sum() <= 4  # instance cap
    again = gkd._draw_sample(Many(), (0, 0))
    assert sample.images == again.images and torch.equal(sample.labels, again.labels)


def test_prototype_picture(frcnn):
    student, teacher, gkd = frcnn
    assert GKD(GKDConfig(), student, teacher).visualize(torch.rand(3, 64, 64), None, None, []) == {}
    pictures = gkd.visualize(torch.rand(3, 64, 64), None, None, [])
    assert set(pictures) == {f"prototypes_p{i}" for i in range(2, 7)}
    for picture in pictures.values():
        assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
        assert picture.shape[0] >= 2 * gkd.cfg.crop_size * 2  # a row per class (1 and 3)


def test_retinanet_with_ground_truth_or_anchor_instances():
    student = tiny("retinanet_r18")
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    set_bn_eval(student, frozen=True)
    by_gt = GKD(GKDConfig(global_loss=True), student, teacher)
    by_gt.on_epoch_start(0, context())
    assert by_gt.prototypes["p3"].labels.numel() > 0
    by_anchor = with_prototypes_of(by_gt, one_stage_instances="anchors", global_loss=True)
    s_out, t_out, targets = outputs(student, teacher, *make_batch(n=2, empty_last=True), teacher_head=True)
    for gkd, instances in ((by_gt, "gt"), (by_anchor, "anchors")):
        terms, stats = run(gkd, s_out, t_out, targets)
        assert all(torch.isfinite(v) for v in terms.values())
        positives = int(sum((m >= 0).sum() for m in s_out.head.matched_idxs))
        assert stats["positives"] == positives > 0
        assert stats["instances"] == (2 if instances == "gt" else positives)  # image 0 has 2 boxes
        assert stats["r_p3"] == pytest.approx(1.0) and stats["r_cls"] == pytest.approx(1.0)
        assert abs(float(terms["kd_cls"].detach())) < 1e-6
