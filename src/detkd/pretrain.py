"""``detkd pretrain``: pretrain a backbone as a classifier of a detection dataset's object crops.

It stands in for ImageNet weights on a machine without them, and is useful on its own where the domain is far from
ImageNet. The classes are the dataset's classes plus one ``background`` class:

- **object crops**: one per annotated object (crowd/difficult ones left out), a square centred on the box with side
  ``context`` (1.25) times its longer side, resized to ``crop_size``; in training the side is jittered by
  x[0.9, 1.15] and the centre by up to 10% of the side;
- **background crops**: per image ``max(1, round(objects / classes))`` squares (so the background class is about as
  frequent as an object class), with sides drawn from the split's object crops and placed where no object overlaps
  them by more than 20% of the smaller of the two areas.

The classifier is the backbone's bottom-up body (its ``c5`` output), global average pooling and one linear layer.
Images are normalised with ImageNet's mean and standard deviation, as the detectors do. The weights file holds
the backbone's state dict under the names ``model.backbone_weights=PATH`` loads (the linear layer is left out);
top-1 accuracy on the val split's crops (object and background crops, no jitter) is printed and written, with the
settings, to a JSON file next to the weights.

An interrupted pretraining resumes: every ``checkpoint_every`` steps (default 100) the classifier, the optimiser, the
crop sampler's random state and the step are written to ``<weights>.resume.pt`` (atomically), and running the same
command again continues from there and ends with the weights an uninterrupted run would have written (bit for bit
on CPU). The file is removed once the weights are written; a checkpoint of other settings is refused, not silently
resumed.

``bireal18`` is trained in two steps of ``iters / 2`` each, the recipe of ReActNet (Liu et al., ECCV 2020,
*ReActNet: Towards Precise Binary Neural Network with Generalized Activation Functions*, arXiv 2003.03488), which
takes its staged training from Real-to-Binary (Martinez et al., ICLR 2020, *Training Binary Neural Networks with
Real-to-Binary Convolutions*, arXiv 2003.11535):

1. step 1 from scratch with real-valued latent weights (``--step1 reactnet``, the default: binary activations and
   real-valued weights, as ReActNet's step 1; ``--step1 real``: real-valued activations and weights, the
   real-valued start of Real-to-Binary's sequence);
2. step 2 initialised from step 1's weights, with binary weights and binary activations (each binary conv's scale
   re-initialised to its channel's mean ``|w|``), a fresh optimiser and learning-rate schedule.

Both steps use AdamW (ReActNet trains with Adam) with weight decay 1e-5 in step 1 and none in step 2, as ReActNet;
ReActNet's distributional loss from a real-valued teacher is not used. The file holds the step-2 (fully binary)
weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from detkd.errors import ConfigError, DataError

log = logging.getLogger("detkd")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONTEXT = 1.25  # crop side / longer box side
BACKGROUND_OVERLAP = 0.2  # a background crop overlaps no object by more than this share of the smaller area
LOG_EVERY = 10  # steps between the lines of --log (what `detkd bench` shows as progress)
CLASSIFIER_PREFIXES = ("fc.", "classifier.")  # ImageNet heads of torchvision nets: not part of a detection backbone


@dataclass
class PretrainConfig:
    """Settings of one pretraining run (also written to the JSON report)."""

    backbone: str
    data: str
    out: str
    format: str = "auto"
    train_split: str = "train"
    val_split: str = "val"
    val_max_images: int | None = None  # measure top-1 on the crops of the first N val images only
    iters: int = 2000
    crop_size: int = 64
    batch_size: int = 64
    lr: float | None = None  # None: 0.1 * batch_size / 256 for sgd (linear scaling), 1e-3 for adamw
    optimizer: str | None = None  # None: sgd, adamw for bireal18
    weight_decay: float = 1e-4  # sgd; bireal18 follows ReActNet (1e-5 then 0)
    step1: str = "reactnet"  # bireal18 only: reactnet | real
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    log: str | None = None  # append {"iter", "step_time", "loss"} every LOG_EVERY steps to this JSON-lines file
    checkpoint_every: int = 100  # steps between resume checkpoints (0: none)


RUNTIME_FIELDS = ("out", "device", "threads", "progress", "log", "checkpoint_every")  # not part of a run's identity


@dataclass
class Crop:
    """A square region of one image and its class (0..C-1 objects, C background)."""

    image: int  # index into the split's records
    cx: float
    cy: float
    side: float
    label: int


def object_crops(records: list[Any]) -> list[Crop]:
    crops = []
    for i, record in enumerate(records):
        for box, label, ignore in zip(record.boxes, record.labels, record.ignore):
            if ignore:
                continue
            x0, y0, x1, y1 = (float(v) for v in box)
            side = CONTEXT * max(x1 - x0, y1 - y0)
            crops.append(Crop(i, (x0 + x1) / 2, (y0 + y1) / 2, side, int(label) - 1))
    return crops


def _overlaps(square: np.ndarray, boxes: np.ndarray) -> bool:
    """Whether ``square`` (xyxy) covers more than :data:`BACKGROUND_OVERLAP` of any box, or any box of it."""
    if len(boxes) == 0:
        return False
    iw = np.clip(np.minimum(square[2], boxes[:, 2]) - np.maximum(square[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(square[3], boxes[:, 3]) - np.maximum(square[1], boxes[:, 1]), 0, None)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    smaller = np.minimum(areas, (square[2] - square[0]) * (square[3] - square[1]))
    return bool((iw * ih > BACKGROUND_OVERLAP * np.maximum(smaller, 1e-6)).any())


def background_crops(records: list[Any], sides: list[float], num_classes: int, seed: int) -> list[Crop]:
    """Squares away from every object (see the module docstring); an image too crowded for one gets none."""
    rng = np.random.default_rng(seed)
    label = num_classes
    crops = []
    for i, record in enumerate(records):
        wanted = max(1, round(len(record.labels) / num_classes))
        found = 0
        for _ in range(20 * wanted):
            if found == wanted:
                break
            side = min(float(rng.choice(sides)), record.width, record.height)
            x0 = rng.uniform(0, record.width - side)
            y0 = rng.uniform(0, record.height - side)
            if not _overlaps(np.array([x0, y0, x0 + side, y0 + side]), record.boxes):
                crops.append(Crop(i, x0 + side / 2, y0 + side / 2, side, label))
                found += 1
    return crops


CACHE_BYTES = 2**30  # decoded images a CropLoader keeps: a suite's digits fit (4000 scenes at 256 px: 0.79 GB)


class CropLoader:
    """Batches of crops as ``[B, 3, S, S]`` normalised tensors and ``[B]`` labels.

    An image holds several crops and a batch of 128 crops draws from about as many images, so decoding dominated the
    step (128 PNG decodes a step); each image is decoded once and kept (8-bit pixels as uint8) until the kept images
    reach ``cache_bytes``, after which the rest are decoded per crop. The pixels are the same either way.

    Args:
        dataset: the split.
        crops: the crops to draw from.
        size: output side in pixels.
        jitter: random scale/shift of each crop (training).
        cache_bytes: memory for decoded images (0: decode per crop).
    """

    def __init__(self, dataset: Any, crops: list[Crop], size: int, jitter: bool, cache_bytes: int = CACHE_BYTES):
        self.dataset, self.crops, self.size, self.jitter = dataset, crops, size, jitter
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0
        self._decoded: dict[int, Tensor] = {}

    def _image(self, index: int) -> Tensor:
        """Image ``index`` of the split as float32 ``[3, H, W]`` in [0, 1], decoded once while the cache has room."""
        from detkd.data.base import decode_image, image_to_float

        pixels = self._decoded.get(index)
        if pixels is None:
            pixels = decode_image(self.dataset.records[index].path)
            size = pixels.numel() * pixels.element_size()
            if self.cached_bytes + size <= self.cache_bytes:
                self._decoded[index] = pixels
                self.cached_bytes += size
        return image_to_float(pixels)

    def load(self, indices: list[int], rng: random.Random | None = None) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for index in indices:
            crop = self.crops[index]
            side, cx, cy = crop.side, crop.cx, crop.cy
            if self.jitter and rng is not None:
                side *= rng.uniform(0.9, 1.15)
                cx += rng.uniform(-0.1, 0.1) * side
                cy += rng.uniform(-0.1, 0.1) * side
            image = self._image(crop.image)
            box = torch.tensor([[0.0, cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]])
            # roi_align resamples the square to size x size; outside the image it reads zeros.
            patch = roi_align(image[None], box, self.size, spatial_scale=1.0, sampling_ratio=2, aligned=True)[0]
            images.append((patch - self.mean) / self.std)
            labels.append(crop.label)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class CropSampler:
    """Endless shuffled training batches of a :class:`CropLoader`, with a state that a checkpoint keeps (the
    random generator of the order and the jitter, and the rest of the current pass)."""

    def __init__(self, loader: CropLoader, batch_size: int, seed: int):
        self.loader, self.batch_size = loader, batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def __iter__(self) -> CropSampler:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if len(self.order) < self.batch_size:
            more = list(range(len(self.loader.crops)))
            self.rng.shuffle(more)
            self.order += more
        indices, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return self.loader.load(indices, self.rng)

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])


class CropClassifier(nn.Module):
    """A backbone body, global average pooling of its last stage and a linear layer."""

    def __init__(self, backbone: str, num_classes: int):
        super().__init__()
        from detkd.models.backbones import BACKBONES

        body = BACKBONES.get(backbone)(frozen_bn=False)
        self.body = body.module
        self.weights_target = body.weights_target  # the module `backbone_weights` loads into
        self.fc = nn.Linear(body.channels["c5"], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x)["c5"].mean(dim=(2, 3)))

    def backbone_state(self) -> dict[str, Tensor]:
        """The backbone's weights under the names ``load_backbone_weights`` expects (no classifier)."""
        state = self.weights_target.state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}


