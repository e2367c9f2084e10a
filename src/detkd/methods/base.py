"""The distiller interface every method implements, the run context it is given, and the registry of methods.

A method is one :class:`Distiller` subclass in one file, written against this file and ``models/outputs.py``
(the typed head outputs and the detector protocols). It is built from its own ``Config`` dataclass and the
student and teacher detectors (it reads their ``feature_info`` to size its adapters, and may re-run parts of them
through the protocols: ``student.head_losses`` on other maps, ``decode_boxes``, ``level_anchors``...). Its
``forward`` returns **unweighted** ``kd_<term>`` tensors; weights and schedules are applied by
:class:`detkd.distillation.DistillModel`, in one place. Numbers worth watching go to ``self.stats``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from detkd.data.sampling import subset_batches
from detkd.models.outputs import DenseHead, Detector, DetOutputs, Head, TwoStageHead
from detkd.registry import Registry


@dataclass
class RunContext:
    """What a run gives methods' ``on_epoch_start``: the training data and the run's sizes.

    Attributes:
        dataset: the training set with evaluation transforms (no augmentation): ``dataset[i]`` is
            ``(image [3, H, W] in [0, 1], target)``; ``detkd.data.sampling`` reads its annotations cheaply.
        device: where the detectors live.
        batch_size: images per training batch (also the batch size of :meth:`batches`).
        iters_per_epoch: training iterations per pass over the data.
        total_iters: length of the run in iterations.
        out: the run folder, or None.
    """

    dataset: Any
    device: torch.device
    batch_size: int
    iters_per_epoch: int
    total_iters: int
    out: Path | None = None

    def batches(self, indices: list[int]) -> Iterator[list[tuple[Tensor, dict[str, Tensor]]]]:
        """The items ``dataset[i]`` for ``i`` in ``indices``, in order, ``batch_size`` at a time (on the CPU)."""
        return subset_batches(self.dataset, indices, max(1, int(self.batch_size)))


@dataclass
class ScheduleConfig:
    """How a method's weight changes over training. The factor multiplies every term not in ``exempt``.

    ``warmup_iters`` ramps linearly from 0 to 1; ``decay`` is ``none``, ``linear`` (r(t) = 1 - t/T, with t and
    T counted in ``decay_unit``: ``iter`` or ``epoch``) or ``step`` (times ``decay_gamma`` at each fraction of
    training in ``decay_steps``); outside ``[start_iter, stop_iter)`` the factor is 0.
    """

    warmup_iters: int = 0
    decay: Literal["none", "linear", "step"] = "none"
    decay_unit: Literal["iter", "epoch"] = "iter"
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
        Config: the method's config dataclass (a :class:`MethodConfig` subclass); choices are ``Literal`` fields,
            checked when the config is loaded.
        needs_teacher: False for teacher-free methods.
        heads: the head types (``models/outputs.py``) of the students the method handles; ``forward`` dispatches
            on ``isinstance(student.head, ...)``. The teacher has the same head type when the method reads its
            head; feature-only methods take any teacher.
        kinds: derived from ``heads``: their ``kind`` strings (``two_stage``, ``one_stage``, ``detr``), for
            messages and listings.
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
    heads: ClassVar[tuple[type[Head], ...]] = (TwoStageHead, DenseHead)
    kinds: ClassVar[tuple[str, ...]] = ("two_stage", "one_stage")
    benchmark_goal: ClassVar[bool] = False
    paper_gap_closed: ClassVar[float | None] = None
    has_unused_parameters: ClassVar[bool] = False
    own_losses: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.kinds = tuple(h.kind for h in cls.heads)

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

    def needs_teacher_head(self) -> bool:
        """True if ``forward`` reads the teacher's head outputs (proposals, dense logits...), not only its
        features; DistillModel then runs the teacher's whole training forward (without targets)."""
        return False

    def needs_shared_rois(self) -> bool:
        """True if ``forward`` reads ``teacher.on_student_rois``: the teacher's box head on the student's sampled
        RoIs (region proposal sharing), which DistillModel computes once per batch for all distillers."""
        return False

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        """Unweighted ``kd_*`` terms for one batch; set ``self.stats`` for logging."""
        raise NotImplementedError

    def optim_groups(self) -> list[dict[str, Any]]:
        """Parameter groups with their own settings (``lr_scale``, ``weight_decay``); parameters not listed go
        to the default group. E.g. LGD trains its label-guided teacher with its own group."""
        return []

    def on_epoch_start(self, epoch: int, context: RunContext | None) -> None:
        """Called before each epoch (and before training) with the run context (None outside a run, e.g. in a
        bare ``DistillModel``); e.g. GKD's prototypes, LGD's phases."""

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
