"""Assemble a run from a :class:`Config`: data, student, teacher, distillers, optimiser, hooks; then train.

``detkd train`` and ``detkd distill`` both end here. Under ``torchrun`` each process calls :func:`run` and the
process group is set up from the environment; only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from detkd.config import Config, OptimConfig, save_config, to_dict
from detkd.distill import DistillModel, build_distillers
from detkd.engine.checkpoint import load_detector, load_state_checked, read_checkpoint
from detkd.engine.evaluate import json_safe
from detkd.engine.hooks import (
    Checkpointer,
    Evaluator,
    KDActivityCheck,
    Logger,
    LRSchedule,
    MethodEpochs,
    set_rng_state,
)
from detkd.engine.trainer import Trainer, amp_dtype
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


SCHEDULES = ("step", "cosine", "constant")
# Only rank 0 evaluates, while the other ranks wait in their next collective: the timeout must outlast an evaluation.
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
    return sum(int((~record.ignore).sum()) for record in dataset.records)


def build_optimizer(cfg: OptimConfig, model: DistillModel) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable module; no weight decay on norms and biases; method-defined groups;
    ``cfg.lr_mult`` scales the LR of the parameters it names."""
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
        plain.setdefault((mult_of(name), param.ndim > 1), []).append(param)
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
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ConfigError(f"optim.name must be sgd or adamw, got {cfg.name!r}")


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


