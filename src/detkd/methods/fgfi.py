"""Distilling Object Detectors with Fine-grained Feature Imitation (Wang et al., CVPR 2019, arXiv 1906.03609).

Only the feature cells near objects are imitated. For each ground-truth box the IoU with every anchor of the
student (all FPN levels) is computed; with ``m`` the box's best anchor IoU, the anchors whose IoU exceeds
``psi * m`` mark their cell as an imitation cell. The union over boxes gives a mask ``I`` per level, and

    L = sum_levels sum_cells I * ||adapt(s) - t||^2 / (2 * N_p),   N_p = number of marked cells,

through a per-level adapter (identity-initialised when channels match). For FPN detectors the best IoU is taken
over all levels' anchors, so each object is imitated on the levels whose anchors fit it. FCOS's anchors are its
per-location points with the size of the stride, which gives a centre-and-scale mask.

Options: ``psi`` (default 0.5, the paper's value), ``levels``, ``kernel`` (adapter kernel, default 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detkd.errors import BuildError
from detkd.methods.base import Distiller, MethodConfig
from detkd.methods.connectors import build_connectors
from detkd.models.outputs import AnchorDetector, Detector, DetOutputs


@dataclass
class FGFIConfig(MethodConfig):
    psi: float = 0.5
    levels: list[str] | None = None
    kernel: int = 3


def imitation_masks(
    anchors: dict[str, Tensor], shapes: dict[str, tuple[int, int]], boxes: list[Tensor], psi: float
) -> dict[str, Tensor]:
    """FGFI masks ``[B, H, W]`` per level.

    Args:
        anchors: level -> ``[H*W*A, 4]`` anchors in torchvision's order (location-major, anchor-minor).
        shapes: level -> ``(H, W)``.
        boxes: per image GT ``[N, 4]``.
        psi: the threshold factor.
    """
    levels = list(anchors)
    all_anchors = torch.cat([anchors[lv] for lv in levels])
    sizes = [len(anchors[lv]) for lv in levels]
    masks = {lv: torch.zeros(len(boxes), *shapes[lv], device=all_anchors.device) for lv in levels}
    for i, gt in enumerate(boxes):
        if len(gt) == 0:
            continue
        iou = box_iou(gt.float(), all_anchors.float())  # [N, A_total]
        best = iou.amax(1, keepdim=True)
        hit = ((iou > psi * best) & (best > 0)).any(0)  # [A_total]
        for lv, part in zip(levels, hit.split(sizes)):
            h, w = shapes[lv]
            masks[lv][i] = part.view(h, w, -1).any(-1).float()
    return masks


class FGFI(Distiller):
    name = "fgfi"
    summary = "fine-grained feature imitation on cells whose anchors overlap objects (Wang et al. CVPR 2019)"
    Config = FGFIConfig

    def __init__(self, cfg: FGFIConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        if not isinstance(student, AnchorDetector):
            raise BuildError(f"fgfi needs a student with anchors; {student.spec['name']} has none")
        self.connectors = build_connectors(student.feature_info, teacher.feature_info, cfg.levels, cfg.kernel)

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        feats = student.features
        anchors = {lv: a for lv, a in self.student.level_anchors(feats).items() if lv in self.connectors}
        masks = imitation_masks(
            anchors,
            {lv: tuple(feats[lv].shape[-2:]) for lv in anchors},
            [t["boxes"] for t in targets],
            self.cfg.psi,
        )
        total, cells = feats[next(iter(anchors))].new_zeros((), dtype=torch.float32), 0.0
        for level, connector in self.connectors.items():
            t_feat = teacher.features[level]
            s_feat = connector(feats[level], t_feat.shape[-2:])
            mask = masks[level]
            if mask.shape[-2:] != t_feat.shape[-2:]:
                mask = torch.nn.functional.interpolate(mask[:, None], size=t_feat.shape[-2:], mode="nearest")[:, 0]
            total = total + ((s_feat.float() - t_feat.float()).pow(2) * mask[:, None]).sum()
            cells += float(mask.sum())
        self.stats["mask_cells"] = cells
        return {"kd_feat": total / (2 * max(1.0, cells))}
