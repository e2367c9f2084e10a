"""Conditional DETR's transformer (Meng et al., ICCV 2021, arXiv 2108.06152).

A plain encoder over one level; in the decoder, cross-attention splits every head's query and key into a content
part and a spatial part and concatenates them, so the spatial part of the query (a sine embedding of the query's
2-D reference point, scaled by a function of the decoder embedding) matches the keys' positional encoding and
narrows the attention to the object's extremities. A query is ``dim`` wide: its positional embedding; the
decoder's content input starts at zero. Boxes are predicted relative to the reference point, with heads shared
by all layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.models.detr.deformable import FFN, box_heads, valid_ratios
from detkd.models.detr.neck import MLP, in_fp32, inverse_sigmoid, sine_point_embedding, sine_position


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int, key_padding_mask: Tensor | None, dropout: float) -> Tensor:
    """Multi-head attention whose query/key width may differ from its value width.

    ``q`` ``[B, N, heads*dq]``, ``k`` ``[B, S, heads*dq]``, ``v`` ``[B, S, heads*dv]`` -> ``[B, N, heads*dv]``.
    """
    b, n, _ = q.shape
    s = k.shape[1]
    q = q.view(b, n, heads, -1).transpose(1, 2)
    k = k.view(b, s, heads, -1).transpose(1, 2)
    v = v.view(b, s, heads, -1).transpose(1, 2)
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
    out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).reshape(b, n, -1)


def per_head_cat(a: Tensor, b: Tensor, heads: int) -> Tensor:
    """Concatenate two ``[B, N, heads*d]`` tensors head by head -> ``[B, N, heads*2d]``."""
    shape = a.shape[:-1]
    return torch.cat([a.view(*shape, heads, -1), b.view(*shape, heads, -1)], -1).flatten(-2)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn, dropout)
        self.drop2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        q = src + pos
        out = self.attn(q, q, src, key_padding_mask=padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.drop1(out))
        return self.norm2(src + self.drop2(self.ffn(src)))


class ConditionalDecoderLayer(nn.Module):
    """Self-attention over queries, then conditional cross-attention.

    Args:
        first: the first layer also adds the query's positional embedding to the content query and the keys'
            positional encoding to the content keys (later layers rely on the spatial part alone).
    """

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, first: bool):
        super().__init__()
        self.heads, self.dropout, self.first = heads, dropout, first
        self.sa_q_content, self.sa_q_pos = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.sa_k_content, self.sa_k_pos = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.sa_v, self.sa_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.ca_q_content, self.ca_q_sine = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.ca_k_content, self.ca_k_pos = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.ca_v, self.ca_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        # Only the first layer uses the query's positional embedding in cross-attention; a layer without it keeps
        # no unused parameter (which DDP would reject).
        self.ca_q_pos = nn.Linear(dim, dim) if first else None
        self.drop2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn, dropout)
        self.drop3, self.norm3 = nn.Dropout(dropout), nn.LayerNorm(dim)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, query_sine: Tensor, memory: Tensor, pos: Tensor, padding_mask: Tensor
    ) -> Tensor:
        p = self.dropout if self.training else 0.0
        q = self.sa_q_content(tgt) + self.sa_q_pos(query_pos)
        k = self.sa_k_content(tgt) + self.sa_k_pos(query_pos)
        out = self.sa_out(attend(q, k, self.sa_v(tgt), self.heads, None, p))
        tgt = self.norm1(tgt + self.drop1(out))

        q = self.ca_q_content(tgt)
        k = self.ca_k_content(memory)
        k_pos = self.ca_k_pos(pos)
        if self.ca_q_pos is not None:
            q = q + self.ca_q_pos(query_pos)
            k = k + k_pos
        q = per_head_cat(q, self.ca_q_sine(query_sine), self.heads)
        k = per_head_cat(k, k_pos, self.heads)
        out = self.ca_out(attend(q, k, self.ca_v(memory), self.heads, padding_mask, p))
        tgt = self.norm2(tgt + self.drop2(out))
        return self.norm3(tgt + self.drop3(self.ffn(tgt)))


class ConditionalTransformer(nn.Module):
    """Encoder, conditional decoder, learned queries and prediction heads of Conditional DETR.

    Args:
        num_classes: foreground classes.
        dim: model width.
        heads: attention heads.
        enc_layers: encoder depth.
        dec_layers: decoder depth.
        ffn: feed-forward width.
        dropout: dropout rate.
        queries: number of object queries.
    """

    query_format = "conditional"

    def __init__(
        self,
        num_classes: int,
        dim: int = 256,
        heads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        ffn: int = 2048,
        dropout: float = 0.1,
        queries: int = 300,
    ):
        super().__init__()
        self.dim, self.num_layers = dim, dec_layers
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, ffn, dropout) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(
            ConditionalDecoderLayer(dim, heads, ffn, dropout, first=i == 0) for i in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.query_embed = nn.Embedding(queries, dim)
        self.ref_point_head = MLP(dim, dim, 2, 2)
        self.query_scale = MLP(dim, dim, dim, 2)
        cls, box = box_heads(dim, num_classes)
        self.class_embed = cls
        self.bbox_embed = box

    @property
    def query_dim(self) -> int:
        return self.query_embed.embedding_dim

    def encode(self, features: list[Tensor], masks: list[Tensor]) -> dict[str, Any]:
        """Run the encoder on the single level ``[B, dim, H, W]`` with its padding mask ``[B, H, W]``.

        Returns ``memory`` ``[B, S, dim]``, ``padding_mask`` ``[B, S]``, ``spatial_shapes``,
        ``level_start_index``, ``valid_ratios`` ``[B, 1, 2]`` and ``pos`` ``[B, S, dim]``.
        """
        (feat,), (mask,) = features, masks
        src = feat.flatten(2).transpose(1, 2)
        pos = sine_position(mask, self.dim).to(src.dtype).flatten(2).transpose(1, 2)
        flat_mask = mask.flatten(1)
        for layer in self.encoder:
            src = layer(src, pos, flat_mask)
        return {
            "memory": src,
            "padding_mask": flat_mask,
            "spatial_shapes": [tuple(feat.shape[-2:])],
            "level_start_index": torch.zeros(1, dtype=torch.int64, device=src.device),
            "valid_ratios": valid_ratios(mask)[:, None],
            "pos": pos,
        }

    def decode(self, memory: dict[str, Any], queries: Tensor) -> dict[str, Tensor]:
        """Run the decoder and heads on ``queries`` ``[N, dim]`` or ``[B, N, dim]`` (positional embeddings).

        Returns per layer ``logits`` ``[L, B, N, C]``, ``boxes`` ``[L, B, N, 4]`` and ``embeddings``
        ``[L, B, N, dim]`` (the normalised decoder outputs the heads read).
        """
        src, pos, mask = memory["memory"], memory["pos"], memory["padding_mask"]
        if queries.dim() == 2:
            # A copy, not a view of the parameter: module hooks (FlopCounterMode's) reject views made under no_grad.
            queries = queries[None].repeat(src.shape[0], 1, 1)
        reference = in_fp32(self.ref_point_head, queries).sigmoid()  # [B, N, 2], fp32 under autocast too
        sine = sine_point_embedding(reference, self.dim).to(queries.dtype)
        tgt = torch.zeros_like(queries)
        logits, boxes, embeddings = [], [], []
        for i, layer in enumerate(self.decoder):
            # The first layer has no content yet to condition the spatial query on.
            query_sine = sine if i == 0 else sine * self.query_scale(tgt)
            tgt = layer(tgt, queries, query_sine, src, pos, mask)
            hidden = self.decoder_norm(tgt)
            delta = self.bbox_embed(hidden).float()  # boxes are decoded in fp32
            boxes.append(torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid())
            logits.append(self.class_embed(hidden))
            embeddings.append(hidden)
        return {"logits": torch.stack(logits), "boxes": torch.stack(boxes), "embeddings": torch.stack(embeddings)}
