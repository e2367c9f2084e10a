"""DETR-family detectors behind detkd's :class:`Detector` API.

A :class:`DETRDetector` is a backbone (ResNet stages ``c3..c5``), a neck (:class:`ChannelMapper`: the transformer's
input levels), a transformer (Deformable or Conditional DETR: ``encode`` then ``decode``) and the set criterion.
Images are preprocessed by torchvision's ``GeneralizedRCNNTransform`` (ImageNet normalisation, resize, padding to
a multiple of 32), exactly as for the torchvision detectors, so a teacher and a student of any family share one
batch tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert

from detkd.models.detr.criterion import SetCriterion
from detkd.models.detr.matcher import Assignment, image_wh, normalize_targets
from detkd.models.detr.neck import ChannelMapper, level_masks, padding_mask
from detkd.models.outputs import Detector, SetHead

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class DETRDetector(Detector):
    """A DETR: backbone, neck, transformer, set criterion.

    ``features`` (from :meth:`extract`) are the neck's levels, the transformer's inputs: ``p3..p6`` (strides
    8..64) for Deformable DETR, ``p5`` for Conditional DETR, all ``hidden`` channels wide.

    ``head`` (from :meth:`head_losses`) is a :class:`SetHead`. Implements ``SetDetector`` and
    ``BackboneDetector``.

    Args:
        backbone: bottom-up network returning ``c2..c5``.
        neck: input projections.
        transformer: a ``DeformableTransformer`` or ``ConditionalTransformer``.
        criterion: the set criterion.
        num_classes: foreground classes.
        spec: build arguments.
        detections_per_img: boxes :meth:`predict` keeps per image (top scores over queries x classes).
    """

    head_type = SetHead

    def __init__(
        self,
        backbone: nn.Module,
        neck: ChannelMapper,
        transformer: nn.Module,
        criterion: SetCriterion,
        num_classes: int,
        spec: dict[str, Any],
        detections_per_img: int = 100,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.feature_info = list(neck.feature_info)
        self.spec = spec
        self.detections_per_img = detections_per_img
        self.transform = GeneralizedRCNNTransform(spec["min_size"], spec["max_size"], IMAGENET_MEAN, IMAGENET_STD)

    @property
    def num_layers(self) -> int:
        """Decoder depth ``L``."""
        return self.transformer.num_layers

    @property
    def hidden_dim(self) -> int:
        return self.transformer.dim

    @property
    def query_format(self) -> str:
        """``deformable`` (query = positional half + content half) or ``conditional`` (positional only)."""
        return self.transformer.query_format

    @property
    def query_dim(self) -> int:
        return self.transformer.query_dim

    def backbone_body(self) -> nn.Module:
        return self.backbone

    def extract(self, images: ImageList) -> dict[str, Tensor]:
        return dict(self.neck(self.backbone(images.tensors)))

    def encode(self, features: dict[str, Tensor], images: ImageList) -> dict[str, Any]:
        """Run the encoder; returns the ``memory`` dict of ``head``."""
        feats = [features[f.name] for f in self.feature_info]
        mask = padding_mask(list(images.image_sizes), tuple(images.tensors.shape[-2:]), images.tensors.device)
        return self.transformer.encode(feats, level_masks(mask, [tuple(f.shape[-2:]) for f in feats]))

    def decode(self, memory: dict[str, Any], queries: Tensor) -> dict[str, Tensor]:
        """The decoder and heads run on the given queries (``[N, q]`` or ``[B, N, q]``, in this detector's
        :attr:`query_format`) over an encoded batch: ``logits``, ``boxes``, ``embeddings`` per layer, as in ``head``.

        DETRDistill's query-prior group feeds the teacher's queries through the student's decoder this way.
        """
        return self.transformer.decode(memory, queries)

    def match(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]
    ) -> list[Assignment]:
        """This detector's Hungarian assignment of one layer's predictions (``[B, N, K]``, ``[B, N, 4]``) to
        preprocessed targets (``boxes`` xyxy in input pixels, ``labels`` 1..K)."""
        sizes = image_wh(image_sizes, logits.device)
        return self.criterion.matcher(logits, boxes, normalize_targets(targets, image_sizes), sizes)

    def head_losses(
        self, features: dict[str, Tensor], images: ImageList, targets: list[dict] | None
    ) -> tuple[dict[str, Tensor], SetHead]:
        memory = self.encode(features, images)
        queries = self.transformer.query_embed.weight
        out = self.decode(memory, queries)
        head = SetHead(out["logits"], out["boxes"], out["embeddings"], memory, queries)
        if targets is None:
            return {}, head
        sizes = image_wh(list(images.image_sizes), out["logits"].device)
        normalized = normalize_targets(targets, list(images.image_sizes))
        losses, head.assignments = self.criterion(out["logits"], out["boxes"], normalized, sizes)
        return losses, head

    def postprocess(self, logits: Tensor, boxes: Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Top-scoring (query, class) pairs of the last layer: ``boxes`` xyxy in input pixels (clipped to the
        image), ``scores``, ``labels`` 1..K. A query may appear with several classes, as in Deformable DETR; there
        is no NMS."""
        probs = logits.float().sigmoid().flatten(1)  # [B, N*K]
        k = min(self.detections_per_img, probs.shape[1])
        scores, idx = probs.topk(k, dim=1)
        query, label = idx // self.num_classes, idx % self.num_classes
        sizes = image_wh(image_sizes, logits.device)
        out = []
        for b in range(len(image_sizes)):
            xyxy = box_convert(boxes[b, query[b]].float(), "cxcywh", "xyxy").clamp(0, 1) * sizes[b].repeat(2)
            out.append({"boxes": xyxy, "scores": scores[b], "labels": label[b] + 1})
        return out

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            images = [im.to(device) for im in images]
            original = [tuple(im.shape[-2:]) for im in images]
            batch, _ = self.preprocess(images)
            _, head = self.head_losses(self.extract(batch), batch, None)
            detections = self.postprocess(head.logits[-1], head.boxes[-1], list(batch.image_sizes))
            return self.transform.postprocess(detections, list(batch.image_sizes), original)
        finally:
            self.train(was_training)
