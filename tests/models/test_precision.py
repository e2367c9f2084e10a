"""Numerically sensitive parts stay in fp32 under bf16 autocast: losses, box decoding, deformable sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detkd.models.detr.ms_deform_attn import MSDeformAttn
from tests.conftest import make_batch, tiny


def head_value(head, key: str):
    return head[key] if isinstance(head, dict) else getattr(head, key)


@pytest.mark.parametrize("name", ["frcnn_r18", "retinanet_r18", "deformable_detr_r18", "conditional_detr_r18"])
def test_losses_and_boxes_are_fp32_under_bf16_autocast(name):
    detector = tiny(name).train()
    images, targets = make_batch(n=2)
    batch, targets = detector.preprocess(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = detector(batch, targets)
    assert out.losses and all(v.dtype == torch.float32 for v in out.losses.values())
    if detector.kind == "detr":
        assert head_value(out.head, "boxes").dtype == torch.float32
    if detector.kind == "two_stage":
        assert all(p.dtype == torch.float32 for p in head_value(out.head, "proposals"))


def attention_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 32), (12, 16)]
    attn = MSDeformAttn(32, levels=2, heads=4, points=4)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5, generator=g)
        attn.attention_weights.weight.normal_(0, 0.1, generator=g)
    query = torch.randn(2, 50, 32, generator=g)
    reference = torch.rand(2, 50, 2, 2, generator=g)
    value = torch.randn(2, sum(h * w for h, w in shapes), 32, generator=g)
    return attn, query, reference, value, shapes


def test_deformable_sampling_grid_is_fp32_under_autocast(monkeypatch):
    attn, query, reference, value, shapes = attention_inputs()
    grids = []
    original = F.grid_sample

    def spy(inp, grid, *args, **kwargs):
        grids.append(grid.dtype)
        return original(inp, grid, *args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(query, reference, value, shapes)
    assert grids == [torch.float32] * len(shapes)


def test_deformable_attention_under_autocast_is_closer_to_fp32_than_with_a_bf16_grid(monkeypatch):
    attn, query, reference, value, shapes = attention_inputs()
    with torch.no_grad():
        exact = attn(query, reference, value, shapes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = attn(query, reference, value, shapes).float()
        original = F.grid_sample

        def rounded_grid(inp, grid, *args, **kwargs):
            return original(inp, grid.bfloat16().float(), *args, **kwargs)

        monkeypatch.setattr(F, "grid_sample", rounded_grid)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            coarse = attn(query, reference, value, shapes).float()

    def error(x):
        return float((x - exact).norm() / exact.norm())

    assert error(mixed) < error(coarse)
