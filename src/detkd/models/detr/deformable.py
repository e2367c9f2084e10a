"""Deformable DETR's transformer (Zhu et al., ICLR 2021, arXiv 2010.04159), with optional iterative box refinement.

The encoder runs multi-scale deformable self-attention over the flattened levels; the decoder runs ordinary
self-attention between the queries and deformable cross-attention around each query's reference point. A query
is ``2 * dim`` wide: its positional half makes the reference point (a linear layer and a sigmoid) and its
content half is the decoder's input. Without refinement, every layer predicts its box relative to that initial
point with shared heads; with refinement, each layer has its own heads and the next layer starts from the
(detached) box of the previous one.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from detkd.models.detr.ms_deform_attn import MSDeformAttn
from detkd.models.detr.neck import MLP, in_fp32, inverse_sigmoid, sine_position


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DeformableEncoderLayer(nn.Module):
    def __init__(self, dim: int, ffn: int, dropout: float, levels: int, heads: int, points: int):
        super().__init__()
        self.attn = MSDeformAttn(dim, levels, heads, points)
        self.drop1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn, dropout)
        self.drop2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(dim)

    def forward(
        self, src: Tensor, pos: Tensor, reference: Tensor, shapes: list[tuple[int, int]], padding_mask: Tensor
    ) -> Tensor:
        src = self.norm1(src + self.drop1(self.attn(src + pos, reference, src, shapes, padding_mask)))
        return self.norm2(src + self.drop2(self.ffn(src)))


class DeformableDecoderLayer(nn.Module):
    def __init__(self, dim: int, ffn: int, dropout: float, levels: int, heads: int, points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, levels, heads, points)
        self.drop2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn, dropout)
        self.drop3, self.norm3 = nn.Dropout(dropout), nn.LayerNorm(dim)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference: Tensor,
        memory: Tensor,
        shapes: list[tuple[int, int]],
        padding_mask: Tensor,
    ) -> Tensor:
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        tgt = self.norm2(tgt + self.drop2(self.cross_attn(tgt + query_pos, reference, memory, shapes, padding_mask)))
        return self.norm3(tgt + self.drop3(self.ffn(tgt)))


def valid_ratios(mask: Tensor) -> Tensor:
    """``[B, 2]`` fraction ``(w, h)`` of a level that holds the image rather than padding."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / w, valid_h / h], -1)


def encoder_reference_points(shapes: list[tuple[int, int]], ratios: Tensor) -> Tensor:
    """Every cell centre as a reference point for every level: ``[B, S, levels, 2]``, padded-extent frame."""
    points = []
    for level, (h, w) in enumerate(shapes):
        y, x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, device=ratios.device),
            torch.linspace(0.5, w - 0.5, w, device=ratios.device),
            indexing="ij",
        )
        y = y.reshape(-1)[None] / (ratios[:, None, level, 1] * h)
        x = x.reshape(-1)[None] / (ratios[:, None, level, 0] * w)
        points.append(torch.stack([x, y], -1))
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


def box_heads(dim: int, num_classes: int) -> tuple[nn.Linear, MLP]:
    """A class head with the focal-loss prior (every class at probability 0.01) and a box head predicting no
    change of the reference point and a small box (sigmoid(-2) ~ 0.12 of the image)."""
    cls = nn.Linear(dim, num_classes)
    nn.init.constant_(cls.bias, -math.log((1 - 0.01) / 0.01))
    box = MLP(dim, dim, 4, 3)
    nn.init.zeros_(box.layers[-1].weight)
    nn.init.zeros_(box.layers[-1].bias)
    nn.init.constant_(box.layers[-1].bias[2:], -2.0)
    return cls, box


