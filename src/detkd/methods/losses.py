"""What several methods share: soft-label divergences, soft counts, box masks, and the checks that a
(student, teacher) pair can be distilled.

Every reduction runs in fp32 so that the terms stay finite under mixed precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.errors import BuildError
from detkd.models.outputs import DenseHead, Detector


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


def check_logit_pair(student: Detector, teacher: Detector, method: str) -> None:
    """Logit distillation needs the same classes, the same head type and, for dense heads, the same anchor layout;
    raises :class:`BuildError` naming the two detectors otherwise."""
    if student.num_classes != teacher.num_classes:
        raise BuildError(f"{method}: student predicts {student.num_classes} classes, teacher {teacher.num_classes}")
    if student.head_type is not teacher.head_type:
        raise BuildError(
            f"{method}: logit distillation needs the same detector kind; student {student.spec['name']} "
            f"is {student.kind}, teacher {teacher.spec['name']} is {teacher.kind}"
        )
    if student.head_type is DenseHead:
        s_family, t_family = (d.spec["name"].split("_")[0] for d in (student, teacher))
        s_levels, t_levels = ([f.stride for f in d.feature_info] for d in (student, teacher))
        if s_family != t_family or s_levels != t_levels:
            raise BuildError(
                f"{method}: dense logits can be distilled only between detectors with the same head "
                f"and levels; student {student.spec['name']} {s_levels}, teacher {teacher.spec['name']} "
                f"{t_levels}"
            )


def dense_soft_count(t_logits: Tensor) -> Tensor:
    """Teacher's soft number of objects in a batch of dense logits ``[B, A, K]``, at least 1."""
    return torch.sigmoid(t_logits.float()).amax(-1).sum().clamp(min=1.0)
