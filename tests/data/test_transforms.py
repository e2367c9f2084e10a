"""Box-aware augmentation: flips and rescales move boxes with the pixels."""

from __future__ import annotations

import pytest
import torch

from detkd.config import DataConfig
from detkd.data import build_transforms
from detkd.errors import ConfigError


def _target(boxes: list[list[float]], labels: list[int]) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": 7,
        "orig_size": (20, 30),
    }


def _painted(height: int, width: int, boxes: list[list[int]]) -> torch.Tensor:
    """Black image with each integer box filled white."""
    image = torch.zeros(3, height, width)
    for x0, y0, x1, y1 in boxes:
        image[:, y0:y1, x0:x1] = 1.0
    return image


def _ink_box(image: torch.Tensor, box: torch.Tensor, threshold: float = 0.5) -> list[int]:
    """Bounding box of the bright pixels near ``box`` (searched in ``box`` grown by 3 pixels)."""
    x0, y0, x1, y1 = box.tolist()
    h, w = image.shape[1:]
    gx0, gy0, gx1, gy1 = max(int(x0) - 3, 0), max(int(y0) - 3, 0), min(int(x1) + 4, w), min(int(y1) + 4, h)
    ys, xs = torch.nonzero(image[0, gy0:gy1, gx0:gx1] > threshold, as_tuple=True)
    return [int(xs.min()) + gx0, int(ys.min()) + gy0, int(xs.max()) + gx0 + 1, int(ys.max()) + gy0 + 1]


def test_hflip_moves_boxes_by_hand():
    transform = build_transforms(DataConfig(hflip=1.0), train=True)
    image = _painted(20, 30, [[2, 3, 7, 9]])
    target = _target([[2, 3, 7, 9], [0, 0, 30, 20]], [1, 2])
    out_image, out = transform(image, target)
    # Width 30: x -> 30 - x, so [2, 7] becomes [23, 28] and the full-width box stays.
    assert out["boxes"].tolist() == [[23.0, 3.0, 28.0, 9.0], [0.0, 0.0, 30.0, 20.0]]
    assert out["labels"].tolist() == [1, 2]
    assert torch.equal(out_image, image.flip(-1))
    assert _ink_box(out_image, out["boxes"][0]) == [23, 3, 28, 9]
    assert type(out_image) is torch.Tensor and type(out["boxes"]) is torch.Tensor
    assert out.keys() == target.keys() and out["image_id"] == 7 and out["orig_size"] == (20, 30)
    assert target["boxes"].tolist()[0] == [2.0, 3.0, 7.0, 9.0]  # the input target is not modified


def test_eval_transform_changes_nothing():
    transform = build_transforms(DataConfig(hflip=1.0, scale_jitter=[0.5, 2.0]), train=False)
    image, target = torch.rand(3, 20, 30), _target([[1, 2, 5, 6]], [3])
    out_image, out = transform(image, target)
    assert torch.equal(out_image, image) and torch.equal(out["boxes"], target["boxes"])


def test_no_flip_when_probability_zero():
    transform = build_transforms(DataConfig(hflip=0.0), train=True)
    image, target = torch.rand(3, 20, 30), _target([[1, 2, 5, 6]], [3])
    out_image, out = transform(image, target)
    assert torch.equal(out_image, image) and out["boxes"].tolist() == [[1.0, 2.0, 5.0, 6.0]]


def test_scale_jitter_keeps_boxes_on_their_pixels():
    boxes = [[4, 6, 20, 18], [30, 2, 44, 30], [10, 24, 16, 28]]
    image = _painted(32, 48, boxes)
    transform = build_transforms(DataConfig(hflip=0.5, scale_jitter=[0.6, 1.8]), train=True)
    sizes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out = transform(image, _target(boxes, [1, 2, 3]))
        h, w = out_image.shape[1:]
        sizes.add((h, w))
        assert abs(w - 1.5 * h) <= 1.5  # aspect ratio kept, up to rounding each side
        assert 0.6 * 32 - 1 <= h <= 1.8 * 32 + 1
        assert out["boxes"].shape == (3, 4)
        for box in out["boxes"]:
            ink = torch.tensor(_ink_box(out_image, box), dtype=torch.float32)
            # Resampling blurs edges by under a pixel; the box must sit on the ink it came from.
            assert torch.allclose(ink, box, atol=1.0), (seed, ink.tolist(), box.tolist())
    assert len(sizes) > 3


def test_boxes_that_shrink_below_a_pixel_are_dropped_with_their_labels():
    transform = build_transforms(DataConfig(hflip=0.0, scale_jitter=[0.5, 0.5]), train=True)
    target = _target([[2, 2, 12, 12], [20, 4, 21.5, 14], [4, 14, 18, 19]], [1, 2, 3])
    out_image, out = transform(torch.rand(3, 20, 30), target)
    assert out_image.shape == (3, 10, 15)
    assert out["labels"].tolist() == [1, 3]
    assert out["boxes"].tolist() == [[1.0, 1.0, 6.0, 6.0], [2.0, 7.0, 9.0, 9.5]]


def test_empty_target_passes_through():
    transform = build_transforms(DataConfig(hflip=1.0, scale_jitter=[0.5, 1.5]), train=True)
    out_image, out = transform(torch.rand(3, 20, 30), _target([], []))
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale_jitter": [2.0, 1.0]}, "data.scale_jitter"),
        ({"scale_jitter": [0.0, 1.0]}, "data.scale_jitter"),
        ({"scale_jitter": [1.0]}, "data.scale_jitter"),
        ({"hflip": 1.5}, "data.hflip"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_transforms(DataConfig(**kwargs), train=True)
