"""The contract between detectors and distillation methods: what a detector returns and what it may be asked.

A method reads this file and ``methods/base.py`` only. A training forward returns :class:`DetOutputs`; its
``head`` is one typed dataclass per detector kind (:class:`TwoStageHead`, :class:`DenseHead`, :class:`SetHead`),
documented once, here. What a method may ask of a detector beyond :class:`Detector` is declared as small
protocols (:class:`RoIHeadDetector`, :class:`AnchorDetector`, :class:`BackboneDetector`, :class:`SetDetector`);
a method checks for a protocol with ``isinstance`` and never reaches into a detector's submodules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList


@dataclass(frozen=True)
class FeatureSpec:
    """One feature level a detector exposes to distillation methods.

    Attributes:
        name: level name, ``p2``..``p7`` for FPN outputs.
        channels: number of channels.
        stride: input pixels per cell.
    """

    name: str
    channels: int
    stride: int


# --------------------------------------------------------------------------------------------------- head outputs


@dataclass
class TwoStageHead:
    """Raw outputs of a two-stage detector (Faster R-CNN). ``C`` classes, ``R`` sampled RoIs in the batch.

    Attributes:
        proposals: per image ``[P, 4]`` xyxy RPN proposals after the RPN's NMS (input pixels, not differentiated).
        proposal_scores: per image ``[P]`` their objectness.
        rois: with targets, per image the sampled RoIs ``[R_i, 4]`` (ground truth included, as torchvision does).
        roi_labels: per image ``[R_i]`` class of each RoI, 0 for background.
        roi_matched_idxs: per image ``[R_i]`` index of the matched ground-truth box, -1 for background.
        roi_matched_gt: per image ``[R_i, 4]`` the matched ground-truth box (any box for background RoIs).
        roi_regression_targets: per image ``[R_i, 4]`` encoded regression targets.
        roi_logits: ``[R, C+1]`` box-head class logits, RoIs of all images concatenated in image order.
        roi_deltas: ``[R, (C+1)*4]`` box-head class-specific deltas.
    """

    kind: ClassVar[str] = "two_stage"

    proposals: list[Tensor]
    proposal_scores: list[Tensor]
    rois: list[Tensor] | None = None
    roi_labels: list[Tensor] | None = None
    roi_matched_idxs: list[Tensor] | None = None
    roi_matched_gt: list[Tensor] | None = None
    roi_regression_targets: list[Tensor] | None = None
    roi_logits: Tensor | None = None
    roi_deltas: Tensor | None = None


@dataclass
class DenseHead:
    """Raw outputs of a dense one-stage detector (RetinaNet, FCOS). ``A`` anchors (or points) per image, all levels
    concatenated finest first; ``K = C+1`` sigmoid class logits (index 0 unused, labels are ``1..C``).

    Attributes:
        cls_logits: ``[B, A, K]``.
        bbox_regression: ``[B, A, 4]``.
        anchors: per image ``[A, 4]`` xyxy anchors in input pixels (FCOS: one stride-sized box per location).
        num_anchors_per_level: ``A`` split by level.
        matched_idxs: with targets, per image ``[A]`` the index of the ground-truth box each anchor is assigned to
            by the detector's own matcher, -1 background, -2 ignored (RetinaNet's IoU matcher; FCOS's centre
            sampling and scale ranges).
        bbox_ctrness: FCOS only, ``[B, A, 1]`` centre-ness logits.
    """

    kind: ClassVar[str] = "one_stage"

    cls_logits: Tensor
    bbox_regression: Tensor
    anchors: list[Tensor]
    num_anchors_per_level: list[int]
    matched_idxs: list[Tensor] | None = None
    bbox_ctrness: Tensor | None = None

    def anchor_centres(self) -> Tensor:
        """``[B, A, 2]`` the ``(x, y)`` centre of every anchor (or point), input pixels."""
        return torch.stack([(a[:, :2] + a[:, 2:]) / 2 for a in self.anchors])


@dataclass
class SetHead:
    """Raw outputs of a set-prediction detector (DETR family), ``L`` decoder layers, ``N`` queries, ``K`` classes,
    width ``d``.

    Attributes:
        logits: ``[L, B, N, K]`` sigmoid class logits of every layer (the last is the prediction).
        boxes: ``[L, B, N, 4]`` normalised ``(cx, cy, w, h)``, relative to each image's unpadded size.
        embeddings: ``[L, B, N, d]`` the decoder outputs the heads read (the query embeddings).
        memory: what :meth:`SetDetector.decode` needs: ``memory`` ``[B, S, d]`` encoder output, ``padding_mask``
            ``[B, S]``, ``spatial_shapes``, ``level_start_index``, ``valid_ratios`` ``[B, levels, 2]``, ``pos``.
        query_embed: the learned query embedding ``[N, q]`` (the parameter itself), in the detector's
            :attr:`SetDetector.query_format`.
        assignments: with targets, per layer, per image ``(query indices, target indices)``: the Hungarian
            assignment the task loss used.
    """

    kind: ClassVar[str] = "detr"

    logits: Tensor
    boxes: Tensor
    embeddings: Tensor
    memory: dict[str, Any]
    query_embed: Tensor
    assignments: list[list[tuple[Tensor, Tensor]]] | None = None


Head = TwoStageHead | DenseHead | SetHead


@dataclass
class RoIOutputs:
    """A box head run on given RoIs: ``logits`` ``[R, C+1]`` and ``deltas`` ``[R, (C+1)*4]``."""

    logits: Tensor
    deltas: Tensor


@dataclass
class DetOutputs:
    """What a detector's training forward returns.

    Attributes:
        features: level name -> map ``[B, C, H, W]``, the levels of ``feature_info``.
        head: the raw, pre-NMS head outputs, typed by detector kind; None for a teacher run for its features only.
        losses: the detector's own task losses (empty when no targets were given).
        image_sizes: ``(h, w)`` of each image inside the padded batch.
        batch_shape: ``(H, W)`` of the padded batch tensor.
        images: the preprocessed batch itself (for methods that re-run a head, e.g. ``head_losses``).
        on_student_rois: teacher outputs only: the teacher's box head on the **student's** sampled RoIs (region
            proposal sharing), filled once per batch by ``DistillModel`` when a distiller asks for it
            (``Distiller.needs_shared_rois``).
    """

    features: dict[str, Tensor]
    head: Head | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    batch_shape: tuple[int, int] = (0, 0)
    images: ImageList | None = None
    on_student_rois: RoIOutputs | None = None


# ------------------------------------------------------------------------------------------------------- detectors


class Detector(nn.Module):
    """The API every detkd detector offers, beyond ``nn.Module``.

    Inputs are preprocessed once by :meth:`preprocess` (normalise, resize, pad into one batch tensor) so that
    a teacher and a student can be fed exactly the same tensor.

    Attributes:
        head_type: the class of ``DetOutputs.head`` this detector returns.
        kind: ``head_type.kind``: ``"two_stage"``, ``"one_stage"`` or ``"detr"``.
        num_classes: number of foreground classes ``C``; labels are ``1..C``.
        feature_info: the levels :meth:`extract` returns.
        spec: JSON-able build arguments; ``build_detector(**spec)`` rebuilds the same architecture.
        transform: the input transform (torchvision's ``GeneralizedRCNNTransform``: ``image_mean``,
            ``image_std``, resizing and batching) that :meth:`preprocess` applies.
    """

    head_type: ClassVar[type[Head]]
    num_classes: int
    feature_info: list[FeatureSpec]
    spec: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.head_type.kind

    def preprocess(
        self, images: list[Tensor], targets: list[dict] | None = None
    ) -> tuple[ImageList, list[dict] | None]:
        if targets is not None:
            # The transform replaces only the keys it resizes; copy so callers keep their targets.
            targets = [dict(t) for t in targets]
        sizes, cap = self.spec.get("train_sizes"), self.spec.get("train_max_size")
        if sizes:
            # torchvision's transform draws each training image's short side from its min_size tuple (global torch
            # RNG, so a resume replays it) and evaluates at the tuple's last entry.
            self.transform.min_size = tuple(sizes) if self.training else (self.spec["min_size"],)
        if cap:
            self.transform.max_size = cap if self.training else self.spec["max_size"]
        return self.transform(images, targets)

    def extract(self, images: ImageList) -> dict[str, Tensor]:
        """Feature maps by level name."""
        raise NotImplementedError

    def head_losses(
        self, features: dict[str, Tensor], images: ImageList, targets: list[dict] | None
    ) -> tuple[dict[str, Tensor], Head]:
        """Run the head(s) on ``features`` (any maps shaped like the detector's own, e.g. LGD's label-guided
        maps): task losses (empty without targets) and raw head outputs."""
        raise NotImplementedError

    def forward(self, images: ImageList, targets: list[dict] | None = None) -> DetOutputs:
        features = self.extract(images)
        losses, head = self.head_losses(features, images, targets)
        return DetOutputs(features, head, losses, list(images.image_sizes), tuple(images.tensors.shape[-2:]), images)

    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections (``boxes`` xyxy in each input image's own pixels, ``scores``, ``labels``), eval mode."""
        raise NotImplementedError


