"""The Python API: what the ``detkd`` command does, callable from a program or a notebook.

>>> import detkd
>>> cfg = detkd.load_config("configs/frcnn_r50.yaml", ["data.root=data/digits", "train.iters=500"])
>>> summary = detkd.train(cfg, "runs/teacher")
>>> detector = detkd.load("runs/teacher/best.pt")
>>> detections = detector.predict(["image.png"])

Every function raises :class:`detkd.errors.DetkdError` (one line, nothing half-written) for what the user can fix,
as the command line does; nothing here exits the interpreter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detkd.config import Config
from detkd.errors import ConfigError, DataError

ImageLike = Tensor | np.ndarray | str | Path | Any  # Any: a PIL image (PIL is imported only when one is given)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The run configuration the CLI builds: defaults, then the dataset's own settings (``<data.root>/detkd.yaml``,
    written e.g. by ``detkd data digits``) when it has them, then the YAML file's overrides, then ``key=value`` pairs.

    Args:
        path: a YAML file of overrides (e.g. one of ``configs/``), or None for the defaults.
        overrides: ``key=value`` strings, as on the command line (``train.iters=500``, ``model.name=frcnn_r18``).

    Returns:
        The :class:`detkd.config.Config`; its fields can also be set directly (``cfg.train.iters = 500``).
    """
    from detkd.config import load_config as _load

    return _load(path, list(overrides), dataset_settings=True)


