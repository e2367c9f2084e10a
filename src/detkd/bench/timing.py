"""Step-time measurement for ``detkd bench``: everything of one pair timed in one process, interleaved.

The student's training step, the teacher's forward and each method's distillation step run round-robin on the
same pre-loaded batches, so a slow minute on a shared machine slows all of them alike and their ratios stay
meaningful. Medians over the timed rounds are reported. Where CUDA is available the timing runs on the GPU with the
runs' own mixed precision (``train.amp``), each step timed up to a device synchronisation.

Timed steps are the trainer's own training step (:meth:`detkd.engine.trainer.Trainer.run_step`: forward, backward,
the methods' per-step hooks, clipping, optimiser step) at learning rate 0: the weights stay those of the trained
checkpoint, so every row does the same work at every step. Letting the copies train would let a row's weights
drift, and a row whose loss diverges (NaN weights) makes its proposals and NMS degenerate and its step *cheaper*
than the student's own.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("detkd")


def timing_device() -> torch.device:
    """Where the timing runs: the GPU when there is one (the suite's runs train there too), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _timed(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``, up to the end of the work it queued on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _median_time(fn, repeats: int, warmup: int = 2, device: torch.device | None = None) -> float:
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def frozen_trainer(
    model: Any,
    optim_cfg: Any,
    batches: list[Any],
    step: int = 500,
    device: torch.device | None = None,
    amp: str = "off",
) -> Any:
    """A :class:`~detkd.engine.trainer.Trainer` of ``model`` (a DistillModel) cycling over ``batches``, at learning
    rate 0 (see the module docstring) and held at step ``step``; each ``run_step()`` is one whole training step,
    the trainer's own, with the methods' per-step hooks, and never stops on non-finite losses (they are counted
    in ``nonfinite_total``). ``device`` (default CPU) and ``amp`` are the trainer's."""
    from detkd.engine.hooks import MethodSteps
    from detkd.engine.launch import build_optimizer
    from detkd.engine.trainer import Trainer

    optimizer = build_optimizer(optim_cfg, model)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    return Trainer(
        model,
        optimizer,
        itertools.cycle(batches),
        max_iters=step + 1,
        hooks=[MethodSteps()],
        device=device or torch.device("cpu"),
        amp=amp,
        clip_grad_norm=optim_cfg.clip_grad_norm,
        clip_grad_value=optim_cfg.clip_grad_value,
        max_nonfinite=math.inf,
        start_iter=step,
    )


def frozen_train_step(model: Any, optim_cfg: Any, batches: list[Any], **options: Any) -> Any:
    """A function doing one training step of :func:`frozen_trainer` (``options``: its ``step``, ``device``,
    ``amp``); it returns whether the step's loss (and gradient) were finite."""
    trainer = frozen_trainer(model, optim_cfg, batches, **options)

    def run() -> bool:
        skipped = trainer.nonfinite_total
        trainer.run_step()
        return trainer.nonfinite_total == skipped

    return run


def model_cost_or_none(detector: Any, size: int) -> dict[str, Any] | None:
    """Parameters, sizes and operation counts, when the accounting module can measure this detector."""
    try:
        from detkd.models.complexity import model_cost
    except ImportError:
        return {
            "params": sum(p.numel() for p in detector.parameters()),
            "fp32_mb": sum(p.numel() for p in detector.parameters()) * 4 / 2**20,
        }
    try:
        return model_cost(detector, image_size=(size, size))
    except Exception as exc:  # accounting is a report detail; a failure must not lose the timing
        log.warning("cost accounting failed for %s: %s", detector.spec.get("name"), exc)
        return None


def time_pair(
    data: Path,
    student_ckpt: Path,
    teacher_ckpt: Path | None,
    rows: list[str],
    overrides: list[str],
    steps: int = 12,
    references: dict[str, Path] | None = None,
    method_overrides: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Median step times of the student, the teacher forward and each method row; latency and cost per model.

    Returns:
        ``student_step_s``, ``teacher_forward_s``, ``rows`` (row -> ``step_s``, ``ratio`` = step / (student step +
        teacher forward), ``ratio_student`` = step / student step (what the report uses for a row that runs no
        teacher), ``nonfinite_steps`` = timed steps whose loss was not finite, which makes the row's time
        meaningless), ``latency_ms`` (model -> one-image predict),
        ``cost`` (model name -> accounting) and ``steps``.
    """
    from detkd.config import load_config
    from detkd.data import build_dataset, build_train_loader, build_transforms
    from detkd.distillation import DistillModel, build_distillers
    from detkd.engine.checkpoint import load_detector
    from detkd.engine.launch import RunContext
    from detkd.engine.trainer import amp_dtype
    from detkd.methods import METHODS

    # The runs' own layers: the dataset's settings (detkd.yaml: preset, image size), then the pair's overrides.
    overrides = [f"data.root={data}", *overrides]
    cfg = load_config(overrides=overrides, dataset_settings=True)
    train_set = build_dataset(data, cfg.data.train_split, cfg.data.format, build_transforms(cfg.data, True))
    loader = build_train_loader(train_set, cfg.data.batch_size, seed=1234)
    batches = [next(loader) for _ in range(3)]
    device = timing_device()
    student = load_detector(student_ckpt)[0].to(device)
    teacher = load_detector(teacher_ckpt)[0].to(device) if teacher_ckpt else None
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    context = RunContext(
        build_dataset(data, cfg.data.train_split, cfg.data.format, build_transforms(cfg.data, False)),
        device,
        cfg.data.batch_size,
        100,
        1000,
        Path("."),
    )

    nonfinite: dict[str, int] = {}

    def trainer_step(key: str, model: DistillModel) -> Any:
        step_fn = frozen_train_step(model, cfg.optim, batches, device=device, amp=cfg.train.amp)
        nonfinite[key] = 0

        def step() -> None:
            if not step_fn():
                nonfinite[key] += 1

        return step

    plain = DistillModel(copy.deepcopy(student), None, {}, total_iters=1000, iters_per_epoch=100).to(device)
    fns: dict[str, Any] = {"student": trainer_step("student", plain)}
    if teacher is not None:
        teacher_images = [im.to(device) for im in batches[0][0]]
        dtype = amp_dtype(cfg.train.amp, device)

        def teacher_forward() -> None:
            images = teacher_images
            autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                batch, _ = student.preprocess(images, None)
                teacher(batch, None)

        fns["teacher"] = teacher_forward
    for row in rows:
        methods = row.split("+")
        needs_teacher = any(METHODS.get(m).needs_teacher for m in methods)
        s = copy.deepcopy(student)
        # The row's own settings (weights, options), as its training runs have them.
        row_cfg = load_config(
            overrides=overrides + [o for m in methods for o in (method_overrides or {}).get(m, [])],
            dataset_settings=True,
        )
        distillers = build_distillers(methods, row_cfg.distill.options, s, teacher if needs_teacher else None)
        model = DistillModel(
            s,
            teacher if needs_teacher else None,
            distillers,
            row_cfg.distill.weights,
            total_iters=1000,
            iters_per_epoch=100,
        ).to(device)
        for d in distillers.values():
            d.on_epoch_start(0, context)
        fns[row] = trainer_step(row, model)

    for fn in fns.values():  # warm-up: allocation, lazy init
        fn()
        fn()
    nonfinite.update({k: 0 for k in nonfinite})
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for key, fn in fns.items():
            samples[key].append(_timed(fn, device))
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = med["student"] + med.get("teacher", 0.0)
    result: dict[str, Any] = {
        "student_step_s": med["student"],
        "teacher_forward_s": med.get("teacher"),
        "rows": {
            row: {
                "step_s": med[row],
                "ratio": med[row] / base,
                "ratio_student": med[row] / med["student"],
                "nonfinite_steps": nonfinite[row],
            }
            for row in rows
        },
        "student_nonfinite_steps": nonfinite["student"],
        "steps": steps,
        "batch_size": cfg.data.batch_size,
        "threads": torch.get_num_threads(),
        "device": _device_name(device),
    }
    size = cfg.model.min_size
    image = [batches[0][0][0]]
    models = {student.spec["name"]: student}
    if teacher is not None:
        models[teacher.spec["name"]] = teacher
    for path in (references or {}).values():
        if Path(path).exists():
            ref, _ = load_detector(path)
            models[ref.spec["name"]] = ref.to(device)
    result["latency_ms"] = {
        name: 1000 * _median_time(lambda m=m: m.predict(image), 10, device=device) for name, m in models.items()
    }
    result["cost"] = {name: model_cost_or_none(m, size) for name, m in models.items()}
    for key, count in nonfinite.items():
        if count:
            log.warning("timing: %s had %d non-finite timed steps; its step time means nothing", key, count)
    for name in result["cost"]:
        if result["cost"][name] is not None:
            result["cost"][name]["latency_ms"] = result["latency_ms"][name]
    return result


def time_detectors(data: Path, names: list[str], overrides: list[str], steps: int = 10) -> dict[str, Any]:
    """Training-step time (batch from the suite's data) and one-image predict latency of freshly built detectors,
    interleaved in one process like :func:`time_pair`. Detector-specific recipes do not change a step's cost much,
    so every detector runs with the suite's plain settings."""
    from detkd.config import load_config
    from detkd.data import build_dataset, build_train_loader, build_transforms
    from detkd.distillation import DistillModel
    from detkd.models import build_detector

    cfg = load_config(overrides=[f"data.root={data}", *overrides], dataset_settings=True)
    train_set = build_dataset(data, cfg.data.train_split, cfg.data.format, build_transforms(cfg.data, True))
    loader = build_train_loader(train_set, cfg.data.batch_size, seed=1234)
    batches = [next(loader) for _ in range(3)]
    device = timing_device()
    steps_fns, models = {}, {}
    for name in names:
        torch.manual_seed(0)
        binary = "bireal" in name
        det = build_detector(
            name,
            len(train_set.classes),
            preset=cfg.model.preset,
            min_size=cfg.model.min_size,
            max_size=cfg.model.max_size,
            binary_neck=binary,
        )
        model = DistillModel(det, None, {}).to(device)
        step = frozen_train_step(model, cfg.optim, batches, device=device, amp=cfg.train.amp)
        label = name + (" (binary neck)" if binary else "")
        steps_fns[label], models[label] = step, det
    for fn in steps_fns.values():
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in steps_fns}
    for _ in range(steps):
        for key, fn in steps_fns.items():
            samples[key].append(_timed(fn, device))
    image = [batches[0][0][0]]
    return {
        "batch_size": cfg.data.batch_size,
        "size": cfg.model.min_size,
        "threads": torch.get_num_threads(),
        "device": _device_name(device),
        "steps": steps,
        "detectors": {
            key: {
                "step_s": statistics.median(samples[key]),
                "latency_ms": 1000 * _median_time(lambda m=models[key]: m.predict(image), 10, device=device),
                "params": sum(p.numel() for p in models[key].parameters()),
            }
            for key in steps_fns
        },
    }
