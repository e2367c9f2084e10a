"""Multi-scale training (model.train_sizes): training images drawn from the sizes, evaluation at min_size."""

from __future__ import annotations

import pytest
import torch

from detkd.config import load_config
from detkd.engine.checkpoint import load_detector, save_student
from detkd.errors import ConfigError
from tests.conftest import make_batch, tiny


@pytest.mark.parametrize("name", ["frcnn_r18", "retinanet_r18", "deformable_detr_r18"])
def test_training_short_sides_are_drawn_from_the_sizes_and_evaluation_uses_min_size(name):
    det = tiny(name, train_sizes=[40, 56])
    images, targets = make_batch(n=1, size=64, empty_last=False)
    det.train()
    torch.manual_seed(0)
    seen = {det.preprocess(images, targets)[0].image_sizes[0][0] for _ in range(30)}
    assert seen == {40, 56}
    det.eval()
    assert {det.preprocess(images)[0].image_sizes[0][0] for _ in range(5)} == {64}
    # Boxes follow their image's size.
    det.train()
    for _ in range(10):
        batch, resized = det.preprocess(images, targets)
        scale = batch.image_sizes[0][0] / 64
        assert torch.allclose(resized[0]["boxes"], targets[0]["boxes"] * scale, atol=1e-3)


def test_single_scale_detectors_keep_their_spec_and_the_sizes_survive_a_checkpoint(tmp_path):
    assert "train_sizes" not in tiny("frcnn_r18").spec
    det = tiny("frcnn_r18", train_sizes=[40, 56])
    save_student(tmp_path / "s.pt", det, ["a", "b", "c"])
    loaded, _ = load_detector(tmp_path / "s.pt")
    assert loaded.spec["train_sizes"] == [40, 56]


def test_the_sizes_are_checked_at_load_time():
    assert load_config(overrides=["model.train_sizes=[640,672,704]"]).model.train_sizes == [640, 672, 704]
    for bad in ("[]", "[0,800]", "[640.5]"):
        with pytest.raises(ConfigError, match="model.train_sizes"):
            load_config(overrides=[f"model.train_sizes={bad}"])


def test_a_training_long_side_cap_applies_in_training_only():
    det = tiny("frcnn_r18", train_sizes=[64], train_max_size=96)  # eval: min 64, max 64
    images, targets = make_batch(n=1, size=64, empty_last=False)
    images = [torch.nn.functional.interpolate(images[0][None], size=(64, 128))[0]]  # 1:2 aspect
    det.train()
    assert det.preprocess(images, targets)[0].image_sizes[0] == (48, 96)  # long side capped at 96
    det.eval()
    assert det.preprocess(images)[0].image_sizes[0] == (32, 64)  # eval: max_size 64
