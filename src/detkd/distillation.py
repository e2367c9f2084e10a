"""DistillModel: student + frozen teacher + distillers, with all loss weighting in one place.

Plain training is the same object with no teacher and no distillers, so ``detkd train`` and
``detkd distill`` share one loop, one checkpoint format and one evaluation. It also runs, once per batch, what
several distillers may share: the teacher's whole forward (``Distiller.needs_teacher_head``) and the teacher's box
head on the student's RoIs (``Distiller.needs_shared_rois``, handed over as ``DetOutputs.on_student_rois``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from detkd.calibration import LossCalibration
from detkd.errors import BuildError, ConfigError
from detkd.methods.base import METHODS, Distiller
from detkd.models.outputs import Detector, DetOutputs, RoIHeadDetector, RoIOutputs, TwoStageHead


@torch.no_grad()
def share_rois(teacher: Detector, student_out: DetOutputs, teacher_out: DetOutputs) -> None:
    """Region proposal sharing: run the teacher's box head on the student's sampled RoIs and store the result in
    ``teacher_out.on_student_rois`` (once per batch, whatever the number of distillers reading it)."""
    head = student_out.head
    if teacher_out.on_student_rois is not None or not isinstance(head, TwoStageHead) or head.rois is None:
        return
    logits, deltas = teacher.roi_forward(teacher_out.features, head.rois, student_out.image_sizes)
    teacher_out.on_student_rois = RoIOutputs(logits, deltas)


class StudentWithDistillers(nn.Module):
    """The trainable part (student + distillers' own modules): the only module wrapped in DDP.

    Its forward runs everything that produces gradients, so DDP sees every used parameter, and the shared-RoI pass
    of the teacher, which needs the student's RoIs.
    """

    def __init__(self, student: Detector, distillers: dict[str, Distiller], teacher: Detector | None = None):
        super().__init__()
        self.student = student
        self.distillers = nn.ModuleDict(distillers)
        # A tuple keeps the teacher out of this module's parameters and state dict.
        self._teacher = (teacher,)
        self.shared_rois = teacher is not None and any(d.needs_shared_rois() for d in distillers.values())
        if self.shared_rois and not isinstance(teacher, RoIHeadDetector):
            raise BuildError(f"proposal sharing needs a teacher with a RoI head; {teacher.spec['name']} lacks one")

    def forward(
        self, images: ImageList, targets: list[dict[str, Tensor]], teacher: DetOutputs | None, step: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float]]:
        s_out = self.student(images, targets)
        if self.shared_rois and teacher is not None:
            share_rois(self._teacher[0], s_out, teacher)
        terms: dict[str, Tensor] = {}
        stats: dict[str, float] = {}
        for name, distiller in self.distillers.items():
            distiller.stats = {}
            for key, value in distiller(s_out, teacher, targets, step).items():
                terms[f"{name}.{key}"] = value
            stats.update({f"{name}.{k}": float(v) for k, v in distiller.stats.items()})
        return s_out.losses, terms, stats


class DistillModel(nn.Module):
    """Student, optional frozen teacher and distillers.

    The teacher runs in eval mode (its BatchNorm statistics never move, even when this module is in train mode)
    under ``no_grad``, never runs its final NMS, and sees exactly the student's preprocessed batch tensor.

    Args:
        student: the detector being trained.
        teacher: a trained detector, or None.
        distillers: method name -> distiller.
        weights: method name -> overall weight (default 1).
        total_iters: length of training (for decay schedules).
        iters_per_epoch: iterations per pass over the data (for epoch-based schedules).
        calibration: measured loss scales (``distill.calibrate=auto``), or None for the configured weights alone.
        task_weight: multiplies the student's own detection losses (``loss_*``); IDa-Det's student uses 5.
    """

    def __init__(
        self,
        student: Detector,
        teacher: Detector | None = None,
        distillers: dict[str, Distiller] | None = None,
        weights: dict[str, float] | None = None,
        total_iters: int = 1,
        iters_per_epoch: int = 1,
        calibration: LossCalibration | None = None,
        task_weight: float = 1.0,
    ):
        super().__init__()
        distillers = distillers or {}
        self.trainable_module = StudentWithDistillers(student, distillers, teacher)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in distillers}
        self.total_iters = total_iters
        self.iters_per_epoch = iters_per_epoch
        self.calibration = calibration
        self.task_weight = float(task_weight)
        self.teacher_head = any(d.needs_teacher_head() for d in distillers.values())
        # The module whose forward is called for the trainable part; the trainer may swap in a DDP wrapper.
        self.trainable_forward: nn.Module = self.trainable_module

    @property
    def student(self) -> Detector:
        return self.trainable_module.student

    @property
    def distillers(self) -> dict[str, Distiller]:
        return dict(self.trainable_module.distillers.items())

    def train(self, mode: bool = True) -> DistillModel:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def run_teacher(self, images: ImageList) -> DetOutputs | None:
        if self.teacher is None:
            return None
        if self.teacher_head:
            return self.teacher(images, None)
        return DetOutputs(
            self.teacher.extract(images),
            image_sizes=list(images.image_sizes),
            batch_shape=tuple(images.tensors.shape[-2:]),
            images=images,
        )

    def share_rois(self, student_out: DetOutputs, teacher_out: DetOutputs | None) -> None:
        """Fill ``teacher_out.on_student_rois`` when a distiller needs it, for callers that run the student and
        teacher themselves (pictures, tests); :meth:`forward` does it on its own."""
        if self.trainable_module.shared_rois and teacher_out is not None:
            share_rois(self.teacher, student_out, teacher_out)

    def schedule_factors(self, step: int) -> dict[str, float]:
        return {
            name: d.cfg.schedule.factor(step, self.total_iters, self.iters_per_epoch)
            for name, d in self.trainable_module.distillers.items()
        }

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]], step: int = 0
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Weighted losses (task ``loss_*`` and ``<method>.kd_*``) and float stats for logging."""
        batch, targets = self.student.preprocess(images, targets)
        t_out = self.run_teacher(batch)
        task, terms, stats = self.trainable_forward(batch, targets, t_out, step)
        losses = {k: v * self.task_weight for k, v in task.items()} if self.task_weight != 1.0 else dict(task)
        factors = self.schedule_factors(step)
        distillers = self.trainable_module.distillers
        for key, value in terms.items():
            method, term = key.split(".", 1)
            cfg = distillers[method].cfg
            if term in distillers[method].own_losses:
                # A method's own module's training loss, not a distillation term: no method weight, no schedule.
                losses[key] = value * cfg.term_weights.get(term, 1.0)
                continue
            weight = self.weights[method] * cfg.term_weights.get(term, 1.0)
            if term not in cfg.schedule.exempt:
                weight *= factors[method]
            if self.calibration is not None:
                weight *= self.calibration.factor(key)  # 0 while measuring: detection loss alone
            stats[f"raw.{key}"] = float(value.detach())
            losses[key] = value * weight
        for method, factor in factors.items():
            stats[f"{method}.schedule"] = factor
        if self.calibration is not None and self.training:
            # Measured against the detection loss as trained (times task_weight); a method's own losses are no
            # distillation terms and keep their weights.
            kd_terms = {
                k: v for k, v in terms.items() if k.split(".", 1)[1] not in distillers[k.split(".", 1)[0]].own_losses
            }
            stats.update(self.calibration.observe(step, sum(losses[k] for k in task), kd_terms))
        return losses, stats


def build_distillers(
    methods: list[str],
    options: dict[str, dict[str, Any]],
    student: Detector,
    teacher: Detector | None,
) -> dict[str, Distiller]:
    """Build each named method from its options; checks the teacher and detector kinds the method needs."""
    from detkd.config import from_dict

    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise ConfigError(
            f"distill.options has settings for {', '.join(unknown)}, which is not among --method "
            f"{'+'.join(methods) or '(none)'}"
        )
    if len(set(methods)) != len(methods):
        raise ConfigError(f"method listed twice in {'+'.join(methods)}")
    distillers: dict[str, Distiller] = {}
    for name in methods:
        cls = METHODS.get(name)
        if cls.needs_teacher and teacher is None:
            raise BuildError(f"method {name!r} needs a teacher (--teacher CKPT)")
        if student.head_type not in cls.heads:
            raise BuildError(
                f"method {name!r} supports {', '.join(cls.kinds)} students; {student.spec['name']} is {student.kind}"
            )
        if teacher is not None and cls.needs_teacher and teacher.head_type not in cls.heads:
            raise BuildError(
                f"method {name!r} supports {', '.join(cls.kinds)} teachers; {teacher.spec['name']} is {teacher.kind}"
            )
        cfg = from_dict(cls.Config, options.get(name, {}), where=f"distill.options.{name}")
        distillers[name] = cls(cfg, student, teacher)
    return distillers