def train(cfg: Config, out: str | Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train a detector without distillation (``detkd train``).

    Args:
        cfg: the run configuration (see :func:`load_config`); ``cfg.distill.methods`` must be empty.
        out: run folder; it receives config.yaml, log.jsonl, eval.jsonl, last.pt, best.pt and student.pt.
        resume: continue the run in ``out`` from its last.pt.
        overwrite: replace the run ``out`` holds (without it, or ``resume``, a folder holding results is refused).

    Returns:
        The run's summary (also written to ``out/final.json``): ``metrics`` of the last evaluation, ``best``,
        ``train_time_s``...
    """
    if cfg.distill.methods:
        raise ConfigError("the config names distillation methods; use `detkd distill` (detkd.distill) for them")
    return _run(cfg, out, resume, overwrite)


def distill(cfg: Config, out: str | Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train a student with the distillation methods of ``cfg.distill`` (``detkd distill``).

    Args:
        cfg: the run configuration; ``cfg.distill.methods`` names the methods, ``cfg.distill.teacher`` the teacher
            checkpoint (None for teacher-free methods), ``cfg.model`` the student.
        out: run folder, as for :func:`train`.
        resume: continue the run in ``out`` from its last.pt.
        overwrite: replace the run ``out`` holds (without it, or ``resume``, a folder holding results is refused).

    Returns:
        The run's summary, as for :func:`train`.
    """
    check_distill_config(cfg)
    return _run(cfg, out, resume, overwrite)


def check_distill_config(cfg: Config) -> None:
    """Raise :class:`~detkd.errors.ConfigError` if ``cfg`` names no method or a teacher file that is not there."""
    if not cfg.distill.methods:
        raise ConfigError("no method given: pass --method NAME[+NAME] (see `detkd list methods`)")
    if cfg.distill.teacher is not None and not Path(cfg.distill.teacher).is_file():
        raise ConfigError(
            f"--teacher {cfg.distill.teacher}: file not found (train one with `detkd train`, or pass "
            "--teacher none for teacher-free methods)"
        )


def _run(cfg: Config, out: str | Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    from detkd.engine.launch import run

    return run(cfg, Path(out), resume=resume, overwrite=overwrite)


class Predictor:
    """A trained detector ready to predict: :func:`load` returns one.

    Attributes:
        model: the detector (a ``torch.nn.Module``), in eval mode.
        classes: class names; label ``i + 1`` is ``classes[i]``.
        device: where the model runs.
        checkpoint: the checkpoint's metadata (everything but the weights).
    """

    def __init__(self, model: torch.nn.Module, classes: list[str], device: torch.device, checkpoint: dict[str, Any]):
        self.model = model.eval()
        self.classes = list(classes)
        self.device = device
        self.checkpoint = checkpoint

    def predict(
        self, images: ImageLike | Sequence[ImageLike], score_threshold: float = 0.0, batch_size: int = 8
    ) -> list[dict[str, Any]]:
        """Detect objects in images.

        Args:
            images: one image or a list: ``[3, H, W]`` float tensors in [0, 1] (RGB), ``HxWx3`` uint8 arrays,
                PIL images or image file paths.
            score_threshold: drop detections scoring below this (the detector's own floor is 0.05 for Faster
                R-CNN, RetinaNet and FCOS; DETR models keep their 100 best).
            batch_size: images per forward pass.

        Returns:
            One dict per image: ``boxes`` (``[N, 4]`` xyxy pixels of the image as given), ``scores`` ``[N]``,
            ``labels`` ``[N]`` (1..C) as CPU tensors, and ``names`` (the class name of each box).
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        results: list[dict[str, Any]] = []
        for start in range(0, len(items), max(1, batch_size)):
            batch = [as_image_tensor(item) for item in items[start : start + batch_size]]
            with torch.no_grad():
                outputs = self.model.predict(batch)
            for out in outputs:
                keep = out["scores"] >= score_threshold
                labels = out["labels"][keep].cpu()
                results.append(
                    {
                        "boxes": out["boxes"][keep].float().cpu(),
                        "scores": out["scores"][keep].float().cpu(),
                        "labels": labels,
                        "names": [self.classes[int(k) - 1] for k in labels],
                    }
                )
        return results

    def __repr__(self) -> str:
        return f"Predictor({self.checkpoint.get('spec', {}).get('name')!r}, classes={len(self.classes)}, {self.device})"


def as_image_tensor(image: ImageLike) -> Tensor:
    """A ``[3, H, W]`` float RGB tensor in [0, 1] from a tensor, an ``HxWx3`` uint8 array, a PIL image or a path."""
    from detkd.data.base import load_image

    if isinstance(image, (str, Path)):
        return load_image(Path(image))
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise DataError(f"an image tensor must be [3, H, W], got {list(image.shape)}")
        return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"an image array must be HxWx3, got {list(image.shape)}")
        return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
    if hasattr(image, "convert"):  # a PIL image
        return as_image_tensor(np.asarray(image.convert("RGB")))
    raise DataError(f"cannot read an image from a {type(image).__name__}")


def select(device: str | torch.device) -> torch.device:
    from detkd.engine.launch import select_device

    return device if isinstance(device, torch.device) else select_device(device)


def load(checkpoint: str | Path, device: str | torch.device = "auto") -> Predictor:
    """Load a detkd checkpoint (``best.pt``, ``student.pt``, ``last.pt``) for prediction.

    Args:
        checkpoint: the checkpoint file.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.

    Returns:
        A :class:`Predictor`.
    """
    from detkd.engine.checkpoint import load_detector

    where = select(device)
    model, ckpt = load_detector(checkpoint, where)
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "trainable", "packed", "optimizer")}
    return Predictor(model, list(ckpt.get("classes", [])), where, meta)


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "val",
    metric: str = "coco",
    format: str = "auto",
    batch_size: int = 8,
    max_images: int | None = None,
    device: str | torch.device = "auto",
    save_predictions: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a dataset split (``detkd eval``).

    Args:
        checkpoint: the checkpoint file.
        data: dataset folder (COCO, VOC or YOLO layout).
        split: split name.
        metric: ``coco`` (mAP@[.5:.95] and friends), ``voc`` (AP@0.5, area) or ``voc07`` (11-point AP@0.5).
        format: ``auto``, ``coco``, ``voc`` or ``yolo``.
        batch_size: images per forward pass.
        max_images: evaluate the first this many images only.
        device: where to run.
        save_predictions: write the detections scored as a COCO results JSON here (see :func:`write_results`).
        progress: show a progress bar.

    Returns:
        The metrics: ``AP``, ``AP50``... (COCO) or ``mAP`` (VOC), ``per_class`` and ``num_images``.
    """
    from detkd.config import DataConfig
    from detkd.data import build_dataset, build_transforms
    from detkd.data.base import check_not_empty
    from detkd.engine.evaluate import run_evaluation

    predictor = load(checkpoint, device)
    dataset = build_dataset(data, split, format, build_transforms(DataConfig(), False))
    check_not_empty(dataset, "evaluation")
    if list(dataset.classes) != predictor.classes:
        raise ConfigError(f"{checkpoint} was trained on classes {predictor.classes}, {data} has {dataset.classes}")
    predictions: list[dict[str, Any]] = []
    metrics = run_evaluation(
        predictor.model.predict,
        dataset,
        batch_size=batch_size,
        metric=metric,
        max_images=max_images,
        progress=progress,
        predictions=predictions,
    )
    if save_predictions is not None:
        write_results(predictions, dataset.category_ids, save_predictions)
    return metrics


def write_results(predictions: list[dict[str, Any]], category_ids: Sequence[int], path: str | Path) -> Path:
    """Write per-image predictions as a COCO results JSON (``[{"image_id", "category_id", "bbox", "score"}]``).

    Image ids are the dataset's (a COCO file's own ids; for VOC and YOLO folders the position of the image in the
    split's list, see docs/datasets.md); category ids are the COCO file's (1..C for VOC and YOLO).
    """
    from detkd.engine.evaluate import coco_results

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(coco_results(predictions, category_ids)))
    tmp.replace(path)
    return path


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders' images (sorted, not recursive)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such image file or folder")
    if not files:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    score_threshold: float = 0.3,
    batch_size: int = 8,
    category_ids: Sequence[int] | None = None,
    pictures: bool = True,
) -> dict[str, Any]:
    """Predict on image files and write ``out/predictions.json``, ``out/images.json`` and one picture per image.

    ``predictions.json`` is a COCO results list holding every detection the detector outputs (scores down to its
    own floor, 0.05 for the torchvision families), so it can be scored or filtered later; the pictures show the
    boxes scoring ``score_threshold`` or more, with class name and score. Image ids are the positions of the
    images in the order read (files as given, a folder's images sorted by name); ``images.json`` maps them to the
    files, COCO style (``images`` and ``categories``).

    Args:
        predictor: from :func:`load`.
        inputs: image files and/or folders of images.
        out: output folder.
        score_threshold: the pictures' threshold.
        batch_size: images per forward pass.
        category_ids: the category id of each class (default 1..C).
        pictures: draw the pictures.

    Returns:
        ``{"images": count, "detections": count in the JSON, "drawn": count in the pictures, "out": folder}``.
    """
    from detkd.viz import draw_detections, save_png

    files = image_files(inputs)
    ids = list(category_ids) if category_ids is not None else list(range(1, len(predictor.classes) + 1))
    if len(ids) != len(predictor.classes):
        raise ConfigError(f"{len(ids)} category ids for the checkpoint's {len(predictor.classes)} classes")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictions, images, drawn, used_names = [], [], 0, set()
    for start in range(0, len(files), max(1, batch_size)):
        chunk = files[start : start + batch_size]
        tensors = [as_image_tensor(p) for p in chunk]
        for offset, (path, image, det) in enumerate(zip(chunk, tensors, predictor.predict(tensors))):
            image_id = start + offset
            predictions.append({"image_id": image_id, **{k: det[k] for k in ("boxes", "scores", "labels")}})
            images.append({"id": image_id, "file_name": str(path), "height": image.shape[1], "width": image.shape[2]})
            if pictures:
                keep = det["scores"] >= score_threshold
                names = [f"{n} {s:.2f}" for n, s, k in zip(det["names"], det["scores"].tolist(), keep) if k]
                picture = draw_detections(image, det["boxes"][keep], det["labels"][keep], names)
                name = f"{path.stem}.png" if path.stem not in used_names else f"{path.stem}_{image_id}.png"
                used_names.add(path.stem)
                save_png(picture, out / name)
                drawn += int(keep.sum())
    write_results(predictions, ids, out / "predictions.json")
    categories = [{"id": i, "name": n} for i, n in zip(ids, predictor.classes)]
    (out / "images.json").write_text(json.dumps({"images": images, "categories": categories}, indent=1))
    detections = sum(len(p["scores"]) for p in predictions)
    return {"images": len(files), "detections": detections, "drawn": drawn, "out": str(out)}
