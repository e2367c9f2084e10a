"""Detectors, backbones and the output contract shared with distillation methods."""

from detkd.models.detectors import build_detector, detector_names
from detkd.models.outputs import Detector, DetOutputs, FeatureSpec

__all__ = ["DetOutputs", "Detector", "FeatureSpec", "build_detector", "detector_names"]
