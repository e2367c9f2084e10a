"""COCO reader: ``annotations/instances_{split}.json`` with images in ``{split}/`` or ``images/{split}/``.

Category ids may be any integers; they are mapped to contiguous labels 1..C in increasing id order, and
the class names are the categories' names in that order. Crowd annotations (``iscrowd = 1``) are not
training targets; they stay in the record as regions the evaluation ignores.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from detkd.data.base import DetectionDataset, ImageRecord, Transform, check_images_exist, make_record, one_line
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

    raw: dict[Any, list[tuple[list[float], int, bool, float | None]]] = defaultdict(list)
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
        raw[ann["image_id"]].append(([x, y, x + w, y + h], label_of[ann["category_id"]], crowd, area))

    image_dir = _image_dir(root, split)
    records: list[ImageRecord] = []
    for image_id, img in images.items():
        anns = raw.get(image_id, [])
        records.append(
            make_record(
                path=image_dir / img["file_name"],
                file_name=str(img["file_name"]),
                image_id=image_id,
                width=int(img["width"]),
                height=int(img["height"]),
                boxes=[a[0] for a in anns],
                labels=[a[1] for a in anns],
                ignore=[a[2] for a in anns],
                areas=[a[3] if a[3] is not None else 0.0 for a in anns],
                skipped=skipped,
            )
        )
    check_images_exist([r.path for r in records], str(ann_file))
    category_ids = [int(c["id"]) for c in categories]
    return DetectionDataset(records, classes, root, split, "coco", skipped, transforms, category_ids)
