"""Distilling Object Detectors via Decoupled Features (Guo et al., CVPR 2021, arXiv 2103.14475).

DeFeat's observation: background regions carry useful knowledge too, but mixing them with object regions
drowns one in the other. So every term is split in two and weighted separately:

- feature imitation on each FPN level, through an adapter, with the ground-truth boxes as the object mask ``M``:
  ``kd_feat_fg = sum M ||s'-t||^2 / (2 sum M)`` and ``kd_feat_bg = sum (1-M) ||s'-t||^2 / (2 sum (1-M))``,
  averaged over levels;
- soft labels, decoupled the same way: two-stage students distil the teacher's box head run on the student's
  sampled RoIs, split into positive and negative RoIs (``kd_cls_pos``, ``kd_cls_neg``, softmax KL at their own
  temperatures); one-stage students distil dense sigmoid logits, split by whether the anchor centre is inside a
  ground-truth box.

Options: ``temperature_pos``, ``temperature_neg`` (defaults 1 and 1), ``levels``, ``kernel``; the relative
weights are ``term_weights``, defaulting to fg 1, bg 4 (background cells are many and each matters less, so
each is normalised by its own count and re-weighted), pos 1, neg 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from detkd.methods.base import Distiller, MethodConfig
from detkd.methods.connectors import build_connectors
from detkd.methods.losses import bernoulli_kl, box_masks, check_logit_pair, softmax_kl
from detkd.models.outputs import DenseHead, Detector, DetOutputs, TwoStageHead


@dataclass
class DeFeatConfig(MethodConfig):
    term_weights: dict[str, float] = field(
        default_factory=lambda: {"kd_feat_fg": 1.0, "kd_feat_bg": 4.0, "kd_cls_pos": 1.0, "kd_cls_neg": 1.0}
    )
    temperature_pos: float = 1.0
    temperature_neg: float = 1.0
    levels: list[str] | None = None
    kernel: int = 3


def split_mean(values: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Means of ``values`` over ``positive`` and over the rest (0 where a side is empty)."""
    zero = values.sum() * 0.0
    pos = values[positive].mean() if positive.any() else zero
    neg = values[~positive].mean() if (~positive).any() else zero
    return pos, neg


class DeFeat(Distiller):
    name = "defeat"
    summary = "decoupled foreground/background feature imitation + decoupled soft labels (Guo et al. CVPR 2021)"
    Config = DeFeatConfig

    def __init__(self, cfg: DeFeatConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        self.connectors = build_connectors(student.feature_info, teacher.feature_info, cfg.levels, cfg.kernel)
        check_logit_pair(student, teacher, "defeat")

    def needs_teacher_head(self) -> bool:
        return self.student.head_type is DenseHead

    def needs_shared_rois(self) -> bool:
        return self.student.head_type is TwoStageHead

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        boxes = [t["boxes"] for t in targets]
        fg, bg, coverage = [], [], []
        for level, connector in self.connectors.items():
            t_feat = teacher.features[level]
            s_feat = connector(student.features[level], t_feat.shape[-2:])
            mask = box_masks(boxes, tuple(t_feat.shape[-2:]), connector.teacher_spec.stride)[:, None]  # [B,1,H,W]
            diff2 = (s_feat.float() - t_feat.float()).pow(2)
            fg.append((diff2 * mask).sum() / (2 * mask.sum().clamp(min=1.0)))
            bg.append((diff2 * (1 - mask)).sum() / (2 * (1 - mask).sum().clamp(min=1.0)))
            coverage.append(float(mask.mean()))
        self.stats["fg_coverage"] = sum(coverage) / len(coverage)
        terms = {"kd_feat_fg": torch.stack(fg).mean(), "kd_feat_bg": torch.stack(bg).mean()}

        head = student.head
        if isinstance(head, TwoStageHead):
            s_logits, t_logits = head.roi_logits, teacher.on_student_rois.logits
            positive = torch.cat(head.roi_labels) > 0
            pos_kl = softmax_kl(s_logits, t_logits, self.cfg.temperature_pos)
            neg_kl = softmax_kl(s_logits, t_logits, self.cfg.temperature_neg)
            terms["kd_cls_pos"], _ = split_mean(pos_kl, positive)
            _, terms["kd_cls_neg"] = split_mean(neg_kl, positive)
            self.stats["positive_rois"] = float(positive.sum())
        else:
            s_logits, t_logits = head.cls_logits, teacher.head.cls_logits
            centres = head.anchor_centres()  # [B, A, 2]
            positive = torch.zeros(centres.shape[:2], dtype=torch.bool, device=centres.device)
            for i, b in enumerate(boxes):
                if len(b):
                    x, y = centres[i, :, 0, None], centres[i, :, 1, None]
                    positive[i] = ((x >= b[:, 0]) & (x <= b[:, 2]) & (y >= b[:, 1]) & (y <= b[:, 3])).any(1)
            pos_kl = bernoulli_kl(s_logits, t_logits, self.cfg.temperature_pos)
            neg_kl = bernoulli_kl(s_logits, t_logits, self.cfg.temperature_neg)
            terms["kd_cls_pos"], _ = split_mean(pos_kl, positive)
            _, terms["kd_cls_neg"] = split_mean(neg_kl, positive)
            self.stats["positive_anchors"] = float(positive.sum())
        return terms
