"""Detector registry and builder.

A detector name is ``<family>_<backbone>``: ``frcnn_r50``, ``retinanet_r18``, ``fcos_mbv3``,
``frcnn_bireal18``..., and for Faster R-CNN, RetinaNet and FCOS any timm model as ``<family>_timm:<model>``
(``frcnn_timm:resnet18``, ``retinanet_timm:convnext_tiny``). Presets size the parts that do not depend on the backbone:

- ``slim``: narrow FPN (64 channels), small RoI head (256-d, 128 sampled RoIs), few proposals, anchors sized for
  small inputs (up to about 320 px), GroupNorm in the RetinaNet head (as in RetinaNet v2). Practical on a 2-core
  CPU.
- ``standard``: torchvision's defaults (256-channel FPN, 1024-d RoI head, 2000/1000 proposals, 512 RoIs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from detkd.errors import BuildError, ConfigError
from detkd.models.backbones import (
    BACKBONES,
    TIMM_PREFIX,
    FPNBackbone,
    freeze_stages,
    get_backbone,
    is_backbone,
    load_backbone_weights,
)
from detkd.models.binary import binarize_neck, bireal18
from detkd.models.detr import DETR_FAMILIES
from detkd.models.outputs import Detector
from detkd.models.torchvision_adapter import build_faster_rcnn, build_fcos, build_retinanet
from detkd.registry import Registry

PRESETS: dict[str, dict[str, Any]] = {
    "slim": dict(
        fpn_channels=64,
        rpn_pre_nms_train=600,
        rpn_post_nms_train=300,
        rpn_pre_nms_test=300,
        rpn_post_nms_test=100,
        rpn_batch=128,
        box_batch=128,
        box_head_dim=256,
        topk_candidates=300,
        two_stage_anchor_scale=4,
        one_stage_anchor_scale=2,
        head_norm="group",  # RetinaNet heads trained from scratch barely move without it
    ),
    "standard": dict(
        fpn_channels=256,
        rpn_pre_nms_train=2000,
        rpn_post_nms_train=2000,
        rpn_pre_nms_test=1000,
        rpn_post_nms_test=1000,
        rpn_batch=256,
        box_batch=512,
        box_head_dim=1024,
        topk_candidates=1000,
        two_stage_anchor_scale=8,
        one_stage_anchor_scale=4,
        head_norm="none",
    ),
}


# A family builder takes (backbone name, num_classes, preset dict, spec dict, backbone_weights) -> Detector.
FAMILIES: Registry[Callable[..., Detector]] = Registry("detector family")


def _fpn_family(levels: tuple[str, ...], build: Callable[..., Detector], anchor_key: str) -> Callable[..., Detector]:
    def family(backbone: str, num_classes: int, preset: dict, spec: dict, backbone_weights: str) -> Detector:
        frozen = bool(spec.get("frozen_bn"))
        if backbone.startswith(TIMM_PREFIX) and backbone_weights == "imagenet":
            body = get_backbone(backbone)(frozen_bn=frozen, pretrained=True)  # timm fetches its own weights
        else:
            body = get_backbone(backbone)(frozen_bn=frozen)
            if backbone_weights != "none":
                load_backbone_weights(body, backbone_weights)
        if frozen:
            freeze_stages(body, trainable=3)
        fpn = FPNBackbone(body, levels, preset["fpn_channels"])
        detector = build(fpn, num_classes, dict(preset, anchor_scale=preset[anchor_key]), spec)
        if spec.get("binary_neck"):
            binarize_neck(detector)
        return detector

    family.timm = True
    return family


FAMILIES.register("frcnn")(_fpn_family(("p2", "p3", "p4", "p5", "p6"), build_faster_rcnn, "two_stage_anchor_scale"))
FAMILIES.register("retinanet")(_fpn_family(("p3", "p4", "p5", "p6", "p7"), build_retinanet, "one_stage_anchor_scale"))
FAMILIES.register("fcos")(_fpn_family(("p3", "p4", "p5", "p6", "p7"), build_fcos, "one_stage_anchor_scale"))
# Every family and backbone defined outside this file and backbones.py is registered here, by explicit import.
for _name, _build in DETR_FAMILIES.items():
    FAMILIES.register(_name)(_build)
BACKBONES.register("bireal18")(bireal18)


def split_name(name: str) -> tuple[str, str]:
    """``"frcnn_r50"`` -> ``("frcnn", "r50")``; the family is the longest registered prefix."""
    for family in sorted(FAMILIES.names(), key=len, reverse=True):
        if name.startswith(family + "_"):
            return family, name[len(family) + 1 :]
    raise ConfigError(
        f"unknown detector {name!r}: expected <family>_<backbone> with family in {', '.join(FAMILIES.names())} "
        f"and backbone in {', '.join(BACKBONES.names())} (see `detkd list detectors`)"
    )


def detector_names() -> list[str]:
    """Every buildable ``<family>_<backbone>`` name."""
    return [f"{f}_{b}" for f in FAMILIES.names() for b in BACKBONES.names() if b in _compatible_backbones(f)]


def _compatible_backbones(family: str) -> set[str]:
    compatible = getattr(FAMILIES.get(family), "backbones", None)
    return set(compatible) if compatible is not None else set(BACKBONES.names())


def _supports(family: str, backbone: str) -> bool:
    if backbone.startswith(TIMM_PREFIX):
        return getattr(FAMILIES.get(family), "timm", False)
    return backbone in _compatible_backbones(family)


def build_detector(
    name: str,
    num_classes: int,
    *,
    preset: str = "slim",
    backbone_weights: str = "none",
    min_size: int = 128,
    max_size: int = 128,
    train_sizes: list[int] | None = None,
    train_max_size: int | None = None,
    fpn_channels: int | None = None,
    binary_neck: bool = False,
    frozen_bn: bool | None = None,
) -> Detector:
    """Build a detector by name.

    Args:
        name: ``<family>_<backbone>``, e.g. ``frcnn_r18``.
        num_classes: number of foreground classes (labels ``1..num_classes``).
        preset: ``slim`` or ``standard``.
        backbone_weights: ``none``, ``imagenet`` or a path to a backbone state dict.
        min_size: short side of the network input.
        max_size: maximum long side of the network input.
        train_sizes: multi-scale training: each training image's short side is drawn from these (evaluation uses
            ``min_size``); None: ``min_size`` always.
        train_max_size: long-side cap in training (None: ``max_size``).
        fpn_channels: override of the preset's FPN (or transformer) width.
        binary_neck: 1-bit FPN convs and RPN conv (IDa-Det's student); see ``detkd.models.binary``.
        frozen_bn: frozen BatchNorm statistics and stem/first stage (torchvision's convention for a pretrained
            backbone); None = when ``backbone_weights`` is not ``none``. Recorded in the spec, so that a checkpoint
            rebuilds with the same layers.
    """
    family, backbone = split_name(name)
    if not is_backbone(backbone):
        raise ConfigError(
            f"unknown backbone {backbone!r} in detector {name!r}; known: {', '.join(BACKBONES.names())}, "
            f"{TIMM_PREFIX}<model>"
        )
    if not _supports(family, backbone):
        raise BuildError(f"detector family {family!r} does not support backbone {backbone!r}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    settings = dict(PRESETS[preset])
    if fpn_channels is not None:
        settings["fpn_channels"] = fpn_channels
    spec = dict(
        name=name,
        num_classes=num_classes,
        preset=preset,
        min_size=min_size,
        max_size=max_size,
        fpn_channels=fpn_channels,
    )
    if train_sizes:  # only when set: specs of single-scale detectors keep their keys
        spec["train_sizes"] = [int(s) for s in train_sizes]
    if train_max_size:
        spec["train_max_size"] = int(train_max_size)
    if binary_neck:
        spec["binary_neck"] = True
    if frozen_bn if frozen_bn is not None else backbone_weights != "none":
        spec["frozen_bn"] = True
    model = FAMILIES.get(family)(backbone, num_classes, settings, spec, backbone_weights)
    model.name = name
    return model
