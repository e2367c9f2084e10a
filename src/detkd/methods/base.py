"""The distiller interface every method implements, and the registry of methods.

A method is one :class:`Distiller` subclass in one file. It is built from its own ``Config`` dataclass and
the student and teacher detectors (it reads their ``feature_info`` to size its adapters, and may re-run parts
of them: ``teacher.roi_forward`` on the student's RoIs, ``student.head_losses`` on other maps). Its
``forward`` returns **unweighted** ``kd_<term>`` tensors; weights and schedules are applied by
:class:`detkd.distill.DistillModel`, in one place. Numbers worth watching go to ``self.stats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from detkd.models.outputs import Detector, DetOutputs
from detkd.registry import Registry


@dataclass
class ScheduleConfig:
    """How a method's weight changes over training. The factor multiplies every term not in ``exempt``.

    ``warmup_iters`` ramps linearly from 0 to 1; ``decay`` is ``none``, ``linear`` (r(t) = 1 - t/T, with t and
    T counted in ``decay_unit``: ``iter`` or ``epoch``) or ``step`` (times ``decay_gamma`` at each fraction of
    training in ``decay_steps``); outside ``[start_iter, stop_iter)`` the factor is 0.
    """

    warmup_iters: int = 0
    decay: str = "none"  # none | linear | step
    decay_unit: str = "iter"  # iter | epoch
    decay_steps: list[float] = field(default_factory=list)
    decay_gamma: float = 0.1
    start_iter: int = 0
    stop_iter: int | None = None
    exempt: list[str] = field(default_factory=list)  # term names (e.g. "kd_cls") the schedule leaves alone

    def factor(self, step: int, total_iters: int, iters_per_epoch: int) -> float:
        if step < self.start_iter or (self.stop_iter is not None and step >= self.stop_iter):
            return 0.0
        f = 1.0
        if self.warmup_iters > 0:
            f *= min(1.0, (step - self.start_iter + 1) / self.warmup_iters)
        if self.decay == "linear":
            if self.decay_unit == "epoch":
                epochs = max(1, -(-total_iters // max(1, iters_per_epoch)))
                f *= 1.0 - (step // max(1, iters_per_epoch)) / epochs
            else:
                f *= 1.0 - step / max(1, total_iters)
        elif self.decay == "step":
            f *= self.decay_gamma ** sum(step >= s * total_iters for s in self.decay_steps)
        return f


@dataclass
class MethodConfig:
    """Fields every method's ``Config`` has: its schedule and per-term weights (``{"kd_feat": 2.0}``)."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    term_weights: dict[str, float] = field(default_factory=dict)


class Distiller(nn.Module):
    """Base class of distillation methods.

    Class attributes:
        name: the method's key (``--method NAME``).
        summary: one line for ``detkd list methods``.
        Config: the method's config dataclass (a :class:`MethodConfig` subclass).
        needs_teacher: False for teacher-free methods.
        teacher_head: True if the teacher's head outputs (proposals, dense logits...) are needed, not only its
            features.
        kinds: student kinds the method supports (``two_stage``, ``one_stage``, ``detr``).
        benchmark_goal: True puts the method in the benchmark's goals table (``detkd bench``): its row must beat
            the student baseline by more than twice the baseline's seed spread.
        paper_gap_closed: the share of the teacher-student mAP gap the method's paper reports closing (1.0 = the
            student reaches its teacher), shown next to the measured share; None when the paper states none.
        has_unused_parameters: True if some trainable parameter (the method's own or the student's) can get no
            gradient in a step. Multi-GPU training then asks DistributedDataParallel to look for them
            (``find_unused_parameters``, a traversal of the whole graph every step); otherwise DDP would stop with
            an error. tests/methods/test_harness.py checks the methods that say False.
        own_losses: returned terms that are not distillation terms but the training losses of the method's own
            modules (LGD's implicit teacher); named ``loss_*``, weighted by ``term_weights`` alone, never by
            ``distill.weights`` or the schedule.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_teacher: ClassVar[bool] = True
    teacher_head: ClassVar[bool] = False
    kinds: ClassVar[tuple[str, ...]] = ("two_stage", "one_stage")
    benchmark_goal: ClassVar[bool] = False
    paper_gap_closed: ClassVar[float | None] = None
    has_unused_parameters: ClassVar[bool] = False
    own_losses: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: MethodConfig, student: Detector, teacher: Detector | None):
        super().__init__()
        self.cfg = cfg
        # A tuple keeps the detectors out of this module's parameters: the student is trained through
        # DistillModel, the teacher is never trained.
        self._models = (student, teacher)
        self.stats: dict[str, float] = {}

    @property
    def student(self) -> Detector:
        return self._models[0]

    @property
    def teacher(self) -> Detector | None:
        return self._models[1]

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        """Unweighted ``kd_*`` terms for one batch; set ``self.stats`` for logging."""
        raise NotImplementedError

    def optim_groups(self) -> list[dict[str, Any]]:
        """Parameter groups with their own settings (``lr_scale``, ``weight_decay``); parameters not listed go
        to the default group. E.g. LGD trains its label-guided teacher with its own group."""
        return []

    def on_epoch_start(self, epoch: int, context: Any) -> None:
        """Called before each epoch (and before training) with the training context; e.g. GKD's prototypes."""

    def before_optimizer_step(self, step: int) -> None:
        """Called after backward and before the optimiser step; e.g. LGD drops the student backbone's
        gradients (``p.grad = None``, so neither momentum nor weight decay moves it) while it is frozen."""

    def visualize(
        self, image: Tensor, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]]
    ) -> dict[str, Any]:
        """Diagnostic pictures for the first image of a batch, ``name -> HxWx3 uint8 array`` (see ``detkd.viz``):
        masks, selected proposals, prototypes... ``image`` is that image as the networks saw it (``[3, H, W]``,
        values in [0, 1], before normalisation); the outputs are those of a training forward on the batch."""
        return {}


METHODS: Registry[type[Distiller]] = Registry("method")


def register(cls: type[Distiller]) -> type[Distiller]:
    """Add a method to the registry under ``cls.name`` (the built-in ones are registered in ``detkd.methods``)."""
    return METHODS.register(cls.name)(cls)
