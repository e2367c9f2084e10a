"""Box-aware augmentation on ``torchvision.transforms.v2``.

The pipelines take and return ``(image, target)`` with plain tensors, as the datasets produce them;
inside, the image and boxes are wrapped as ``tv_tensors`` so every geometric change moves the boxes
with the pixels. Resizing to the model's input size is the model's job, not done here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detkd.config import DataConfig
from detkd.errors import ConfigError


class RandomRescale(v2.Transform):
    """Rescale the whole image by a factor drawn uniformly from ``[low, high]``, keeping its aspect ratio.

    Unlike ``v2.ScaleJitter`` the factor is relative to the image's own size, so images of any size are
    jittered alike.
    """

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        factor = self.low + (self.high - self.low) * torch.rand(()).item()
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop a random window whose height and width are fractions in ``[low, high]`` of the image's (drawn
    independently), at a random position. Boxes are cut to the window; those left empty are dropped later by
    ``SanitizeBoundingBoxes``. DETR's crop draws sizes in pixels (384-600 px of an image resized to 400-600 px);
    fractions keep the augmentation the same at any image size.
    """

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        fh, fw = (self.low + (self.high - self.low) * torch.rand(2)).tolist()
        h, w = max(1, min(height, round(height * fh))), max(1, min(width, round(width * fw)))
        top = int(torch.randint(0, height - h + 1, ()).item())
        left = int(torch.randint(0, width - w + 1, ()).item())
        return {"top": top, "left": left, "height": h, "width": w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


def _labels_of(sample: tuple[Any, dict[str, Any]]) -> Tensor:
    # A named function, not a lambda, so the pipeline pickles into DataLoader workers.
    return sample[1]["labels"]


class DetectionTransform:
    """Runs a v2 pipeline on ``(image, target)`` and hands back plain tensors with the same target keys."""

    def __init__(self, pipeline: v2.Transform | None):
        self.pipeline = pipeline

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        if self.pipeline is None:
            return image, target
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
        out_image, out = self.pipeline(tv_tensors.Image(image), {"boxes": boxes, "labels": target["labels"]})
        target = dict(target)
        target["boxes"] = out["boxes"].as_subclass(Tensor).reshape(-1, 4)
        target["labels"] = out["labels"]
        return out_image.as_subclass(Tensor), target

    def __repr__(self) -> str:
        return f"DetectionTransform({self.pipeline!r})"


def build_transforms(cfg: DataConfig, train: bool) -> DetectionTransform:
    """The augmentation pipeline for training (``train=True``) or evaluation.

    Training: horizontal flip with probability ``cfg.hflip``, then, when ``cfg.scale_jitter = [low, high]``,
    a rescale of the whole image by a random factor in that range, then, when ``cfg.random_crop = [low, high]``,
    with probability ``cfg.random_crop_prob`` a crop to a random window (:class:`RandomSizeCrop`); boxes that
    became smaller than a pixel are dropped with their labels. Evaluation changes nothing.

    Args:
        cfg: data settings (``hflip``, ``scale_jitter``).
        train: which pipeline.

    Returns:
        A callable ``(image, target) -> (image, target)``.

    Raises:
        ConfigError: ``hflip`` or ``random_crop_prob`` is not a probability, or ``scale_jitter`` is not
            ``[low, high]`` with ``0 < low <= high``, or ``random_crop`` not one with ``high <= 1``.
    """
    if not 0.0 <= cfg.hflip <= 1.0:
        raise ConfigError(f"data.hflip: {cfg.hflip} is not a probability in [0, 1]")
    jitter = cfg.scale_jitter
    if jitter is not None and (len(jitter) != 2 or not 0 < jitter[0] <= jitter[1]):
        raise ConfigError(f"data.scale_jitter: expected [low, high] with 0 < low <= high, got {jitter}")
    crop = cfg.random_crop
    if crop is not None and (len(crop) != 2 or not 0 < crop[0] <= crop[1] <= 1):
        raise ConfigError(f"data.random_crop: expected [low, high] with 0 < low <= high <= 1, got {crop}")
    if not 0.0 <= cfg.random_crop_prob <= 1.0:
        raise ConfigError(f"data.random_crop_prob: {cfg.random_crop_prob} is not a probability in [0, 1]")
    if not train:
        return DetectionTransform(None)
    steps: list[v2.Transform] = []
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=cfg.hflip))
    if jitter is not None:
        steps.append(RandomRescale(float(jitter[0]), float(jitter[1])))
    if crop is not None and cfg.random_crop_prob > 0:
        steps.append(v2.RandomApply([RandomSizeCrop(float(crop[0]), float(crop[1]))], p=cfg.random_crop_prob))
    steps.append(v2.SanitizeBoundingBoxes(labels_getter=_labels_of))
    return DetectionTransform(v2.Compose(steps))
