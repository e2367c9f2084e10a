"""Detection metrics: COCO mAP (through faster-coco-eval) and PASCAL VOC AP, and an evaluation loop.

Predictions are lists of per-image dicts ``{"image_id", "boxes" [N, 4] xyxy, "scores" [N], "labels" [N]}``
with labels 1..C; the ground truth is a dataset's :meth:`~detkd.data.base.DetectionDataset.coco_gt`.
A metric that has no ground truth to be measured on (a class absent from the images, or no large
objects for ``APl``) is NaN, not 0: it is undefined, not failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detkd.errors import ConfigError

Prediction = dict[str, Any]
METRICS = ("coco", "voc", "voc07")
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


def _as_numpy(value: Tensor | np.ndarray | Sequence, dtype: type) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _flatten(predictions: Sequence[Prediction]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All detections as ``(image_ids [D], boxes [D, 4] xyxy, scores [D], labels [D])``."""
    ids, boxes, scores, labels = [], [], [], []
    for pred in predictions:
        b = _as_numpy(pred["boxes"], np.float64).reshape(-1, 4)
        ids.append(np.full(len(b), int(pred["image_id"]), dtype=np.int64))
        boxes.append(b)
        scores.append(_as_numpy(pred["scores"], np.float64).reshape(-1))
        labels.append(_as_numpy(pred["labels"], np.int64).reshape(-1))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(ids), np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)


def _check_image_ids(image_ids: np.ndarray, coco_gt: dict[str, Any]) -> None:
    known = {img["id"] for img in coco_gt["images"]}
    unknown = sorted(set(image_ids.tolist()) - known)
    if unknown:
        raise ValueError(f"predictions for image ids not in the ground truth: {unknown[:10]}")


