"""torchvision Faster R-CNN, RetinaNet and FCOS behind detkd's :class:`Detector` API.

Each adapter owns an unmodified torchvision model (``self.model``) and re-runs its parts in the order
torchvision does, keeping what distillation needs and torchvision discards: the FPN maps, RPN scores, the
sampled RoIs with their labels and matched ground truth, and the raw dense-head outputs. Methods read those
from :class:`DetOutputs` and never hook into the model. Inference and export use ``self.model`` as is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign, box_iou
from torchvision.ops.poolers import initLevelMapper

from detkd.errors import ConfigError
from detkd.models.backbones import FPNBackbone
from detkd.models.outputs import Detector


class _TorchvisionDetector(Detector):
    """Shared parts: preprocessing through the model's own transform, feature extraction, prediction."""

    model: nn.Module

    def __init__(self, model: nn.Module, backbone: FPNBackbone, num_classes: int, spec: dict[str, Any]):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.feature_info = backbone.feature_info
        self.spec = spec

    @property
    def transform(self) -> nn.Module:
        """torchvision's ``GeneralizedRCNNTransform``: normalisation, resizing and batching."""
        return self.model.transform

    def extract(self, images: ImageList) -> dict[str, Tensor]:
        return dict(self.model.backbone(images.tensors))

    def level_anchors(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Anchors of each level, ``[H*W*A, 4]`` in input pixels (the same for every image of a batch)."""
        generator = self._anchor_generator()
        feats = list(features.values())
        first = feats[0]
        strides = [[torch.tensor(f.stride), torch.tensor(f.stride)] for f in self.feature_info]
        generator.set_cell_anchors(first.dtype, first.device)
        anchors = generator.grid_anchors([list(f.shape[-2:]) for f in feats], strides)
        return dict(zip(features, anchors))

    def _anchor_generator(self) -> AnchorGenerator:
        return self.model.anchor_generator

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            return self.model([im.to(device) for im in images])
        finally:
            self.train(was_training)


class FasterRCNNAdapter(_TorchvisionDetector):
    """Faster R-CNN with FPN.

    ``head`` holds ``proposals`` and ``proposal_scores`` (after the RPN's NMS, per image) and, with targets,
    ``rois`` (the sampled RoIs, per image, ground truth included as torchvision does), ``roi_labels``,
    ``roi_matched_idxs`` (-1 for background), ``roi_matched_gt`` (matched GT boxes), ``roi_regression_targets``,
    ``roi_logits`` ``[R, C+1]`` and ``roi_deltas`` ``[R, (C+1)*4]``.
    """

    kind = "two_stage"

    def _anchor_generator(self) -> AnchorGenerator:
        return self.model.rpn.anchor_generator

    def _rpn(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict] | None
    ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        rpn = self.model.rpn
        feats = list(features.values())
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(images, feats)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        # Proposals are not differentiated through, as in torchvision; decoded in fp32 so that mixed precision does
        # not move the boxes (bf16 has a 4-px step at 512 px) and change which RoIs are sampled.
        proposals = rpn.box_coder.decode(deltas.detach().float(), anchors).view(len(anchors), -1, 4)
        boxes, scores = rpn.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        losses = {}
        if targets is not None:
            labels, matched_gt = rpn.assign_targets_to_anchors(anchors, targets)
            regression_targets = rpn.box_coder.encode(matched_gt, anchors)
            loss_obj, loss_box = rpn.compute_loss(objectness, deltas, labels, regression_targets)
            losses = {"loss_rpn_cls": loss_obj, "loss_rpn_box": loss_box}
        return boxes, scores, losses

    def head_losses(
        self, features: dict[str, Tensor], images: ImageList, targets: list[dict] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        proposals, scores, losses = self._rpn(images, features, targets)
        head: dict[str, Any] = {"proposals": proposals, "proposal_scores": scores}
        if targets is None:
            return losses, head
        roi_heads = self.model.roi_heads
        rois, matched_idxs, labels, regression_targets = roi_heads.select_training_samples(
            [p.detach() for p in proposals], targets
        )
        logits, deltas = self.roi_forward(features, rois, images.image_sizes)
        loss_cls, loss_box = fastrcnn_loss(logits, deltas, labels, regression_targets)
        losses.update(loss_cls=loss_cls, loss_box=loss_box)
        matched_gt = []
        for t, idx in zip(targets, matched_idxs):
            gt = t["boxes"] if len(t["boxes"]) else t["boxes"].new_zeros(1, 4)
            matched_gt.append(gt[idx.clamp(min=0)])
        head.update(
            rois=rois,
            roi_labels=labels,
            roi_matched_idxs=[torch.where(lab > 0, idx, -1) for idx, lab in zip(matched_idxs, labels)],
            roi_matched_gt=matched_gt,
            roi_regression_targets=regression_targets,
            roi_logits=logits,
            roi_deltas=deltas,
        )
        return losses, head

    def roi_features(
        self, features: dict[str, Tensor], rois: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> Tensor:
        """RoIAlign-pooled features ``[R, C, 7, 7]`` at torchvision's level assignment."""
        return self.model.roi_heads.box_roi_pool(features, rois, image_sizes)

    def roi_forward(
        self, features: dict[str, Tensor], rois: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        roi_heads = self.model.roi_heads
        x = roi_heads.box_head(self.roi_features(features, rois, image_sizes))
        return roi_heads.box_predictor(x)


class RetinaNetAdapter(_TorchvisionDetector):
    """RetinaNet. ``head``: ``cls_logits`` ``[B, A, C+1]``, ``bbox_regression`` ``[B, A, 4]``, ``anchors``
    (per image ``[A, 4]``), ``num_anchors_per_level`` and, with targets, ``matched_idxs`` (per image, -1
    background, -2 ignored)."""

    kind = "one_stage"

    def head_losses(
        self, features: dict[str, Tensor], images: ImageList, targets: list[dict] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        feats = list(features.values())
        out = self.model.head(feats)
        anchors = self.model.anchor_generator(images, feats)
        per_location = out["cls_logits"].shape[1] // sum(f.shape[-2] * f.shape[-1] for f in feats)
        head: dict[str, Any] = dict(
            out, anchors=anchors, num_anchors_per_level=[f.shape[-2] * f.shape[-1] * per_location for f in feats]
        )
        if targets is None:
            return {}, head
        matched = []
        for a, t in zip(anchors, targets):
            if t["boxes"].numel() == 0:
                matched.append(torch.full((len(a),), -1, dtype=torch.int64, device=a.device))
            else:
                matched.append(self.model.proposal_matcher(box_iou(t["boxes"], a)))
        losses = self.model.head.compute_loss(targets, out, anchors, matched)
        head["matched_idxs"] = matched
        return {"loss_cls": losses["classification"], "loss_box": losses["bbox_regression"]}, head


class FCOSAdapter(_TorchvisionDetector):
    """FCOS. ``head``: ``cls_logits`` ``[B, A, C+1]``, ``bbox_regression`` ``[B, A, 4]``, ``bbox_ctrness``
    ``[B, A, 1]``, ``anchors`` (one point-anchor per location) and ``num_anchors_per_level``."""

    kind = "one_stage"

    def head_losses(
        self, features: dict[str, Tensor], images: ImageList, targets: list[dict] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        feats = list(features.values())
        out = self.model.head(feats)
        anchors = self.model.anchor_generator(images, feats)
        num_per_level = [f.shape[-2] * f.shape[-1] for f in feats]
        head: dict[str, Any] = dict(out, anchors=anchors, num_anchors_per_level=num_per_level)
        if targets is None:
            return {}, head
        losses = self.model.compute_loss(targets, out, anchors, num_per_level)
        return {
            "loss_cls": losses["classification"],
            "loss_box": losses["bbox_regression"],
            "loss_ctrness": losses["bbox_ctrness"],
        }, head


def build_faster_rcnn(backbone: FPNBackbone, num_classes: int, preset: dict[str, Any], spec: dict) -> FasterRCNNAdapter:
    channels = backbone.out_channels
    strides = [f.stride for f in backbone.feature_info]
    anchors = AnchorGenerator(tuple((preset["anchor_scale"] * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    roi_levels = [f for f in backbone.feature_info if f.name != "p6"]
    roi_pool = MultiScaleRoIAlign([f.name for f in roi_levels], output_size=7, sampling_ratio=2)
    # torchvision infers the level scales from the first batch it sees, which goes wrong when that batch's images
    # were shrunk by max_size; the strides are known, so set them.
    roi_pool.scales = [1.0 / f.stride for f in roi_levels]
    roi_pool.map_levels = initLevelMapper(int(math.log2(roi_levels[0].stride)), int(math.log2(roi_levels[-1].stride)))
    model = FasterRCNN(
        backbone,
        num_classes=None,  # given by box_predictor
        min_size=spec["min_size"],
        max_size=spec["max_size"],
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=preset["rpn_pre_nms_train"],
        rpn_post_nms_top_n_train=preset["rpn_post_nms_train"],
        rpn_pre_nms_top_n_test=preset["rpn_pre_nms_test"],
        rpn_post_nms_top_n_test=preset["rpn_post_nms_test"],
        rpn_batch_size_per_image=preset["rpn_batch"],
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(channels * 49, preset["box_head_dim"]),
        box_predictor=FastRCNNPredictor(preset["box_head_dim"], num_classes + 1),
        box_batch_size_per_image=preset["box_batch"],
        box_detections_per_img=100,
    )
    return FasterRCNNAdapter(model, backbone, num_classes, spec)


def _head_norm(preset: dict[str, Any]) -> Callable[[int], nn.Module] | None:
    """GroupNorm in the one-stage heads' conv towers (``head_norm: group``, as in RetinaNet v2 and FCOS), or none."""
    norm = preset.get("head_norm", "none")
    if norm == "group":
        return partial(nn.GroupNorm, preset.get("head_norm_groups", 16))
    if norm == "none":
        return None
    raise ConfigError(f"unknown head_norm {norm!r} (use group or none)")


def build_retinanet(backbone: FPNBackbone, num_classes: int, preset: dict[str, Any], spec: dict) -> RetinaNetAdapter:
    strides = [f.stride for f in backbone.feature_info]
    sizes = tuple(tuple(preset["anchor_scale"] * s * 2 ** (k / 3) for k in range(3)) for s in strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))
    model = RetinaNet(
        backbone,
        num_classes=num_classes + 1,
        min_size=spec["min_size"],
        max_size=spec["max_size"],
        anchor_generator=anchors,
        head=RetinaNetHead(
            backbone.out_channels,
            anchors.num_anchors_per_location()[0],
            num_classes + 1,
            norm_layer=_head_norm(preset),
        ),
        topk_candidates=preset["topk_candidates"],
        score_thresh=0.05,
    )
    return RetinaNetAdapter(model, backbone, num_classes, spec)


def build_fcos(backbone: FPNBackbone, num_classes: int, preset: dict[str, Any], spec: dict) -> FCOSAdapter:
    strides = [f.stride for f in backbone.feature_info]
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    model = FCOS(
        backbone,
        num_classes=num_classes + 1,
        min_size=spec["min_size"],
        max_size=spec["max_size"],
        anchor_generator=anchors,
        topk_candidates=preset["topk_candidates"],
        score_thresh=0.05,
    )
    return FCOSAdapter(model, backbone, num_classes, spec)
