"""PASCAL VOC reader: ``Annotations/<id>.xml``, ``ImageSets/Main/{split}.txt``, ``JPEGImages/<id>.jpg|png``.

Class names come from ``classes.txt`` (one per line) when the folder has one, else the 20 VOC classes.
VOC corner coordinates are 1-based inclusive pixel indices, so ``xmin``/``ymin`` are shifted by one to
continuous 0-based coordinates (``xmin=1, xmax=W`` spans the whole image width ``[0, W]``). Objects
marked ``difficult`` are not training targets; they stay as regions the evaluation ignores.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from detkd.data.base import (
    DetectionDataset,
    ImageRecord,
    Transform,
    check_images_exist,
    make_record,
    one_line,
    read_image_size,
)
from detkd.errors import DataError

logger = logging.getLogger("detkd")

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def read_class_names(path: Path) -> list[str]:
    """Class names from a text file, one per line; blank lines are ignored, duplicates are errors."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read class names ({one_line(exc)})") from None
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path}: no class names in the file")
    seen = set()
    for n in names:
        if n in seen:
            raise DataError(f"{path}: class name {n!r} is listed twice")
        seen.add(n)
    return names


def _text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = _text(node, tag, where)
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: <{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: <{tag}> is not finite: {text!r}")
    return value


def _image_path(root: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = root / "JPEGImages" / f"{stem}{suffix}"
        if path.is_file():
            return path
    return root / "JPEGImages" / f"{stem}.jpg"  # reported as missing by check_images_exist


def load_voc(root: Path, split: str, transforms: Transform | None = None) -> DetectionDataset:
    """Read split ``split`` of the VOC dataset at ``root``.

    Image ids are the positions (0-based) of the images in ``ImageSets/Main/{split}.txt``.

    Args:
        root: dataset folder.
        split: split name; its image list is ``ImageSets/Main/{split}.txt``.
        transforms: applied to each ``(image, target)``.

    Returns:
        The dataset.

    Raises:
        DataError: an annotation file is missing or malformed, names an unknown class, or an image is missing.
    """
    class_file = root / "classes.txt"
    if class_file.is_file():
        classes = read_class_names(class_file)
        class_source = str(class_file)
    else:
        classes = list(VOC_CLASSES)
        class_source = f"the 20 PASCAL VOC classes, as {class_file} does not exist"
        logger.warning(
            "%s: no classes.txt; using the 20 PASCAL VOC classes (for other classes, write them to %s, one per line)",
            root,
            class_file,
        )
    label_of = {name: i + 1 for i, name in enumerate(classes)}

    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{list_file}: cannot read image list ({one_line(exc)})") from None
    # Per-class lists ("<id> 1") share the layout; only the first column is the image id.
    stems = [line.split()[0] for line in lines if line.strip()]

    parsed = []
    for stem in stems:
        xml_file = root / "Annotations" / f"{stem}.xml"
        try:
            tree = ET.parse(xml_file)
        except FileNotFoundError:
            raise DataError(
                f"{xml_file}: annotation file not found (image {stem!r} is listed in {list_file})"
            ) from None
        except ET.ParseError as exc:
            raise DataError(f"{xml_file}: not valid XML ({one_line(exc)})") from None
        except OSError as exc:
            raise DataError(f"{xml_file}: cannot read annotation file ({one_line(exc)})") from None
        parsed.append((stem, xml_file, tree.getroot()))

    paths = [_image_path(root, stem) for stem, _, _ in parsed]
    check_images_exist(paths, str(list_file))

    records: list[ImageRecord] = []
    skipped: Counter = Counter()
    for image_id, ((_, xml_file, ann), path) in enumerate(zip(parsed, paths)):
        size = ann.find("size")
        width = height = 0
        if size is not None:
            width = int(_number(size, "width", f"{xml_file}: <size>"))
            height = int(_number(size, "height", f"{xml_file}: <size>"))
        if width <= 0 or height <= 0:
            # Some tools write <size> as 0 or leave it out; the header is the truth then.
            width, height = read_image_size(path)
        boxes, labels, difficult = [], [], []
        for k, obj in enumerate(ann.iter("object")):
            name = _text(obj, "name", f"{xml_file}: object {k}")
            where = f"{xml_file}: object {k} ({name!r})"
            if name not in label_of:
                fix = "" if class_file.is_file() else f"; adding {class_file} with one class name per line fixes this"
                raise DataError(
                    f"{xml_file}: object {k}: unknown class name {name!r} (classes from {class_source}{fix})"
                )
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise DataError(f"{where}: missing <bndbox>")
            x0, y0, x1, y1 = (_number(bndbox, tag, f"{where} <bndbox>") for tag in ("xmin", "ymin", "xmax", "ymax"))
            flag = obj.find("difficult")
            is_difficult = flag is not None and (flag.text or "0").strip() not in ("0", "")
            if is_difficult:
                skipped["difficult"] += 1
            boxes.append([x0 - 1.0, y0 - 1.0, x1, y1])
            labels.append(label_of[name])
            difficult.append(is_difficult)
        records.append(
            make_record(
                path=path,
                file_name=path.name,
                image_id=image_id,
                width=width,
                height=height,
                boxes=boxes,
                labels=labels,
                ignore=difficult,
                skipped=skipped,
            )
        )
    return DetectionDataset(records, classes, root, split, "voc", skipped, transforms)
