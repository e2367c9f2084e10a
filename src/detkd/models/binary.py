"""1-bit layers, the Bi-Real/ReActNet binary ResNet-18 backbone (``bireal18``) and the binary FPN/RPN of IDa-Det's
student.

Binarisation (as in Bi-Real Net, arXiv 1808.00278, and IDa-Det's ``BiConv``):

- activations: ``sign(x)`` forward (0 counts as +1), and the ApproxSign gradient ``2 - 2|x|`` on ``(-1, 1)``, 0
  outside (the derivative of Bi-Real's piecewise-quadratic approximation of sign);
- weights: ``w_b = alpha_c * sign(w)`` with a learnable per-output-channel scale ``alpha`` (initialised to the
  channel's mean ``|w|``, the closed-form minimiser of ``||w - alpha * sign(w)||^2``). The backward pass adds the
  gradient of the reconstruction loss ``mu / 2 * ||w - alpha * sign(w)||^2`` (IDa-Det's ``L_R``, ``mu = 1e-4``):
  ``grad_w = g * alpha + mu * (w - alpha * b)`` (straight-through for sign) and
  ``grad_alpha = sum g * b - mu * sum (w - alpha * b) * b``. IDa-Det's code uses ``sum g * w`` for the first part
  of ``grad_alpha`` and a fixed factor 0.02 in front of ``|alpha|``; here ``alpha`` gets its true gradient and
  carries the whole scale.
- latent-weight gradient scale (``grad_scale``, the run's ``model.binary_grad_scale``): the straight-through part
  ``g * alpha`` of ``grad_w`` is multiplied by it. Default 1, the true straight-through gradient. IDa-Det's code
  computes its binary weight as ``0.02 * |s| * sign(w)`` but passes ``g * |s|`` back to ``w``, leaving the 0.02
  out: with ``alpha = 0.02 * |s|`` that is ``g * alpha / 0.02``, so its value is ``1 / 0.02 = 50`` (the
  reconstruction part ``mu * (w - alpha * b)`` is the same in both). Under SGD that is a 50x larger step of the
  latent weights; under Adam mostly a shift of balance against the reconstruction term.

The backbone follows the Bi-Real/ReActNet layout IDa-Det's student uses: a real 7x7 stem (conv, BN, max-pool, no
ReLU), then 4 stages of 4 blocks, each block ``LearnableBias -> binary 3x3 conv -> BN -> + shortcut -> RPReLU``
with its own shortcut; a down-sampling shortcut is ``AvgPool 2x2 -> real 1x1 conv -> BN``. So 16 binary 3x3
convs; stem, 1x1 shortcuts and every head stay real-valued. ``binarize_neck`` makes the FPN convs (3x3 laterals
and outputs, each followed by a PReLU, no normalisation) and the RPN's 3x3 conv binary, as IDa-Det's student has.

Training recipe. IDa-Det starts from an ImageNet-pretrained binary backbone and keeps every backbone BatchNorm's
statistics frozen (``norm_eval``). detkd has no such weights, so ``bireal18`` trains from scratch with ordinary
(training-mode) BatchNorm; when ``backbone_weights`` names a file, the usual detkd rule applies (frozen BN, stem and
first stage frozen), which is IDa-Det's setting. See ``configs/frcnn_bireal18.yaml`` for a recommended recipe.

The bit-packed file format for binary detectors lives beside the other checkpoint formats, in
``detkd.engine.checkpoint`` (``save_packed``/``load_packed``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detkd.errors import BuildError
from detkd.models.backbones import Body
from detkd.models.outputs import Detector


def binarize(x: Tensor) -> Tensor:
    """``+1`` where ``x >= 0``, ``-1`` elsewhere (no zeros, so every value fits one bit)."""
    # sign() maps 0 to 0; shifting by 1/2 and taking the sign again sends it to +1. Much faster than where().
    return torch.sign(x).add_(0.5).sign_()


class _ApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return binarize(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere.
        return grad * x.abs().mul_(-2).add_(2).clamp_(min=0)


def approx_sign(x: Tensor) -> Tensor:
    """Sign activation with Bi-Real Net's ApproxSign gradient."""
    return _ApproxSign.apply(x)


class _ScaledSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: Tensor, scale: Tensor, mu: float, grad_scale: float) -> Tensor:
        ctx.save_for_backward(weight, scale)
        ctx.mu, ctx.grad_scale = mu, grad_scale
        return binarize(weight) * scale.view(-1, *([1] * (weight.dim() - 1)))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        weight, scale = ctx.saved_tensors
        b = binarize(weight)
        alpha = scale.view(-1, *([1] * (weight.dim() - 1)))
        residual = weight - alpha * b  # the reconstruction error of L_R
        dims = tuple(range(1, weight.dim()))
        grad_w = grad * alpha * ctx.grad_scale + ctx.mu * residual
        grad_scale = (grad * b).sum(dims) - ctx.mu * (residual * b).sum(dims)
        return grad_w, grad_scale, None, None


