"""Hooks assembled by the run: LR schedule, checkpoints, evaluation, logging, method callbacks, sanity checks."""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from detkd.config import OptimConfig
from detkd.engine.checkpoint import TRAIN_FORMAT, VERSION, save_atomic, save_student
from detkd.engine.evaluate import json_safe
from detkd.engine.trainer import Hook, Trainer

log = logging.getLogger("detkd")


def lr_factor(cfg: OptimConfig, step: int, total: int) -> float:
    """Multiplier of the base LR at ``step``: linear warm-up, then step / cosine / constant."""
    if cfg.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))
    elif cfg.schedule == "step":
        factor = cfg.gamma ** sum(step >= s * total for s in cfg.steps)
    else:
        factor = 1.0
    if step < cfg.warmup_iters:
        alpha = step / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


class LRSchedule(Hook):
    """Sets every param group's LR from its ``initial_lr`` before each step; stateless, so resume is exact."""

    def __init__(self, cfg: OptimConfig):
        self.cfg = cfg

    def before_train(self, trainer: Trainer) -> None:
        for group in trainer.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def before_step(self, trainer: Trainer) -> None:
        factor = lr_factor(self.cfg, trainer.iter, trainer.max_iters)
        for group in trainer.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor


def gather(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` outside a process group). A collective: every rank calls."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random state (torch, CUDA, numpy, Python) as tensors and plain values.

    Plain, so that a training checkpoint still loads with ``weights_only=True``.
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` captured (parts missing from older checkpoints are left alone)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        np_state = state["numpy"]
        keys = np_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


def training_state(trainer: Trainer, extra: dict[str, Any], rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The contents of ``last.pt``.

    Args:
        trainer: the trainer.
        extra: JSON-able fields stored as they are (config, spec, classes).
        rng: every rank's :func:`rng_state`, in rank order; this process's alone if None.
    """
    state = {
        "format": TRAIN_FORMAT,
        "version": VERSION,
        "iter": trainer.iter,
        "trainable": trainer.model.trainable_module.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": rng if rng is not None else [rng_state(trainer.device)],
        "best": dict(trainer.best),
        "nonfinite_total": trainer.nonfinite_total,
        "train_time_s": trainer.train_time(),
        "train_time_partial": trainer.time_partial,
        **extra,
    }
    calibration = getattr(trainer.model, "calibration", None)
    if calibration is not None:
        state["calibration"] = calibration.state_dict()  # resume keeps the measured scales, never re-measures
    return state


class Checkpointer(Hook):
    """Writes ``last.pt`` every ``every`` steps and at the end (atomically), and ``student.pt`` at the end.

    Every rank takes part (each contributes its random state, so a resumed multi-process run continues every
    rank's stream); only the rank with ``enabled`` writes.

    Args:
        out: run folder.
        every: steps between checkpoints (0 = only at the end).
        extra: JSON-able fields stored in every checkpoint (config, spec, classes).
        classes: class names, stored with the student.
        enabled: False on non-zero ranks.
    """

    def __init__(self, out: Path, every: int, extra: dict[str, Any], classes: list[str], enabled: bool = True):
        self.out, self.every, self.extra, self.classes, self.enabled = out, every, extra, classes, enabled

    def before_train(self, trainer: Trainer) -> None:
        if not self.enabled:
            return
        # A process killed inside save_atomic leaves its temporary file behind; the checkpoint itself is intact.
        for name in ("last.pt", "best.pt", "student.pt"):
            for stale in self.out.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)

    def save(self, trainer: Trainer) -> None:
        rng = gather(rng_state(trainer.device))
        if self.enabled:
            save_atomic(training_state(trainer, self.extra, rng), self.out / "last.pt")

    def after_step(self, trainer: Trainer) -> None:
        if self.every and trainer.iter % self.every == 0 and trainer.iter < trainer.max_iters:
            self.save(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self.save(trainer)
        if self.enabled:
            save_student(
                self.out / "student.pt",
                trainer.model.student,
                self.classes,
                {"iter": trainer.iter, "config": self.extra.get("config")},
            )


class Evaluator(Hook):
    """Evaluates the student every ``every`` steps and at the end; keeps ``best.pt`` (student only) by ``key``.

    Args:
        evaluate: student -> metrics dict.
        out: run folder.
        every: steps between evaluations (0 = only at the end).
        classes: class names, stored with the student.
        key: the metric that decides "best".
        enabled: False on non-zero ranks: they write nothing.
        shared: every rank calls ``evaluate`` (which shares the images out and gathers the predictions);
            without it only enabled ranks evaluate.
    """

    def __init__(
        self,
        evaluate: Callable[[Any], dict[str, Any]],
        out: Path,
        every: int,
        classes: list[str],
        key: str = "AP",
        enabled: bool = True,
        shared: bool = False,
    ):
        self.evaluate, self.out, self.every, self.classes, self.key = evaluate, out, every, classes, key
        self.enabled, self.shared = enabled, shared
        self.last: dict[str, Any] = {}

    def run(self, trainer: Trainer) -> None:
        if not (self.enabled or self.shared):
            return
        start = time.perf_counter()
        # Evaluation draws random numbers (the eval DataLoader seeds itself from the global generator); forking
        # keeps the training stream as it was, so eval_every does not change training and a resume is exact.
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            metrics = self.evaluate(trainer.model.student)
        metrics = {"iter": trainer.iter, **metrics, "eval_time_s": round(time.perf_counter() - start, 3)}
        self.last = metrics
        if not self.enabled:
            return
        with open(self.out / "eval.jsonl", "a") as f:
            f.write(json.dumps(json_safe(metrics)) + "\n")
        score = metrics.get(self.key)
        if score is not None and (trainer.best["score"] is None or score > trainer.best["score"]):
            trainer.best = {"score": score, "iter": trainer.iter}
            save_student(
                self.out / "best.pt",
                trainer.model.student,
                self.classes,
                {"iter": trainer.iter, "metrics": {k: v for k, v in metrics.items() if k != "per_class"}},
            )
        log.info(
            "eval at step %d: %s",
            trainer.iter,
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k.startswith("AP")),
        )

    def after_step(self, trainer: Trainer) -> None:
        if self.every and trainer.iter % self.every == 0 and trainer.iter < trainer.max_iters:
            self.run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self.run(trainer)


class MethodEpochs(Hook):
    """Calls each distiller's ``on_epoch_start(epoch, context)`` at the start of every epoch."""

    def __init__(self, iters_per_epoch: int, context: Any):
        self.iters_per_epoch, self.context = max(1, iters_per_epoch), context

    def before_step(self, trainer: Trainer) -> None:
        if trainer.iter % self.iters_per_epoch == 0 or trainer.iter == trainer.start_iter:
            epoch = trainer.iter // self.iters_per_epoch
            if trainer.state.get("epoch_started") == epoch:
                return
            trainer.state["epoch_started"] = epoch
            for distiller in trainer.model.distillers.values():
                distiller.on_epoch_start(epoch, self.context)


class MethodSteps(Hook):
    """Calls each distiller's ``before_optimizer_step(step)`` once the step's gradients exist (LGD's own
    gradient handling, for example)."""

    def before_optimizer_step(self, trainer: Trainer) -> None:
        for distiller in trainer.model.distillers.values():
            distiller.before_optimizer_step(trainer.iter)


class KDActivityCheck(Hook):
    """Warns when a distillation term was exactly zero over the first ``window`` steps (KD silently off), on any rank.

    Each rank sums ``|term|`` over its own first steps; the sums are gathered, so a term that is dead on one rank
    only (a classic multi-process failure) is reported with the rank. Results in ``trainer.state``: ``kd_active``
    (term -> non-zero on every rank) and ``kd_per_rank`` (per rank, term -> sum of ``|term|``).
    """

    def __init__(self, window: int = 10):
        self.window = window
        self.seen: dict[str, float] = defaultdict(float)
        self.done = False

    def after_step(self, trainer: Trainer) -> None:
        steps = trainer.iter - trainer.start_iter
        if self.done or steps > self.window:
            return
        for key, value in trainer.record.items():
            if key.startswith("raw."):
                self.seen[key[4:]] += abs(value)
        if steps == self.window:
            self.finish(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if not self.done and trainer.iter > trainer.start_iter:  # a run shorter than the window
            self.finish(trainer)

    def finish(self, trainer: Trainer) -> None:
        self.done = True
        per_rank = gather(dict(self.seen))  # every rank reaches this at the same step
        terms = sorted({k for sums in per_rank for k in sums})
        if not terms:
            return
        steps = min(self.window, trainer.iter - trainer.start_iter)
        dead = {t: [r for r, sums in enumerate(per_rank) if sums.get(t, 0.0) == 0.0] for t in terms}
        dead = {t: ranks for t, ranks in dead.items() if ranks}
        if dead:
            where = (
                ""
                if len(per_rank) == 1
                else " on rank(s) " + "; ".join(f"{t}: {', '.join(map(str, r))}" for t, r in dead.items())
            )
            log.warning(
                "distillation term(s) %s were exactly 0 for the first %d steps%s: check the method's "
                "masks/selection (see its stats in log.jsonl)",
                ", ".join(dead),
                steps,
                where,
            )
        trainer.state["kd_active"] = {t: t not in dead for t in terms}
        trainer.state["kd_per_rank"] = per_rank


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of the ranks' log rows (a key missing on a rank is averaged over the ranks that have it)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: sum(row[k] for row in rows if k in row) / sum(k in row for row in rows) for k in keys}


# A distillation term this many times the detection loss at the first step drowns the task: the student learns to
# imitate before it learns to detect (measured: fitnet/tar feature terms at their default weights on real data).
LOSS_BALANCE_LIMIT = 100.0


def loss_balance_warning(record: dict[str, float], limit: float = LOSS_BALANCE_LIMIT) -> str | None:
    """A warning naming each weighted ``<method>.kd_*`` term that is ``limit`` times the detection loss or more.

    Args:
        record: one step's weighted losses (``loss_*`` task terms, ``<method>.kd_*`` distillation terms).
        limit: the ratio from which to warn.
    """
    detection = sum(v for k, v in record.items() if k.startswith("loss_") and math.isfinite(v))
    if detection <= 0:
        return None
    large = {}
    for key, value in record.items():
        method, _, term = key.partition(".")
        if term.startswith("kd_") and math.isfinite(value) and value >= limit * detection:
            large[key] = (method, value / detection)
    if not large:
        return None
    parts = [f"{key} is {ratio:.0f}x" for key, (_, ratio) in large.items()]
    fixes = sorted({f"distill.weights.{method}" for method, _ in large.values()})
    return (
        f"distillation term {', '.join(parts)} the detection loss ({detection:.3g}) at the first step and will drown "
        f"it; lower {' / '.join(fixes)} about as many times (or distill.options.<method>.term_weights.<term>)"
    )


class Logger(Hook):
    """Averages the step records over ``every`` steps into ``log.jsonl`` (+ TensorBoard); shows progress.

    In a multi-process run every rank keeps its window and the logged values are the mean over ranks (the loss of
    the global batch, for losses that are means over images); only the rank with ``enabled`` writes.

    Args:
        out: run folder.
        every: steps per log line.
        progress: show a progress bar (rich) on a terminal, or a line per log step otherwise.
        tensorboard: also write TensorBoard scalars under ``out/tb``.
        enabled: False on non-zero ranks.
    """

    def __init__(self, out: Path, every: int, progress: bool = True, tensorboard: bool = True, enabled: bool = True):
        self.out, self.every, self.enabled = out, max(1, every), enabled
        self.show = progress and enabled
        self.tensorboard = tensorboard and enabled
        self.window: dict[str, list[float]] = defaultdict(list)
        self.step_times: list[float] = []
        self.data_times: list[float] = []
        self.writer = None
        self.progress = None
        self.task = None
        self.start = 0.0
        self.balance_checked = False

    def before_train(self, trainer: Trainer) -> None:
        if not self.enabled:
            return
        self.start = time.perf_counter()
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's module raises ImportError itself when the tensorboard package is absent
                log.warning(
                    "no TensorBoard scalars: the tensorboard package is not installed (`pip install "
                    "'detkd[tensorboard]'`, or set train.tensorboard=false to silence this); log.jsonl has the numbers"
                )
            else:
                self.writer = SummaryWriter(str(self.out / "tb"))
        if self.show and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=trainer.max_iters, completed=trainer.iter, info="")

    def after_step(self, trainer: Trainer) -> None:
        if trainer.record.get("skipped"):
            self.window["skipped"].append(1.0)
        else:
            self.step_times.append(trainer.step_time)
            self.data_times.append(trainer.data_time)
            for key, value in trainer.record.items():
                self.window[key].append(value)
            if not self.balance_checked and self.enabled:
                self.balance_checked = True
                warning = loss_balance_warning(trainer.record)
                if warning:
                    log.warning(warning)
        if trainer.iter % self.every == 0 or trainer.iter == trainer.max_iters:
            row = {k: sum(v) / len(v) for k, v in self.window.items() if v}
            if "skipped" in self.window:
                row["skipped"] = float(len(self.window["skipped"]))
            row["step_time"] = sum(self.step_times[-self.every :]) / max(1, len(self.step_times[-self.every :]))
            row["data_time"] = sum(self.data_times[-self.every :]) / max(1, len(self.data_times[-self.every :]))
            rows = gather(row)  # a collective at the same steps on every rank
            self.window.clear()
            if not self.enabled:
                return
            row = {"iter": trainer.iter, **mean_rows(rows)}
            row["elapsed_s"] = round(time.perf_counter() - self.start, 2)
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(json_safe(row)) + "\n")
            if self.writer is not None:
                for key, value in row.items():
                    if key != "iter":
                        self.writer.add_scalar(key.replace(".", "/"), value, trainer.iter)
            info = f"loss {row.get('loss', float('nan')):.3f}  lr {row.get('lr', 0):.2e}  {row['step_time']:.2f}s/it"
            if self.progress is not None:
                self.progress.update(self.task, completed=trainer.iter, info=info)
            elif self.show:
                print(f"step {trainer.iter}/{trainer.max_iters}  {info}", file=sys.stderr, flush=True)
        elif self.progress is not None:
            self.progress.update(self.task, completed=trainer.iter)

    def steady_step_time(self, skip: int = 5) -> float | None:
        """Mean step time without the first ``skip`` steps (warm-up, allocation)."""
        times = self.step_times[skip:] if len(self.step_times) > skip else self.step_times
        return sum(times) / len(times) if times else None

    def close(self, trainer: Trainer) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
