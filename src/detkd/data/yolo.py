"""YOLO reader: ``images/{split}/*`` with ``labels/{split}/<same name>.txt`` beside them.

Each label line is ``cls cx cy w h``: a 0-based class index and a box centre and size normalised by the
image size; the class becomes label ``cls + 1``. An image without a label file has no objects. Class
names come from ``data.yaml`` (``names`` as a list or an ``{index: name}`` mapping) or ``classes.txt``.
Image ids are the positions (0-based) of the images sorted by path.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import yaml

from detkd.data.base import (
    DetectionDataset,
    ImageRecord,
    Transform,
    make_record,
    one_line,
    read_image_size,
)
from detkd.data.voc import read_class_names
from detkd.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _names_from_yaml(path: Path) -> list[str]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({one_line(exc)})") from None
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({one_line(str(exc).splitlines()[0])})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DataError(f"{path}: missing key 'names' (the class names)")
    names = data["names"]
    if isinstance(names, dict):
        keys = sorted(names, key=lambda k: (not isinstance(k, int), str(k)))
        if keys != list(range(len(names))):
            raise DataError(f"{path}: 'names' keys must be the class indices 0..{len(names) - 1}, got {keys}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: 'names' must be a non-empty list or {{index: name}} mapping")
    return [str(n) for n in names]


def read_yolo_classes(root: Path) -> list[str]:
    """Class names of a YOLO dataset from ``data.yaml`` or ``classes.txt``."""
    if (root / "data.yaml").is_file():
        return _names_from_yaml(root / "data.yaml")
    if (root / "classes.txt").is_file():
        return read_class_names(root / "classes.txt")
    raise DataError(f"{root}: no class names; looked for data.yaml (key 'names') and classes.txt")


def _read_labels(path: Path, num_classes: int, width: int, height: int) -> tuple[list[list[float]], list[int]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read label file ({one_line(exc)})") from None
    boxes, labels = [], []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 5:
            raise DataError(f"{where}: expected 5 values 'cls cx cy w h', got {len(fields)}: {line.strip()!r}")
        try:
            cls = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise DataError(f"{where}: not a class index and four numbers: {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in (cx, cy, w, h)):
            raise DataError(f"{where}: box values must be finite: {line.strip()!r}")
        if not 0 <= cls < num_classes:
            raise DataError(f"{where}: class index {cls} is not in 0..{num_classes - 1}")
        boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
        labels.append(cls + 1)
    return boxes, labels


def load_yolo(root: Path, split: str, transforms: Transform | None = None) -> DetectionDataset:
    """Read split ``split`` of the YOLO dataset at ``root``.

    Args:
        root: dataset folder.
        split: split name; images are under ``images/{split}``, labels under ``labels/{split}``.
        transforms: applied to each ``(image, target)``.

    Returns:
        The dataset.

    Raises:
        DataError: the class names are missing, a label line is malformed, or an image is unreadable.
    """
    classes = read_yolo_classes(root)
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    paths = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"{image_dir}: no image files ({suffixes})")
    # A label file whose image is gone means the image is missing, not that the labels are extra.
    stems = {p.relative_to(image_dir).with_suffix("").as_posix() for p in paths}
    orphans = sorted(
        p for p in label_dir.rglob("*.txt") if p.relative_to(label_dir).with_suffix("").as_posix() not in stems
    )
    if orphans:
        more = f" ({len(orphans)} label files have no image)" if len(orphans) > 1 else ""
        raise DataError(f"{orphans[0]}: no image for this label file in {image_dir}{more}")

    records: list[ImageRecord] = []
    skipped: Counter = Counter()
    for image_id, path in enumerate(paths):
        relative = path.relative_to(image_dir)
        width, height = read_image_size(path)  # labels are normalised: the size is needed now
        label_file = (label_dir / relative).with_suffix(".txt")
        boxes, labels = _read_labels(label_file, len(classes), width, height) if label_file.is_file() else ([], [])
        records.append(
            make_record(
                path=path,
                file_name=relative.as_posix(),
                image_id=image_id,
                width=width,
                height=height,
                boxes=boxes,
                labels=labels,
                skipped=skipped,
            )
        )
    return DetectionDataset(records, classes, root, split, "yolo", skipped, transforms)
