"""The training loop: one step at a time; schedules, checkpoints, evaluation and logs are hooks."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from detkd.config import AmpMode
from detkd.distillation import DistillModel
from detkd.errors import DetkdError


class TrainingDiverged(DetkdError):
    """Too many consecutive non-finite losses."""


class Hook:
    """Something done around steps. The trainer is passed in; hooks read and write its public state."""

    def before_train(self, trainer: Trainer) -> None: ...
    def before_step(self, trainer: Trainer) -> None: ...
    def before_optimizer_step(self, trainer: Trainer) -> None: ...  # gradients ready (unscaled), not yet clipped
    def after_step(self, trainer: Trainer) -> None: ...
    def after_train(self, trainer: Trainer) -> None: ...
    def close(self, trainer: Trainer) -> None: ...


def move_to(images: list[Tensor], targets: list[dict], device: torch.device) -> tuple[list[Tensor], list[dict]]:
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets
    ]
    return images, targets


def amp_dtype(mode: AmpMode, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``: ``auto`` = bf16 on CUDA, none on CPU."""
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


class Trainer:
    """Runs ``max_iters`` optimisation steps of a :class:`DistillModel`.

    :meth:`run` is the loop; :meth:`run_step` is one whole training step (the benchmark's step timing calls it
    alone). Public state hooks use: ``iter`` (steps completed), ``max_iters``, ``record`` (last step's losses and
    stats), ``step_time`` (the whole step) and ``data_time`` (its part waiting for the batch), ``nonfinite_total``,
    ``best`` (best eval score and its step), ``state`` (free dict), :meth:`train_time` (seconds of training so far,
    the parts before a resume included).

    Args:
        model: the model (student, teacher, distillers).
        optimizer: optimiser over ``model.trainable_module``'s parameters.
        data: an iterator of ``(images, targets)`` batches.
        max_iters: total steps.
        hooks: run in list order.
        device: where to compute.
        amp: ``auto``/``off``/``bf16``/``fp16``.
        clip_grad_norm: max gradient L2 norm, or None.
        clip_grad_value: max absolute gradient element, or None.
        max_nonfinite: abort after this many consecutive non-finite losses.
        start_iter: steps already done (resume).
    """

    def __init__(
        self,
        model: DistillModel,
        optimizer: torch.optim.Optimizer,
        data: Iterator,
        max_iters: int,
        hooks: list[Hook],
        device: torch.device,
        amp: AmpMode = "auto",
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        max_nonfinite: int = 20,
        start_iter: int = 0,
    ):
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.max_iters = max_iters
        self.hooks = hooks
        self.device = device
        self.dtype = amp_dtype(amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.max_nonfinite = max_nonfinite
        self.iter = start_iter
        self.start_iter = start_iter
        self.record: dict[str, Any] = {}
        self.step_time = 0.0
        self.data_time = 0.0
        self.nonfinite = 0
        self.nonfinite_total = 0
        self.best: dict[str, Any] = {"score": None, "iter": None}
        self.state: dict[str, Any] = {}
        self.params = [p for p in model.trainable_module.parameters() if p.requires_grad]
        self.time_before = 0.0  # training seconds of the parts before a resume
        self.time_partial = False  # a part before a resume was not timed (its checkpoint predates train_time_s)
        self.started: float | None = None

    def train_time(self) -> float:
        """Seconds of training so far: this part's (since :meth:`run` started) and the parts' before a resume."""
        now = time.perf_counter()
        return self.time_before + (now - self.started if self.started is not None else 0.0)

    def run(self) -> None:
        self.started = time.perf_counter()
        try:
            for hook in self.hooks:
                hook.before_train(self)
            while self.iter < self.max_iters:
                for hook in self.hooks:
                    hook.before_step(self)
                self.run_step()
                self.iter += 1
                for hook in self.hooks:
                    hook.after_step(self)
            for hook in self.hooks:
                hook.after_train(self)
        finally:
            for hook in self.hooks:
                hook.close(self)

    def _all_finite(self, value: Tensor) -> bool:
        finite = torch.isfinite(value).all()
        if dist.is_available() and dist.is_initialized():
            # Every rank must take the same branch, or the DDP all-reduce in backward would hang.
            flag = finite.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        return bool(finite)

    def run_step(self) -> None:
        """One optimisation step on the next batch: forward, backward, ``before_optimizer_step`` hooks, clipping,
        optimiser step; ``record`` holds its losses. Does not advance ``iter`` (:meth:`run` does)."""
        start = time.perf_counter()
        self.model.train()
        images, targets = next(self.data)
        self.data_time = time.perf_counter() - start
        images, targets = move_to(images, targets, self.device)
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        with autocast:
            losses, stats = self.model(images, targets, self.iter)
        total = torch.stack([v.float() for v in losses.values()]).sum()
        self.optimizer.zero_grad(set_to_none=True)
        if not self._all_finite(total):
            self._skip(losses, stats, "loss")
            return
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        for hook in self.hooks:
            hook.before_optimizer_step(self)
        if self.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(self.params, self.clip_grad_value)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm or math.inf)
        if self.dtype != torch.float16 and not self._all_finite(norm):
            # fp16 overflow is the scaler's business; elsewhere a non-finite gradient skips the step.
            self.optimizer.zero_grad(set_to_none=True)
            self._skip(losses, stats, "gradient")
            return
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.nonfinite = 0
        self.step_time = time.perf_counter() - start
        self.record = {
            "loss": float(total.detach()),
            **{k: float(v.detach()) for k, v in losses.items()},
            **stats,
            "grad_norm": float(norm.detach()),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if scale is not None and self.scaler.get_scale() < scale:
            # The scaler skipped this step and lowered its scale (fp16 overflow; normal in the first steps). The
            # inf norm is left out of the record so it does not swamp the logged mean.
            del self.record["grad_norm"]
            self.record["amp_overflow"] = 1.0

    def _skip(self, losses: dict[str, Tensor], stats: dict[str, float], what: str) -> None:
        self.nonfinite += 1
        self.nonfinite_total += 1
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
        self.record = {"skipped": 1.0, "lr": self.optimizer.param_groups[0]["lr"]}
        self.state["last_nonfinite"] = f"non-finite {what} at step {self.iter}" + (
            f" ({', '.join(bad)})" if bad else ""
        )
        if self.nonfinite >= self.max_nonfinite:
            raise TrainingDiverged(
                f"{self.nonfinite} consecutive non-finite losses (last: {self.state['last_nonfinite']}); stopped. "
                "The last good checkpoint is kept; try a lower optim.lr, longer optim.warmup_iters or "
                "optim.clip_grad_norm"
            )
