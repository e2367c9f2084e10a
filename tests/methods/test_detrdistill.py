"""DETRDistill: hand-made cases for each part, and the wiring on tiny DETRs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from detkd.distillation import DistillModel, build_distillers
from detkd.errors import BuildError, ConfigError
from detkd.methods.detrdistill import (
    DEFAULT_WEIGHTS,
    info_nce,
    layer_pairs,
    masked_feature_loss,
    memory_maps,
    pos_neg_terms,
    quality_mask,
    select_queries,
    soft_all_terms,
    soft_bce_cost,
    soft_kl,
    soft_match,
)
from detkd.models.detr.criterion import num_boxes, set_losses
from detkd.models.detr.matcher import HungarianMatcher, image_wh, normalize_targets
from tests.conftest import make_batch, tiny


def random_predictions(seed: int, b: int = 2, n: int = 6, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, n, c, generator=g) * 2
    boxes = torch.cat([torch.rand(b, n, 2, generator=g) * 0.6 + 0.2, torch.rand(b, n, 2, generator=g) * 0.3 + 0.05], -1)
    return logits, boxes


def test_soft_kl_known_values_and_bce_cost():
    assert float(soft_kl(torch.zeros(1), torch.tensor([0.5]))) == pytest.approx(0.0, abs=1e-7)
    assert float(soft_kl(torch.zeros(1), torch.tensor([1.0]))) == pytest.approx(math.log(2), abs=1e-6)
    assert float(soft_kl(torch.tensor([math.log(3.0)]), torch.tensor([0.0]))) == pytest.approx(math.log(4), abs=1e-6)
    s, t = torch.randn(4, 3), torch.rand(5, 3)
    cost = soft_bce_cost(s, t)
    for i in range(4):
        for j in range(5):
            expected = F.binary_cross_entropy_with_logits(s[i], t[j], reduction="sum")
            assert float(cost[i, j]) == pytest.approx(float(expected), rel=1e-5)


def test_logits_distillation_is_zero_when_student_equals_teacher():
    logits, boxes = random_predictions(0)
    size = torch.tensor([[64.0, 48.0], [64.0, 48.0]])
    prob = logits.sigmoid()
    pairs = soft_match(logits, boxes, prob, boxes, size, [1.0, 5.0, 2.0])
    for s, t in pairs:
        assert torch.equal(s, t)  # each query finds itself
    terms = soft_all_terms(logits, boxes, prob, boxes, size, pairs)
    assert set(terms) == {"kd_ld_cls", "kd_ld_bbox", "kd_ld_giou"}
    for key, value in terms.items():
        assert abs(float(value)) < 1e-5, key


def test_soft_matching_recovers_a_permuted_teacher_and_counts_unmatched_as_background():
    logits, boxes = random_predictions(1, b=1, n=5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    size = torch.tensor([[50.0, 50.0]])
    ((s, t),) = soft_match(logits, boxes, logits[:, perm].sigmoid(), boxes[:, perm], size, [1.0, 5.0, 2.0])
    assert torch.equal(perm[t], s)
    # A student with two extra queries: its unmatched rows are pulled to background (probability 0).
    extra_logits = torch.cat([logits, torch.full((1, 2, 3), 2.0)], 1)
    extra_boxes = torch.cat([boxes, torch.full((1, 2, 4), 0.5)], 1)
    pairs = soft_match(extra_logits, extra_boxes, logits.sigmoid(), boxes, size, [1.0, 5.0, 2.0])
    terms = soft_all_terms(extra_logits, extra_boxes, logits.sigmoid(), boxes, size, pairs)
    expected_cls = 2 * 3 * F.softplus(torch.tensor(2.0)) / 7  # 2 rows x 3 classes of -log(1 - sigmoid(2)), / 7 rows
    assert float(terms["kd_ld_cls"]) == pytest.approx(float(expected_cls), rel=1e-4)
    assert float(terms["kd_ld_bbox"]) < 1e-6


def test_pos_neg_mode_uses_teacher_positives_as_pseudo_ground_truth():
    logits, boxes = random_predictions(2, b=1, n=6)
    size = torch.tensor([[64.0, 64.0]])
    prob = logits.sigmoid()
    t_assignment = [(torch.tensor([4, 1]), torch.tensor([0, 1]))]  # teacher queries 4 and 1 found the objects
    terms, pairs = pos_neg_terms(logits, boxes, prob, boxes, size, t_assignment, HungarianMatcher(), (5.0, 2.0))
    for key in ("kd_ld_bbox", "kd_ld_giou", "kd_ld_neg_bbox", "kd_ld_neg_giou"):
        assert abs(float(terms[key])) < 1e-5, key  # student == teacher: every box pair coincides
    ((s, t),) = pairs
    assert len(s) == 6 and torch.equal(s.sort().values, torch.arange(6))
    assert dict(zip(s.tolist(), t.tolist()))[4] == 4 and dict(zip(s.tolist(), t.tolist()))[1] == 1
    # Classification is the focal Hungarian loss against the teacher's argmax labels.
    pseudo = [{"labels": prob[0, [4, 1]].argmax(-1), "boxes": boxes[0, [4, 1]]}]
    focal, _, _ = set_losses(
        logits, boxes, pseudo, [(torch.tensor([4, 1]), torch.tensor([0, 1]))], size, torch.tensor(2.0)
    )
    assert float(terms["kd_ld_cls"]) == pytest.approx(float(focal), rel=1e-5)


def test_quality_mask_hand_made():
    feat = torch.zeros(1, 2, 1, 3)
    feat[0, :, 0, 0] = torch.tensor([1.0, 0.0])  # cell 0 aligned with the query
    feat[0, :, 0, 1] = torch.tensor([0.0, 1.0])  # cell 1 orthogonal
    feat[0, :, 0, 2] = torch.tensor([-1.0, 0.0])  # cell 2 opposite
    queries = torch.tensor([[[2.0, 0.0]]])
    mask = quality_mask(queries, feat, torch.tensor([[0.5]]), floor=0.01)
    # Sum = (0.5, 0, -0.5), floored at 0.01, divided by the max 0.5.
    assert torch.allclose(mask[0, 0], torch.tensor([1.0, 0.02, 0.02]))
    t_feat, s_feat = torch.ones(1, 2, 1, 3), torch.zeros(1, 2, 1, 3)
    assert float(masked_feature_loss(s_feat, t_feat, mask)) == pytest.approx((1 + 2 * 0.0004) / 3, rel=1e-5)
    valid = torch.tensor([[[True, False, False]]])
    assert float(masked_feature_loss(s_feat, t_feat, mask, valid)) == pytest.approx(1.0)


def test_select_queries_quality_is_score_times_iou():
    logits = torch.full((2, 3, 2), -10.0)
    logits[:, 1, 0] = 0.0  # query 1, class 0: score 0.5
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]]).expand(2, 3, 4)
    emb = torch.arange(2 * 3 * 4.0).view(2, 3, 4)
    targets = [{"boxes": torch.tensor([[20.0, 20.0, 60.0, 60.0]])}, {"boxes": torch.zeros(0, 4)}]
    queries, quality = select_queries(logits, emb, boxes, targets, torch.tensor([[100.0, 100.0]] * 2), k=1)
    assert torch.equal(queries[:, 0], emb[:, 1])
    # Query 1's box is (40, 40, 60, 60): IoU with (20, 20, 60, 60) = 400 / 1600.
    assert float(quality[0, 0]) == pytest.approx(0.5 * 0.25, rel=1e-5)
    assert float(quality[1, 0]) == pytest.approx(0.5, rel=1e-5)  # no ground truth: the score alone


def test_info_nce_prefers_the_diagonal():
    x = F.normalize(torch.eye(4), dim=-1)
    loss, acc = info_nce(x, x, temperature=0.07)
    assert float(acc) == 1.0 and float(loss) < 1e-5
    loss_shuffled, _ = info_nce(x, x[[1, 0, 3, 2]], temperature=0.07)
    assert float(loss_shuffled) > 10


def test_layer_pairs():
    assert layer_pairs(3, 6) == [(0, 3), (1, 4), (2, 5)]
    assert layer_pairs(3, 6, "first") == [(0, 0), (1, 1), (2, 2)]
    assert layer_pairs(4, 2) == [(2, 0), (3, 1)]
    assert layer_pairs(3, 3, explicit=[-1, 0, 2]) == [(1, 0), (2, 2)]
    with pytest.raises(ConfigError, match="one entry per student"):
        layer_pairs(3, 3, explicit=[0, 1])
    with pytest.raises(ConfigError, match="not a teacher layer"):
        layer_pairs(2, 3, explicit=[0, 3])
    with pytest.raises(ConfigError, match="layer_mapping"):
        layer_pairs(2, 3, "middle")


def build(student="deformable_detr_r18", teacher="deformable_detr_r34", options=None, teacher_depth=None, **kw):
    s = tiny(student, **kw)
    t = tiny(teacher)
    if teacher_depth is not None:
        t.transformer.decoder = t.transformer.decoder[:teacher_depth]
        t.transformer.num_layers = teacher_depth
    distillers = build_distillers(["detrdistill"], {"detrdistill": options or {}}, s, t)
    return DistillModel(s, t, distillers, total_iters=10, iters_per_epoch=10)


def test_query_prior_group_is_supervised_with_the_teachers_assignment():
    model = build(options={"use_ld": False, "use_fd": False, "use_query_contrast": False})
    model.eval()  # no dropout: the group can be recomputed exactly
    images, targets = make_batch(n=2, empty_last=True)
    batch, targets = model.student.preprocess(images, targets)
    t_out = model.run_teacher(batch)
    s_out = model.student(batch, targets)
    distiller = model.distillers["detrdistill"]
    terms = {k: v.detach() for k, v in distiller(s_out, t_out, targets, 0).items()}
    assert set(terms) == {"kd_ad_cls", "kd_ad_bbox", "kd_ad_giou"}
    sizes = image_wh(s_out.image_sizes)
    gt = normalize_targets(targets, s_out.image_sizes)
    group = model.student.decode(s_out.head.memory, t_out.head.query_embed)
    expected, differs = [0.0] * 3, False
    for ks, kt in distiller.pairs:
        logits, boxes = group["logits"][ks], group["boxes"][ks]
        t_assignment = model.teacher.match(t_out.head.logits[kt], t_out.head.boxes[kt], targets, s_out.image_sizes)
        own = model.student.match(logits, boxes, targets, s_out.image_sizes)
        assert len(t_assignment[0][0]) == 2 and len(t_assignment[1][0]) == 0
        differs |= not torch.equal(own[0][0], t_assignment[0][0])
        layer = set_losses(logits, boxes, gt, t_assignment, sizes, num_boxes(gt, sizes.device))
        expected = [a + b.detach() for a, b in zip(expected, layer)]
    for key, value in zip(("kd_ad_cls", "kd_ad_bbox", "kd_ad_giou"), expected):
        assert float(terms[key]) == pytest.approx(float(value), rel=1e-5), key
    # Matching the group afresh would have picked other queries: the teacher's assignment was used as it is.
    assert differs
    assert distiller.stats["teacher_positives"] == 2
    # FD's "memory" source: the encoder output cut back into levels, cell (y, x) of p4 is row start + y * W + x.
    maps = memory_maps(s_out, model.student)
    assert {k: v.shape for k, v in maps.items()} == {k: v.shape for k, v in s_out.features.items()}
    start, width = int(s_out.head.memory["level_start_index"][1]), maps["p4"].shape[-1]
    assert torch.equal(maps["p4"][1, :, 2, 3], s_out.head.memory["memory"][1, start + 2 * width + 3])


def test_same_detector_gives_zero_logits_and_feature_terms():
    student = tiny("deformable_detr_r18")
    teacher = copy.deepcopy(student)
    # Unclipped teacher boxes: with the default clipping, boxes that leave the image differ from the student's.
    distillers = build_distillers(["detrdistill"], {"detrdistill": {"clamp_teacher_boxes": False}}, student, teacher)
    model = DistillModel(student, teacher, distillers, total_iters=10, iters_per_epoch=10)
    model.eval()
    images, targets = make_batch(n=2, empty_last=True)
    batch, targets = student.preprocess(images, targets)
    s_out, t_out = student(batch, targets), model.run_teacher(batch)
    distiller = model.distillers["detrdistill"]
    terms = {k: v.detach() for k, v in distiller(s_out, t_out, targets, 0).items()}
    for key in ("kd_ld_cls", "kd_ld_bbox", "kd_ld_giou", "kd_feat"):
        assert abs(float(terms[key])) < 1e-5, key
    assert float(terms["kd_contrast"]) > 0  # the projection heads still have to learn
    picture = distiller.visualize(batch.tensors[0].clamp(0, 1), s_out, t_out, targets)["fd_mask"]
    assert picture.shape == (64, 64, 3) and picture.dtype.name == "uint8"


def test_heterogeneous_pairs_build_or_say_why():
    # A narrower student: FD gets 1x1 adapters, AD cannot take 128-wide teacher queries without a projection.
    with pytest.raises(BuildError, match="ad_projection"):
        build(fpn_channels=32)
    narrow = build(fpn_channels=32, options={"ad_projection": True})
    distiller = narrow.distillers["detrdistill"]
    assert isinstance(distiller.connectors["p3"].net[0], torch.nn.Conv2d)
    assert distiller.query_projection.in_features == 128 and distiller.query_projection.out_features == 64
    # A Conditional DETR teacher for a Deformable student: FD on the one shared level, AD through a projection.
    with pytest.raises(BuildError, match="conditional"):
        build(teacher="conditional_detr_r34")
    cross = build(teacher="conditional_detr_r34", options={"ad_projection": True})
    assert list(cross.distillers["detrdistill"].connectors) == ["p5"]
    for model in (narrow, cross):
        model.train()
        images, targets = make_batch(n=2)
        losses, _ = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        assert any(p.grad is not None for p in model.distillers["detrdistill"].query_projection.parameters())


def test_shallower_teacher_pos_neg_mode_and_weights():
    model = build(options={"mode": "pos_neg", "fd_source": "memory", "term_weights": {"kd_feat": 3.0}}, teacher_depth=2)
    distiller = model.distillers["detrdistill"]
    assert distiller.pairs == [(1, 0), (2, 1)]
    # A partial override keeps the other defaults; pos_neg's focal term defaults to 2.
    assert distiller.cfg.term_weights == dict(DEFAULT_WEIGHTS, kd_ld_cls=2.0, kd_feat=3.0)
    model.train()
    images, targets = make_batch(n=2, empty_last=True)
    losses, stats = model(images, targets)
    assert {"detrdistill.kd_ld_neg_bbox", "detrdistill.kd_ad_cls", "detrdistill.kd_contrast"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_options_are_checked():
    with pytest.raises(ConfigError, match="mode"):
        build(options={"mode": "hard"})
    with pytest.raises(ConfigError, match="fd_source"):
        build(options={"fd_source": "encoder"})
    with pytest.raises(ConfigError, match="ld_cost"):
        build(options={"ld_cost": [1.0, 5.0]})
    retinanet = tiny("retinanet_r18")
    with pytest.raises(BuildError, match="detr"):
        build_distillers(["detrdistill"], {}, retinanet, retinanet)
