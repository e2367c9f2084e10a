"""COCO reader: ``annotations/instances_{split}.json`` with images in ``{split}/`` or ``images/{split}/``.

Category ids may be any integers; they are mapped to contiguous labels 1..C in increasing id order, and
the class names are the categories' names in that order. Crowd annotations (``iscrowd = 1``) are not
training targets; they stay in the record as regions the evaluation ignores.
"""

from __future__ import annotations

import functools
import json
import math
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from detkd.data.base import DetectionDataset, Transform, check_images_exist, one_line
from detkd.data.records import RecordTable, cached_table
from detkd.errors import DataError


def _require(entry: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_size(value: Any) -> bool:
    # Some converters write sizes as 640.0; any whole positive number is a size.
    return _is_number(value) and value > 0 and value % 1 == 0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read annotation file ({one_line(exc.strerror)})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: annotation file is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    _require(data, ("images", "annotations", "categories"), str(path))
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DataError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _image_dir(root: Path, split: str) -> Path:
    for candidate in (root / split, root / "images" / split):
        if candidate.is_dir():
            return candidate
    raise DataError(f"{root}: image folder for split {split!r} not found; looked for {split}/ and images/{split}/")


def load_coco(root: Path, split: str, transforms: Transform | None = None) -> DetectionDataset:
    """Read split ``split`` of the COCO dataset at ``root``.

    Args:
        root: dataset folder.
        split: split name; the annotation file is ``annotations/instances_{split}.json``.
        transforms: applied to each ``(image, target)``.

    Returns:
        The dataset.

    Raises:
        DataError: the annotation file or one of its entries is malformed, or an image is missing.
    """
    ann_file = root / "annotations" / f"instances_{split}.json"

    # A partial of a module-level function, not a closure: a large file is parsed in a child process.
    parse = functools.partial(_parse, ann_file, root, split)

    if ann_file.is_file():
        # Parsed once per file version: later reads (other ranks, the next run) load the cached arrays.
        table, classes, category_ids, skipped = cached_table(ann_file, f"{root.resolve()}|{split}", parse)
    else:
        table, classes, category_ids, skipped = parse()  # reports the missing file
    check_images_exist(table.image_paths(), str(ann_file))
    return DetectionDataset(table, classes, root, split, "coco", skipped, transforms, category_ids)


def _parse(ann_file: Path, root: Path, split: str) -> tuple[RecordTable, list[str], list[int], Counter]:
    """Read and check the annotation file; returns the records as arrays, the class names, their COCO category
    ids and the skipped counts."""
    data = _read_json(ann_file)

    for i, cat in enumerate(data["categories"]):
        _require(cat, ("id", "name"), f"{ann_file}: categories[{i}]")
        if not isinstance(cat["id"], int) or isinstance(cat["id"], bool):
            raise DataError(f"{ann_file}: categories[{i}]: id {cat['id']!r} is not an integer")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {}
    for cat in categories:
        if cat["id"] in label_of:
            raise DataError(f"{ann_file}: category id {cat['id']} appears twice in 'categories'")
        label_of[cat["id"]] = len(label_of) + 1
    classes = [str(c["name"]) for c in categories]

    images: dict[Any, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        _require(img, ("id", "file_name", "width", "height"), f"{ann_file}: images[{i}]")
        if not isinstance(img["id"], int) or isinstance(img["id"], bool):
            raise DataError(f"{ann_file}: images[{i}]: id {img['id']!r} is not an integer")
        for key in ("width", "height"):
            if not _is_size(img[key]):
                raise DataError(f"{ann_file}: image {img['id']}: {key} {img[key]!r} is not a positive integer")
        if img["id"] in images:
            raise DataError(f"{ann_file}: image id {img['id']} appears twice in 'images'")
        images[img["id"]] = img

    index_of = {image_id: k for k, image_id in enumerate(images)}
    # Flat typed arrays, not a Python object per annotation: a COCO-sized file has close to a million.
    ann_image, boxes, labels = array("q"), array("d"), array("q")
    crowds, areas = array("b"), array("d")
    skipped: Counter = Counter()
    for i, ann in enumerate(data["annotations"]):
        ann_id = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        where = f"{ann_file}: annotation {ann_id}"
        _require(ann, ("image_id", "category_id", "bbox"), where)
        if ann["image_id"] not in images:
            raise DataError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in label_of:
            ids = [str(c) for c in label_of]
            known = ", ".join(ids[:12]) + (", ..." if len(ids) > 12 else "") if ids else "none"
            raise DataError(f"{where}: category_id {ann['category_id']} is not in 'categories' (known ids: {known})")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DataError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        crowd = bool(ann.get("iscrowd", 0))
        if crowd:
            skipped["crowd"] += 1
        area = ann.get("area")
        area = float(area) if _is_number(area) else None
        ann_image.append(index_of[ann["image_id"]])
        boxes.extend((x, y, x + w, y + h))
        labels.append(label_of[ann["category_id"]])
        crowds.append(crowd)
        areas.append(area if area is not None else 0.0)

    image_dir = _image_dir(root, split)
    files = [str(img["file_name"]) for img in images.values()]
    table = RecordTable.from_annotations(
        {
            "paths": [str(image_dir / name) for name in files],
            "file_names": files,
            "image_ids": list(images),
            "widths": [int(img["width"]) for img in images.values()],
            "heights": [int(img["height"]) for img in images.values()],
        },
        np.frombuffer(ann_image, dtype=np.int64),
        np.frombuffer(boxes, dtype=np.float64).reshape(-1, 4),
        np.frombuffer(labels, dtype=np.int64),
        np.frombuffer(crowds, dtype=np.int8).astype(bool),
        np.frombuffer(areas, dtype=np.float64),
        skipped,
    )
    return table, classes, [int(c["id"]) for c in categories], skipped