class DeformableTransformer(nn.Module):
    """Encoder, decoder, learned queries and prediction heads of Deformable DETR.

    Args:
        num_classes: foreground classes.
        dim: model width.
        heads: attention heads.
        enc_layers: encoder depth.
        dec_layers: decoder depth.
        ffn: feed-forward width.
        dropout: dropout rate.
        levels: feature levels.
        points: sampling points per head and level.
        queries: number of object queries.
        box_refine: iterative box refinement.
    """

    query_format = "deformable"

    def __init__(
        self,
        num_classes: int,
        dim: int = 256,
        heads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        ffn: int = 1024,
        dropout: float = 0.1,
        levels: int = 4,
        points: int = 4,
        queries: int = 300,
        box_refine: bool = False,
    ):
        super().__init__()
        self.dim, self.num_layers, self.box_refine = dim, dec_layers, box_refine
        self.level_embed = nn.Parameter(torch.empty(levels, dim))
        nn.init.normal_(self.level_embed)
        self.encoder = nn.ModuleList(
            DeformableEncoderLayer(dim, ffn, dropout, levels, heads, points) for _ in range(enc_layers)
        )
        self.decoder = nn.ModuleList(
            DeformableDecoderLayer(dim, ffn, dropout, levels, heads, points) for _ in range(dec_layers)
        )
        self.query_embed = nn.Embedding(queries, 2 * dim)  # (positional half, content half)
        self.reference_points = nn.Linear(dim, 2)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        cls, box = box_heads(dim, num_classes)
        if box_refine:
            # Later layers start from a box, not a point: their box heads start as "keep the box".
            boxes = [box] + [copy.deepcopy(box) for _ in range(dec_layers - 1)]
            for b in boxes[1:]:
                nn.init.zeros_(b.layers[-1].bias)
            self.class_embed = nn.ModuleList([cls] + [copy.deepcopy(cls) for _ in range(dec_layers - 1)])
            self.bbox_embed = nn.ModuleList(boxes)
        else:
            self.class_embed = nn.ModuleList([cls])
            self.bbox_embed = nn.ModuleList([box])

    @property
    def query_dim(self) -> int:
        return self.query_embed.embedding_dim

    def encode(self, features: list[Tensor], masks: list[Tensor]) -> dict[str, Any]:
        """Run the encoder on the neck's levels ``[B, dim, H, W]`` with their padding masks ``[B, H, W]``.

        Returns what :meth:`decode` needs: ``memory`` ``[B, S, dim]``, ``padding_mask`` ``[B, S]``,
        ``spatial_shapes`` (``(H, W)`` per level), ``level_start_index`` ``[levels]``, ``valid_ratios``
        ``[B, levels, 2]`` and ``pos`` ``[B, S, dim]`` (positional + level embedding).
        """
        shapes = [tuple(f.shape[-2:]) for f in features]
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat(
            [
                (sine_position(m, self.dim).to(f.dtype) + self.level_embed[i][:, None, None]).flatten(2).transpose(1, 2)
                for i, (f, m) in enumerate(zip(features, masks))
            ],
            1,
        )
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)  # [B, levels, 2]
        reference = encoder_reference_points(shapes, ratios)
        for layer in self.encoder:
            src = layer(src, pos, reference, shapes, mask)
        starts = torch.tensor([0] + [h * w for h, w in shapes][:-1], device=src.device).cumsum(0)
        return {
            "memory": src,
            "padding_mask": mask,
            "spatial_shapes": shapes,
            "level_start_index": starts,
            "valid_ratios": ratios,
            "pos": pos,
        }

    def decode(self, memory: dict[str, Any], queries: Tensor) -> dict[str, Tensor]:
        """Run the decoder and heads on ``queries`` ``[N, 2*dim]`` (shared by the batch) or ``[B, N, 2*dim]``.

        Returns per layer ``logits`` ``[L, B, N, C]``, ``boxes`` ``[L, B, N, 4]`` (normalised cxcywh, relative to
        each image's unpadded size) and ``embeddings`` ``[L, B, N, dim]`` (the decoder outputs the heads read).
        """
        src, mask, shapes, ratios = (
            memory["memory"],
            memory["padding_mask"],
            memory["spatial_shapes"],
            memory["valid_ratios"],
        )
        if queries.dim() == 2:
            # A copy, not a view of the parameter: module hooks (FlopCounterMode's) reject views made under no_grad.
            queries = queries[None].repeat(src.shape[0], 1, 1)
        query_pos, tgt = queries.split(self.dim, -1)
        reference = in_fp32(self.reference_points, query_pos).sigmoid()  # [B, N, 2], fp32 under autocast too
        logits, boxes, embeddings = [], [], []
        for i, layer in enumerate(self.decoder):
            scale = ratios if reference.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
            tgt = layer(tgt, query_pos, reference[:, :, None] * scale[:, None], src, shapes, mask)
            head = i if self.box_refine else 0
            delta = self.bbox_embed[head](tgt).float()  # boxes are decoded in fp32
            if reference.shape[-1] == 4:
                box = (delta + inverse_sigmoid(reference)).sigmoid()
            else:
                box = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
            logits.append(self.class_embed[head](tgt))
            boxes.append(box)
            embeddings.append(tgt)
            if self.box_refine:
                reference = box.detach()
        return {"logits": torch.stack(logits), "boxes": torch.stack(boxes), "embeddings": torch.stack(embeddings)}
