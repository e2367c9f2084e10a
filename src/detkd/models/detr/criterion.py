"""The set-prediction loss of focal-loss DETRs: Hungarian matching, then focal + L1 + GIoU, on every decoder layer.

Unmatched predictions have the all-zero (background) target of a sigmoid head. Every term is a sum divided by
the number of ground-truth boxes in the batch (averaged over processes under DDP, at least 1), as in Deformable
DETR, so an image without boxes still contributes its background classification.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from detkd.models.detr.matcher import Assignment, HungarianMatcher, cxcywh_to_pixel_xyxy


def num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> Tensor:
    """Ground-truth boxes per process, averaged over processes, at least 1 (the loss normaliser)."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1.0)


def one_hot_targets(logits: Tensor, targets: list[dict[str, Tensor]], assignment: list[Assignment]) -> Tensor:
    """Classification targets ``[B, N, C]``: one-hot at matched predictions, zero (background) elsewhere."""
    out = torch.zeros_like(logits, dtype=torch.float32)
    for b, (pred, gt) in enumerate(assignment):
        out[b, pred, targets[b]["labels"][gt]] = 1.0
    return out


def set_losses(
    logits: Tensor,
    boxes: Tensor,
    targets: list[dict[str, Tensor]],
    assignment: list[Assignment],
    size_wh: Tensor,
    normalizer: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Unweighted focal, L1 and GIoU losses of one decoder layer under a given assignment.

    Args:
        logits: ``[B, N, C]``.
        boxes: ``[B, N, 4]`` normalised cxcywh.
        targets: normalised targets (``labels`` 0-based, ``boxes`` cxcywh) per image.
        assignment: per image ``(prediction indices, target indices)``.
        size_wh: ``[B, 2]`` image sizes (for GIoU in pixels).
        normalizer: the number of boxes to divide by.

    Returns:
        ``(focal, l1, giou)``, each a sum divided by ``normalizer``, in fp32.
    """
    cls_target = one_hot_targets(logits, targets, assignment)
    focal = sigmoid_focal_loss(logits.float(), cls_target, alpha=alpha, gamma=gamma, reduction="sum") / normalizer
    batch_idx = torch.cat([torch.full_like(pred, b) for b, (pred, _) in enumerate(assignment)])
    pred_idx = torch.cat([pred for pred, _ in assignment])
    matched = boxes[batch_idx, pred_idx].float()  # [M, 4]
    target = torch.cat([t["boxes"][gt] for t, (_, gt) in zip(targets, assignment)]).float()
    l1 = (matched - target).abs().sum() / normalizer
    wh = size_wh[batch_idx]
    giou = generalized_box_iou_loss(
        cxcywh_to_pixel_xyxy(matched, wh), cxcywh_to_pixel_xyxy(target, wh), reduction="sum"
    )
    return focal, l1, giou / normalizer


class SetCriterion(nn.Module):
    """Hungarian loss summed over decoder layers (the last one and the auxiliary ones, equal weights).

    Args:
        matcher: the Hungarian matcher.
        cls_weight: weight of the focal loss (Deformable DETR: 2).
        bbox_weight: weight of the L1 loss (5).
        giou_weight: weight of the GIoU loss (2).
        alpha: focal alpha.
        gamma: focal gamma.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        cls_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        self.matcher = matcher
        self.weights = {"loss_cls": cls_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.alpha, self.gamma = alpha, gamma

    def forward(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], size_wh: Tensor
    ) -> tuple[dict[str, Tensor], list[list[Assignment]]]:
        """Weighted losses summed over layers, and the assignment of every layer.

        Args:
            logits: ``[L, B, N, C]``.
            boxes: ``[L, B, N, 4]``.
            targets: normalised targets per image.
            size_wh: ``[B, 2]``.
        """
        normalizer = num_boxes(targets, logits.device)
        sums = dict.fromkeys(self.weights, 0.0)
        assignments = []
        for layer_logits, layer_boxes in zip(logits, boxes):
            assignment = self.matcher(layer_logits, layer_boxes, targets, size_wh)
            assignments.append(assignment)
            terms = set_losses(
                layer_logits, layer_boxes, targets, assignment, size_wh, normalizer, self.alpha, self.gamma
            )
            for key, value in zip(self.weights, terms):
                sums[key] = sums[key] + value
        return {k: v * self.weights[k] for k, v in sums.items()}, assignments