def run(cfg: Config, out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train (and distil, if ``cfg.distill.methods``) as configured; returns the final summary.

    Raises:
        DetkdError: for anything the user can fix; files already written are left untouched.
    """
    from detkd.data import build_dataset, build_train_loader, build_transforms
    from detkd.engine.evaluate import run_evaluation

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: the run folder (--out) is an existing file")
    device = select_device(cfg.train.device)
    if cfg.train.threads is not None:
        if cfg.train.threads < 1:
            raise ConfigError(f"train.threads must be >= 1, got {cfg.train.threads}")
        torch.set_num_threads(cfg.train.threads)
    amp_dtype(cfg.train.amp, device)  # settings read only later are checked now, before anything is written
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.optim.schedule!r}")
    rank, world, owns_group = init_distributed(device)
    main = rank == 0
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    last = out / "last.pt"
    if main:
        if last.exists() and not resume:
            raise ConfigError(
                f"{out} already holds a run (last.pt); pass --resume to continue it or choose another --out"
            )
        if resume and not last.exists():
            raise ConfigError(f"--resume: {last} not found (nothing to resume in {out})")
    torch.manual_seed(cfg.train.seed + rank)

    train_set = build_dataset(cfg.data.root, cfg.data.train_split, cfg.data.format, build_transforms(cfg.data, True))
    val_set = build_dataset(cfg.data.root, cfg.data.val_split, cfg.data.format, build_transforms(cfg.data, False))
    classes = list(train_set.classes)
    if list(val_set.classes) != classes:
        raise ConfigError(f"train and val splits of {cfg.data.root} have different classes")
    if count_boxes(train_set) == 0:
        raise DataError(
            f"{cfg.data.root}: split {cfg.data.train_split!r} has no boxes to train on ({len(train_set)} images, "
            "none with a usable annotation)"
        )
    student = build_detector(
        cfg.model.name,
        len(classes),
        preset=cfg.model.preset,
        backbone_weights=cfg.model.backbone_weights,
        min_size=cfg.model.min_size,
        max_size=cfg.model.max_size,
        fpn_channels=cfg.model.fpn_channels,
        binary_neck=cfg.model.binary_neck,
    )
    teacher = None
    teacher_metrics = None
    if cfg.distill.teacher:
        teacher, t_ckpt = load_detector(cfg.distill.teacher)
        if list(t_ckpt.get("classes", [])) != classes:
            raise CheckpointError(
                f"{cfg.distill.teacher}: the teacher was trained on classes {t_ckpt.get('classes')}, "
                f"the data has {classes}"
            )
        teacher.to(device)
        if cfg.distill.check_teacher > 0 and not resume and main:
            teacher_metrics = check_teacher(teacher, val_set, cfg.distill.check_teacher, cfg.data.batch_size)
            log.info(
                "teacher check on %d val images: mAP %.3f, mAP@0.5 %.3f",
                teacher_metrics["num_images"],
                teacher_metrics["AP"],
                teacher_metrics["AP50"],
            )
    distillers = build_distillers(cfg.distill.methods, cfg.distill.options, student, teacher)
    iters_per_epoch = max(1, math.ceil(len(train_set) / (cfg.data.batch_size * world)))
    model = DistillModel(student, teacher, distillers, cfg.distill.weights, cfg.train.iters, iters_per_epoch)
    model.to(device)
    optimizer = build_optimizer(cfg.optim, model)

    trainer_state: dict[str, Any] = {}
    start_iter = 0
    if resume:
        ckpt = read_checkpoint(last)
        if ckpt["format"] != "detkd.train":
            raise CheckpointError(f"{last}: not a training checkpoint")
        load_state_checked(model.trainable_module, ckpt["trainable"], last)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{last}: optimiser state does not fit this run ({exc})") from None
        start_iter = int(ckpt["iter"])
        trainer_state = ckpt
        if start_iter >= cfg.train.iters:
            log.info("%s already finished (%d/%d steps)", out, start_iter, cfg.train.iters)

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model.trainable_forward = DDP(
            model.trainable_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(distillers),
        )

    if main:
        # Everything that can fail on bad input has been checked: only now is the run folder touched.
        out.mkdir(parents=True, exist_ok=True)
        for name in ("log.jsonl", "eval.jsonl"):
            trim_jsonl(out / name, start_iter)
        save_config(cfg, out / "config.yaml")
    extra = {"config": to_dict(cfg), "spec": dict(student.spec), "classes": classes}
    context = RunContext(
        build_dataset(cfg.data.root, cfg.data.train_split, cfg.data.format, build_transforms(cfg.data, False)),
        device,
        cfg.data.batch_size,
        iters_per_epoch,
        cfg.train.iters,
        out,
    )

    def evaluate(detector: Detector) -> dict[str, Any]:
        return run_evaluation(
            detector.predict,
            val_set,
            batch_size=cfg.data.batch_size,
            max_images=cfg.data.val_max_images,
            workers=cfg.data.workers,
            progress=cfg.train.progress,
        )

    logger = Logger(out, cfg.train.log_every, cfg.train.progress, cfg.train.tensorboard, enabled=main)
    evaluator = Evaluator(evaluate, out, cfg.train.eval_every, classes, enabled=main)
    hooks = [LRSchedule(cfg.optim)]
    if distillers:
        hooks += [MethodEpochs(iters_per_epoch, context), KDActivityCheck()]
    # The evaluator runs before the checkpointer, so a checkpoint taken at an evaluation step holds its best score.
    hooks += [logger, evaluator, Checkpointer(out, cfg.train.ckpt_every, extra, classes, enabled=main)]

    data = build_train_loader(train_set, cfg.data.batch_size, cfg.train.seed, cfg.data.workers, rank, world, start_iter)
    trainer = Trainer(
        model,
        optimizer,
        iter(data),
        cfg.train.iters,
        hooks,
        device,
        cfg.train.amp,
        cfg.optim.clip_grad_norm,
        cfg.optim.clip_grad_value,
        cfg.train.max_nonfinite,
        start_iter,
    )
    if trainer_state:
        trainer.scaler.load_state_dict(trainer_state.get("scaler", {}))
        trainer.best = dict(trainer_state.get("best", trainer.best))
        trainer.nonfinite_total = int(trainer_state.get("nonfinite_total", 0))
        rng = trainer_state["rng"]
        rng = rng if isinstance(rng, list) else [rng]  # older checkpoints: rank 0's state alone
        if len(rng) != world:
            log.warning(
                "%s was written by %d process(es), this run has %d: the random streams restart from the seed",
                last,
                len(rng),
                world,
            )
            torch.manual_seed(hash((cfg.train.seed, rank, start_iter)) % 2**63)
        else:
            set_rng_state(rng[rank], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.run()
    summary = {
        "out": str(out),
        "iters": trainer.iter,
        "resumed_from": start_iter or None,
        "train_time_s": round(time.perf_counter() - start, 2),
        "step_time_s": logger.steady_step_time(),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "nonfinite_steps": trainer.nonfinite_total,
        "metrics": {k: v for k, v in evaluator.last.items() if k != "per_class"},
        "per_class_AP": evaluator.last.get("per_class"),
        "best": trainer.best,
        "teacher_check": teacher_metrics,
        "kd_active": trainer.state.get("kd_active"),
        "kd_per_rank": trainer.state.get("kd_per_rank"),
        "student_params": sum(p.numel() for p in student.parameters()),
        "machine": {
            "device": str(device),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "world_size": world,
        },
    }
    if main:
        (out / "final.json").write_text(json.dumps(json_safe(summary), indent=2))
    if world > 1:
        dist.barrier()
    if owns_group:
        dist.destroy_process_group()
    return summary