@runtime_checkable
class RoIHeadDetector(Protocol):
    """A detector with a box head on RoIs (two-stage): what region-proposal sharing and box distillation use."""

    def roi_forward(
        self, features: dict[str, Tensor], rois: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Box-head ``(logits [R, C+1], deltas [R, (C+1)*4])`` on the given RoIs (per image ``[R_i, 4]``)."""
        ...

    def decode_boxes(self, deltas: Tensor, rois: Tensor) -> Tensor:
        """Boxes ``[R, 4]`` xyxy from one set of deltas ``[R, 4]`` applied to ``rois`` ``[R, 4]``, with this
        detector's box coder."""
        ...

    @property
    def box_coder_weights(self) -> tuple[float, ...]:
        """The weights the box coder scales deltas by: two detectors' deltas compare only when these agree."""
        ...

    @property
    def test_proposals(self) -> int:
        """Proposals per image the RPN keeps at inference."""
        ...


@runtime_checkable
class AnchorDetector(Protocol):
    """A detector whose levels carry anchors (every torchvision-based detector; for FCOS, its points)."""

    def level_anchors(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Anchors of each level, ``[H*W*A, 4]`` xyxy in input pixels (location-major, anchor-minor; the same for
        every image of a batch)."""
        ...


@runtime_checkable
class BackboneDetector(Protocol):
    """A detector whose bottom-up backbone (without the neck) can be singled out, e.g. to freeze it."""

    def backbone_body(self) -> nn.Module:
        """The bottom-up network (ResNet stages), without the FPN or neck."""
        ...


@runtime_checkable
class SetDetector(Protocol):
    """A DETR-family detector: the facts and passes DETR distillation uses."""

    num_layers: int  # decoder depth L
    hidden_dim: int  # width d
    query_format: str  # "deformable" (positional half + content half) or "conditional" (positional only)
    query_dim: int  # width q of a query

    def decode(self, memory: dict[str, Any], queries: Tensor) -> dict[str, Tensor]:
        """Decoder and heads on the given queries (``[N, q]`` or ``[B, N, q]``) over an encoded batch:
        ``logits``, ``boxes``, ``embeddings`` per layer, as in :class:`SetHead`."""
        ...

    def match(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]
    ) -> list[tuple[Tensor, Tensor]]:
        """The detector's Hungarian assignment of one layer's predictions to preprocessed targets."""
        ...
