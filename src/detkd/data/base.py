"""The dataset class every reader produces, and the checks the readers share (``formats.py`` picks the reader).

A reader (``coco.py``, ``voc.py``, ``yolo.py``) parses its annotation files once into one
:class:`ImageRecord` per image; :class:`DetectionDataset` decodes the image only when an item is
requested. Boxes are clipped to the image when the records are made, so a target never points outside
its image and degenerate boxes are counted instead of reaching a loss.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from detkd.data.records import ImageRecord, RecordTable
from detkd.errors import DataError

logger = logging.getLogger("detkd")

Transform = Callable[[Tensor, dict[str, Any]], tuple[Tensor, dict[str, Any]]]

SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # PIL opens 16-bit gray PNGs as I;16 (older: I)


def one_line(text: object) -> str:
    """``text`` with line breaks folded, so an error message stays on one line."""
    return " ".join(str(text).split())


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


def check_not_empty(dataset: DetectionDataset, use: str) -> None:
    """Raise :class:`DataError` naming the split when ``dataset`` has no images (``use``: what needs them)."""
    if len(dataset) == 0:
        raise DataError(
            f"{dataset.root}: split {dataset.split!r} has no images ({use} needs at least one; check the split's "
            f"{dataset.format} annotations)"
        )


def read_image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({one_line(exc)})") from None


def load_image(path: Path) -> Tensor:
    """Decode an image file into a float32 ``[3, H, W]`` RGB tensor in [0, 1]."""
    return image_to_float(decode_image(path))


def image_to_float(pixels: Tensor) -> Tensor:
    """:func:`decode_image`'s pixels as float32 in [0, 1] (a new tensor for 8-bit pixels, as they are otherwise)."""
    return pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels


def decode_image(path: Path) -> Tensor:
    """Decode an image file into an RGB ``[3, H, W]`` tensor at its own depth: uint8 for 8-bit images (a quarter of
    float32's memory, for callers that keep decoded images), float32 in [0, 1] for 16-bit gray."""
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
    return torch.from_numpy(array).permute(2, 0, 1)


class DetectionDataset(torch.utils.data.Dataset):
    """Images and box targets of one split, in the form every detkd model takes.

    ``dataset[i]`` returns ``(image, target)``: ``image`` a float32 ``[3, H, W]`` RGB tensor in [0, 1],
    ``target`` a dict with ``boxes`` (float32 ``[N, 4]`` xyxy pixels), ``labels`` (int64 ``[N]``, 1..C),
    ``image_id`` (int) and ``orig_size`` (``(h, w)`` before transforms). ``dataset[i, seed]`` runs the
    transforms under their own random state seeded with ``seed``, so an augmented sample depends only
    on ``(i, seed)``, not on which worker or process loads it.

    Attributes:
        records: the split's annotations as a :class:`~detkd.data.records.RecordTable` (arrays);
            ``records[i]`` is image ``i``'s :class:`ImageRecord`.
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
        records: list[ImageRecord] | Any,
        classes: list[str],
        root: str | Path,
        split: str,
        format: str,
        skipped: Counter | dict[str, int] | None = None,
        transforms: Transform | None = None,
        category_ids: list[int] | None = None,
    ):
        # Arrays, not one object per image: DataLoader workers then share them instead of copying them on access.
        self.records = records if isinstance(records, RecordTable) else RecordTable.from_records(list(records))
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

    def record(self, index: int) -> ImageRecord:
        """Image ``index``'s record (path, size, boxes, labels, areas, ignore flags), built from the arrays of
        :attr:`records` (a :class:`~detkd.data.records.RecordTable`); ``dataset.records[index]`` is the same."""
        return self.records[index]

    def with_transforms(self, transforms: Transform | None) -> DetectionDataset:
        """The same split (sharing its arrays, nothing read again) with other transforms."""
        other = copy.copy(self)
        other.transforms = transforms
        return other

    def image_ids(self) -> list[int]:
        """The split's image ids, in index order."""
        return [int(i) for i in self.records.image_ids]

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
