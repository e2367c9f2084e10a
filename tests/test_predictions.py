"""Predictions out: ``detkd eval --save-predictions`` and ``detkd predict`` write COCO results JSON that
pycocotools scores to the number detkd printed, with the dataset's own image and category ids."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.cli import main
from detkd.data import build_dataset, make_digits
from detkd.engine.checkpoint import save_student
from detkd.engine.evaluate import run_evaluation
from tests.conftest import tiny

CAT_ID = {i: 100 + 7 * i for i in range(1, 11)}  # non-contiguous category ids, as COCO's own
IMAGE_ID_OFFSET = 5000


def pycocotools_ap(ann_file, results_file) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(ann_file))
    evaluator = COCOeval(gt, gt.loadRes(str(results_file)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return [float(v) for v in evaluator.stats]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A digits dataset rewritten with COCO-like ids: category ids 107, 114, ... and image ids from 5000."""
    root = tmp_path_factory.mktemp("pred") / "digits"
    make_digits(root, train=2, val=6, size=64)
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        coco = json.loads(path.read_text())
        for cat in coco["categories"]:
            cat["id"] = CAT_ID[cat["id"]]
        for img in coco["images"]:
            img["id"] += IMAGE_ID_OFFSET
        for ann in coco["annotations"]:
            ann["category_id"] = CAT_ID[ann["category_id"]]
            ann["image_id"] += IMAGE_ID_OFFSET
        path.write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    classes = build_dataset(data, "val").classes
    save_student(path, tiny("frcnn_r18", num_classes=len(classes), fpn_channels=32), classes)
    return path


def noisy_ground_truth(dataset, seed=0):
    """A predict_fn that finds the objects with jittered boxes and adds false positives: an AP well inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    index = iter(range(len(dataset)))

    def predict(images):
        out = []
        for _ in images:
            record = dataset.records[next(index)]
            boxes = torch.from_numpy(record.boxes).reshape(-1, 4)
            labels = torch.from_numpy(record.labels)
            boxes = boxes + torch.randn(boxes.shape, generator=g) * 2.0
            wrong = torch.rand(3, 2, generator=g) * 40
            boxes = torch.cat([boxes, torch.cat([wrong, wrong + 20], 1)])
            labels = torch.cat([labels, torch.randint(1, 11, (3,), generator=g)])
            out.append({"boxes": boxes, "scores": torch.rand(len(boxes), generator=g), "labels": labels})
        return out

    return predict


def test_saved_results_rescore_to_detkd_ap(data, tmp_path):
    from detkd.api import write_results

    dataset = build_dataset(data, "val")
    predictions = []
    metrics = run_evaluation(
        noisy_ground_truth(dataset), dataset, batch_size=4, progress=False, predictions=predictions
    )
    assert 0.1 < metrics["AP"] < 0.9  # a case where the ids matter: a wrong mapping would score ~0
    path = write_results(predictions, dataset.category_ids, tmp_path / "preds.json")
    results = json.loads(path.read_text())
    assert {r["category_id"] for r in results} <= set(CAT_ID.values())
    assert {r["image_id"] for r in results} == set(dataset.image_ids())
    assert min(dataset.image_ids()) > IMAGE_ID_OFFSET
    stats = pycocotools_ap(data / "annotations" / "instances_val.json", path)
    assert stats[0] == pytest.approx(metrics["AP"], abs=1e-4)
    assert stats[1] == pytest.approx(metrics["AP50"], abs=1e-4)


def test_eval_cli_saves_predictions(data, checkpoint, tmp_path, capsys):
    preds, out = tmp_path / "preds.json", tmp_path / "metrics.json"
    argv = ["eval", str(checkpoint), "--data", str(data), "--device", "cpu", "--no-progress"]
    assert main([*argv, "--save-predictions", str(preds), "--out", str(out)]) == 0
    assert "predictions written to" in capsys.readouterr().out
    results = json.loads(preds.read_text())
    assert results, "an untrained Faster R-CNN still outputs boxes above its 0.05 floor"
    assert {r["image_id"] for r in results} <= set(build_dataset(data, "val").image_ids())
    assert {r["category_id"] for r in results} <= set(CAT_ID.values())
    printed = json.loads(out.read_text())
    stats = pycocotools_ap(data / "annotations" / "instances_val.json", preds)
    assert stats[0] == pytest.approx(printed["AP"], abs=1e-4)


def test_predict_cli_writes_json_and_pictures(data, checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((data / "val").iterdir())[:3]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "pred"
    argv = ["predict", str(checkpoint), str(images), "--out", str(out), "--device", "cpu", "--data", str(data)]
    assert main([*argv, "--score-threshold", "0"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "predictions.json").read_text())
    index = json.loads((out / "images.json").read_text())
    assert [img["id"] for img in index["images"]] == [0, 1, 2]
    assert [img["file_name"] for img in index["images"]] == [str(p) for p in sorted(images.iterdir())]
    assert [c["id"] for c in index["categories"]] == list(CAT_ID.values())
    assert results and {r["image_id"] for r in results} <= {0, 1, 2}
    assert {r["category_id"] for r in results} <= set(CAT_ID.values())
    assert f"{len(results)} detections" in printed and f"{len(results)} scoring >= 0.0 drawn" in printed
    for img in index["images"]:
        source = np.asarray(Image.open(img["file_name"]).convert("RGB"))
        picture = np.asarray(Image.open(out / (img["file_name"].rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".png")))
        assert picture.shape == source.shape
        drawn = any(r["image_id"] == img["id"] for r in results)
        assert (picture != source).any() == drawn

    # A threshold above every score: same JSON, pictures without boxes.
    out2 = tmp_path / "pred2"
    argv[argv.index(str(out))] = str(out2)
    assert main([*argv, "--score-threshold", "1.01"]) == 0
    assert json.loads((out2 / "predictions.json").read_text()) == results
    for img in index["images"]:
        name = img["file_name"].rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".png"
        source = np.asarray(Image.open(img["file_name"]).convert("RGB"))
        assert (np.asarray(Image.open(out2 / name)) == source).all()


def test_predict_without_data_uses_label_ids(data, checkpoint, tmp_path):
    image = sorted((data / "val").iterdir())[0]
    out = tmp_path / "pred"
    assert main(["predict", str(checkpoint), str(image), "--out", str(out), "--device", "cpu", "--no-pictures"]) == 0
    results = json.loads((out / "predictions.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(range(1, 11))
    assert not list(out.glob("*.png"))


def test_predict_missing_input_is_one_line(checkpoint, tmp_path, capsys):
    assert main(["predict", str(checkpoint), str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such image file or folder" in capsys.readouterr().err


def test_api_predict_takes_paths_pil_tensors_and_arrays_alike(data, checkpoint):
    import detkd
    from detkd.data.base import load_image

    detector = detkd.load(checkpoint, device="cpu")
    assert detector.classes == build_dataset(data, "val").classes
    path = sorted((data / "val").iterdir())[0]
    pil = Image.open(path)
    forms = [path, str(path), pil, load_image(path), np.asarray(pil.convert("RGB"))]
    results = detector.predict(forms, batch_size=2)
    assert len(results) == len(forms) and len(results[0]["scores"]) > 0
    for other in results[1:]:
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(other[key], results[0][key])
    [single] = detector.predict(path, score_threshold=0.1)
    assert (single["scores"] >= 0.1).all() and len(single["scores"]) <= len(results[0]["scores"])
    assert single["names"] == [detector.classes[int(k) - 1] for k in single["labels"]]
