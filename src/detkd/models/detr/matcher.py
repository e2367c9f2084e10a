"""Hungarian matching for set-prediction detectors, and the box frames it works in.

Boxes inside a DETR are normalised ``(cx, cy, w, h)`` in ``[0, 1]``, relative to each image's own (unpadded)
size. L1 costs are taken in that frame; (G)IoU in pixel ``xyxy``, so that an image that is not square does not
distort overlaps. Assignments are solved per image with ``scipy.optimize.linear_sum_assignment`` on a CPU copy of
the cost, after non-finite entries are replaced by large finite ones (scipy refuses NaN and Inf).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

# Stand-in for a non-finite cost: large enough that no finite pairing is worse, small enough to add up safely.
NONFINITE_COST = 1e8

Assignment = tuple[Tensor, Tensor]  # (prediction indices, target indices), int64, same length


def cxcywh_to_pixel_xyxy(boxes: Tensor, size_wh: Tensor) -> Tensor:
    """Normalised ``cxcywh`` ``[..., 4]`` -> pixel ``xyxy``; ``size_wh`` ``[2]`` or broadcastable ``[..., 2]``."""
    return box_convert(boxes, "cxcywh", "xyxy") * torch.cat([size_wh, size_wh], -1)


def image_wh(image_sizes: list[tuple[int, int]], device: torch.device | None = None) -> Tensor:
    """``[(h, w), ...]`` -> ``[B, 2]`` float ``(w, h)``."""
    return torch.tensor([[float(w), float(h)] for h, w in image_sizes], device=device)


def normalize_targets(targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """Preprocessed targets (``boxes`` xyxy in input pixels, ``labels`` 1..C) -> the DETR frame.

    Returns per image ``labels`` (0-based class index) and ``boxes`` (normalised ``cxcywh``).
    """
    out = []
    for t, (h, w) in zip(targets, image_sizes):
        boxes = t["boxes"].float()
        scale = boxes.new_tensor([w, h, w, h])
        out.append({"labels": t["labels"] - 1, "boxes": box_convert(boxes / scale, "xyxy", "cxcywh")})
    return out


def solve(cost: Tensor) -> Assignment:
    """Minimum-cost one-to-one assignment of the rows and columns of ``cost`` ``[N, M]``.

    Returns ``min(N, M)`` pairs, sorted by row, on the cost's device. NaN and Inf are replaced by large finite
    costs, so a diverging prediction never crashes the solver.
    """
    device = cost.device
    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    c = np.nan_to_num(
        cost.detach().float().cpu().numpy().astype(np.float64),
        nan=NONFINITE_COST,
        posinf=NONFINITE_COST,
        neginf=-NONFINITE_COST,
    )
    rows, cols = linear_sum_assignment(c)
    return torch.as_tensor(rows, dtype=torch.int64, device=device), torch.as_tensor(
        cols, dtype=torch.int64, device=device
    )


def focal_cost(logits: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per (prediction, class) cost of calling the class present, focal-loss style: ``[N, C]``.

    ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))``: the focal loss of a positive minus that of
    a negative, so a confident correct class is cheap and a confident wrong one expensive.
    """
    x = logits.float()
    p = torch.sigmoid(x)
    pos = alpha * (1 - p).pow(gamma) * F.softplus(-x)  # -log p = softplus(-x)
    neg = (1 - alpha) * p.pow(gamma) * F.softplus(x)  # -log(1-p) = softplus(x)
    return pos - neg


def box_cost(pred: Tensor, target: Tensor, size_wh: Tensor, l1_weight: float, giou_weight: float) -> Tensor:
    """``l1_weight * |pred - target|_1 (normalised cxcywh) - giou_weight * GIoU (pixel xyxy)``, ``[N, M]``."""
    pred, target = pred.float(), target.float()
    l1 = torch.cdist(pred, target, p=1)
    giou = generalized_box_iou(cxcywh_to_pixel_xyxy(pred, size_wh), cxcywh_to_pixel_xyxy(target, size_wh))
    return l1_weight * l1 - giou_weight * giou


class HungarianMatcher:
    """One-to-one matching of predictions to ground truth, per image.

    Cost = ``cls_weight * focal cost at the target class + bbox_weight * L1 + giou_weight * (-GIoU)``.

    Args:
        cls_weight: weight of the focal classification cost.
        bbox_weight: weight of the L1 cost on normalised ``cxcywh``.
        giou_weight: weight of the negative GIoU (pixel ``xyxy``).
        alpha: focal alpha.
        gamma: focal gamma.
    """

    def __init__(
        self,
        cls_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        self.cls_weight, self.bbox_weight, self.giou_weight = cls_weight, bbox_weight, giou_weight
        self.alpha, self.gamma = alpha, gamma

    def cost(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor, size_wh: Tensor) -> Tensor:
        """Cost ``[N, G]`` for one image: ``logits`` ``[N, C]``, ``boxes`` ``[N, 4]``, ``labels`` ``[G]`` (0-based)."""
        cls = focal_cost(logits, self.alpha, self.gamma)[:, labels]
        return self.cls_weight * cls + box_cost(boxes, target_boxes, size_wh, self.bbox_weight, self.giou_weight)

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], size_wh: Tensor
    ) -> list[Assignment]:
        """Match a batch: ``logits`` ``[B, N, C]``, ``boxes`` ``[B, N, 4]``, normalised targets, ``size_wh`` ``[B, 2]``.

        Returns per image ``(prediction indices, target indices)``; empty for an image without targets.
        """
        b, n, _ = logits.shape
        counts = [len(t["labels"]) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
        if sum(counts) == 0:
            return [(empty, empty) for _ in targets]
        # One cost matrix for the whole batch against every image's targets (each image then reads its own
        # columns): a few large operations instead of many small ones per image.
        labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).float()
        target_wh = torch.cat([size_wh[i].expand(c, 2) for i, c in enumerate(counts)])
        pred = boxes.flatten(0, 1).float()
        cls = focal_cost(logits.flatten(0, 1), self.alpha, self.gamma)[:, labels]
        l1 = torch.cdist(pred, target_boxes, p=1)
        giou = generalized_box_iou(
            cxcywh_to_pixel_xyxy(pred, size_wh.repeat_interleave(n, 0)), cxcywh_to_pixel_xyxy(target_boxes, target_wh)
        )
        cost = (self.cls_weight * cls + self.bbox_weight * l1 - self.giou_weight * giou).view(b, n, -1).cpu()
        out = []
        for i, part in enumerate(cost.split(counts, -1)):
            rows, cols = solve(part[i]) if counts[i] else (empty.cpu(), empty.cpu())
            out.append((rows.to(logits.device), cols.to(logits.device)))
        return out
