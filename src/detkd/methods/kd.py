"""Distilling the Knowledge in a Neural Network (Hinton et al., 2015, arXiv 1503.02531), for detectors.

Soft labels at temperature T:

- two-stage students: the teacher's box head runs on the **student's** sampled RoIs (region proposal sharing),
  and the student's RoI class distribution (C+1-way softmax) is pulled towards the teacher's with
  ``T^2 * KL(p_t || p_s)``, averaged over RoIs;
- one-stage students (RetinaNet, FCOS): per-class sigmoid logits at every anchor, with a Bernoulli KL per class;
  the sum over anchors is divided by the teacher's soft count of objects ``max(1, sum_a max_c p_t)``, which plays
  the role the number of positives plays in the focal loss (so the term's scale does not depend on image size).

Options: ``temperature`` (default 2), ``rois`` (two-stage: ``all`` sampled RoIs or ``positive`` only).
Teacher and student must predict the same classes; one-stage pairs must share the detector family and anchors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from detkd.methods.base import Distiller, MethodConfig
from detkd.methods.losses import bernoulli_kl, check_logit_pair, dense_soft_count, softmax_kl
from detkd.models.outputs import DenseHead, Detector, DetOutputs, TwoStageHead


@dataclass
class KDConfig(MethodConfig):
    temperature: float = 2.0
    rois: Literal["all", "positive"] = "all"


class KD(Distiller):
    name = "kd"
    summary = "Hinton soft labels: RoI softmax on shared RoIs (two-stage) or dense sigmoid logits (one-stage)"
    Config = KDConfig
    heads = (TwoStageHead, DenseHead)

    def __init__(self, cfg: KDConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        check_logit_pair(student, teacher, "kd")

    def needs_teacher_head(self) -> bool:
        return self.student.head_type is DenseHead

    def needs_shared_rois(self) -> bool:
        return self.student.head_type is TwoStageHead

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        T = self.cfg.temperature
        head = student.head
        if isinstance(head, TwoStageHead):
            s_logits, t_logits = head.roi_logits, teacher.on_student_rois.logits
            if self.cfg.rois == "positive":
                keep = torch.cat(head.roi_labels) > 0
                s_logits, t_logits = s_logits[keep], t_logits[keep]
            self.stats["rois"] = float(len(s_logits))
            if len(s_logits) == 0:
                return {"kd_cls": s_logits.sum() * 0.0}
            return {"kd_cls": softmax_kl(s_logits, t_logits, T).mean()}
        s_logits, t_logits = head.cls_logits, teacher.head.cls_logits
        norm = dense_soft_count(t_logits)
        self.stats["teacher_objects"] = float(norm)
        return {"kd_cls": bernoulli_kl(s_logits, t_logits, T).sum() / norm}
