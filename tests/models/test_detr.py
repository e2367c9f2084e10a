"""The pure-PyTorch DETR family: matcher, deformable attention, losses, the Detector contract, learning."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from detkd.models import build_detector, detector_names
from detkd.models.detr.criterion import set_losses
from detkd.models.detr.matcher import HungarianMatcher, focal_cost, normalize_targets, solve
from detkd.models.detr.ms_deform_attn import MSDeformAttn, ms_deform_attn_core
from detkd.models.detr.neck import sine_position
from tests.conftest import make_batch, tiny

DETRS = ["deformable_detr_r18", "deformable_detr_refine_r18", "conditional_detr_r18"]


def brute_force(cost: torch.Tensor) -> float:
    """Minimum total cost over every one-to-one assignment (rows >= columns)."""
    n, m = cost.shape
    return min(sum(float(cost[r, c]) for c, r in enumerate(rows)) for rows in itertools.permutations(range(n), m))


@pytest.mark.parametrize("seed", range(5))
def test_matcher_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 6, 4
    logits = torch.randn(1, n, k, generator=g) * 3
    boxes = torch.rand(1, n, 4, generator=g) * 0.5 + 0.25
    target = {"labels": torch.tensor([0, 2, 2]), "boxes": torch.rand(3, 4, generator=g) * 0.5 + 0.25}
    size = torch.tensor([[96.0, 64.0]])
    matcher = HungarianMatcher()
    ((pred, gt),) = matcher(logits, boxes, [target], size)
    cost = matcher.cost(logits[0], boxes[0], target["labels"], target["boxes"], size[0])
    assert sorted(gt.tolist()) == [0, 1, 2] and len(set(pred.tolist())) == 3
    assert float(cost[pred, gt].sum()) == pytest.approx(brute_force(cost), abs=1e-4)


def test_batched_matching_equals_per_image_matching():
    g = torch.Generator().manual_seed(7)
    logits, boxes = torch.randn(3, 8, 4, generator=g), torch.rand(3, 8, 4, generator=g) * 0.5 + 0.2
    sizes = torch.tensor([[64.0, 64.0], [96.0, 48.0], [50.0, 80.0]])
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.rand(2, 4, generator=g) * 0.5 + 0.2},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([0, 0, 2]), "boxes": torch.rand(3, 4, generator=g) * 0.5 + 0.2},
    ]
    matcher = HungarianMatcher()
    for i, (pred, gt) in enumerate(matcher(logits, boxes, targets, sizes)):
        t = targets[i]
        expected = solve(matcher.cost(logits[i], boxes[i], t["labels"], t["boxes"], sizes[i]))
        assert torch.equal(pred, expected[0]) and torch.equal(gt, expected[1])


def test_solve_survives_nan_and_inf_and_empty_problems():
    cost = torch.tensor([[float("nan"), 1.0], [2.0, float("inf")], [0.5, 3.0]])
    rows, cols = solve(cost)
    # The finite optimum avoids both non-finite entries: (row 2, col 0) = 0.5 and (row 0, col 1) = 1.
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 1), (2, 0)]
    assert solve(torch.zeros(0, 3))[0].numel() == 0
    matcher = HungarianMatcher()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    ((pred, gt),) = matcher(torch.full((1, 5, 3), float("nan")), torch.rand(1, 5, 4), [empty], torch.ones(1, 2))
    assert pred.numel() == 0 and gt.numel() == 0


def test_focal_cost_known_value():
    # p = 0.5: pos = 0.25 * 0.25 * log 2, neg = 0.75 * 0.25 * log 2.
    assert float(focal_cost(torch.zeros(1, 1))) == pytest.approx((0.0625 - 0.1875) * math.log(2), abs=1e-6)


def test_set_losses_known_values():
    logits = torch.full((1, 2, 2), -20.0)
    logits[0, 0, 1] = 20.0  # query 0 says class 1, confidently
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    assignment = [(torch.tensor([0]), torch.tensor([0]))]
    size = torch.tensor([[100.0, 100.0]])
    focal, l1, giou = set_losses(logits, boxes, targets, assignment, size, torch.tensor(1.0))
    assert float(focal) < 1e-6 and float(l1) == 0.0 and float(giou) == pytest.approx(0.0, abs=1e-6)
    # The other query: L1 = |0.3-0.5| * 2 + |0.1-0.2| * 2 = 0.6, divided by the normaliser 2.
    wrong = [(torch.tensor([1]), torch.tensor([0]))]
    focal, l1, _ = set_losses(logits, boxes, targets, wrong, size, torch.tensor(2.0))
    assert float(l1) == pytest.approx(0.3, abs=1e-6)
    assert float(focal) > 1.0  # query 0 now a confident false positive, query 1 a confident miss


def test_ms_deform_attn_core_matches_manual_bilinear_sampling():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    value = torch.randn(1, sum(h * w for h, w in shapes), 2, 3, generator=g)  # [B, S, heads, head_dim]
    locations = torch.rand(1, 1, 2, 2, 1, 2, generator=g)  # one query, one point per head and level
    weights = torch.tensor([0.3, 0.7, 0.6, 0.4]).view(1, 1, 2, 2, 1)
    out = ms_deform_attn_core(value, shapes, locations, weights).view(2, 3)
    expected = torch.zeros(2, 3)
    start = 0
    for level, (h, w) in enumerate(shapes):
        v = value[0, start : start + h * w].view(h, w, 2, 3)
        start += h * w
        for head in range(2):
            # align_corners=False: pixel centres at (i + 0.5) / size; zero outside.
            x = float(locations[0, 0, head, level, 0, 0]) * w - 0.5
            y = float(locations[0, 0, head, level, 0, 1]) * h - 0.5
            x0, y0 = math.floor(x), math.floor(y)
            sample = torch.zeros(3)
            for dy, dx in itertools.product((0, 1), (0, 1)):
                yy, xx = y0 + dy, x0 + dx
                if 0 <= yy < h and 0 <= xx < w:
                    sample += (1 - abs(x - xx)) * (1 - abs(y - yy)) * v[yy, xx, head]
            expected[head] += float(weights[0, 0, head, level, 0]) * sample
    assert torch.allclose(out, expected, atol=1e-5)


def test_ms_deform_attn_reads_the_reference_cell():
    """Zero offsets and one-hot weights on level 1: the output is that level's value at the reference cell."""
    attn = MSDeformAttn(dim=4, levels=2, heads=1, points=1)
    torch.nn.init.zeros_(attn.sampling_offsets.bias)
    for proj in (attn.value_proj, attn.output_proj):
        torch.nn.init.eye_(proj.weight)
    torch.nn.init.constant_(attn.attention_weights.bias, 0.0)
    attn.attention_weights.bias.data[1] = 50.0
    shapes = [(2, 2), (2, 2)]
    value = torch.randn(1, 8, 4)
    reference = torch.tensor([0.75, 0.25]).view(1, 1, 1, 2).expand(1, 1, 2, 2)  # cell (row 0, col 1)
    out = attn(torch.zeros(1, 1, 4), reference, value, shapes)
    assert torch.allclose(out[0, 0], value[0, 4 + 1], atol=1e-4)


