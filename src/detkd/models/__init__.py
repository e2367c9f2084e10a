"""Detectors, backbones and the output contract shared with distillation methods."""
