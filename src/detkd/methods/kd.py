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

import torch
from torch import Tensor

from detkd.errors import BuildError, ConfigError
from detkd.methods.base import Distiller, MethodConfig
from detkd.methods.losses import bernoulli_kl, shared_roi_outputs, softmax_kl
from detkd.models.outputs import Detector, DetOutputs


@dataclass
class KDConfig(MethodConfig):
    temperature: float = 2.0
    rois: str = "all"  # all | positive


def check_logit_pair(student: Detector, teacher: Detector, method: str) -> None:
    """Logit distillation needs the same classes and, for dense heads, the same anchor layout."""
    if student.num_classes != teacher.num_classes:
        raise BuildError(f"{method}: student predicts {student.num_classes} classes, teacher {teacher.num_classes}")
    if student.kind != teacher.kind:
        raise BuildError(
            f"{method}: logit distillation needs the same detector kind; student {student.spec['name']} "
            f"is {student.kind}, teacher {teacher.spec['name']} is {teacher.kind}"
        )
    if student.kind == "one_stage":
        s_family, t_family = (d.spec["name"].split("_")[0] for d in (student, teacher))
        s_levels, t_levels = ([f.stride for f in d.feature_info] for d in (student, teacher))
        if s_family != t_family or s_levels != t_levels:
            raise BuildError(
                f"{method}: dense logits can be distilled only between detectors with the same head "
                f"and levels; student {student.spec['name']} {s_levels}, teacher {teacher.spec['name']} "
                f"{t_levels}"
            )


def dense_soft_count(t_logits: Tensor) -> Tensor:
    """Teacher's soft number of objects in a batch of dense logits ``[B, A, K]``, at least 1."""
    return torch.sigmoid(t_logits.float()).amax(-1).sum().clamp(min=1.0)


class KD(Distiller):
    name = "kd"
    summary = "Hinton soft labels: RoI softmax on shared RoIs (two-stage) or dense sigmoid logits (one-stage)"
    Config = KDConfig

    def __init__(self, cfg: KDConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        if cfg.rois not in ("all", "positive"):
            raise ConfigError(f"distill.options.kd.rois must be 'all' or 'positive', got {cfg.rois!r}")
        check_logit_pair(student, teacher, "kd")
        self.teacher_head = student.kind == "one_stage"

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        T = self.cfg.temperature
        if self.student.kind == "two_stage":
            t_logits, _ = shared_roi_outputs(self.teacher, student, teacher)
            s_logits = student.head["roi_logits"]
            if self.cfg.rois == "positive":
                keep = torch.cat(student.head["roi_labels"]) > 0
                s_logits, t_logits = s_logits[keep], t_logits[keep]
            self.stats["rois"] = float(len(s_logits))
            if len(s_logits) == 0:
                return {"kd_cls": s_logits.sum() * 0.0}
            return {"kd_cls": softmax_kl(s_logits, t_logits, T).mean()}
        s_logits, t_logits = student.head["cls_logits"], teacher.head["cls_logits"]
        norm = dense_soft_count(t_logits)
        self.stats["teacher_objects"] = float(norm)
        return {"kd_cls": bernoulli_kl(s_logits, t_logits, T).sum() / norm}
