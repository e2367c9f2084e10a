"""The contract between detectors and distillation methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class FeatureSpec:
    """One feature level a detector exposes to distillation methods.

    Attributes:
        name: level name, ``p2``..``p7`` for FPN outputs.
        channels: number of channels.
        stride: input pixels per feature cell.
    """

    name: str
    channels: int
    stride: int


@dataclass
class DetOutputs:
    """What a detector's training forward returns.

    Attributes:
        features: FPN level name -> map ``[B, C, H, W]``.
        head: raw, pre-NMS head outputs. Two-stage: ``proposals``/``proposal_scores`` (per image),
            ``rois`` (sampled, per image), ``roi_labels``, ``roi_matched_gt`` (boxes of the matched GT),
            ``roi_logits`` ``[R, C+1]``, ``roi_deltas`` ``[R, (C+1)*4]``. One-stage: ``cls_logits`` ``[B, A, C+1]``,
            ``bbox_regression`` ``[B, A, 4]``, ``anchors`` (per image), ``num_anchors_per_level`` and, where the
            detector matches anchors itself, ``matched_idxs``. DETR: see ``models/detr``.
        losses: the detector's own task losses (empty when no targets were given).
        image_sizes: ``(h, w)`` of each image inside the padded batch.
        batch_shape: ``(H, W)`` of the padded batch tensor.
    """

    features: dict[str, Tensor]
    head: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    batch_shape: tuple[int, int] = (0, 0)
