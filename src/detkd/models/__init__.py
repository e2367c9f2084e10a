"""Detectors, backbones and the output contract shared with distillation methods."""

import detkd.models.detr  # noqa: F401  (registers DETR families)
from detkd.models import binary  # noqa: F401  (registers bireal18)
from detkd.models.detectors import build_detector, detector_names
from detkd.models.outputs import Detector, DetOutputs, FeatureSpec

__all__ = ["DetOutputs", "Detector", "FeatureSpec", "build_detector", "detector_names"]
