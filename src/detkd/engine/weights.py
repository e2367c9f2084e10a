"""Whole-detector weights (``model.weights``): a torchvision detector state dict, a detkd checkpoint, or
torchvision's COCO weights.

The ``standard`` preset of ``frcnn_r50``, ``retinanet_r50`` and ``fcos_r50`` has the layers (names and shapes) of
torchvision's ``fasterrcnn_resnet50_fpn``, ``retinanet_resnet50_fpn`` and ``fcos_resnet50_fpn``; detkd's adapter
holds the torchvision model as ``model``, so a torchvision key ``backbone.body.conv1.weight`` is detkd's
``model.backbone.body.conv1.weight``. The v2 variants (``*_v2``) have other heads and
FPN layers (and RetinaNet v2 another P6): such a file is refused.

Every tensor of the model must be in the file with its shape, except the class-specific layers (the box classifier
and regressor of Faster R-CNN, the class logits of RetinaNet and FCOS), which keep their fresh initialisation when
the class count differs; anything else missing or shaped otherwise means another architecture, and the file is
refused. Tensors of the file that the model has no place for (a Mask R-CNN's mask head) are skipped and named.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from detkd.engine.checkpoint import STUDENT_FORMAT, TRAIN_FORMAT, student_state
from detkd.errors import BuildError, CheckpointError
from detkd.models.outputs import Detector

log = logging.getLogger("detkd")

# Layers whose shape follows the number of classes, by the last parts of their names.
CLASS_LAYERS = ("box_predictor.cls_score", "box_predictor.bbox_pred", "classification_head.cls_logits")

# detkd detector -> torchvision's COCO weights (``torchvision.models.detection.<enum>.COCO_V1``).
TORCHVISION_COCO = {
    "frcnn_r50": "FasterRCNN_ResNet50_FPN_Weights",
    "retinanet_r50": "RetinaNet_ResNet50_FPN_Weights",
    "fcos_r50": "FCOS_ResNet50_FPN_Weights",
}


def _is_class_layer(key: str) -> bool:
    stem = key.rsplit(".", 1)[0]
    return stem.endswith(CLASS_LAYERS)


def torchvision_coco_state(name: str) -> dict[str, torch.Tensor]:
    """torchvision's COCO state dict for detector ``name``, through torchvision's own weights API (hub cache or
    download)."""
    import torchvision.models.detection as tvd

    enum_name = TORCHVISION_COCO.get(name)
    if enum_name is None:
        raise BuildError(
            f"model.weights=torchvision: torchvision publishes COCO weights for {', '.join(TORCHVISION_COCO)} "
            f"(standard preset), not for {name}"
        )
    weights = getattr(tvd, enum_name).COCO_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # noqa: BLE001  (no network, proxy, full disk: the remedy is the same)
        raise BuildError(
            f"model.weights=torchvision: torchvision's COCO weights for {name} could not be fetched "
            f"({type(exc).__name__}); download {weights.url} where a network is reachable and pass "
            "model.weights=PATH (--weights PATH)"
        ) from None


def read_weights(path: str | Path) -> tuple[dict[str, Any], str]:
    """The state dict in a weights file and what kind of file it was (``detkd`` or ``state dict``)."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"model.weights: {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read detector weights ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict or detkd checkpoint (a {type(obj).__name__})")
    if obj.get("format") in (STUDENT_FORMAT, TRAIN_FORMAT):
        return student_state(obj), "detkd checkpoint"
    # torchvision's reference scripts save {"model": state_dict, "optimizer": ...}; others use "state_dict".
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: holds no tensors")
    return state, "state dict"


def load_weights(detector: Detector, source: str) -> dict[str, Any]:
    """Load whole-detector weights into ``detector`` in place and log what happened in at most three lines.

    Args:
        detector: a freshly built detector.
        source: ``torchvision`` (COCO weights of the same architecture) or a path to a torchvision state dict or
            a detkd checkpoint.

    Returns:
        ``loaded``, ``reinitialised`` (class layers left at their initialisation) and ``skipped`` (file tensors
        the model has no place for), lists of names.

    Raises:
        BuildError: the file lacks some of the model's tensors, or a layer other than the class layers has another
            shape (another architecture).
    """
    name = detector.spec["name"]
    if source == "torchvision":
        state, kind = torchvision_coco_state(name), "torchvision COCO weights"
    else:
        state, kind = read_weights(source)
    own = detector.state_dict()
    # A torchvision detector's names are the adapter's without the "model." prefix.
    mapped = {k if k in own or f"model.{k}" not in own else f"model.{k}": v for k, v in state.items()}
    common = [k for k in own if k in mapped]
    wrong = [k for k in common if tuple(own[k].shape) != tuple(mapped[k].shape)]
    reinit = [k for k in wrong if _is_class_layer(k)]
    other = [k for k in wrong if k not in reinit]
    missing = _counted([k for k in own if k not in mapped])
    if not common or other or missing:
        if not common:
            what = "no tensor name matches"
        elif other:
            k = other[0]
            what = f"{k} is {tuple(mapped[k].shape)} in the file and {tuple(own[k].shape)} in the model"
        else:
            what = f"the file lacks {len(missing)} of the model's tensors, first {missing[0]}"
        raise BuildError(
            f"{source}: these weights do not fit {name} with the {detector.spec.get('preset')} preset ({what}); "
            "whole-detector weights need the same architecture (torchvision's *_resnet50_fpn fit the standard "
            "preset of the matching r50 detector; backbone-only files go to model.backbone_weights)"
        )
    loaded = [k for k in common if k not in reinit]
    detector.load_state_dict({k: mapped[k] for k in loaded}, strict=False)

    unused = _counted([k for k in mapped if k not in own])
    log.info("weights: %d tensors loaded into %s from %s (%s)", len(loaded), name, source, kind)
    if reinit:
        first = reinit[0]
        log.info(
            "weights: the class count differs (%s has %d outputs in the file, %d in the model): re-initialised %s",
            first.rsplit(".", 1)[0],
            mapped[first].shape[0],
            own[first].shape[0],
            ", ".join(sorted({k.rsplit(".", 1)[0] for k in reinit})),
        )
    if unused:
        log.info("weights: skipped %d file tensor(s) the model has no place for (%s)", len(unused), _names(unused))
    return {"loaded": loaded, "reinitialised": reinit, "skipped": unused}


def _counted(keys: list[str]) -> list[str]:
    """Without BatchNorm's step counters, which frozen BatchNorm does not have and nothing reads."""
    return [k for k in keys if not k.endswith("num_batches_tracked")]


def _names(keys: list[str], shown: int = 3) -> str:
    head = ", ".join(keys[:shown])
    return head + (f", ... {len(keys) - shown} more" if len(keys) > shown else "")
