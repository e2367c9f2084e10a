"""DETR-style random crop: boxes are cut to the window and stay on the pixels they label."""

from __future__ import annotations

import pytest
import torch

from detkd.config import DataConfig
from detkd.data import build_transforms
from detkd.errors import ConfigError


def scene() -> tuple[torch.Tensor, dict]:
    """A 40x60 image with three disjoint boxes, each filled with its own label / 10."""
    boxes = [[2, 3, 20, 15], [30, 5, 55, 30], [10, 25, 25, 38]]
    labels = [1, 2, 3]
    image = torch.zeros(3, 40, 60)
    for (x0, y0, x1, y1), label in zip(boxes, labels):
        image[:, y0:y1, x0:x1] = label / 10
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels), "image_id": 1}
    return image, target


def test_crop_keeps_boxes_on_their_pixels():
    transform = build_transforms(DataConfig(hflip=0.0, random_crop=[0.4, 0.8], random_crop_prob=1.0), train=True)
    sizes, kept = set(), []
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = scene()
        out, t = transform(image, target)
        h, w = out.shape[-2:]
        sizes.add((h, w))
        assert 0.4 * 40 - 1 <= h <= 0.8 * 40 + 1 and 0.4 * 60 - 1 <= w <= 0.8 * 60 + 1
        assert len(t["boxes"]) == len(t["labels"])
        kept.append(len(t["boxes"]))
        ink = out[0] > 0
        covered = torch.zeros_like(ink)
        for box, label in zip(t["boxes"], t["labels"]):
            x0, y0, x1, y1 = (int(v) for v in box.round().tolist())
            assert torch.equal(box, box.round()) and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            # The box holds exactly its own label's pixels, cut to the window.
            assert torch.allclose(out[0, y0:y1, x0:x1], torch.full((y1 - y0, x1 - x0), label / 10))
            covered[y0:y1, x0:x1] = True
        assert torch.equal(covered, ink)  # every visible object keeps its box, no box on empty pixels
    assert len(sizes) > 5 and min(kept) < 3  # windows vary, and objects outside the window are dropped


def test_crop_probability_and_bad_settings():
    image, target = scene()
    out, t = build_transforms(DataConfig(hflip=0.0, random_crop=[0.5, 0.5], random_crop_prob=0.0), True)(image, target)
    assert out.shape == image.shape and torch.equal(t["boxes"], target["boxes"])
    for bad in ([0.0, 0.5], [0.6, 0.5], [0.5, 1.2], [0.5]):
        with pytest.raises(ConfigError, match="random_crop"):
            build_transforms(DataConfig(random_crop=bad), True)
    with pytest.raises(ConfigError, match="random_crop_prob"):
        build_transforms(DataConfig(random_crop=[0.5, 1.0], random_crop_prob=1.5), True)
