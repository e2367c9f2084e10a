"""Dataset formats: detect a folder's layout and build its dataset. The only file that knows every reader.

A new format is a reader module (``load_<format>(root, split, transforms) -> DetectionDataset``), one entry in
:data:`READERS`, a layout test in :func:`detect_format` and one choice in ``DataConfig.format``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from detkd.data.base import DetectionDataset, Transform
from detkd.data.coco import load_coco
from detkd.data.voc import load_voc
from detkd.data.yolo import load_yolo
from detkd.errors import ConfigError, DataError

READERS: dict[str, Callable[..., DetectionDataset]] = {"coco": load_coco, "voc": load_voc, "yolo": load_yolo}


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
    root = Path(root)
    if format not in ("auto", *READERS):  # the config's data.format is checked at load time; this is the API's
        raise ConfigError(f"data.format: unknown format {format!r}; choose one of auto, {', '.join(READERS)}")
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if format == "auto":
        format = detect_format(root, split)
    return READERS[format](root, split, transforms)