def _cocoeval(predictions: Sequence[Prediction], coco_gt: dict[str, Any]) -> Any | None:
    """A run ``COCOeval_faster`` for bbox, or None when the ground truth has no images."""
    from faster_coco_eval import COCO, COCOeval_faster

    image_ids, boxes, scores, labels = _flatten(predictions)
    _check_image_ids(image_ids, coco_gt)
    if not coco_gt["images"]:
        return None
    detections = [
        {"image_id": int(i), "category_id": int(c), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
        for i, b, s, c in zip(image_ids.tolist(), boxes.tolist(), scores.tolist(), labels.tolist())
    ]
    gt = COCO(coco_gt, use_deepcopy=True, print_function=_silent)  # the evaluator writes into GT entries
    evaluator = COCOeval_faster(gt, gt.loadRes(detections), iouType="bbox", print_function=_silent)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def coco_summary(predictions: Sequence[Prediction], coco_gt: dict[str, Any]) -> list[float]:
    """The 12 standard COCO bbox numbers (AP, AP50, AP75, APs/m/l, AR1, AR10, AR100, ARs/m/l).

    As COCO reports them: -1 where a number has no ground truth to be measured on.
    """
    evaluator = _cocoeval(predictions, coco_gt)
    return [-1.0] * 12 if evaluator is None else [float(v) for v in evaluator.stats[:12]]


def coco_metrics(predictions: Sequence[Prediction], coco_gt: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """COCO bbox mAP with faster-coco-eval (pycocotools-compatible numbers).

    Args:
        predictions: per-image predictions, labels 1..C.
        coco_gt: ground truth as a COCO dict with category ids 1..C; crowd/difficult objects have
            ``iscrowd = 1``.
        classes: class names; ``classes[i]`` is category ``i + 1``.

    Returns:
        ``AP`` (mAP@[.5:.95]), ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` and ``per_class`` (name ->
        AP@[.5:.95]), floats in [0, 1]; NaN where there is no ground truth to measure.
    """
    evaluator = _cocoeval(predictions, coco_gt)
    stats = [-1.0] * 6 if evaluator is None else [float(v) for v in evaluator.stats[:6]]
    per_class = [-1.0] * len(classes)
    if evaluator is not None:
        precision = evaluator.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]
        cat_ids = list(evaluator.params.catIds)
        for i in range(len(classes)):
            if i + 1 in cat_ids:
                p = precision[:, :, cat_ids.index(i + 1), 0, -1]
                per_class[i] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    result: dict[str, Any] = {key: _undefined_as_nan(v) for key, v in zip(COCO_KEYS, stats)}
    result["per_class"] = {name: _undefined_as_nan(v) for name, v in zip(classes, per_class)}
    return result


def _undefined_as_nan(value: float) -> float:
    return math.nan if value < 0 else float(value)


def _box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with ``[M, 4]`` boxes, in continuous coordinates (no +1 pixel)."""
    iw = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(union - inter, np.finfo(np.float64).eps)


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """Average precision from a ranked list's cumulative recall and precision.

    Args:
        recall: recall after each detection, in ranking order.
        precision: precision after each detection.
        use_07_metric: VOC2007's mean of the interpolated precision at recall 0, 0.1, ..., 1; otherwise
            the area under the interpolated precision-recall curve (VOC2010 and later).

    Returns:
        The AP.
    """
    if use_07_metric:
        points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: best precision at any higher recall
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def voc_metrics(
    predictions: Sequence[Prediction],
    coco_gt: dict[str, Any],
    classes: Sequence[str],
    iou: float = 0.5,
    use_07_metric: bool = False,
) -> dict[str, Any]:
    """PASCAL VOC mean AP at one IoU threshold.

    Detections are matched greedily in decreasing score order to the unmatched ground truth of their
    class with the highest IoU above ``iou``; a second detection of the same object is a false positive.
    Objects marked ``iscrowd``/``ignore`` (VOC difficult) count neither as positives nor, when matched,
    as false positives.

    Args:
        predictions: per-image predictions, labels 1..C.
        coco_gt: ground truth as a COCO dict with category ids 1..C.
        classes: class names; ``classes[i]`` is category ``i + 1``.
        iou: IoU a detection needs (strictly more than) to match.
        use_07_metric: VOC2007 11-point AP instead of the area under the curve.

    Returns:
        ``mAP`` (mean over classes with ground truth) and ``per_class`` (name -> AP, NaN without ground truth).
    """
    image_ids, boxes, scores, labels = _flatten(predictions)
    _check_image_ids(image_ids, coco_gt)
    gt: dict[tuple[int, int], list[tuple[list[float], bool]]] = {}
    for ann in coco_gt["annotations"]:
        x, y, w, h = ann["bbox"]
        ignored = bool(ann.get("iscrowd", 0) or ann.get("ignore", 0))
        gt.setdefault((ann["image_id"], ann["category_id"]), []).append(([x, y, x + w, y + h], ignored))

    per_class: dict[str, float] = {}
    for k, name in enumerate(classes):
        label = k + 1
        n_pos = sum(not ignored for (_, c), objs in gt.items() if c == label for _, ignored in objs)
        if n_pos == 0:
            per_class[name] = math.nan
            continue
        mine = np.nonzero(labels == label)[0]
        mine = mine[np.argsort(-scores[mine], kind="stable")]
        matched = {key: np.zeros(len(objs), dtype=bool) for key, objs in gt.items() if key[1] == label}
        tp = np.zeros(len(mine))
        fp = np.zeros(len(mine))
        for rank, d in enumerate(mine):
            key = (int(image_ids[d]), label)
            objs = gt.get(key)
            if not objs:
                fp[rank] = 1
                continue
            overlaps = _box_iou(boxes[d], np.asarray([o[0] for o in objs], dtype=np.float64))
            best = int(np.argmax(overlaps))
            if overlaps[best] <= iou:
                fp[rank] = 1
            elif objs[best][1]:
                continue  # on an ignored object: neither right nor wrong
            elif not matched[key][best]:
                tp[rank] = 1
                matched[key][best] = True
            else:
                fp[rank] = 1
        keep = (tp + fp) > 0  # detections on ignored objects leave the ranking
        tp_cum, fp_cum = np.cumsum(tp[keep]), np.cumsum(fp[keep])
        recall = tp_cum / n_pos
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        per_class[name] = voc_ap(recall, precision, use_07_metric)
    values = [v for v in per_class.values() if not math.isnan(v)]
    return {"mAP": float(np.mean(values)) if values else math.nan, "per_class": per_class}


def _subset_gt(coco_gt: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    return {
        **coco_gt,
        "images": [img for img in coco_gt["images"] if img["id"] in image_ids],
        "annotations": [a for a in coco_gt["annotations"] if a["image_id"] in image_ids],
    }


def coco_results(predictions: Sequence[Prediction], category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Predictions as a COCO results list (what ``COCO.loadRes`` and the COCO evaluation server read).

    Args:
        predictions: per-image predictions, labels 1..C.
        category_ids: the dataset's category id of each label (``category_ids[label - 1]``).

    Returns:
        One ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per detection, in the order given;
        boxes rounded to 1/1000 pixel and scores to 5 decimals (tests/test_predictions.py scores such a file with
        pycocotools to the mAP computed before rounding, within 1e-4).
    """
    image_ids, boxes, scores, labels = _flatten(predictions)
    ids = list(category_ids)
    if len(labels) and (labels.min() < 1 or labels.max() > len(ids)):
        raise ValueError(f"labels must be in 1..{len(ids)}, got {labels.min()}..{labels.max()}")
    return [
        {
            "image_id": int(i),
            "category_id": ids[c - 1],
            "bbox": [round(b[0], 3), round(b[1], 3), round(b[2] - b[0], 3), round(b[3] - b[1], 3)],
            "score": round(s, 5),
        }
        for i, b, s, c in zip(image_ids.tolist(), boxes.tolist(), scores.tolist(), labels.tolist())
    ]


def _gather(predictions: list[Prediction], world_size: int) -> list[Prediction]:
    """Every rank's predictions on rank 0, in dataset order (rank ``r`` evaluated images ``r, r + world, ...``);
    other ranks get an empty list."""
    import torch.distributed as dist

    shards: list[Any] = [None] * world_size if dist.get_rank() == 0 else []
    dist.gather_object(predictions, shards if dist.get_rank() == 0 else None, dst=0)
    if dist.get_rank() != 0:
        return []
    merged: list[Prediction] = []
    for i in range(max(len(shard) for shard in shards)):
        merged += [shard[i] for shard in shards if i < len(shard)]
    return merged


@torch.no_grad()
def run_evaluation(
    predict_fn: Callable[[list[Tensor]], list[dict[str, Tensor]]],
    dataset: Any,
    batch_size: int = 8,
    metric: str = "coco",
    max_images: int | None = None,
    workers: int = 0,
    progress: bool = True,
    world_size: int = 1,
    predictions: list[Prediction] | None = None,
) -> dict[str, Any]:
    """Predict on a dataset and score the predictions.

    Args:
        predict_fn: ``images -> [{"boxes", "scores", "labels"}]``, one dict per image, boxes in the given
            images' pixel coordinates. Put the model in eval mode before calling.
        dataset: a :class:`~detkd.data.base.DetectionDataset` (its transforms should not move pixels).
        batch_size: images per call of ``predict_fn``.
        metric: ``coco`` (mAP@[.5:.95] and friends), ``voc`` (VOC2010+ AP@0.5) or ``voc07`` (11-point AP@0.5).
        max_images: evaluate only the first this many images.
        workers: DataLoader worker processes.
        progress: show a progress bar.
        world_size: with more than one process (``torch.distributed`` initialised), every rank predicts its share
            of the images, rank 0 gathers them and scores them once, and every rank returns the same metrics.
        predictions: if given, the per-image predictions that were scored (``image_id``, ``boxes`` xyxy, ``scores``,
            ``labels``) are appended to this list (on rank 0), e.g. for :func:`coco_results`.

    Returns:
        The metric's dict (see :func:`coco_metrics`, :func:`voc_metrics`) plus ``num_images``.

    Raises:
        ConfigError: unknown ``metric``.
    """
    from detkd.data.loader import build_eval_loader

    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    rank = 0
    if world_size > 1:
        import torch.distributed as dist

        rank = dist.get_rank()
    loader = build_eval_loader(
        dataset, batch_size, workers=workers, max_images=max_images, rank=rank, world_size=world_size
    )
    mine: list[Prediction] = []
    with _progress_bar(progress and rank == 0, len(loader)) as advance:
        for images, targets in loader:
            outputs = predict_fn(images)
            if len(outputs) != len(images):
                raise ValueError(f"predict_fn returned {len(outputs)} results for {len(images)} images")
            for out, target in zip(outputs, targets):
                mine.append(
                    {
                        "image_id": target["image_id"],
                        "boxes": out["boxes"].detach().float().cpu(),
                        "scores": out["scores"].detach().float().cpu(),
                        "labels": out["labels"].detach().cpu(),
                    }
                )
            advance()
    if world_size > 1:
        return _score_on_rank0(_gather(mine, world_size), dataset, metric, predictions)
    return _score(mine, dataset, metric, predictions)


def _score(
    gathered: list[Prediction], dataset: Any, metric: str, predictions: list[Prediction] | None
) -> dict[str, Any]:
    coco_gt = _subset_gt(dataset.coco_gt(), {p["image_id"] for p in gathered})
    if metric == "coco":
        result = coco_metrics(gathered, coco_gt, dataset.classes)
    else:
        result = voc_metrics(gathered, coco_gt, dataset.classes, use_07_metric=metric == "voc07")
    result["num_images"] = len(gathered)
    if predictions is not None:
        predictions.extend(gathered)
    return result


def _score_on_rank0(
    gathered: list[Prediction], dataset: Any, metric: str, predictions: list[Prediction] | None
) -> dict[str, Any]:
    """Score on rank 0 and share the numbers, so every rank takes the same decisions from them."""
    import torch.distributed as dist

    box = [_score(gathered, dataset, metric, predictions) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """Yields an ``advance()`` callable: a transient rich bar when enabled, a no-op otherwise."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("eval", total=total)
        yield lambda: bar.advance(task)


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats (undefined metrics) replaced by None, so the JSON written is strict."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