def set_binary_mode(model: nn.Module, activations: bool, weights: bool) -> None:
    """Switch every binary conv of ``model`` to (real or binary) activations and weights."""
    from detkd.models.binary import binary_modules

    for conv in binary_modules(model).values():
        if weights and not conv.binary_weights:
            with torch.no_grad():  # alpha's closed-form start for the weights step 1 left
                conv.scale.copy_(conv.weight.abs().mean(dim=(1, 2, 3)))
        conv.binary_activations, conv.binary_weights = activations, weights


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def top1(model: nn.Module, loader: CropLoader, device: torch.device, batch_size: int) -> tuple[float, float]:
    """Top-1 accuracy over all crops and over the object crops alone."""
    model.eval()
    hits = objects = object_hits = 0
    background = model.fc.out_features - 1
    for start in range(0, len(loader.crops), batch_size):
        images, labels = loader.load(list(range(start, min(start + batch_size, len(loader.crops)))))
        predicted = model(images.to(device)).argmax(1).cpu()
        correct = predicted == labels
        hits += int(correct.sum())
        is_object = labels != background
        objects += int(is_object.sum())
        object_hits += int(correct[is_object].sum())
    model.train()
    return hits / max(1, len(loader.crops)), object_hits / max(1, objects)


def _progress(enabled: bool, total: int) -> Any:
    if not (enabled and sys.stderr.isatty()):
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    progress.start()
    progress.add_task("pretrain", total=total, info="")
    return progress


