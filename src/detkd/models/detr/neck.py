"""What sits between the backbone and a DETR transformer: the input projections (the "neck"), padding masks
and sine positional encodings."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.models.outputs import FeatureSpec

STAGE_STRIDES = {"c3": 8, "c4": 16, "c5": 32}


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows (DETRs' input projections), fewer otherwise."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ChannelMapper(nn.Module):
    """Project backbone stages to the transformer width: a 1x1 conv + GroupNorm per stage, then ``extra`` levels
    made by 3x3 stride-2 convs (the first on the last stage itself, as Deformable DETR does).

    Args:
        in_channels: stage name (``c3``..``c5``) -> channels, in order.
        hidden: output channels of every level.
        extra: number of extra, coarser levels.
    """

    def __init__(self, in_channels: dict[str, int], hidden: int, extra: int = 0):
        super().__init__()
        self.stages = list(in_channels)
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, 1), group_norm(hidden)) for c in in_channels.values()
        )
        extras, channels = [], list(in_channels.values())[-1]
        for _ in range(extra):
            extras.append(nn.Sequential(nn.Conv2d(channels, hidden, 3, stride=2, padding=1), group_norm(hidden)))
            channels = hidden
        self.extras = nn.ModuleList(extras)
        strides = [STAGE_STRIDES[s] for s in self.stages]
        strides += [strides[-1] * 2 ** (i + 1) for i in range(extra)]
        self.feature_info = [FeatureSpec(f"p{int(math.log2(s))}", hidden, s) for s in strides]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight, gain=1)
                nn.init.zeros_(module.bias)

    def forward(self, stages: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        outs = [proj(stages[s]) for s, proj in zip(self.stages, self.projections)]
        x = stages[self.stages[-1]]
        for extra in self.extras:
            x = extra(x)
            outs.append(x)
        return OrderedDict((f.name, o) for f, o in zip(self.feature_info, outs))


def padding_mask(image_sizes: list[tuple[int, int]], batch_shape: tuple[int, int], device: torch.device) -> Tensor:
    """``[B, H, W]`` bool, True on the padding around each image in the batch tensor."""
    mask = torch.ones(len(image_sizes), *batch_shape, dtype=torch.bool, device=device)
    for i, (h, w) in enumerate(image_sizes):
        mask[i, :h, :w] = False
    return mask


def level_masks(mask: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """The padding mask resized (nearest) to each level's ``(H, W)``; a level never becomes all padding."""
    out = []
    for shape in shapes:
        m = F.interpolate(mask[:, None].float(), size=shape, mode="nearest")[:, 0].bool()
        m[:, 0, 0] = False  # an image smaller than one cell still owns the first cell
        out.append(m)
    return out


def sine_position(mask: Tensor, channels: int, temperature: float = 10000.0) -> Tensor:
    """DETR's 2-D sine encoding of each valid cell's position, normalised by the valid size: ``[B, channels, H, W]``.

    Args:
        mask: ``[B, H, W]`` True on padding.
        channels: output channels (half for y, half for x).
        temperature: frequency base.
    """
    valid = (~mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    # Cell centres, as fractions of the valid extent (the -0.5 of Deformable DETR).
    y = (y - 0.5) / (y[:, -1:, :] + eps) * scale
    x = (x - 0.5) / (x[:, :, -1:] + eps) * scale
    return torch.cat([_sine(y, channels // 2, temperature), _sine(x, channels // 2, temperature)], -1).permute(
        0, 3, 1, 2
    )


def _sine(coord: Tensor, channels: int, temperature: float) -> Tensor:
    """``coord`` ``[...]`` (already scaled to radians) -> ``[..., channels]`` interleaved sin/cos."""
    dim_t = torch.arange(channels, dtype=torch.float32, device=coord.device)
    dim_t = temperature ** (2 * (dim_t // 2) / channels)
    pos = coord[..., None] / dim_t
    return torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], -1).flatten(-2)


def sine_point_embedding(points: Tensor, channels: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalised ``(x, y)`` points ``[..., 2]`` -> ``[..., channels]`` (y half first, as for
    feature maps), used by Conditional DETR's spatial queries."""
    scale = 2 * math.pi
    x = _sine(points[..., 0] * scale, channels // 2, temperature)
    y = _sine(points[..., 1] * scale, channels // 2, temperature)
    return torch.cat([y, x], -1)


def in_fp32(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` in fp32 even under autocast: positions (reference points, sampling offsets) are too sensitive
    for bf16, whose 8-bit mantissa moves a point on a 1000-px map by up to 2 px."""
    with torch.autocast(x.device.type, enabled=False):
        return module(x.float())


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``layers`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