def test_sine_position_depends_on_valid_extent_only():
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, :, 2:] = True  # the second image is 2 cells wide, the first 6
    pos = sine_position(mask, 8)
    assert pos.shape == (2, 8, 4, 6)
    # Cell centres at the same fraction of their image's width get the same x encoding: 1.5/6 = 0.5/2.
    assert torch.allclose(pos[0, 4:, :, 1], pos[1, 4:, :, 0], atol=1e-5)
    assert torch.allclose(pos[0, 4:, :, 4], pos[1, 4:, :, 1], atol=1e-5)
    assert torch.allclose(pos[0, :4, :, :2], pos[1, :4, :, :2])  # same height: same y encoding on image cells


def test_registered_names():
    names = detector_names()
    for name in DETRS + ["deformable_detr_r50", "conditional_detr_r101"]:
        assert name in names


@pytest.mark.parametrize("name", DETRS)
def test_detector_contract(name):
    model = tiny(name)
    images, targets = make_batch(n=2, empty_last=True)
    batch, targets = model.preprocess(images, targets)
    out = model(batch, targets)
    assert model.kind == "detr" and list(out.features) == [f.name for f in model.feature_info]
    for spec in model.feature_info:
        assert out.features[spec.name].shape[1] == spec.channels
        assert out.features[spec.name].shape[-1] == -(-batch.tensors.shape[-1] // spec.stride)
    head, layers, queries = out.head, model.num_layers, model.transformer.query_embed.num_embeddings
    assert head.logits.shape == (layers, 2, queries, 3)
    assert head.boxes.shape == (layers, 2, queries, 4) and 0 <= head.boxes.min() <= head.boxes.max() <= 1
    assert head.embeddings.shape == (layers, 2, queries, model.hidden_dim)
    assert head.query_embed.shape == (queries, model.query_dim)
    # Two GT boxes in image 0, none in image 1, matched at every layer.
    for assignment in head.assignments:
        assert len(assignment[0][0]) == 2 and len(assignment[1][0]) == 0
    assert set(out.losses) == {"loss_cls", "loss_bbox", "loss_giou"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # All-empty batch: finite losses.
    images, targets = make_batch(n=1, empty_last=True)
    empty = model(*model.preprocess(images, targets))
    assert all(torch.isfinite(v) for v in empty.losses.values())


@pytest.mark.parametrize("name", DETRS)
def test_decode_with_own_queries_reproduces_head(name):
    model = tiny(name).eval()
    images, _ = make_batch(n=2)
    batch, _ = model.preprocess(images)
    out = model(batch)
    again = model.decode(out.head.memory, out.head.query_embed)
    for key in ("logits", "boxes", "embeddings"):
        assert torch.allclose(again[key], getattr(out.head, key), atol=1e-5)
    # Fewer, batch-specific queries are fine too.
    some = model.decode(out.head.memory, out.head.query_embed[None, :7].expand(2, -1, -1))
    assert some["boxes"].shape == (model.num_layers, 2, 7, 4)


@pytest.mark.parametrize("name", ["deformable_detr_r18", "conditional_detr_r18"])
def test_predict_returns_original_coordinates_and_spec_rebuilds(name):
    model = tiny(name)
    (pred,) = model.predict([torch.rand(3, 48, 96)])
    assert pred["boxes"].shape == (100, 4) and pred["labels"].min() >= 1 and pred["labels"].max() <= 3
    assert pred["boxes"][:, 2].max() <= 96 + 1e-3 and pred["boxes"][:, 3].max() <= 48 + 1e-3
    assert torch.all(pred["scores"][:-1] >= pred["scores"][1:])
    assert model.training
    rebuilt = build_detector(**model.spec)
    rebuilt.load_state_dict(model.state_dict())
    assert type(rebuilt.transformer) is type(model.transformer)


def test_presets_and_width_override():
    model = tiny("deformable_detr_r18", fpn_channels=32)
    assert [f.channels for f in model.feature_info] == [32] * 4
    assert [f.stride for f in model.feature_info] == [8, 16, 32, 64]
    assert model.query_dim == 64 and model.transformer.query_embed.num_embeddings == 50
    assert tiny("conditional_detr_r18").feature_info[0].stride == 32


def test_match_uses_preprocessed_pixel_targets():
    model = tiny("deformable_detr_r18")
    images, targets = make_batch(n=1, empty_last=False)
    batch, targets = model.preprocess(images, targets)
    out = model(batch, targets)
    again = model.match(out.head.logits[-1], out.head.boxes[-1], targets, list(batch.image_sizes))
    (pred, gt), (pred_own, gt_own) = again[0], out.head.assignments[-1][0]
    assert torch.equal(pred, pred_own) and torch.equal(gt, gt_own)
    norm = normalize_targets(targets, list(batch.image_sizes))[0]
    assert torch.allclose(norm["boxes"][0], torch.tensor([17.0, 17.0, 26.0, 22.0]) / 64)
    assert norm["labels"].tolist() == [0, 2]


@pytest.mark.parametrize("steps,ratio", [(8, 0.8), pytest.param(30, 0.5, marks=pytest.mark.slow)])
def test_training_loss_falls_on_a_tiny_fixture(steps, ratio):
    torch.manual_seed(0)
    model = build_detector("deformable_detr_r18", 3, min_size=32, max_size=32)
    model.train()
    images, targets = make_batch(n=2, size=32, empty_last=False)
    batch, targets = model.preprocess(images, targets)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = sum(model(batch, targets).losses.values())
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
    last = float(sum(model(batch, targets).losses.values()).detach())
    assert last < ratio * losses[0], losses + [last]


def test_conditional_attention_heads_see_content_and_position():
    from detkd.models.detr.conditional import attend, per_head_cat

    a, b = torch.arange(4.0).view(1, 1, 4), torch.arange(4.0, 8.0).view(1, 1, 4)
    assert per_head_cat(a, b, heads=2).view(-1).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    q, k, v = torch.randn(1, 3, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 4)
    out = attend(q, k, v, heads=2, key_padding_mask=None, dropout=0.0)
    ref = F.scaled_dot_product_attention(
        q.view(1, 3, 2, 4).transpose(1, 2), k.view(1, 5, 2, 4).transpose(1, 2), v.view(1, 5, 2, 2).transpose(1, 2)
    )
    assert torch.allclose(out, ref.transpose(1, 2).reshape(1, 3, 4), atol=1e-6)


def test_compute_is_countable():
    """FlopCounterMode's module hooks see no view of a parameter made under no_grad."""
    from detkd.models.complexity import model_cost

    model = tiny("deformable_detr_r18")
    cost = model_cost(model, (64, 64))
    assert cost["flops"] > 0 and cost["params"] == sum(p.numel() for p in model.parameters())
