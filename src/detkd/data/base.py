"""The dataset class every reader produces, and the checks the readers share.

A reader (``coco.py``, ``voc.py``, ``yolo.py``) parses its annotation files once into one
:class:`ImageRecord` per image; :class:`DetectionDataset` decodes the image only when an item is
requested. Boxes are clipped to the image when the records are made, so a target never points outside
its image and degenerate boxes are counted instead of reaching a loss.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from detkd.errors import ConfigError, DataError

logger = logging.getLogger("detkd")

Transform = Callable[[Tensor, dict[str, Any]], tuple[Tensor, dict[str, Any]]]

FORMATS = ("coco", "voc", "yolo")
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # PIL opens 16-bit gray PNGs as I;16 (older: I)


def one_line(text: object) -> str:
    """``text`` with line breaks folded, so an error message stays on one line."""
    return " ".join(str(text).split())


@dataclass
class ImageRecord:
    """One image of a split and its annotations, boxes already clipped to the image.

    Attributes:
        path: image file.
        file_name: the image's name as the annotation files spell it (kept for ``coco_gt``).
        image_id: integer id, unique within the split.
        width: image width in pixels.
        height: image height in pixels.
        boxes: ``[N, 4]`` float32 xyxy pixels.
        labels: ``[N]`` int64, 1..C.
        areas: ``[N]`` float32 area used by the COCO small/medium/large split.
        ignore: ``[N]`` bool; True for crowd (COCO) and difficult (VOC) objects, which are left out of
            training targets and only kept as regions the evaluation does not count.
    """

    path: Path
    file_name: str
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    areas: np.ndarray
    ignore: np.ndarray


def make_record(
    path: Path,
    file_name: str,
    image_id: int,
    width: int,
    height: int,
    boxes: Sequence[Sequence[float]] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    skipped: Counter,
    ignore: Sequence[bool] | np.ndarray | None = None,
    areas: Sequence[float] | np.ndarray | None = None,
) -> ImageRecord:
    """Clip raw xyxy boxes to the image and drop the degenerate ones, counting them in ``skipped``.

    Args:
        path: image file.
        file_name: the image's name as written in the annotation files.
        image_id: integer id of the image.
        width: image width.
        height: image height.
        boxes: ``[N, 4]`` xyxy boxes as annotated (may reach outside the image or be empty).
        labels: ``[N]`` labels 1..C.
        skipped: counter of dropped annotations by reason, updated in place.
        ignore: ``[N]`` flags of objects the evaluation ignores; counted as ``crowd``/``difficult`` by
            the caller, not here.
        areas: ``[N]`` annotated areas (COCO segment areas); the clipped box area where not given.

    Returns:
        The record with the surviving boxes.
    """
    n = len(labels)
    raw = np.asarray(boxes, dtype=np.float64).reshape(n, 4)
    labels_arr = np.asarray(labels, dtype=np.int64).reshape(n)
    ignore_arr = np.zeros(n, dtype=bool) if ignore is None else np.asarray(ignore, dtype=bool).reshape(n)

    zero_area = (raw[:, 2] <= raw[:, 0]) | (raw[:, 3] <= raw[:, 1])
    clipped = raw.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    outside = ~zero_area & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    keep = ~(zero_area | outside)
    # Ignored objects are already counted by their reason; a degenerate one is simply dropped.
    if (zero_area & ~ignore_arr).any():
        skipped["zero_area"] += int((zero_area & ~ignore_arr).sum())
    if (outside & ~ignore_arr).any():
        skipped["outside_image"] += int((outside & ~ignore_arr).sum())

    clipped = clipped[keep]
    box_areas = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    if areas is not None:
        given = np.asarray(areas, dtype=np.float64).reshape(n)[keep]
        box_areas = np.where(given > 0, given, box_areas)
    return ImageRecord(
        path=path,
        file_name=file_name,
        image_id=int(image_id),
        width=int(width),
        height=int(height),
        boxes=clipped.astype(np.float32),
        labels=labels_arr[keep],
        areas=box_areas.astype(np.float32),
        ignore=ignore_arr[keep],
    )


def check_images_exist(paths: Sequence[Path], what: str) -> None:
    """Raise :class:`DataError` naming the first missing image and how many are missing.

    Args:
        paths: image files the split refers to.
        what: where the images are listed (an annotation file or folder), for the message.
    """
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" ({len(missing)} of {len(paths)} images are missing)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: image file not found (listed in {what}){more}")


def read_image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({one_line(exc)})") from None


def load_image(path: Path) -> Tensor:
    """Decode an image file into a float32 ``[3, H, W]`` RGB tensor in [0, 1]."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, with its name, not later in a worker
            if im.mode in SIXTEEN_BIT_MODES:
                # PIL's RGB conversion clips 16-bit gray at 255 instead of rescaling it.
                gray = torch.from_numpy(np.array(im, dtype=np.float32) / 65535.0)
                return gray.clamp_(0.0, 1.0).expand(3, -1, -1).contiguous()
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({one_line(exc)})") from None
    array = np.array(rgb, dtype=np.uint8)  # [H, W, 3], writable copy for torch
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


