"""torchvision Faster R-CNN, RetinaNet and FCOS behind detkd's :class:`Detector` API.

Each adapter owns an unmodified torchvision model (``self.model``) and re-runs its parts in the order
torchvision does, keeping what distillation needs and torchvision discards: the FPN maps, RPN scores, the
sampled RoIs with their labels and matched ground truth, and the raw dense-head outputs. Methods read those
from :class:`DetOutputs` (heads typed in ``detkd.models.outputs``) and the protocols declared there, never
``self.model``. Inference and export use ``self.model`` as is.
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
from torchvision.ops import box_iou
from torchvision.ops.poolers import initLevelMapper

from detkd.errors import ConfigError
from detkd.models.backbones import FPNBackbone
from detkd.models.outputs import DenseHead, Detector, TwoStageHead
from detkd.models.roi_align import FastMultiScaleRoIAlign


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

    def backbone_body(self) -> nn.Module:
        """The bottom-up network (ResNet stages) under the FPN."""
        return self.model.backbone.body

    def fpn(self) -> nn.Module:
        """torchvision's ``FeaturePyramidNetwork`` (lateral ``inner_blocks`` and output ``layer_blocks``)."""
        return self.model.backbone.fpn

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
    """Faster R-CNN with FPN; ``head`` is a :class:`TwoStageHead`. Implements ``RoIHeadDetector``."""

    head_type = TwoStageHead

    @property
    def box_coder_weights(self) -> tuple[float, ...]:
        return tuple(self.model.roi_heads.box_coder.weights)

    @property
    def test_proposals(self) -> int:
        return int(self.model.rpn._post_nms_top_n["testing"])

    def rpn_head(self) -> nn.Module:
        """torchvision's ``RPNHead`` (a 3x3 ``conv`` then the objectness and delta 1x1 convs)."""
        return self.model.rpn.head

    def decode_boxes(self, deltas: Tensor, rois: Tensor) -> Tensor:
        return self.model.roi_heads.box_coder.decode_single(deltas, rois)

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
    ) -> tuple[dict[str, Tensor], TwoStageHead]:
        proposals, scores, losses = self._rpn(images, features, targets)
        head = TwoStageHead(proposals, scores)
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
        head.rois = rois
        head.roi_labels = labels
        head.roi_matched_idxs = [torch.where(lab > 0, idx, -1) for idx, lab in zip(matched_idxs, labels)]
        head.roi_matched_gt = matched_gt
        head.roi_regression_targets = regression_targets
        head.roi_logits, head.roi_deltas = logits, deltas
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
    """RetinaNet; ``head`` is a :class:`DenseHead` with the IoU matcher's ``matched_idxs``."""

    head_type = DenseHead

    def head_losses(
        self, features: dict[str, Tensor], images: ImageList, targets: list[dict] | None
    ) -> tuple[dict[str, Tensor], DenseHead]:
        feats = list(features.values())
        out = self.model.head(feats)
        anchors = self.model.anchor_generator(images, feats)
        per_location = out["cls_logits"].shape[1] // sum(f.shape[-2] * f.shape[-1] for f in feats)
        head = DenseHead(
            out["cls_logits"],
            out["bbox_regression"],
            anchors,
            [f.shape[-2] * f.shape[-1] * per_location for f in feats],
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
        head.matched_idxs = matched
        return {"loss_cls": losses["classification"], "loss_box": losses["bbox_regression"]}, head


class FCOSAdapter(_TorchvisionDetector):
    """FCOS; ``head`` is a :class:`DenseHead` (one point-anchor per location, ``bbox_ctrness``) with the
    ``matched_idxs`` of FCOS's own assignment (:meth:`match_points`)."""

    head_type = DenseHead

    def match_points(self, anchors: Tensor, gt: Tensor, num_per_level: list[int]) -> Tensor:
        """FCOS's assignment of one image's locations ``[A, 4]`` to its boxes ``[M, 4]``: ``[A]`` box index, -1 for
        background.

        A location is a candidate for a box when its centre lies inside the box, within ``center_sampling_radius``
        strides of the box centre, and its largest distance to the box sides lies in the level's range
        ``(4 s, 8 s)`` (open below on the finest level, above on the coarsest); among candidates the smallest box
        wins. The same rule as torchvision's ``FCOS.compute_loss``, and scored the same way, so the loss computed
        from these indices is the one ``FCOS.compute_loss`` gives.
        """
        if gt.numel() == 0:
            return torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # [A, 2]
        stride = anchors[:, 2] - anchors[:, 0]  # [A]
        gt_centres = (gt[:, :2] + gt[:, 2:]) / 2  # [M, 2]
        radius = self.model.center_sampling_radius
        near = (centres[:, None] - gt_centres[None]).abs().amax(2) < radius * stride[:, None]  # [A, M]
        x, y = centres[:, 0:1], centres[:, 1:2]
        sides = torch.stack([x - gt[None, :, 0], y - gt[None, :, 1], gt[None, :, 2] - x, gt[None, :, 3] - y], 2)
        low, high = stride * 4, stride * 8
        low[: num_per_level[0]] = 0
        high[-num_per_level[-1] :] = float("inf")
        reach = sides.amax(2)  # [A, M]
        ok = near & (sides.amin(2) > 0) & (reach > low[:, None]) & (reach < high[:, None])
        area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])  # [M]
        # Scored as torchvision does (1e8 - area, fp32), so ties between near-equal areas resolve identically.
        score, idx = (ok.to(torch.float32) * (1e8 - area[None])).max(1)
        return torch.where(score < 1e-5, torch.full_like(idx, -1), idx)

    def head_losses(
        self, features: dict[str, Tensor], images: ImageList, targets: list[dict] | None
    ) -> tuple[dict[str, Tensor], DenseHead]:
        feats = list(features.values())
        out = self.model.head(feats)
        anchors = self.model.anchor_generator(images, feats)
        num_per_level = [f.shape[-2] * f.shape[-1] for f in feats]
        head = DenseHead(out["cls_logits"], out["bbox_regression"], anchors, num_per_level, None, out["bbox_ctrness"])
        if targets is None:
            return {}, head
        head.matched_idxs = [self.match_points(a, t["boxes"], num_per_level) for a, t in zip(anchors, targets)]
        losses = self.model.head.compute_loss(targets, out, anchors, head.matched_idxs)
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
    roi_pool = FastMultiScaleRoIAlign([f.name for f in roi_levels], output_size=7, sampling_ratio=2)
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
