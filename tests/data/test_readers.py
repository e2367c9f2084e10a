"""COCO, VOC and YOLO readers: same targets for the same scene, degenerate boxes, ignore regions."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.config import DataConfig
from detkd.data import DetectionDataset, build_dataset, build_transforms
from detkd.errors import ConfigError, DataError


def _items(dataset: DetectionDataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


def test_three_formats_give_identical_targets(coco_root, voc_root, yolo_root, writers):
    datasets = {root.name: build_dataset(root, "val") for root in (coco_root, voc_root, yolo_root)}
    assert {name: ds.format for name, ds in datasets.items()} == {"coco": "coco", "voc": "voc", "yolo": "yolo"}
    reference = _items(datasets["coco"])
    assert len(reference) == len(writers.scene)
    for (image, target), item in zip(reference, writers.scene):
        assert image.dtype == torch.float32 and image.shape == (3, item["height"], item["width"])
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(item["boxes"]), 4)
        assert target["labels"].dtype == torch.int64
        assert target["boxes"].tolist() == [[float(v) for v in b] for b in item["boxes"]]
        assert target["labels"].tolist() == item["labels"]
        assert target["orig_size"] == (item["height"], item["width"])
        assert isinstance(target["image_id"], int)
    for name in ("voc", "yolo"):
        ds = datasets[name]
        assert ds.classes == writers.classes
        assert ds.image_ids() == datasets["coco"].image_ids()
        assert ds.coco_gt() == datasets["coco"].coco_gt()
        for (image, target), (ref_image, ref_target) in zip(_items(ds), reference):
            assert torch.equal(image, ref_image)
            assert target.keys() == ref_target.keys()
            assert torch.equal(target["boxes"], ref_target["boxes"]), name
            assert torch.equal(target["labels"], ref_target["labels"]), name
            assert (target["image_id"], target["orig_size"]) == (ref_target["image_id"], ref_target["orig_size"])


def test_empty_image_has_empty_tensors(coco_root):
    _, target = build_dataset(coco_root, "val")[1]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_explicit_format_and_unknown_layout(coco_root, tmp_path):
    assert build_dataset(coco_root, "val", format="coco").format == "coco"
    with pytest.raises(DataError) as err:
        build_dataset(tmp_path, "val")
    message = str(err.value)
    assert str(tmp_path) in message and "annotations/instances_val.json" in message
    assert "ImageSets/Main/val.txt" in message and "labels/val" in message
    with pytest.raises(DataError, match="not found"):
        build_dataset(tmp_path / "nowhere", "val")
    with pytest.raises(ConfigError, match="unknown format"):
        build_dataset(coco_root, "val", format="pascal")


def test_coco_images_under_images_split(tmp_path, writers):
    root = writers.coco(tmp_path / "c")
    (root / "images").mkdir()
    (root / "val").rename(root / "images" / "val")
    assert len(build_dataset(root, "val")) == 3


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_become_rgb(tmp_path, writers, mode):
    root = writers.coco(tmp_path / "c")
    path = root / "val" / "a.png"
    gray = np.asarray(Image.open(path).convert("L"))
    if mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)  # full 16-bit range
    else:
        Image.open(path).convert(mode).save(path)
    image, _ = build_dataset(root, "val")[0]
    assert image.shape == (3, 32, 64) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    if mode in ("L", "I;16"):
        expected = torch.from_numpy(gray.astype(np.float32) / 255.0)
        assert torch.allclose(image, expected.expand(3, -1, -1), atol=1e-6)


def test_degenerate_boxes_are_clipped_skipped_and_counted(tmp_path, writers, caplog):
    scene = [
        {
            "name": "a",
            "width": 64,
            "height": 32,
            "boxes": [
                [-5, -3, 10, 12],  # partly outside: clipped to [0, 0, 10, 12]
                [50, 20, 80, 40],  # partly outside: clipped to [50, 20, 64, 32]
                [10, 10, 10, 20],  # zero width
                [30, 20, 25, 25],  # negative width
                [70, 0, 90, 10],  # entirely right of the image
            ],
            "labels": [1, 2, 3, 1, 2],
        }
    ]
    with caplog.at_level(logging.WARNING, logger="detkd"):
        ds = build_dataset(writers.coco(tmp_path / "c", scene), "val")
    assert ds.skipped == {"outside_image": 1, "zero_area": 2}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "zero_area 2" in warnings[0].getMessage()
    _, target = ds[0]
    assert target["boxes"].tolist() == [[0.0, 0.0, 10.0, 12.0], [50.0, 20.0, 64.0, 32.0]]
    assert target["labels"].tolist() == [1, 2]


def test_clean_dataset_logs_no_warning(coco_root, caplog):
    with caplog.at_level(logging.WARNING, logger="detkd"):
        assert build_dataset(coco_root, "val").skipped == {}
    assert not caplog.records


def test_coco_crowd_is_ignore_region(coco_root):
    path = coco_root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["iscrowd"] = 1
    data["annotations"][0]["area"] = 123.0  # a segment area is kept for the small/medium/large split
    path.write_text(json.dumps(data))
    ds = build_dataset(coco_root, "val")
    assert ds.skipped == {"crowd": 1}
    _, target = ds[0]
    assert target["boxes"].tolist() == [[4.0, 2.0, 20.0, 30.0]] and target["labels"].tolist() == [1]
    gt = ds.coco_gt()
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["ignore"] == 1 and crowd[0]["bbox"] == [30.0, 8.0, 30.0, 8.0]
    assert gt["annotations"][0]["area"] == 123.0
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3]


def test_coco_gt_format(coco_root, writers):
    gt = build_dataset(coco_root, "val").coco_gt()
    assert gt["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(writers.classes)]
    assert gt["images"][0] == {"id": 0, "file_name": "a.png", "width": 64, "height": 32}
    first = gt["annotations"][0]
    assert first["bbox"] == [4.0, 2.0, 16.0, 28.0] and first["area"] == 16.0 * 28.0
    assert first["category_id"] == 1 and first["iscrowd"] == 0


def test_coco_category_ids_become_contiguous(tmp_path, writers):
    root = writers.coco(tmp_path / "c")
    path = root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    remap = {1: 17, 2: 5, 3: 90}  # "dog" has the smallest id, so it becomes label 1
    for cat in data["categories"]:
        cat["id"] = remap[cat["id"]]
    for ann in data["annotations"]:
        ann["category_id"] = remap[ann["category_id"]]
    path.write_text(json.dumps(data))
    ds = build_dataset(root, "val")
    assert ds.classes == ["dog", "cat", "bird"]
    assert ds[0][1]["labels"].tolist() == [2, 3] and ds[2][1]["labels"].tolist() == [1]


def test_voc_difficult_and_default_classes(tmp_path, writers):
    root = writers.voc(tmp_path / "v")
    item = writers.scene[0]
    (root / "Annotations" / "a.xml").write_text(writers.voc_xml(item, writers.classes, difficult=[False, True]))
    ds = build_dataset(root, "val")
    assert ds.skipped == {"difficult": 1}
    assert ds[0][1]["labels"].tolist() == [1]
    ignored = [a for a in ds.coco_gt()["annotations"] if a["ignore"]]
    assert len(ignored) == 1 and ignored[0]["bbox"] == [30.0, 8.0, 30.0, 8.0]

    (root / "classes.txt").unlink()
    voc_names = ["dog", "dog", "bird"]  # names from the 20 VOC classes
    for it in writers.scene:
        (root / "Annotations" / f"{it['name']}.xml").write_text(writers.voc_xml(it, voc_names))
    ds = build_dataset(root, "val")
    assert len(ds.classes) == 20 and ds.classes[11] == "dog"
    assert ds[0][1]["labels"].tolist() == [12, 3]


def test_voc_size_read_from_image_when_absent(tmp_path, writers):
    root = writers.voc(tmp_path / "v")
    xml = writers.voc_xml(writers.scene[0], writers.classes)
    xml = xml.replace("<width>64</width>", "<width>0</width>")
    (root / "Annotations" / "a.xml").write_text(xml)
    _, target = build_dataset(root, "val")[0]
    assert target["orig_size"] == (32, 64)


def test_yolo_names_mapping_and_classes_txt(tmp_path, writers):
    root = writers.yolo(tmp_path / "y")
    (root / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n  2: bird\n")
    assert build_dataset(root, "val").classes == writers.classes
    (root / "data.yaml").unlink()
    (root / "classes.txt").write_text("cat\ndog\nbird\n")
    ds = build_dataset(root, "val")
    assert ds.classes == writers.classes and ds[0][1]["labels"].tolist() == [1, 3]


def test_seeded_item_is_reproducible_and_leaves_global_rng_alone(coco_root):
    transforms = build_transforms(DataConfig(hflip=0.5, scale_jitter=[0.5, 1.5]), train=True)
    ds = build_dataset(coco_root, "val", transforms=transforms)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    first = [ds[0, seed] for seed in range(6)]
    assert torch.equal(torch.rand(3), expected_next)  # the seeded transforms ran on a forked generator
    second = [ds[0, seed] for seed in range(6)]
    for (a_img, a_t), (b_img, b_t) in zip(first, second):
        assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])
    assert len({tuple(img.shape) for img, _ in first}) > 1  # the seeds do change the augmentation
    assert all(t["orig_size"] == (32, 64) for _, t in first)


def test_image_size_mismatch_is_reported(coco_root):
    path = coco_root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    data["images"][0]["width"] = 65
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="a.png: image is 64x32 pixels but its annotations say 65x32"):
        build_dataset(coco_root, "val")[0]


def test_records_survive_pickling(coco_root):
    import pickle

    ds = build_dataset(coco_root, "val", transforms=build_transforms(DataConfig(scale_jitter=[0.8, 1.2]), True))
    clone = pickle.loads(pickle.dumps(ds))
    a, b = ds[0, 7], clone[0, 7]
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1]["boxes"].numpy(), b[1]["boxes"].numpy())