@dataclass
class Phase:
    """One stage of a pretraining: its steps, its weight decay and, for bireal18, the binary modes
    ``(activations, weights)`` of its convolutions."""

    iters: int
    weight_decay: float
    binary: tuple[bool, bool] | None = None


def _train_phase(
    model: CropClassifier,
    sampler: CropSampler,
    optimizer: torch.optim.Optimizer,
    lr: float,
    device: torch.device,
    steps: int,
    start: int,
    offset: int,
    losses: list[float],
    progress: Any = None,
    log_file: Path | None = None,
    checkpoint: Any = None,
    checkpoint_every: int = 0,
) -> float:
    """Steps ``start .. steps - 1`` of a phase of ``steps`` (warm-up and cosine decay over the whole phase); returns
    the mean loss of its last (up to) 50 steps. ``losses`` holds the phase's recent losses (a resumed phase passes
    the checkpoint's). Every :data:`LOG_EVERY` steps a line goes to ``log_file``: the step counted from the start of
    the run (``offset`` + step), the mean seconds per step since the last line, and the loss. Every
    ``checkpoint_every`` steps inside the phase ``checkpoint(step, losses)`` is called."""
    warmup = min(100, max(1, steps // 10))
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model.train()
    tick, window = time.perf_counter(), 0
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_at(step, steps, warmup)
        images, labels = next(sampler)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(images.to(device)).float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        del losses[:-50]
        window += 1
        if log_file is not None and ((offset + step + 1) % LOG_EVERY == 0 or step + 1 == steps):
            now = time.perf_counter()
            line = {"iter": offset + step + 1, "step_time": (now - tick) / window, "loss": losses[-1]}
            tick, window = now, 0
            with open(log_file, "a") as f:
                f.write(json.dumps(line) + "\n")
        if progress is not None:
            progress.update(progress.task_ids[0], advance=1, info=f"loss {np.mean(losses):.3f}")
        elif (step + 1) % max(1, steps // 10) == 0:
            log.info("pretrain step %d: loss %.3f", offset + step + 1, np.mean(losses))
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint(step + 1, losses)
    return float(np.mean(losses)) if losses else float("nan")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a resume checkpoint (atomically: a crash leaves the previous one)."""
    from detkd.engine.checkpoint import save_atomic

    save_atomic(state, path)


def resume_path(weights: Path) -> Path:
    """The resume checkpoint of the run that writes ``weights``: ``<weights stem>.resume.pt`` beside it."""
    return weights.with_name(f"{weights.stem}.resume.pt")


def load_checkpoint(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The resume checkpoint at ``path`` if there is one; a checkpoint of other settings is refused."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ConfigError(f"{path}: unreadable resume checkpoint ({exc}); delete it to start over") from None
    theirs = state.get("settings", {})
    changed = [f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in settings.items() if theirs.get(k) != v]
    if changed:
        raise ConfigError(
            f"{path} holds an unfinished pretraining with other settings ({', '.join(changed)}); "
            "run it with its own settings to finish it, or delete the file to start over"
        )
    return state


def _keep_log_lines(log_file: Path, upto: int) -> None:
    """Drop the lines of steps after ``upto`` (trained after the checkpoint a resumed run starts from)."""
    if not log_file.exists():
        return
    kept = [line for line in log_file.read_text().splitlines() if line.strip() and json.loads(line)["iter"] <= upto]
    log_file.write_text("".join(line + "\n" for line in kept))


def _optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]  # no decay on norms, biases, binary scales
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def output_paths(out: str | Path, backbone: str) -> tuple[Path, Path]:
    """The weights file and its JSON report: ``out`` itself when it names a ``.pt``/``.pth`` file, else
    ``out/<backbone>.pt``."""
    out = Path(out)
    weights = out if out.suffix in (".pt", ".pth") else out / f"{backbone}.pt"
    return weights, weights.with_suffix(".json")


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain ``cfg.backbone`` on the crops of ``cfg.data``; write the weights and the JSON report.

    Returns:
        The report (also written next to the weights): settings, crop counts, ``top1``, ``top1_objects``.

    Raises:
        ConfigError: unknown backbone or option, bad numbers.
        DataError: the dataset cannot be read or has no boxes.
    """
    import detkd.models  # noqa: F401  (registers every backbone)
    from detkd.data import build_dataset
    from detkd.engine.checkpoint import save_atomic
    from detkd.engine.evaluate import json_safe
    from detkd.engine.launch import select_device
    from detkd.models.backbones import BACKBONES

    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {cfg.backbone!r}; known: {', '.join(BACKBONES.names())}")
    for name in ("iters", "crop_size", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be >= 0, got {cfg.checkpoint_every}")
    binary = cfg.backbone == "bireal18"
    if binary and cfg.iters < 2:
        raise ConfigError("bireal18 trains in two steps: --iters must be >= 2")
    optimizer_name = cfg.optimizer or ("adamw" if binary else "sgd")
    if optimizer_name not in ("sgd", "adamw"):
        raise ConfigError(f"--optimizer must be sgd or adamw, got {optimizer_name!r}")
    if cfg.step1 not in ("reactnet", "real"):
        raise ConfigError(f"--step1 must be reactnet or real, got {cfg.step1!r}")
    lr = cfg.lr if cfg.lr is not None else (0.1 * cfg.batch_size / 256 if optimizer_name == "sgd" else 1e-3)
    weights_path, report_path = output_paths(cfg.out, cfg.backbone)
    if weights_path.exists() and not weights_path.is_file():
        raise ConfigError(f"{weights_path}: exists and is not a file")
    device = select_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    train_set = build_dataset(cfg.data, cfg.train_split, cfg.format)
    val_set = build_dataset(cfg.data, cfg.val_split, cfg.format)
    classes = list(train_set.classes)
    if list(val_set.classes) != classes:
        raise ConfigError(f"train and val splits of {cfg.data} have different classes")
    train_objects = object_crops(train_set.records)
    if not train_objects:
        raise DataError(f"{cfg.data}: split {cfg.train_split!r} has no boxes to crop ({len(train_set)} images)")
    if cfg.val_max_images is not None:
        if cfg.val_max_images < 1:
            raise ConfigError(f"--val-max-images must be >= 1, got {cfg.val_max_images}")
        val_set.records = val_set.records[: cfg.val_max_images]
    val_objects = object_crops(val_set.records)
    if not val_objects:
        raise DataError(f"{cfg.data}: split {cfg.val_split!r} has no boxes to evaluate on ({len(val_set)} images)")
    sides = [c.side for c in train_objects]
    train_crops = train_objects + background_crops(train_set.records, sides, len(classes), cfg.seed)
    val_crops = val_objects + background_crops(val_set.records, sides, len(classes), cfg.seed + 1)

    torch.manual_seed(cfg.seed)
    model = CropClassifier(cfg.backbone, len(classes) + 1).to(device)
    train_loader = CropLoader(train_set, train_crops, cfg.crop_size, jitter=True)
    val_loader = CropLoader(val_set, val_crops, cfg.crop_size, jitter=False)
    sampler = CropSampler(train_loader, cfg.batch_size, cfg.seed)
    log.info(
        "pretrain %s: %d train crops (%d background), %d val crops, %d classes + background",
        cfg.backbone,
        len(train_crops),
        len(train_crops) - len(train_objects),
        len(val_crops),
        len(classes),
    )

    phases = [Phase(cfg.iters, cfg.weight_decay)]
    if binary:  # ReActNet: weight decay 1e-5 with real-valued weights, none once they are binary
        first = cfg.iters // 2
        phases = [Phase(first, 1e-5, (cfg.step1 == "reactnet", False)), Phase(cfg.iters - first, 0.0, (True, True))]
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}
    checkpoint_file = resume_path(weights_path)
    state = load_checkpoint(checkpoint_file, settings)
    records: list[dict[str, Any]] = state["records"] if state else []
    first_phase, first_step = (state["phase"], state["step"]) if state else (0, 0)
    done = sum(p.iters for p in phases[:first_phase]) + first_step
    if state:
        log.info("pretrain %s: resuming from step %d of %d (%s)", cfg.backbone, done, cfg.iters, checkpoint_file)

    log_file = Path(cfg.log) if cfg.log else None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if state:
            _keep_log_lines(log_file, done)
        else:
            log_file.write_text("")  # a pretraining starts over: its old lines would read as progress
    start = time.perf_counter()
    elapsed = float(state["elapsed_s"]) if state else 0.0
    progress = _progress(cfg.progress, cfg.iters)
    if progress is not None and done:
        progress.update(progress.task_ids[0], completed=done)
    try:
        for index in range(first_phase, len(phases)):
            phase = phases[index]
            if phase.binary is not None:
                set_binary_mode(model, *phase.binary)
            optimizer = _optimizer(model, optimizer_name, lr, phase.weight_decay)
            step, losses = 0, []
            if state and index == first_phase:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                sampler.load_state_dict(state["sampler"])
                torch.set_rng_state(state["torch_rng"])
                step, losses = first_step, list(state["losses"])
            offset = sum(p.iters for p in phases[:index])

            def checkpoint(at: int, recent: list[float], index: int = index, optimizer: Any = optimizer) -> None:
                save_checkpoint(
                    {
                        "settings": settings,
                        "phase": index,
                        "step": at,
                        "records": records,
                        "losses": list(recent),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "sampler": sampler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "elapsed_s": elapsed + time.perf_counter() - start,
                    },
                    checkpoint_file,
                )

            loss = _train_phase(
                model,
                sampler,
                optimizer,
                lr,
                device,
                phase.iters,
                step,
                offset,
                losses,
                progress,
                log_file,
                checkpoint,
                cfg.checkpoint_every,
            )
            record: dict[str, Any] = {"step": index + 1, "iters": phase.iters, "loss": loss}
            if binary and index == 0:  # how far the real-valued weights got
                record["top1"] = top1(model, val_loader, device, 256)[0]
            records.append(record)
    finally:
        if progress is not None:
            progress.stop()
    train_time = elapsed + time.perf_counter() - start
    accuracy, object_accuracy = top1(model, val_loader, device, 256)

    save_atomic(model.backbone_state(), weights_path)
    report = {
        **asdict(cfg),
        "lr": lr,
        "optimizer": optimizer_name,
        "weights": str(weights_path),
        "classes": classes + ["background"],
        "train_crops": len(train_crops),
        "train_background_crops": len(train_crops) - len(train_objects),
        "val_crops": len(val_crops),
        "val_background_crops": len(val_crops) - len(val_objects),
        "steps": records,
        "resumed_from": done or None,
        "top1": accuracy,
        "top1_objects": object_accuracy,
        "train_time_s": round(train_time, 1),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    report_path.write_text(json.dumps(json_safe(report), indent=2) + "\n")
    checkpoint_file.unlink(missing_ok=True)
    return report


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a backbone on a detection dataset's object crops",
        description="Train a backbone as a classifier of the object crops (plus background crops) of a detection "
        "dataset's train split; write a state dict that model.backbone_weights=PATH loads, and its top-1 accuracy "
        "on the val split's crops to a JSON file next to it. bireal18 trains in two steps (real-valued weights, "
        "then binary). A stopped run resumes from its last checkpoint (<weights>.resume.pt) when the same command "
        "runs again.",
    )
    p.add_argument("--backbone", required=True, help="r18, r34, r50, r101, mbv3 or bireal18")
    p.add_argument("--data", required=True, help="dataset folder (COCO, VOC or YOLO layout)")
    p.add_argument("--out", required=True, help="weights file (.pt) or a folder (writes BACKBONE.pt there)")
    p.add_argument("--format", default="auto", choices=["auto", "coco", "voc", "yolo"], help="dataset layout")
    p.add_argument("--train-split", default="train", help="split to train on (default train)")
    p.add_argument("--val-split", default="val", help="split to measure top-1 on (default val)")
    p.add_argument("--val-max-images", type=int, help="measure top-1 on the first N val images' crops only")
    p.add_argument("--iters", type=int, default=2000, help="training steps (default 2000)")
    p.add_argument("--crop-size", type=int, default=64, help="crop side in pixels (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="crops per step (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.1 x batch/256 for sgd, 1e-3 for adamw)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="default sgd; adamw for bireal18")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="sgd/adamw weight decay (not bireal18)")
    p.add_argument(
        "--step1",
        default="reactnet",
        choices=["reactnet", "real"],
        help="bireal18's first step: binary activations and real weights (reactnet), or all real (real)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the crops and the initialisation (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log", help="append the step, seconds per step and loss every 10 steps to this JSON-lines file")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="steps between resume checkpoints (default 100; 0: none); the same command resumes a stopped run",
    )
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in PretrainConfig.__dataclass_fields__}
    report = pretrain(PretrainConfig(**fields, progress=not args.no_progress))
    print(
        f"val top-1 {report['top1']:.4f} (objects only {report['top1_objects']:.4f}) on {report['val_crops']} crops "
        f"after {report['iters']} steps; weights: {report['weights']} (load with "
        f"model.backbone_weights={report['weights']})"
    )
    return 0
