"""Every kind of bad input raises DataError with one line naming the file and the entry."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from detkd.data import build_dataset
from detkd.errors import DataError


def _edit_json(root: Path, edit) -> None:
    path = root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _error(root: Path, load_item: int | None = None) -> str:
    with pytest.raises(DataError) as err:
        ds = build_dataset(root, "val")
        if load_item is not None:
            ds[load_item]
    message = str(err.value)
    assert "\n" not in message
    return message


# --- COCO --------------------------------------------------------------------------------------------


def test_coco_invalid_json(coco_root):
    (coco_root / "annotations" / "instances_val.json").write_text('{"images": [')
    message = _error(coco_root)
    assert "instances_val.json" in message and "not valid JSON" in message and "line 1" in message


def test_coco_missing_top_level_key(coco_root):
    _edit_json(coco_root, lambda d: d.pop("annotations"))
    message = _error(coco_root)
    assert "instances_val.json" in message and "annotations" in message


def test_coco_annotation_missing_bbox(coco_root):
    _edit_json(coco_root, lambda d: d["annotations"][1].pop("bbox"))
    message = _error(coco_root)
    assert "instances_val.json: annotation 2: missing key(s) bbox" in message


def test_coco_malformed_bbox(coco_root):
    def edit(d):
        d["annotations"][2]["bbox"] = [1, 2, "x", 4]

    _edit_json(coco_root, edit)
    assert "instances_val.json: annotation 3: bbox must be 4 finite numbers" in _error(coco_root)


def test_coco_unknown_category(coco_root):
    def edit(d):
        d["annotations"][1]["category_id"] = 7

    _edit_json(coco_root, edit)
    message = _error(coco_root)
    assert "instances_val.json: annotation 2: category_id 7 is not in 'categories'" in message


def test_coco_unknown_image_id(coco_root):
    def edit(d):
        d["annotations"][0]["image_id"] = 99

    _edit_json(coco_root, edit)
    assert "instances_val.json: annotation 1: image_id 99 is not in 'images'" in _error(coco_root)


def test_coco_image_missing_key(coco_root):
    _edit_json(coco_root, lambda d: d["images"][2].pop("height"))
    assert "instances_val.json: images[2]: missing key(s) height" in _error(coco_root)


def test_coco_missing_images_reported_with_count(coco_root):
    (coco_root / "val" / "b.png").unlink()
    (coco_root / "val" / "c.png").unlink()
    message = _error(coco_root)
    assert "b.png: image file not found" in message and "2 of 3 images are missing" in message
    assert "instances_val.json" in message


def test_coco_corrupt_image_named_at_load_time(coco_root):
    (coco_root / "val" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = build_dataset(coco_root, "val")  # existence is checked at build time, decoding at load time
    ds[0]
    with pytest.raises(DataError) as err:
        ds[2]
    assert "c.png: cannot read image" in str(err.value) and "\n" not in str(err.value)


def test_coco_truncated_image(coco_root):
    path = coco_root / "val" / "a.png"
    path.write_bytes(path.read_bytes()[:200])
    assert "a.png: cannot read image" in _error(coco_root, load_item=0)


def test_coco_missing_image_folder(coco_root):
    (coco_root / "val").rename(coco_root / "elsewhere")
    message = _error(coco_root)
    assert "image folder for split 'val' not found" in message and "images/val/" in message


# --- VOC ---------------------------------------------------------------------------------------------


def test_voc_invalid_xml(voc_root):
    (voc_root / "Annotations" / "b.xml").write_text("<annotation><object></annotation>")
    message = _error(voc_root)
    assert "b.xml: not valid XML" in message and "line 1" in message


def test_voc_missing_xml(voc_root):
    (voc_root / "Annotations" / "c.xml").unlink()
    message = _error(voc_root)
    assert "c.xml: annotation file not found" in message and "val.txt" in message


def test_voc_unknown_class(voc_root):
    xml = (voc_root / "Annotations" / "a.xml").read_text().replace("<name>bird</name>", "<name>zebra</name>")
    (voc_root / "Annotations" / "a.xml").write_text(xml)
    message = _error(voc_root)
    assert "a.xml: object 1: unknown class name 'zebra'" in message and "classes.txt" in message


def test_voc_without_classes_txt_says_how_to_fix_it(voc_root, caplog):
    """No classes.txt: the 20 PASCAL classes are used (and the log says so); a class outside them is an error
    that names the file to add."""
    (voc_root / "classes.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="detkd"):
        build_dataset(voc_root, "val")  # cat, dog and bird are PASCAL classes
    assert f"{voc_root}: no classes.txt; using the 20 PASCAL VOC classes" in caplog.text
    xml = (voc_root / "Annotations" / "a.xml").read_text().replace("<name>bird</name>", "<name>zebra</name>")
    (voc_root / "Annotations" / "a.xml").write_text(xml)
    message = _error(voc_root)
    assert "a.xml: object 1: unknown class name 'zebra' (classes from the 20 PASCAL VOC classes" in message
    assert f"adding {voc_root / 'classes.txt'} with one class name per line fixes this" in message


def test_voc_missing_coordinate(voc_root):
    xml = (voc_root / "Annotations" / "c.xml").read_text().replace("<ymax>64</ymax>", "")
    (voc_root / "Annotations" / "c.xml").write_text(xml)
    assert "c.xml: object 0 ('dog') <bndbox>: missing <ymax>" in _error(voc_root)


def test_voc_bad_number(voc_root):
    xml = (voc_root / "Annotations" / "c.xml").read_text().replace("<xmax>32</xmax>", "<xmax>3x2</xmax>")
    (voc_root / "Annotations" / "c.xml").write_text(xml)
    assert "c.xml: object 0 ('dog') <bndbox>: <xmax> is not a number: '3x2'" in _error(voc_root)


def test_voc_missing_image(voc_root):
    (voc_root / "JPEGImages" / "b.png").unlink()
    message = _error(voc_root)
    assert "JPEGImages/b.jpg: image file not found" in message and "val.txt" in message


# --- YOLO --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("0 0.5 0.5 0.2", "expected 5 values"),
        ("1 0.5 half 0.2 0.2", "not a class index and four numbers"),
        ("1.5 0.5 0.5 0.2 0.2", "not a class index and four numbers"),
        ("3 0.5 0.5 0.2 0.2", "class index 3 is not in 0..2"),
        ("0 nan 0.5 0.2 0.2", "must be finite"),
    ],
)
def test_yolo_malformed_line(yolo_root, line, reason):
    path = yolo_root / "labels" / "val" / "a.txt"
    path.write_text(path.read_text() + "\n" + line + "\n")  # line 4: two boxes, a blank line, then this
    message = _error(yolo_root)
    assert "labels/val/a.txt:4: " in message and reason in message


def test_yolo_missing_names(yolo_root):
    (yolo_root / "data.yaml").write_text("nc: 3\n")
    assert "data.yaml: missing key 'names'" in _error(yolo_root)
    (yolo_root / "data.yaml").write_text("names: [a, b\n")
    assert "data.yaml: not valid YAML" in _error(yolo_root)
    (yolo_root / "data.yaml").write_text("names: {0: a, 2: b}\n")
    assert "data.yaml: 'names' keys must be the class indices 0..1" in _error(yolo_root)
    (yolo_root / "data.yaml").unlink()
    message = _error(yolo_root)
    assert "no class names" in message and "classes.txt" in message


def test_yolo_label_without_image(yolo_root):
    (yolo_root / "images" / "val" / "c.png").unlink()
    message = _error(yolo_root)
    assert "labels/val/c.txt: no image for this label file" in message


def test_yolo_no_images(yolo_root):
    for path in (yolo_root / "images" / "val").iterdir():
        path.unlink()
    for path in (yolo_root / "labels" / "val").iterdir():
        path.unlink()
    assert "images/val: no image files" in _error(yolo_root)


def test_yolo_corrupt_image(yolo_root):
    (yolo_root / "images" / "val" / "b.png").write_bytes(b"garbage")
    assert "b.png: cannot read image" in _error(yolo_root)  # YOLO reads sizes at build time
