"""Multi-scale deformable attention (Zhu et al., ICLR 2021, arXiv 2010.04159) in plain PyTorch.

Each query attends to a few sampled points per head and level around its reference point, with learned offsets
and weights; the samples are read with ``F.grid_sample`` (bilinear, zero outside the map), so no custom
CUDA op is needed. Memory is ``O(B * heads * head_dim * queries * levels * points)`` per call, and autograd keeps
it; on CUDA, ``grid_sample``'s backward is nondeterministic.

Precision: sampling offsets, locations and the bilinear sampling run in fp32 even under autocast (the sampled
values are upcast for it): rounding the sampling grid to bf16 moves every sample, which in a CPU test raised the
attention output's error against fp32 from 1.5% to 6.4%.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.models.detr.neck import in_fp32


def ms_deform_attn_core(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """Sample and mix values.

    Args:
        value: ``[B, S, heads, head_dim]``, the levels' cells flattened one level after another.
        shapes: ``(H, W)`` of each level (``S = sum(H * W)``).
        locations: ``[B, Q, heads, levels, points, 2]`` sampling points, ``(x, y)`` in ``[0, 1]`` of each level.
        weights: ``[B, Q, heads, levels, points]`` attention weights.

    Returns:
        ``[B, Q, heads * head_dim]``.
    """
    b, _, heads, head_dim = value.shape
    _, q, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample's frame is [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = per_level[level].flatten(2).transpose(1, 2).reshape(b * heads, head_dim, h, w)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*heads, Q, points, 2]
        # fp32 grid (and so fp32 values: grid_sample takes one dtype), whatever the autocast dtype.
        sampled.append(F.grid_sample(v.float(), g.float(), mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [B*heads, head_dim, Q, levels*points]
    w = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (stacked * w.float()).sum(-1)  # [B*heads, head_dim, Q]
    return out.view(b, heads * head_dim, q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        dim: model width.
        levels: number of feature levels.
        heads: attention heads (must divide ``dim``).
        points: sampling points per head and level.
    """

    def __init__(self, dim: int, levels: int, heads: int, points: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as a fixed pattern: each head looks in its own direction, point k at distance k cells,
        # so the layer samples a spread neighbourhood before it has learned anything.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid[:, None, None, :].repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference: Tensor,
        value: Tensor,
        shapes: list[tuple[int, int]],
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` ``[B, Q, dim]`` to ``value`` ``[B, S, dim]``.

        Args:
            query: queries (with their positional embedding added).
            reference: ``[B, Q, levels, 2]`` points ``(x, y)`` or ``[B, Q, levels, 4]`` boxes ``(cx, cy, w, h)``,
                normalised to each level's padded extent.
            value: the flattened multi-scale maps.
            shapes: ``(H, W)`` per level.
            padding_mask: ``[B, S]`` True on padded cells (their values are zeroed).
        """
        b, q, _ = query.shape
        s = value.shape[1]
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(b, s, self.heads, self.dim // self.heads)
        offsets = in_fp32(self.sampling_offsets, query).view(b, q, self.heads, self.levels, self.points, 2)
        reference = reference.float()
        weights = self.attention_weights(query).view(b, q, self.heads, self.levels * self.points).softmax(-1)
        weights = weights.view(b, q, self.heads, self.levels, self.points)
        if reference.shape[-1] == 2:
            # Offsets are in cells of each level: divide by (W, H) to get fractions of the map.
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            # Offsets are in units of half the reference box, spread over the points.
            ref = reference[:, :, None, :, None]
            locations = ref[..., :2] + offsets / self.points * ref[..., 2:] * 0.5
        return self.output_proj(ms_deform_attn_core(v, shapes, locations, weights))