class DetectionDataset(torch.utils.data.Dataset):
    """Images and box targets of one split, in the form every detkd model takes.

    ``dataset[i]`` returns ``(image, target)``: ``image`` a float32 ``[3, H, W]`` RGB tensor in [0, 1],
    ``target`` a dict with ``boxes`` (float32 ``[N, 4]`` xyxy pixels), ``labels`` (int64 ``[N]``, 1..C),
    ``image_id`` (int) and ``orig_size`` (``(h, w)`` before transforms). ``dataset[i, seed]`` runs the
    transforms under their own random state seeded with ``seed``, so an augmented sample depends only
    on ``(i, seed)``, not on which worker or process loads it.

    Attributes:
        classes: class names; label ``i + 1`` is ``classes[i]``.
        root: dataset folder.
        split: split name (``train``, ``val``...).
        format: the reader that produced the records (``coco``, ``voc``, ``yolo``).
        skipped: annotations left out of training targets, by reason.
        transforms: applied to ``(image, target)`` after decoding, or None.
        category_ids: the dataset's own category id of each class (``category_ids[i]`` is ``classes[i]``'s):
            the COCO file's ids; 1..C for VOC and YOLO, whose files have none.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        classes: list[str],
        root: str | Path,
        split: str,
        format: str,
        skipped: Counter | dict[str, int] | None = None,
        transforms: Transform | None = None,
        category_ids: list[int] | None = None,
    ):
        self.records = records
        self.classes = list(classes)
        self.category_ids = list(range(1, len(classes) + 1)) if category_ids is None else list(category_ids)
        if len(self.category_ids) != len(self.classes):
            raise ValueError(f"{len(self.category_ids)} category ids for {len(self.classes)} classes")
        self.root = Path(root)
        self.split = split
        self.format = format
        self.skipped = dict(sorted((skipped or {}).items()))
        self.transforms = transforms
        if self.skipped:
            counts = ", ".join(f"{reason} {count}" for reason, count in self.skipped.items())
            logger.warning(
                "%s (%s, split %r): annotations left out of training targets: %s", self.root, format, split, counts
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Any]]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        record = self.records[index]
        image = load_image(record.path)
        if tuple(image.shape[1:]) != (record.height, record.width):
            raise DataError(
                f"{record.path}: image is {image.shape[2]}x{image.shape[1]} pixels but its annotations say "
                f"{record.width}x{record.height}"
            )
        keep = ~record.ignore
        target = {
            "boxes": torch.from_numpy(record.boxes[keep]).reshape(-1, 4),
            "labels": torch.from_numpy(record.labels[keep]),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        if self.transforms is not None:
            if seed is None:
                image, target = self.transforms(image, target)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image, target = self.transforms(image, target)
        return image, target

    def image_ids(self) -> list[int]:
        """The split's image ids, in index order."""
        return [r.image_id for r in self.records]

    def coco_gt(self) -> dict[str, Any]:
        """The split's ground truth as a COCO-format dict, ready for COCO evaluation.

        Category ids are the contiguous labels 1..C. Crowd and difficult objects are written with
        ``iscrowd = 1`` and ``ignore = 1``: COCO evaluation takes ``iscrowd`` as the ignore flag, so
        detections on them are neither rewarded nor penalised.
        """
        images, annotations = [], []
        for record in self.records:
            images.append(
                {"id": record.image_id, "file_name": record.file_name, "width": record.width, "height": record.height}
            )
            for box, label, area, ignore in zip(record.boxes, record.labels, record.areas, record.ignore):
                x0, y0, x1, y1 = (float(v) for v in box)
                annotations.append(
                    {
                        # COCO evaluation treats annotation id 0 as "unmatched", so ids start at 1.
                        "id": len(annotations) + 1,
                        "image_id": record.image_id,
                        "category_id": int(label),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(area),
                        "iscrowd": int(ignore),
                        "ignore": int(ignore),
                    }
                )
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.classes)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, format={self.format!r}, "
            f"images={len(self)}, classes={len(self.classes)})"
        )


def detect_format(root: Path, split: str) -> str:
    """The annotation format found under ``root`` for ``split``: ``coco``, ``voc`` or ``yolo``."""
    if (root / "annotations" / f"instances_{split}.json").is_file():
        return "coco"
    if (root / "Annotations").is_dir() and (root / "ImageSets" / "Main" / f"{split}.txt").is_file():
        return "voc"
    if (root / "images" / split).is_dir() and (root / "labels" / split).is_dir():
        return "yolo"
    raise DataError(
        f"{root}: no dataset for split {split!r}; looked for COCO (annotations/instances_{split}.json), "
        f"VOC (Annotations/ and ImageSets/Main/{split}.txt) and YOLO (images/{split}/ and labels/{split}/)"
    )


def build_dataset(
    root: str | Path, split: str, format: str = "auto", transforms: Transform | None = None
) -> DetectionDataset:
    """Read one split of a COCO, VOC or YOLO dataset folder.

    Args:
        root: dataset folder.
        split: split name, e.g. ``train`` or ``val``.
        format: ``auto`` (detect from the folder layout), ``coco``, ``voc`` or ``yolo``.
        transforms: applied to each ``(image, target)``; see :func:`detkd.data.build_transforms`.

    Returns:
        The dataset; all annotation files are parsed and all image paths checked before it returns.

    Raises:
        DataError: the folder, an annotation file, an entry or an image is missing or malformed.
        ConfigError: ``format`` is not one of the above.
    """
    # The readers import this module, so they are imported here rather than at the top.
    from detkd.data.coco import load_coco
    from detkd.data.voc import load_voc
    from detkd.data.yolo import load_yolo

    root = Path(root)
    if format not in ("auto", *FORMATS):
        raise ConfigError(f"data.format: unknown format {format!r}; choose one of auto, {', '.join(FORMATS)}")
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if format == "auto":
        format = detect_format(root, split)
    loader = {"coco": load_coco, "voc": load_voc, "yolo": load_yolo}[format]
    return loader(root, split, transforms)
