"""COCO and VOC metrics: parity with pycocotools, hand-computed values, and the evaluation loop."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.data import build_dataset
from detkd.engine.evaluate import coco_metrics, coco_summary, run_evaluation, voc_ap, voc_metrics
from detkd.errors import ConfigError

CLASSES = ["a", "b", "c"]


def _gt(images: list[tuple[int, int, int]], annotations: list[tuple[int, int, list[float], int]]) -> dict:
    """COCO dict from ``(id, width, height)`` images and ``(image_id, category, xyxy, iscrowd)`` objects."""
    anns = []
    for image_id, category, (x0, y0, x1, y1), crowd in annotations:
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": category,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": crowd,
                "ignore": crowd,
            }
        )
    return {
        "images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.png"} for i, w, h in images],
        "annotations": anns,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)],
    }


def _pred(image_id: int, boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict:
    return {
        "image_id": image_id,
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _random_case(seed: int) -> tuple[dict, list[dict]]:
    """Random GT of all sizes (some crowd, some images empty) and noisy, scored predictions."""
    rng = np.random.default_rng(seed)
    images, objects, predictions = [], [], []
    for image_id in range(12):
        w, h = (int(v) for v in rng.integers(120, 400, 2))
        images.append((image_id, w, h))
        n_gt = 0 if image_id in (3, 7) else int(rng.integers(1, 7))
        boxes, scores, labels = [], [], []
        for _ in range(n_gt):
            side = float(rng.choice([12, 24, 50, 80, 110]))
            x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
            box = [x0, y0, x0 + side * rng.uniform(0.7, 1.3), y0 + side * rng.uniform(0.7, 1.3)]
            category = int(rng.integers(1, 4))
            objects.append((image_id, category, box, int(rng.random() < 0.1)))
            for _ in range(int(rng.integers(0, 3))):  # misses, hits and duplicates
                jitter = rng.normal(0, side * 0.1, 4)
                wrong = rng.random() < 0.15
                boxes.append([b + j for b, j in zip(box, jitter)])
                scores.append(float(rng.random()))
                labels.append(int(rng.integers(1, 4)) if wrong else category)
        n_false = 130 if image_id == 5 else int(rng.integers(0, 5))  # image 5 goes past maxDets=100
        for _ in range(n_false):
            x0, y0 = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            boxes.append([x0, y0, x0 + rng.uniform(5, 100), y0 + rng.uniform(5, 100)])
            scores.append(float(rng.random()))
            labels.append(int(rng.integers(1, 4)))
        predictions.append(_pred(image_id, boxes, scores, labels))
    return _gt(images, objects), predictions


def _pycocotools_stats(gt: dict, predictions: list[dict]) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detections = []
    for p in predictions:
        for box, score, label in zip(p["boxes"].double().tolist(), p["scores"].double().tolist(), p["labels"].tolist()):
            detections.append(
                {
                    "image_id": p["image_id"],
                    "category_id": label,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


@pytest.mark.parametrize("seed", [0, 1])
def test_faster_coco_eval_matches_pycocotools(seed):
    pytest.importorskip("pycocotools")
    gt, predictions = _random_case(seed)
    assert any(a["iscrowd"] for a in gt["annotations"])
    ours = coco_summary(predictions, gt)
    reference = _pycocotools_stats(gt, predictions)
    assert len(ours) == len(reference) == 12
    assert np.allclose(ours, reference, atol=1e-6, rtol=0), (ours, reference)
    assert 0.05 < ours[0] < 0.95  # a case where the numbers mean something


def test_coco_metrics_prints_nothing_and_leaves_inputs_alone(capsys):
    gt, predictions = _random_case(0)
    before = copy.deepcopy(gt)
    result = coco_metrics(predictions, gt, CLASSES)
    assert gt == before
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert set(result) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    assert all(0.0 <= result[k] <= 1.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    assert set(result["per_class"]) == set(CLASSES)


def test_perfect_predictions_score_one():
    gt = _gt(
        [(0, 100, 100), (1, 100, 100), (2, 50, 50)],
        [(0, 1, [10, 10, 40, 40], 0), (0, 2, [50, 50, 90, 70], 0), (1, 3, [5, 5, 15, 15], 0)],
    )
    predictions = [
        _pred(0, [[10, 10, 40, 40], [50, 50, 90, 70]], [0.9, 0.8], [1, 2]),
        _pred(1, [[5, 5, 15, 15]], [0.7], [3]),
        _pred(2, [], [], []),  # an image without ground truth or detections
    ]
    result = coco_metrics(predictions, gt, CLASSES)
    assert result["AP"] == result["AP50"] == result["AP75"] == 1.0
    assert result["per_class"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert result["APs"] == 1.0 and math.isnan(result["APl"])  # no large objects: undefined, not zero
    assert voc_metrics(predictions, gt, CLASSES)["mAP"] == 1.0


def test_one_of_two_found_with_correct_ranking():
    # Two objects of class a; the top detection finds one exactly, a lower-scored one is a false positive.
    # Precision is 1 up to recall 0.5 and recall never passes 0.5, so COCO's 101-point interpolation gives
    # precision 1 at recall 0, 0.01, ..., 0.50 (51 points) and 0 at the other 50: AP = 51/101 at every IoU.
    gt = _gt([(0, 100, 100), (1, 100, 100)], [(0, 1, [10, 10, 40, 40], 0), (1, 1, [20, 20, 60, 50], 0)])
    predictions = [_pred(0, [[10, 10, 40, 40]], [0.9], [1]), _pred(1, [[70, 70, 90, 90]], [0.3], [1])]
    result = coco_metrics(predictions, gt, CLASSES)
    assert result["AP"] == pytest.approx(51 / 101, abs=1e-9)
    assert result["AP50"] == pytest.approx(51 / 101, abs=1e-9)
    assert result["per_class"]["a"] == pytest.approx(51 / 101, abs=1e-9)
    assert math.isnan(result["per_class"]["b"])  # no ground truth of class b
    # VOC area: precision envelope 1 from recall 0 to 0.5, then nothing: AP = 0.5.
    assert voc_metrics(predictions, gt, CLASSES)["mAP"] == pytest.approx(0.5)


def test_empty_predictions_give_zeros():
    gt = _gt([(0, 100, 100), (1, 100, 100)], [(0, 1, [10, 10, 40, 50], 0), (0, 2, [0, 0, 100, 100], 0)])
    result = coco_metrics([_pred(0, [], [], []), _pred(1, [], [], [])], gt, CLASSES)
    assert result["AP"] == result["AP50"] == result["APm"] == result["APl"] == 0.0
    assert math.isnan(result["APs"])  # there are no small objects to miss
    assert result["per_class"]["a"] == 0.0 and math.isnan(result["per_class"]["c"])
    assert coco_metrics([], gt, CLASSES)["AP"] == 0.0
    assert voc_metrics([], gt, CLASSES)["mAP"] == 0.0
    nothing = coco_metrics([], {**gt, "images": [], "annotations": []}, CLASSES)
    assert math.isnan(nothing["AP"]) and all(math.isnan(v) for v in nothing["per_class"].values())


def test_crowd_regions_are_ignored():
    gt = _gt([(0, 100, 100)], [(0, 1, [10, 10, 40, 40], 0), (0, 1, [50, 50, 95, 95], 1)])
    on_crowd = _pred(0, [[10, 10, 40, 40], [52, 52, 94, 94]], [0.5, 0.9], [1, 1])
    assert coco_metrics([on_crowd], gt, CLASSES)["AP"] == 1.0
    assert voc_metrics([on_crowd], gt, CLASSES)["mAP"] == 1.0


def test_voc_ap_by_hand():
    # One class, four counted objects in four images plus a difficult one in image 4. Detections by score:
    #   d1 hits object 0 (TP), d2 hits nothing (FP), d3 hits object 1 (TP), d4 hits the difficult object
    #   (ignored: leaves the ranking), d5 hits object 0 again (duplicate: FP), d6 hits object 2 (TP).
    # Counted ranking TP FP TP FP TP: recall .25 .25 .5 .5 .75, precision 1 .5 .667 .5 .6.
    # Area (VOC2010+): envelope 1 on (0, .25], .667 on (.25, .5], .6 on (.5, .75], 0 after:
    #   .25 * 1 + .25 * 2/3 + .25 * .6 = 17/30.
    # 11-point (VOC2007): max precision at recall >= t: t = 0, .1, .2 -> 1; .3, .4, .5 -> 2/3; .6, .7 -> .6;
    #   .8, .9, 1 -> 0: (3 + 2 + 1.2) / 11 = 6.2/11.
    objects = [(k, 1, [10, 10, 50, 50], 0) for k in range(4)] + [(4, 1, [10, 10, 50, 50], 1)]
    gt = _gt([(k, 100, 100) for k in range(5)], objects)
    box = [10, 10, 50, 50]
    predictions = [
        _pred(0, [box, [12, 8, 51, 49]], [0.9, 0.5], [1, 1]),  # d1, d5
        _pred(1, [[60, 60, 90, 90], [11, 11, 50, 50]], [0.8, 0.7], [1, 1]),  # d2, d3
        _pred(2, [box], [0.4], [1]),  # d6
        _pred(3, [], [], []),
        _pred(4, [box], [0.6], [1]),  # d4
    ]
    assert voc_metrics(predictions, gt, CLASSES)["per_class"]["a"] == pytest.approx(17 / 30)
    assert voc_metrics(predictions, gt, CLASSES, use_07_metric=True)["mAP"] == pytest.approx(6.2 / 11)
    recall, precision = np.array([0.25, 0.25, 0.5, 0.5, 0.75]), np.array([1, 0.5, 2 / 3, 0.5, 0.6])
    assert voc_ap(recall, precision) == pytest.approx(17 / 30)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(6.2 / 11)


def test_predictions_for_unknown_images_are_a_bug():
    gt = _gt([(0, 100, 100)], [(0, 1, [10, 10, 40, 40], 0)])
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_metrics([_pred(9, [[1, 1, 5, 5]], [0.5], [1])], gt, CLASSES)


def _write_coco(root: Path) -> None:
    """Four 32x32 images; image k is filled with k / 10 so a fake model can tell which it sees."""
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for k in range(4):
        Image.fromarray(np.full((32, 32, 3), round(k / 10 * 255), dtype=np.uint8)).save(root / "val" / f"{k}.png")
        images.append({"id": k + 10, "file_name": f"{k}.png", "width": 32, "height": 32})
        anns.append({"id": k + 1, "image_id": k + 10, "category_id": k % 3 + 1, "bbox": [k, k, 10, 12], "iscrowd": 0})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    data = {"images": images, "annotations": anns, "categories": categories}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))


def _oracle(images: list[torch.Tensor]) -> list[dict]:
    outputs = []
    for image in images:
        k = round(float(image[0, 0, 0]) * 10)
        outputs.append(
            {
                "boxes": torch.tensor([[k, k, k + 10, k + 12]], dtype=torch.float32),
                "scores": torch.tensor([0.9]),
                "labels": torch.tensor([k % 3 + 1]),
            }
        )
    return outputs


def test_run_evaluation(tmp_path):
    _write_coco(tmp_path)
    ds = build_dataset(tmp_path, "val")
    result = run_evaluation(_oracle, ds, batch_size=3, progress=False)
    assert result["num_images"] == 4 and result["AP"] == 1.0
    # Only the evaluated images' ground truth counts: two images found out of two is still perfect.
    result = run_evaluation(_oracle, ds, batch_size=3, max_images=2, progress=True)
    assert result["num_images"] == 2 and result["AP"] == 1.0
    assert math.isnan(result["per_class"]["c"])  # class c appears only in image 2, which was not evaluated
    assert run_evaluation(_oracle, ds, metric="voc", progress=False) == {
        "mAP": 1.0,
        "per_class": {"a": 1.0, "b": 1.0, "c": 1.0},
        "num_images": 4,
    }
    assert run_evaluation(_oracle, ds, metric="voc07", progress=False)["mAP"] == 1.0
    with pytest.raises(ConfigError, match="unknown metric"):
        run_evaluation(_oracle, ds, metric="f1")
