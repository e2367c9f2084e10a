"""The binary convs' latent-weight gradient, and IDa-Det's official scaling of it."""

from __future__ import annotations

import pytest
import torch

from detkd.errors import BuildError
from detkd.models.binary import BinaryConv2d, set_binary_grad_scale


def official_gradients(w: torch.Tensor, s: torch.Tensor, g: torch.Tensor, mu: float = 1e-4):
    """IDa-Det's BiConv, written out from its definition: forward ``0.02 * |s| * sign(w)``, backward
    ``g * |s| + mu * (w - 0.02 * |s| * sign(w))`` for the weight."""
    sign = torch.where(w >= 0, 1.0, -1.0)
    scale = s.abs().view(-1, 1, 1, 1)
    weight = 0.02 * scale * sign
    grad_w = g * scale + mu * (w - weight)
    return weight, grad_w


def conv_with(w: torch.Tensor, s: torch.Tensor, grad_scale: float) -> BinaryConv2d:
    conv = BinaryConv2d(2, 2, 1, bias=False, grad_scale=grad_scale)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.scale.copy_(0.02 * s.abs())  # detkd's alpha is the official 0.02 * |s|
    return conv


def test_latent_weight_gradient_equals_the_official_one_at_scale_50():
    w = torch.tensor([0.3, -0.1, 0.05, -0.4]).view(2, 2, 1, 1)
    s = torch.tensor([1.5, -0.5])
    g = torch.tensor([0.2, -1.0, 0.7, 0.1]).view(2, 2, 1, 1)
    weight, grad_w = official_gradients(w, s, g)

    conv = conv_with(w, s, grad_scale=50.0)
    out = conv.binary_weight()
    assert torch.allclose(out, weight)
    out.backward(g)
    assert torch.allclose(conv.weight.grad, grad_w, atol=1e-7)

    # The default (true straight-through gradient) is 50x smaller in its g-part: not the official one.
    plain = conv_with(w, s, grad_scale=1.0)
    plain.binary_weight().backward(g)
    assert not torch.allclose(plain.weight.grad, grad_w, atol=1e-4)
    expected = g * 0.02 * s.abs().view(-1, 1, 1, 1) + 1e-4 * (w - weight)
    assert torch.allclose(plain.weight.grad, expected, atol=1e-8)


def test_set_binary_grad_scale_reaches_every_binary_conv():
    model = torch.nn.Sequential(BinaryConv2d(2, 2, 3), torch.nn.Conv2d(2, 2, 1), BinaryConv2d(2, 2, 1))
    assert set_binary_grad_scale(model, 50.0) == 2
    assert model[0].grad_scale == 50.0 and model[2].grad_scale == 50.0
    with pytest.raises(BuildError):
        set_binary_grad_scale(model, 0.0)
