from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detkd.engine.checkpoint import (
    load_packed,
    pack_binary_state,
    pack_bits,
    save_packed,
    unpack_binary_state,
    unpack_bits,
)
from detkd.errors import CheckpointError
from detkd.models.backbones import BACKBONES, freeze_stages
from detkd.models.binary import BinaryConv2d, approx_sign, binary_modules
from tests.conftest import make_batch, tiny


def test_approx_sign_forward_and_gradient_values():
    x = torch.tensor([-2.0, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 3.0], requires_grad=True)
    y = approx_sign(x)
    assert y.tolist() == [-1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1]  # 0 counts as +1: every value fits one bit
    y.sum().backward()
    # 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere.
    assert x.grad.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 1.5, 1.0, 0.5, 0.0, 0.0])


def test_binary_conv_equals_manual_sign_and_scale():
    torch.manual_seed(0)
    conv = BinaryConv2d(3, 5, 3, stride=2, padding=1, bias=True)
    with torch.no_grad():
        conv.scale.copy_(torch.rand(5) + 0.1)
        conv.bias.copy_(torch.randn(5))
    x = torch.randn(2, 3, 9, 9)
    sx = torch.where(x >= 0, 1.0, -1.0)
    sw = torch.where(conv.weight >= 0, 1.0, -1.0) * conv.scale[:, None, None, None]
    expected = F.conv2d(sx, sw, conv.bias, stride=2, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    # The initial scale is the channel's mean |w| (minimiser of ||w - a sign(w)||^2).
    fresh = BinaryConv2d(3, 5, 3)
    assert torch.allclose(fresh.scale, fresh.weight.abs().mean((1, 2, 3)))


def test_binary_weight_gradient_has_reconstruction_term():
    torch.manual_seed(1)
    mu = 0.1
    conv = BinaryConv2d(2, 3, 1, bias=False, mu=mu)
    with torch.no_grad():
        conv.scale.copy_(torch.tensor([0.5, 1.0, 2.0]))
    g = torch.randn(3, 2, 1, 1)
    (conv.binary_weight() * g).sum().backward()
    w, a = conv.weight.detach(), conv.scale.detach()[:, None, None, None]
    b = torch.where(w >= 0, 1.0, -1.0)
    assert torch.allclose(conv.weight.grad, g * a + mu * (w - a * b))
    assert torch.allclose(conv.scale.grad, (g * b).sum((1, 2, 3)) - mu * ((w - a * b) * b).sum((1, 2, 3)))


def test_bireal18_layout():
    body = BACKBONES.get("bireal18")(frozen_bn=False)
    assert body.channels == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
    out = body.module(torch.rand(1, 3, 64, 96))
    assert [tuple(v.shape) for v in out.values()] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    binary = binary_modules(body.module)
    assert len(binary) == 16 and all(m.kernel_size == (3, 3) for m in binary.values())
    real = [n for n, m in body.module.named_modules() if type(m) is nn.Conv2d]
    assert real == ["conv1"] + [f"layer{i}.0.downsample.1" for i in (2, 3, 4)]  # stem and 1x1 shortcuts
    # With weights (frozen BN), freezing follows the ResNet convention: stem and layer1.
    frozen = BACKBONES.get("bireal18")(frozen_bn=True)
    freeze_stages(frozen, trainable=3)
    trainable = {n.split(".")[0] for n, p in frozen.module.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


def test_binary_neck_replaces_fpn_and_rpn_convs():
    model = tiny("frcnn_bireal18", binary_neck=True)
    assert model.spec["binary_neck"] is True
    names = set(binary_modules(model))
    fpn = {n for n in names if ".fpn." in n}
    assert len(fpn) == 8 and "model.rpn.head.conv.0.0" in names
    assert all(m.kernel_size == (3, 3) for m in binary_modules(model).values())
    keys = model.state_dict()
    assert "model.backbone.fpn.inner_blocks.0.0.scale" in keys and "model.backbone.fpn.inner_blocks.0.1.weight" in keys
    images, targets = make_batch()
    out = model(*model.preprocess(images, targets))
    total = sum(out.losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.model.backbone.fpn.inner_blocks[0][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 100])
def test_bit_packing_round_trip(n):
    w = torch.randn(n)
    packed = pack_bits(w)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(unpack_bits(packed, [n]), torch.where(w >= 0, 1.0, -1.0))


def test_packed_export_gives_identical_outputs(tmp_path):
    model = tiny("frcnn_bireal18", binary_neck=True)
    # Move scales and BN statistics away from their initial values, as training would.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BinaryConv2d):
                m.scale.mul_(torch.rand_like(m.scale) + 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    images, _ = make_batch(empty_last=False)

    state = pack_binary_state(model)
    n_binary = sum(m.weight.numel() for m in binary_modules(model).values())
    assert set(state["bits"]) == {f"{name}.weight" for name in binary_modules(model)}
    for key, bits in state["bits"].items():
        assert bits.dtype == torch.uint8 and bits.numel() == -(-math.prod(state["shapes"][key]) // 8)
    assert sum(math.prod(s) for s in state["shapes"].values()) == n_binary
    restored = unpack_binary_state(state)
    assert list(restored) == list(model.state_dict())

    path = tmp_path / "student.packed.pt"
    save_packed(path, model, ["a", "b", "c"], {"note": "x"})
    fp32_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert path.stat().st_size < fp32_bytes / 4
    loaded, payload = load_packed(path)
    assert payload["format"] == "detkd.packed" and payload["classes"] == ["a", "b", "c"]
    loaded.eval()
    batch, _ = model.preprocess(images)
    with torch.no_grad():
        a, b = model.extract(batch), loaded.extract(batch)
        assert all(torch.equal(a[k], b[k]) for k in a)
        # The RPN and box head, on the same features.
        _, ha = model.head_losses(a, batch, None)
        _, hb = loaded.head_losses(a, batch, None)
        assert all(torch.equal(x, y) for x, y in zip(ha.proposal_scores, hb.proposal_scores))
        logits_a, _ = model.roi_forward(a, ha.proposals, batch.image_sizes)
        logits_b, _ = loaded.roi_forward(a, ha.proposals, batch.image_sizes)
        assert torch.equal(logits_a, logits_b)


def test_load_packed_rejects_other_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"format": "detkd.student"}, path)
    with pytest.raises(CheckpointError, match="packed"):
        load_packed(path)
