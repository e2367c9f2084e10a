"""Tiny datasets written to ``tmp_path`` in each supported layout, all holding the same scene."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

CLASSES = ["cat", "dog", "bird"]

# Sizes are powers of two and corners integers, so YOLO's normalised numbers convert back exactly.
SCENE = [
    {"name": "a", "width": 64, "height": 32, "boxes": [[4, 2, 20, 30], [30, 8, 60, 16]], "labels": [1, 3]},
    {"name": "b", "width": 32, "height": 32, "boxes": [], "labels": []},
    {"name": "c", "width": 32, "height": 64, "boxes": [[0, 0, 32, 64]], "labels": [2]},
]


def write_images(folder: Path, scene: list[dict], suffix: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, item in enumerate(scene):
        pixels = np.random.default_rng(k).integers(0, 256, (item["height"], item["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{item['name']}{suffix}")


def write_coco(root: Path, scene: list[dict] = SCENE, split: str = "val", classes: list[str] = CLASSES) -> Path:
    """COCO layout with images in ``root/{split}``; image ids are positions, as VOC and YOLO number them."""
    write_images(root / split, scene)
    images, annotations = [], []
    for image_id, item in enumerate(scene):
        images.append(
            {"id": image_id, "file_name": f"{item['name']}.png", "width": item["width"], "height": item["height"]}
        )
        for (x0, y0, x1, y1), label in zip(item["boxes"], item["labels"]):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data, indent=1))
    return root


def voc_xml(item: dict, classes: list[str], difficult: list[bool] | None = None) -> str:
    objects = []
    for k, ((x0, y0, x1, y1), label) in enumerate(zip(item["boxes"], item["labels"])):
        flag = int(difficult[k]) if difficult else 0
        # VOC corners are 1-based inclusive pixel indices.
        objects.append(
            f"<object><name>{classes[label - 1]}</name><difficult>{flag}</difficult>"
            f"<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    size = f"<size><width>{item['width']}</width><height>{item['height']}</height><depth>3</depth></size>"
    return f"<annotation><filename>{item['name']}.png</filename>{size}{''.join(objects)}</annotation>"


def write_voc(root: Path, scene: list[dict] = SCENE, split: str = "val", classes: list[str] = CLASSES) -> Path:
    write_images(root / "JPEGImages", scene)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for item in scene:
        (root / "Annotations" / f"{item['name']}.xml").write_text(voc_xml(item, classes))
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{item['name']}\n" for item in scene))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def write_yolo(root: Path, scene: list[dict] = SCENE, split: str = "val", classes: list[str] = CLASSES) -> Path:
    write_images(root / "images" / split, scene)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for item in scene:
        if not item["boxes"]:
            continue  # an image without a label file has no objects
        w, h = item["width"], item["height"]
        lines = [
            f"{label - 1} {(x0 + x1) / 2 / w} {(y0 + y1) / 2 / h} {(x1 - x0) / w} {(y1 - y0) / h}\n"
            for (x0, y0, x1, y1), label in zip(item["boxes"], item["labels"])
        ]
        (root / "labels" / split / f"{item['name']}.txt").write_text("".join(lines))
    (root / "data.yaml").write_text("names:\n" + "".join(f"  - {name}\n" for name in classes))
    return root


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "coco")


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    return write_voc(tmp_path / "voc")


@pytest.fixture
def yolo_root(tmp_path: Path) -> Path:
    return write_yolo(tmp_path / "yolo")


@pytest.fixture
def writers() -> SimpleNamespace:
    """The writers above, for tests that lay out their own scenes."""
    return SimpleNamespace(
        coco=write_coco,
        voc=write_voc,
        yolo=write_yolo,
        images=write_images,
        voc_xml=voc_xml,
        scene=SCENE,
        classes=CLASSES,
    )
