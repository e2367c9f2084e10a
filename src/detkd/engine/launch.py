"""Assemble a run from a :class:`Config` and train it: ``detkd train`` and ``detkd distill`` both end here.

:func:`run` reads as its steps: :func:`start_process` (device, threads, process group), :func:`check_run_folder`,
:func:`build_run` (data, student, teacher, distillers, optimiser: everything that can fail on bad input),
:func:`restore` (``--resume``: every piece of a training checkpoint is read back there, and nowhere else),
:func:`prepare_run_folder` (the first write), :func:`make_hooks`, :func:`make_trainer`, the training, and
:func:`summarize`. Under ``torchrun`` each process calls :func:`run` and the process group is set up from the
environment; only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from detkd.calibration import LossCalibration
from detkd.config import Config, OptimConfig, save_config, to_dict
from detkd.distillation import DistillModel, build_distillers
from detkd.engine.checkpoint import load_detector, load_state_checked, read_checkpoint
from detkd.engine.cores import CORES_CHECKED, thread_warning
from detkd.engine.evaluate import json_safe
from detkd.engine.hooks import (
    Checkpointer,
    Evaluator,
    KDActivityCheck,
    Logger,
    LRSchedule,
    MethodEpochs,
    MethodSteps,
    set_rng_state,
)
from detkd.engine.rundir import check_run_folder, clear_run_folder, finished_summary
from detkd.engine.trainer import Hook, Trainer
from detkd.errors import CheckpointError, ConfigError, DataError, DetkdError
from detkd.methods.base import RunContext
from detkd.models import Detector, build_detector

log = logging.getLogger("detkd")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r}") from None


# Rank 0 scores the gathered predictions (and checks the teacher) while the other ranks wait in their next
# collective: the timeout must outlast that.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """Join the process group ``torchrun`` describes; returns (rank, world_size, whether this call created it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if world <= 1:
        return 0, 1, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), True


