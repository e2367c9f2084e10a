"""DETR family in pure PyTorch (no custom CUDA op); ``detkd.models.detectors`` registers these families.

- ``deformable_detr_<backbone>``: Deformable DETR, 4 levels (``p3..p6``), multi-scale deformable attention via
  ``grid_sample``; ``deformable_detr_refine_<backbone>`` adds iterative box refinement.
- ``conditional_detr_<backbone>``: Conditional DETR on one level (``p5``).

Both use focal classification, Hungarian matching (focal 2 / L1 5 / GIoU 2) and the same losses, with auxiliary
losses on every decoder layer. Presets (``slim`` / ``standard``) are this family's own; ``fpn_channels``
overrides the transformer width:

- ``slim``: width 64, 2 encoder / 3 decoder layers, 50 queries, 4 heads, 4 points, FFN 256. Trains on the
  128-px digits dataset on a 2-core CPU.
- ``standard``: the papers' sizes: width 256, 6 / 6 layers, 300 queries, 8 heads, FFN 1024 (Deformable) or
  2048 (Conditional).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from detkd.errors import ConfigError
from detkd.models.backbones import BACKBONES, freeze_stages, load_backbone_weights
from detkd.models.detr.adapter import DETRDetector
from detkd.models.detr.conditional import ConditionalTransformer
from detkd.models.detr.criterion import SetCriterion
from detkd.models.detr.deformable import DeformableTransformer
from detkd.models.detr.matcher import HungarianMatcher
from detkd.models.detr.neck import ChannelMapper

__all__ = ["DETR_FAMILIES", "DETR_PRESETS", "DETRDetector"]

DETR_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "deformable": {
        "slim": dict(dim=64, heads=4, enc_layers=2, dec_layers=3, ffn=256, queries=50, points=4, dropout=0.1),
        "standard": dict(dim=256, heads=8, enc_layers=6, dec_layers=6, ffn=1024, queries=300, points=4, dropout=0.1),
    },
    "conditional": {
        "slim": dict(dim=64, heads=4, enc_layers=2, dec_layers=3, ffn=256, queries=50, dropout=0.1),
        "standard": dict(dim=256, heads=8, enc_layers=6, dec_layers=6, ffn=2048, queries=300, dropout=0.1),
    },
}
DETR_BACKBONES = ("r18", "r34", "r50", "r101", "mbv3")


def _sizes(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    presets = DETR_PRESETS[variant]
    if spec["preset"] not in presets:
        raise ConfigError(f"unknown preset {spec['preset']!r} for DETRs; known: {', '.join(presets)}")
    sizes = dict(presets[spec["preset"]])
    if spec.get("fpn_channels"):
        sizes["dim"] = spec["fpn_channels"]
    if sizes["dim"] % (2 * sizes["heads"]):
        raise ConfigError(f"DETR width {sizes['dim']} must be a multiple of 2 x {sizes['heads']} heads")
    return sizes


def _family(variant: str, box_refine: bool = False) -> Callable[..., DETRDetector]:
    def family(backbone: str, num_classes: int, preset: dict, spec: dict, backbone_weights: str) -> DETRDetector:
        sizes = _sizes(variant, spec)
        frozen = bool(spec.get("frozen_bn"))
        body = BACKBONES.get(backbone)(frozen_bn=frozen)
        if backbone_weights != "none":
            load_backbone_weights(body, backbone_weights)
        if frozen:
            freeze_stages(body, trainable=3)
        if variant == "deformable":
            stages, extra = ("c3", "c4", "c5"), 1
            transformer = DeformableTransformer(num_classes, levels=len(stages) + extra, box_refine=box_refine, **sizes)
        else:
            stages, extra = ("c5",), 0
            transformer = ConditionalTransformer(num_classes, **sizes)
        neck = ChannelMapper({s: body.channels[s] for s in stages}, sizes["dim"], extra)
        criterion = SetCriterion(HungarianMatcher(2.0, 5.0, 2.0), cls_weight=2.0, bbox_weight=5.0, giou_weight=2.0)
        return DETRDetector(body.module, neck, transformer, criterion, num_classes, spec)

    family.backbones = DETR_BACKBONES
    return family


# Family name -> builder, as ``detkd.models.detectors.FAMILIES`` takes them.
DETR_FAMILIES: dict[str, Callable[..., DETRDetector]] = {
    "deformable_detr": _family("deformable"),
    "deformable_detr_refine": _family("deformable", box_refine=True),
    "conditional_detr": _family("conditional"),
}
