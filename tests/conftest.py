"""Shared fixtures: tiny images and targets, tiny detectors. Everything runs on CPU in seconds."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def make_batch(n: int = 2, size: int = 64, empty_last: bool = True, seed: int = 0):
    """``n`` random images with two boxes each (the last one without boxes if ``empty_last``)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = []
    for i in range(n):
        if empty_last and i == n - 1:
            targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": i})
        else:
            boxes = torch.tensor([[4.0, 6.0, 30.0, 28.0], [34.0, 30.0, 60.0, 62.0]]) * size / 64
            targets.append({"boxes": boxes, "labels": torch.tensor([1, 3]), "image_id": i})
    return images, targets


@pytest.fixture
def batch():
    return make_batch()


def tiny(name: str, num_classes: int = 3, **kw):
    from detkd.models import build_detector

    torch.manual_seed(0)
    return build_detector(name, num_classes, min_size=64, max_size=64, **kw)