def trim_jsonl(path: Path, last_iter: int) -> None:
    """Drop the lines of ``path`` logged after step ``last_iter``: steps a killed run did after its checkpoint are
    done again on resume, and would otherwise appear twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("iter", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line torn by the kill
        if step <= last_iter:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def count_boxes(dataset: Any) -> int:
    """Training targets in a split (crowd/difficult objects and skipped annotations excluded)."""
    return int((~dataset.records.ignore).sum())


def build_optimizer(cfg: OptimConfig, model: DistillModel) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable module; no weight decay on norms and biases (unless
    ``cfg.decay_norm_bias``, as the official mmdet and DETR code); method-defined groups; ``cfg.lr_mult`` scales the
    LR of the parameters it names."""
    for key, mult in cfg.lr_mult.items():
        if mult < 0:
            raise ConfigError(f"optim.lr_mult.{key} must be >= 0, got {mult}")
    used: set[str] = set()

    def mult_of(name: str) -> float:
        hits = [k for k in cfg.lr_mult if f".{k}." in f".{name}."]
        if not hits:
            return 1.0
        key = max(hits, key=len)
        used.add(key)
        return cfg.lr_mult[key]

    custom: list[dict[str, Any]] = []
    claimed: set[int] = set()
    for distiller in model.distillers.values():
        for group in distiller.optim_groups():
            params = [p for p in group["params"] if p.requires_grad]
            claimed.update(id(p) for p in params)
            custom.append(
                {
                    "params": params,
                    "lr": cfg.lr * group.get("lr_scale", 1.0),
                    "weight_decay": group.get("weight_decay", cfg.weight_decay),
                }
            )
    plain: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.trainable_module.named_parameters():
        if not param.requires_grad or id(param) in claimed:
            continue
        plain.setdefault((mult_of(name), param.ndim > 1 or cfg.decay_norm_bias), []).append(param)
    unused = sorted(set(cfg.lr_mult) - used)
    if unused:
        raise ConfigError(
            f"optim.lr_mult: no trainable parameter's name contains {', '.join(map(repr, unused))} as whole dotted "
            "parts (e.g. backbone, backbone.body, sampling_offsets); list names with model.named_parameters()"
        )
    groups = [
        {"params": params, "lr": cfg.lr * mult, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (mult, decay), params in sorted(plain.items(), key=lambda kv: (kv[0][0] != 1.0, not kv[0][1], kv[0][0]))
    ]
    groups += custom
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_calibration(cfg: Config) -> LossCalibration | None:
    """The loss calibration ``distill.calibrate`` asks for (None when off); checks it fits the run."""
    if cfg.distill.calibrate == "off":
        return None
    if cfg.distill.calibrate_iters >= cfg.train.iters:
        raise ConfigError(
            f"distill.calibrate_iters ({cfg.distill.calibrate_iters}) must be smaller than train.iters "
            f"({cfg.train.iters}): the distillation terms are not applied while they are measured"
        )
    return LossCalibration(cfg.distill.calibrate_iters, cfg.distill.calibrate_share, cfg.distill.calibrate_exclude)


def check_teacher(teacher: Detector, dataset: Any, images: int, batch_size: int) -> dict[str, Any]:
    """Evaluate the teacher on a few val images; a teacher at mAP@0.5 = 0 means the wrong weights loaded."""
    from detkd.engine.evaluate import run_evaluation

    metrics = run_evaluation(teacher.predict, dataset, batch_size=batch_size, max_images=images, progress=False)
    if metrics["AP50"] <= 0.0:
        raise DetkdError(
            f"the teacher scores mAP@0.5 = 0 on {metrics['num_images']} val images: it did not load correctly, or was "
            "trained on other data/classes (set distill.check_teacher=0 to skip this check)"
        )
    return metrics


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or on CPU the process's peak resident set size.

    On Linux the peak RSS is read from ``/proc/self/status`` (``VmHWM``): ``getrusage``'s ``ru_maxrss`` carries
    the peak of the parent process over fork and exec, so a run started by a large process (``detkd bench`` after
    its timing phase) would report the parent's peak.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # macOS reports bytes, Linux KiB


def describe_model(cfg: Config) -> str:
    """The first log line of a run: what is trained, at what input size, from which weights."""
    m = cfg.model
    weights = f"detector weights {m.weights}" if m.weights != "none" else f"backbone weights {m.backbone_weights}"
    side = f"input short side {m.min_size} px"
    if m.train_sizes:
        side += f" (training: drawn from {', '.join(map(str, m.train_sizes))})"
    cap = f"long side <= {m.max_size}" + (f", {m.train_max_size} in training" if m.train_max_size else "")
    return f"model {m.name}: preset {m.preset}, {side} ({cap}), {weights}"


def input_size_warning(dataset: Any, min_size: int) -> str | None:
    """A warning when the network input is less than half the median short side of the training images: the
    detector then sees shrunken images (a default meant for other data, or a forgotten model.min_size)."""
    records = dataset.records
    if records.widths.size == 0:
        return None
    sides = np.sort(np.minimum(records.widths, records.heights))
    median = int(sides[len(sides) // 2])
    if min_size * 2 >= median:
        return None
    return (
        f"the input short side (model.min_size={min_size}) is under half the training images' median short side "
        f"({median} px): the detector sees shrunken images; set model.min_size/model.max_size if that is not meant"
    )


def teacher_input_warning(teacher: Detector, student: Detector) -> str | None:
    """A warning when the teacher was trained at another input size or normalisation than the student's, which
    it now sees: both share the student's preprocessed batch."""
    diffs = []
    t_spec, s_spec = teacher.spec, student.spec
    for key in ("min_size", "max_size"):
        if t_spec.get(key) != s_spec.get(key):
            diffs.append(f"{key} {t_spec.get(key)} vs {s_spec.get(key)}")
    t_tf, s_tf = getattr(teacher, "transform", None), getattr(student, "transform", None)
    for key in ("image_mean", "image_std"):
        t_val, s_val = getattr(t_tf, key, None), getattr(s_tf, key, None)
        if (
            t_val is not None
            and s_val is not None
            and [round(float(v), 4) for v in t_val] != [round(float(v), 4) for v in s_val]
        ):
            diffs.append(f"{key} {list(t_val)} vs {list(s_val)}")
    if not diffs:
        return None
    return (
        f"the teacher was trained with other inputs than the student's, which it is now fed (teacher vs student: "
        f"{'; '.join(diffs)}); set the student's model.min_size/model.max_size to the teacher's unless meant"
    )


@dataclass
class Process:
    """This process's place in the job: its device and its rank among ``world`` processes."""

    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # whether this process created the process group (and destroys it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_process(cfg: Config) -> Process:
    """Pick the device, set the CPU threads and join the process group ``torchrun`` describes."""
    device = select_device(cfg.train.device)
    if cfg.train.threads is not None:
        if cfg.train.threads < 1:
            raise ConfigError(f"train.threads must be >= 1, got {cfg.train.threads}")
        torch.set_num_threads(cfg.train.threads)
    rank, world, owns_group = init_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return Process(device, rank, world, owns_group)


@dataclass
class Run:
    """Everything :func:`build_run` assembles for one training run."""

    cfg: Config
    out: Path
    process: Process
    train_set: Any
    val_set: Any
    classes: list[str]
    student: Detector
    model: DistillModel
    optimizer: torch.optim.Optimizer
    iters_per_epoch: int
    teacher_metrics: dict[str, Any] | None = None


def build_run(cfg: Config, out: Path, process: Process, resume: bool = False) -> Run:
    """Data, student, teacher (checked on a few val images), distillers, model and optimiser; writes nothing."""
    from detkd.data import build_dataset, build_transforms
    from detkd.data.base import check_not_empty

    train_set = build_dataset(cfg.data.root, cfg.data.train_split, cfg.data.format, build_transforms(cfg.data, True))
    val_set = build_dataset(cfg.data.root, cfg.data.val_split, cfg.data.format, build_transforms(cfg.data, False))
    check_not_empty(train_set, "training")
    check_not_empty(val_set, "evaluation")
    classes = list(train_set.classes)
    if list(val_set.classes) != classes:
        raise ConfigError(f"train and val splits of {cfg.data.root} have different classes")
    if count_boxes(train_set) == 0:
        raise DataError(
            f"{cfg.data.root}: split {cfg.data.train_split!r} has no boxes to train on ({len(train_set)} images, "
            "none with a usable annotation)"
        )
    if process.main:
        log.info(describe_model(cfg))
        small = input_size_warning(train_set, cfg.model.min_size)
        if small:
            log.warning(small)
        if process.device.type == "cpu" and not os.environ.get(CORES_CHECKED):
            busy = thread_warning(process.world * torch.get_num_threads())
            if busy:
                log.warning(busy)
    student = build_detector(
        cfg.model.name,
        len(classes),
        preset=cfg.model.preset,
        # Whole-detector weights bring their own backbone: no ImageNet file to find (or fetch) first.
        backbone_weights=cfg.model.backbone_weights if cfg.model.weights == "none" else "none",
        min_size=cfg.model.min_size,
        max_size=cfg.model.max_size,
        train_sizes=cfg.model.train_sizes,
        train_max_size=cfg.model.train_max_size,
        fpn_channels=cfg.model.fpn_channels,
        binary_neck=cfg.model.binary_neck,
        frozen_bn=(
            cfg.model.frozen_bn
            if cfg.model.frozen_bn is not None
            else cfg.model.backbone_weights != "none" or cfg.model.weights != "none"
        ),
    )
    if cfg.model.weights != "none" and not resume:  # a resumed run restores its own weights below
        from detkd.engine.weights import load_weights

        load_weights(student, cfg.model.weights)
    if cfg.model.binary_grad_scale != 1.0:
        from detkd.models.binary import set_binary_grad_scale

        if set_binary_grad_scale(student, cfg.model.binary_grad_scale) == 0:
            raise ConfigError(f"model.binary_grad_scale is set but {cfg.model.name} has no binary conv")
    teacher = None
    teacher_metrics = None
    if cfg.distill.teacher:
        teacher, t_ckpt = load_detector(cfg.distill.teacher)
        if list(t_ckpt.get("classes", [])) != classes:
            raise CheckpointError(
                f"{cfg.distill.teacher}: the teacher was trained on classes {t_ckpt.get('classes')}, "
                f"the data has {classes}"
            )
        mismatch = teacher_input_warning(teacher, student)
        if mismatch and process.main:
            log.warning(mismatch)
        teacher.to(process.device)
        if cfg.distill.check_teacher > 0 and not resume and process.main:
            teacher_metrics = check_teacher(teacher, val_set, cfg.distill.check_teacher, cfg.data.batch_size)
            log.info(
                "teacher check on %d val images: mAP %.3f, mAP@0.5 %.3f",
                teacher_metrics["num_images"],
                teacher_metrics["AP"],
                teacher_metrics["AP50"],
            )
    distillers = build_distillers(cfg.distill.methods, cfg.distill.options, student, teacher)
    iters_per_epoch = max(1, math.ceil(len(train_set) / (cfg.data.batch_size * process.world)))
    calibration = build_calibration(cfg) if distillers else None
    model = DistillModel(
        student,
        teacher,
        distillers,
        cfg.distill.weights,
        cfg.train.iters,
        iters_per_epoch,
        calibration,
        cfg.model.task_loss_weight,
    )
    model.to(process.device)
    optimizer = build_optimizer(cfg.optim, model)
    return Run(
        cfg, out, process, train_set, val_set, classes, student, model, optimizer, iters_per_epoch, teacher_metrics
    )


@dataclass
class Restored:
    """What a training checkpoint holds beyond the weights and the optimiser: where and how the loop stopped."""

    path: Path
    iter: int = 0
    scaler: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    nonfinite_total: int = 0
    rng: list[dict[str, Any]] = field(default_factory=list)
    train_time_s: float = 0.0
    train_time_partial: bool = False  # train_time_s misses a part trained before checkpoints carried it

    def apply(self, trainer: Trainer, run: Run) -> None:
        """Give the trainer the loop state and this rank its random streams (just before training)."""
        trainer.scaler.load_state_dict(self.scaler)
        trainer.best = dict(self.best or trainer.best)
        trainer.nonfinite_total = self.nonfinite_total
        trainer.time_before = self.train_time_s
        trainer.time_partial = self.train_time_partial
        rank, world = run.process.rank, run.process.world
        if len(self.rng) != world:
            log.warning(
                "%s was written by %d process(es), this run has %d: the random streams restart from the seed",
                self.path,
                len(self.rng),
                world,
            )
            torch.manual_seed(hash((run.cfg.train.seed, rank, self.iter)) % 2**63)
        else:
            set_rng_state(self.rng[rank], run.process.device)


def restore(run: Run, last: Path) -> Restored:
    """Load a training checkpoint's weights and optimiser state into ``run``; returns the rest (see
    :class:`Restored`)."""
    ckpt = read_checkpoint(last)
    if ckpt["format"] != "detkd.train":
        raise CheckpointError(f"{last}: not a training checkpoint")
    load_state_checked(run.model.trainable_module, ckpt["trainable"], last)
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{last}: optimiser state does not fit this run ({exc})") from None
    calibration = run.model.calibration
    if calibration is not None:
        if "calibration" not in ckpt:
            raise CheckpointError(f"{last}: the run was started without distill.calibrate=auto")
        calibration.load_state_dict(ckpt["calibration"])
    rng = ckpt["rng"]
    restored = Restored(
        last,
        iter=int(ckpt["iter"]),
        scaler=ckpt.get("scaler", {}),
        best=ckpt.get("best"),
        nonfinite_total=int(ckpt.get("nonfinite_total", 0)),
        train_time_s=float(ckpt.get("train_time_s", 0.0)),  # older checkpoints: only the time after the resume counts
        train_time_partial=bool(ckpt.get("train_time_partial", "train_time_s" not in ckpt)),
        rng=rng if isinstance(rng, list) else [rng],  # older checkpoints: rank 0's state alone
    )
    return restored


def wrap_distributed(run: Run) -> None:
    """Under several processes, the trainable part (student + distillers) runs as DistributedDataParallel."""
    if not (dist.is_available() and dist.is_initialized()):  # torchrun's group, or one the caller made (even of one)
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = run.process.device
    run.model.trainable_forward = DDP(
        run.model.trainable_module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=any(d.has_unused_parameters for d in run.model.distillers.values()),
    )


def prepare_run_folder(run: Run, start_iter: int, overwrite: bool = False) -> None:
    """The first write of a run, once everything that can fail on bad input has been checked: the folder (emptied
    of an earlier run's files with ``overwrite``), logs trimmed to the checkpoint's step, the resolved config."""
    if not run.process.main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_run_folder(run.out)
    for name in ("log.jsonl", "eval.jsonl"):
        trim_jsonl(run.out / name, start_iter)
    save_config(run.cfg, run.out / "config.yaml")


@dataclass
class Hooks:
    """The trainer's hook list, in order, with the two hooks the summary reads."""

    all: list[Hook]
    logger: Logger
    evaluator: Evaluator


def make_hooks(run: Run) -> Hooks:
    """LR schedule, method callbacks (epochs, steps, activity check), logs, evaluation, checkpoints, in that order."""
    from detkd.data import build_transforms
    from detkd.engine.evaluate import run_evaluation

    cfg, out, main = run.cfg, run.out, run.process.main

    def evaluate(detector: Detector) -> dict[str, Any]:
        return run_evaluation(
            detector.predict,
            run.val_set,
            batch_size=cfg.data.batch_size,
            max_images=cfg.data.val_max_images,
            workers=cfg.data.workers,
            progress=cfg.train.progress,
            world_size=run.process.world,
        )

    logger = Logger(out, cfg.train.log_every, cfg.train.progress, cfg.train.tensorboard, enabled=main)
    evaluator = Evaluator(evaluate, out, cfg.train.eval_every, run.classes, enabled=main, shared=run.process.world > 1)
    hooks: list[Hook] = [LRSchedule(cfg.optim)]
    if run.model.distillers:
        context = RunContext(
            run.train_set.with_transforms(build_transforms(cfg.data, False)),
            run.process.device,
            cfg.data.batch_size,
            run.iters_per_epoch,
            cfg.train.iters,
            out,
        )
        hooks += [MethodEpochs(run.iters_per_epoch, context), MethodSteps(), KDActivityCheck()]
    extra = {"config": to_dict(cfg), "spec": dict(run.student.spec), "classes": run.classes}
    # The evaluator runs before the checkpointer, so a checkpoint taken at an evaluation step holds its best score.
    hooks += [logger, evaluator, Checkpointer(out, cfg.train.ckpt_every, extra, run.classes, enabled=main)]
    return Hooks(hooks, logger, evaluator)


def make_trainer(run: Run, hooks: list[Hook], start_iter: int) -> Trainer:
    """The loop over the training data, from step ``start_iter`` (the loader skips the batches already seen)."""
    from detkd.data import build_train_loader

    cfg, process = run.cfg, run.process
    data = build_train_loader(
        run.train_set,
        cfg.data.batch_size,
        cfg.train.seed,
        cfg.data.workers,
        process.rank,
        process.world,
        start_iter,
        pin_memory=process.device.type == "cuda",
    )
    return Trainer(
        run.model,
        run.optimizer,
        iter(data),
        cfg.train.iters,
        hooks,
        process.device,
        cfg.train.amp,
        cfg.optim.clip_grad_norm,
        cfg.optim.clip_grad_value,
        cfg.train.max_nonfinite,
        start_iter,
    )


def summarize(run: Run, trainer: Trainer, hooks: Hooks, start_iter: int) -> dict[str, Any]:
    """The run's ``final.json``: steps, time, memory, metrics, best score, method activity, machine."""
    device = run.process.device
    last = hooks.evaluator.last
    return {
        "out": str(run.out),
        "iters": trainer.iter,
        "resumed_from": start_iter or None,
        "train_time_s": round(trainer.train_time(), 2),  # every part of a resumed run
        "train_time_partial": trainer.time_partial,  # ... except a part whose checkpoint did not time it
        "step_time_s": hooks.logger.steady_step_time(),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "nonfinite_steps": trainer.nonfinite_total,
        "metrics": {k: v for k, v in last.items() if k != "per_class"},
        "per_class_AP": last.get("per_class"),
        "best": trainer.best,
        "teacher_check": run.teacher_metrics,
        "kd_active": trainer.state.get("kd_active"),
        "kd_per_rank": trainer.state.get("kd_per_rank"),
        "calibration": run.model.calibration.summary() if run.model.calibration is not None else None,
        "student_params": sum(p.numel() for p in run.student.parameters()),
        "machine": {
            "device": str(device),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "world_size": run.process.world,
        },
    }


def run(cfg: Config, out: str | Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train (and distil, if ``cfg.distill.methods``) as configured; returns the final summary.

    ``resume`` continues the run in ``out`` (a finished one is only reported); ``overwrite`` replaces the run
    ``out`` holds. Without either, a folder holding results is refused (see :mod:`detkd.engine.rundir`).

    Raises:
        DetkdError: for anything the user can fix; files already written are left untouched.
    """
    out = Path(out)
    check_run_folder(out, resume, overwrite)
    process = start_process(cfg)
    torch.manual_seed(cfg.train.seed + process.rank)
    built = build_run(cfg, out, process, resume)
    restored = restore(built, out / "last.pt") if resume else None
    start_iter = restored.iter if restored else 0
    finished = finished_summary(out, start_iter, cfg.train.iters) if restored else None
    if finished is not None:  # nothing to train or evaluate again: the saved summary stands
        if process.owns_group:
            dist.destroy_process_group()
        return finished
    wrap_distributed(built)
    prepare_run_folder(built, start_iter, overwrite)
    hooks = make_hooks(built)
    trainer = make_trainer(built, hooks.all, start_iter)
    if restored:
        restored.apply(trainer, built)
    if process.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(process.device)
    trainer.run()
    summary = summarize(built, trainer, hooks, start_iter)
    if process.main:
        (out / "final.json").write_text(json.dumps(json_safe(summary), indent=2))
    if process.world > 1:
        dist.barrier()
    if process.owns_group:
        dist.destroy_process_group()
    return summary
