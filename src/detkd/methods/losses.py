"""Small pure-tensor pieces shared by several methods: soft-label divergences, box masks, shared RoIs.

Every reduction runs in fp32 so that the terms stay finite under mixed precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.models.outputs import Detector, DetOutputs


def softmax_kl(s_logits: Tensor, t_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton KD per row: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, shape ``[N]``. Zero when equal."""
    s = F.log_softmax(s_logits.float() / temperature, dim=-1)
    t = F.log_softmax(t_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature**2


def bernoulli_kl(s_logits: Tensor, t_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KD for sigmoid (per-class) logits: ``T^2 * KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T)))`` summed over the
    last dim, shape ``[...]`` without it. Zero when equal."""
    s, t = s_logits.float() / temperature, t_logits.float() / temperature
    p = torch.sigmoid(t)
    # KL = p*(log p - log q) + (1-p)*(log(1-p) - log(1-q)), written with logsigmoid for stability.
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum(-1) * temperature**2


def box_masks(boxes: list[Tensor], shape: tuple[int, int], stride: int, values: list[Tensor] | None = None) -> Tensor:
    """Rasterise boxes onto a level: ``[B, H, W]``, 1 (or the box's value, max over overlaps) inside a box.

    A cell is inside when its centre ``((x + 0.5) * stride, (y + 0.5) * stride)`` lies in the box; a box that
    covers no cell centre still marks the cell holding its centre, so small objects are never dropped.

    Args:
        boxes: per image ``[N, 4]`` xyxy in input pixels.
        shape: ``(H, W)`` of the level.
        stride: input pixels per cell.
        values: per image ``[N]`` values to paint instead of 1.
    """
    h, w = shape
    device = boxes[0].device if boxes else torch.device("cpu")
    out = torch.zeros(len(boxes), h, w, device=device)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    for i, b in enumerate(boxes):
        if len(b) == 0:
            continue
        b = b.float()
        inside = (
            (ys[None, :, None] >= b[:, 1, None, None])
            & (ys[None, :, None] <= b[:, 3, None, None])
            & (xs[None, None, :] >= b[:, 0, None, None])
            & (xs[None, None, :] <= b[:, 2, None, None])
        )  # [N, H, W]
        cx = ((b[:, 0] + b[:, 2]) / 2 / stride).long().clamp(0, w - 1)
        cy = ((b[:, 1] + b[:, 3]) / 2 / stride).long().clamp(0, h - 1)
        inside[torch.arange(len(b), device=device), cy, cx] = True
        v = torch.ones(len(b), device=device) if values is None else values[i].float().to(device)
        out[i] = (inside.float() * v[:, None, None]).amax(0)
    return out


def masked_mse(diff2: Tensor, mask: Tensor) -> Tensor:
    """``sum(mask * diff2) / max(1, sum(mask))`` with ``diff2`` ``[B, C, H, W]`` and mask ``[B, H, W]``:
    the squared error per masked cell, summed over channels."""
    mask = mask.float()
    return (diff2.float() * mask[:, None]).sum() / mask.sum().clamp(min=1.0)


def shared_roi_outputs(teacher: Detector, student_out: DetOutputs, teacher_out: DetOutputs) -> tuple[Tensor, Tensor]:
    """The teacher's box head on the **student's** sampled RoIs (region proposal sharing), computed once per
    batch and cached in ``teacher_out.head`` so that composed methods share it."""
    cached = teacher_out.head.get("shared_roi_outputs")
    if cached is None:
        with torch.no_grad():
            cached = teacher.roi_forward(teacher_out.features, student_out.head["rois"], student_out.image_sizes)
        teacher_out.head["shared_roi_outputs"] = cached
    return cached
