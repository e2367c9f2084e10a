"""The contract between detectors and distillation methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList


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
        images: the preprocessed batch itself (for methods that re-run a head, e.g. ``head_losses``).
    """

    features: dict[str, Tensor]
    head: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    batch_shape: tuple[int, int] = (0, 0)
    images: ImageList | None = None


class Detector(nn.Module):
    """The API every detkd detector offers, beyond ``nn.Module``.

    Inputs are preprocessed once by :meth:`preprocess` (normalise, resize, pad into one batch tensor) so that
    a teacher and a student can be fed exactly the same tensor.

    Attributes:
        kind: ``"two_stage"``, ``"one_stage"`` or ``"detr"``.
        num_classes: number of foreground classes ``C``; labels are ``1..C``.
        feature_info: the levels :meth:`extract` returns.
        spec: JSON-able build arguments; ``build_detector(**spec)`` rebuilds the same architecture.
        transform: the input transform (torchvision's ``GeneralizedRCNNTransform``: ``image_mean``,
            ``image_std``, resizing and batching) that :meth:`preprocess` applies.
    """

    kind: str = ""
    num_classes: int
    feature_info: list[FeatureSpec]
    spec: dict[str, Any]

    def preprocess(
        self, images: list[Tensor], targets: list[dict] | None = None
    ) -> tuple[ImageList, list[dict] | None]:
        if targets is not None:
            # The transform replaces only the keys it resizes; copy so callers keep their targets.
            targets = [dict(t) for t in targets]
        return self.transform(images, targets)

    def extract(self, images: ImageList) -> dict[str, Tensor]:
        """Feature maps by level name."""
        raise NotImplementedError

    def head_losses(
        self, features: dict[str, Tensor], images: ImageList, targets: list[dict] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Run the head(s) on ``features``: task losses (empty without targets) and raw head outputs."""
        raise NotImplementedError

    def forward(self, images: ImageList, targets: list[dict] | None = None) -> DetOutputs:
        features = self.extract(images)
        losses, head = self.head_losses(features, images, targets)
        return DetOutputs(features, head, losses, list(images.image_sizes), tuple(images.tensors.shape[-2:]), images)

    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections (``boxes`` xyxy in each input image's own pixels, ``scores``, ``labels``), eval mode."""
        raise NotImplementedError

    def roi_forward(
        self, features: dict[str, Tensor], rois: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Two-stage only: box-head ``(logits [R, C+1], deltas [R, (C+1)*4])`` on the given RoIs."""
        raise NotImplementedError(f"{type(self).__name__} has no RoI head")