class BinaryConv2d(nn.Conv2d):
    """Conv with 1-bit inputs and weights: ``conv(sign(x), alpha * sign(w)) + bias``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as :class:`nn.Conv2d`.
        mu: weight of the reconstruction-loss gradient (IDa-Det's ``para_loss``).
        grad_scale: multiplier of the latent weight's straight-through gradient (1; IDa-Det's code: 50, see the
            module docstring).

    Attributes:
        scale: per-output-channel ``alpha``, ``[out_channels]`` (1-D, so the optimiser applies no weight decay
            unless ``optim.decay_norm_bias`` is set).
        binary_activations: sign the input (True); False passes it as is (first step of staged training).
        binary_weights: use ``alpha * sign(w)`` (True); False uses the latent real weights (idem).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        mu: float = 1e-4,
        grad_scale: float = 1.0,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.mu = mu
        self.grad_scale = grad_scale
        self.scale = nn.Parameter(self.weight.detach().abs().mean(dim=(1, 2, 3)).clone())
        # Plain attributes, not state: a trained layer is always used fully binary.
        self.binary_activations = True
        self.binary_weights = True

    def binary_weight(self) -> Tensor:
        """``alpha * sign(w)``, ``[out, in / groups, kh, kw]``."""
        return _ScaledSign.apply(self.weight, self.scale, self.mu, self.grad_scale)

    def forward(self, x: Tensor) -> Tensor:
        x = approx_sign(x) if self.binary_activations else x
        weight = self.binary_weight() if self.binary_weights else self.weight
        return self._conv_forward(x, weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mu={self.mu}, grad_scale={self.grad_scale}"


class LearnableBias(nn.Module):
    """A learnable per-channel shift (ReActNet's RSign threshold / RPReLU shifts), zero-initialised."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias.view(1, -1, 1, 1).to(x.dtype)


class RPReLU(nn.Module):
    """ReActNet's RPReLU: shift, per-channel PReLU, shift."""

    def __init__(self, channels: int):
        super().__init__()
        self.shift_in = LearnableBias(channels)
        self.prelu = nn.PReLU(channels)
        self.shift_out = LearnableBias(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.shift_out(self.prelu(self.shift_in(x)))


class BiRealBlock(nn.Module):
    """One binary 3x3 conv with its own shortcut: ``RPReLU(BN(bconv(shift(x))) + shortcut(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: type[nn.Module]):
        super().__init__()
        self.move = LearnableBias(in_channels)
        self.conv = BinaryConv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn = norm(out_channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            # Real-valued, as in Bi-Real/ReActNet: the shortcut carries the information the 1-bit path loses.
            self.downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity(),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                norm(out_channels),
            )
        self.act = RPReLU(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(self.move(x))) + self.downsample(x))


class BiRealResNet18(nn.Module):
    """Binary ResNet-18 body returning ``c2..c5`` (64, 128, 256, 512 channels at strides 4..32)."""

    widths = (64, 128, 256, 512)

    def __init__(self, norm: type[nn.Module] = nn.BatchNorm2d, blocks_per_stage: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        for i, width in enumerate(self.widths):
            blocks = [
                BiRealBlock(in_channels if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1, norm)
                for j in range(blocks_per_stage)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_channels = width

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        # No ReLU after the stem: the first block's learnable shift and sign follow directly.
        x = self.maxpool(self.bn1(self.conv1(x)))
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            out[f"c{i + 2}"] = x
        return out


def bireal18(frozen_bn: bool) -> Body:
    """The Bi-Real binary ResNet-18 body (registered as backbone ``bireal18`` in ``detkd.models.detectors``)."""
    net = BiRealResNet18(FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    # No published weights: `backbone_weights` must name a file (a state dict of this body).
    return Body(net, {f"c{i + 2}": w for i, w in enumerate(BiRealResNet18.widths)}, None, net)


def _binary_conv_act(conv: nn.Conv2d, kernel: int) -> nn.Sequential:
    """A binary conv (``kernel`` x ``kernel``, same channels and stride as ``conv``, with bias) + PReLU."""
    binary = BinaryConv2d(conv.in_channels, conv.out_channels, kernel, conv.stride[0], kernel // 2, bias=True)
    nn.init.zeros_(binary.bias)
    return nn.Sequential(binary, nn.PReLU(conv.out_channels))


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def binarize_neck(detector: Detector) -> Detector:
    """Make the FPN convs and the RPN's 3x3 conv binary, as IDa-Det's student has (in place).

    FPN laterals become 3x3 binary convs (IDa-Det's ``FPN_REACT_3x3``) and the output convs 3x3 binary convs, each
    followed by a PReLU, without normalisation; the RPN conv becomes a binary 3x3 conv + PReLU. The RPN's 1x1
    classification/regression convs, RetinaNet/FCOS's extra P6/P7 convs and heads stay real-valued.
    State-dict keys keep torchvision's layout: ``...inner_blocks.0.0.{weight,bias,scale}`` for the conv and
    ``...inner_blocks.0.1.weight`` for its PReLU.
    """
    fpn_of = getattr(detector, "fpn", None)
    if fpn_of is None:
        raise BuildError(f"binary_neck: {type(detector).__name__} has no torchvision FPN to binarise")
    fpn = fpn_of()
    for blocks in (fpn.inner_blocks, fpn.layer_blocks):
        for i, block in enumerate(blocks):
            blocks[i] = _binary_conv_act(_first_conv(block), 3)
    rpn_head_of = getattr(detector, "rpn_head", None)
    if rpn_head_of is not None:
        rpn_head = rpn_head_of()
        rpn_head.conv[0] = _binary_conv_act(_first_conv(rpn_head.conv[0]), 3)
    return detector


def binary_modules(model: nn.Module) -> dict[str, BinaryConv2d]:
    """Qualified name -> every :class:`BinaryConv2d` of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BinaryConv2d)}


def set_binary_grad_scale(model: nn.Module, scale: float) -> int:
    """Set the latent-weight gradient multiplier of every :class:`BinaryConv2d` of ``model``; returns how many.

    Raises:
        BuildError: ``scale`` is not positive.
    """
    if not scale > 0:
        raise BuildError(f"model.binary_grad_scale must be > 0, got {scale}")
    convs = binary_modules(model)
    for conv in convs.values():
        conv.grad_scale = float(scale)
    return len(convs)
