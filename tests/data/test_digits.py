"""The built-in digits dataset: determinism, disjoint sources, tight boxes, both presets readable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detkd.data import DIGITS_DIFFICULTIES, build_dataset, make_digits
from detkd.data.digits import PRESETS, DigitsSpec, digits_spec
from detkd.errors import ConfigError

# A plain scene: white background, black gray ink at full contrast, nothing else drawn.
CLEAN = {
    "noise": 0.0,
    "gradient": 0.0,
    "clutter": (0, 0),
    "contrast": (1.0, 1.0),
    "color": False,
}


def _json(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


@pytest.fixture(scope="module")
def easy(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("digits") / "easy"
    return out, make_digits(out, train=10, val=6, seed=3)


def test_summary_and_layout(easy):
    out, summary = easy
    assert summary["path"] == str(out) and summary["size"] == 128 and summary["difficulty"] == "easy"
    assert summary["train"]["images"] == 10 and summary["val"]["images"] == 6
    assert summary["train"]["sources"] + summary["val"]["sources"] == 1797
    for split in ("train", "val"):
        data = _json(out, split)
        assert len(data["images"]) == summary[split]["images"] == len(list((out / split).glob("*.png")))
        assert len(data["annotations"]) == summary[split]["annotations"]
        assert data["categories"][0] == {"id": 1, "name": "0", "supercategory": "digit"}
        assert [c["name"] for c in data["categories"]] == [str(d) for d in range(10)]


def test_same_seed_is_byte_identical_other_seed_differs(easy, tmp_path):
    out, _ = easy
    again = tmp_path / "again"
    make_digits(again, train=10, val=6, seed=3)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert (again / "train" / "000004.png").read_bytes() == (out / "train" / "000004.png").read_bytes()
    other = tmp_path / "other"
    make_digits(other, train=10, val=0, seed=4)
    assert (other / "annotations/instances_train.json").read_bytes() != (
        out / "annotations/instances_train.json"
    ).read_bytes()


def test_smaller_dataset_is_a_prefix(easy, tmp_path):
    out, _ = easy
    make_digits(tmp_path / "small", train=4, val=0, seed=3)
    assert _json(tmp_path / "small", "train")["images"] == _json(out, "train")["images"][:4]


def test_train_and_val_use_disjoint_source_digits(easy):
    out, _ = easy
    train = {a["digit_source"] for a in _json(out, "train")["annotations"]}
    val = {a["digit_source"] for a in _json(out, "val")["annotations"]}
    assert train and val and not train & val
    from detkd.data.digits import _sources

    _, labels, split = _sources()
    assert not set(split["train"].tolist()) & set(split["val"].tolist())
    assert len(split["train"]) + len(split["val"]) == len(labels) == 1797
    for digit in range(10):  # every digit appears in both pools, about 70/30
        share = np.isin(split["val"], np.nonzero(labels == digit)[0]).sum() / (labels == digit).sum()
        assert 0.25 < share < 0.35
    for a in _json(out, "train")["annotations"]:
        assert labels[a["digit_source"]] + 1 == a["category_id"]


def test_boxes_are_tight_around_the_ink(tmp_path):
    out = tmp_path / "clean"
    make_digits(out, train=8, val=0, seed=0, **CLEAN)
    data = _json(out, "train")
    checked = 0
    for image in data["images"]:
        gray = np.asarray(Image.open(out / "train" / image["file_name"]).convert("L")).astype(np.int32)
        ink = 255 - gray  # background is exactly white
        boxes = [a["bbox"] for a in data["annotations"] if a["image_id"] == image["id"]]
        inside = np.zeros_like(ink, dtype=bool)
        for x, y, w, h in boxes:
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
            inside[y : y + h, x : x + w] = True
            patch = ink[y : y + h, x : x + w] >= 20  # ink at the box edge is drawn at >= 30% opacity
            assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()
            checked += 1
        assert not ink[~inside].any()  # nothing at all drawn outside the boxes
    assert checked >= 8


def _iou(a, b) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0, min(ax1, bx1) - max(a[0], b[0])) * max(0, min(ay1, by1) - max(a[1], b[1]))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.mark.parametrize("difficulty", DIGITS_DIFFICULTIES)
def test_presets_write_valid_coco(tmp_path, difficulty):
    out = tmp_path / difficulty
    summary = make_digits(out, train=6, val=3, seed=1, difficulty=difficulty)
    spec = PRESETS[difficulty]
    for split in ("train", "val"):
        ds = build_dataset(out, split)
        assert ds.format == "coco" and ds.classes == [str(d) for d in range(10)] and ds.skipped == {}
        assert len(ds) == summary[split]["images"]
        data = _json(out, split)
        for image in data["images"]:
            boxes = [a["bbox"] for a in data["annotations"] if a["image_id"] == image["id"]]
            assert len(boxes) <= spec.digits_per_scene[1]
            for i, a in enumerate(boxes):
                assert max(a[2], a[3]) <= spec.digit_size[1]
                assert all(_iou(a, b) <= spec.max_iou for b in boxes[i + 1 :])
        image, target = ds[0]
        assert image.shape == (3, 128, 128)
        assert target["labels"].min() >= 1 and target["labels"].max() <= 10
        assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()
    hard_count = summary["train"]["annotations"] / 6
    assert hard_count >= (4 if difficulty == "hard" else 2)


def test_hard_preset_is_harder_than_easy():
    easy, hard = PRESETS["easy"], PRESETS["hard"]
    assert hard.digit_size[1] < easy.digit_size[1] and hard.digits_per_scene[0] > easy.digits_per_scene[0]
    assert hard.contrast[0] < easy.contrast[0] and hard.distractors[1] > 0 and hard.textured_clutter[1] > 0
    assert hard.polarity_flip > 0 and hard.occlusion > 0 and hard.max_occlusion <= 0.35


def test_overrides_are_checked():
    spec = digits_spec("easy", digit_size=[10, 20], noise=0)
    assert isinstance(spec, DigitsSpec) and spec.digit_size == (10, 20) and spec.noise == 0.0
    with pytest.raises(ConfigError, match="unknown key.*nosie"):
        digits_spec("easy", nosie=0.1)
    with pytest.raises(ConfigError, match="digits.digit_size"):
        digits_spec("easy", digit_size=(30, 10))
    with pytest.raises(ConfigError, match="digits.polarity_flip"):
        digits_spec("easy", polarity_flip=1.5)
    with pytest.raises(ConfigError, match="unknown difficulty"):
        digits_spec("medium")


def test_make_digits_rejects_digits_larger_than_the_image(tmp_path):
    with pytest.raises(ConfigError, match="smaller than the largest digit"):
        make_digits(tmp_path, train=1, val=0, size=32)
    with pytest.raises(ConfigError, match="unknown key"):
        make_digits(tmp_path, train=1, val=0, colour=False)


def test_occluders_cover_at_most_the_allowed_share_of_a_box():
    from detkd.data.digits import _sources, render_scene

    pool = _sources()[2]["train"]
    settings = {**CLEAN, "digits_per_scene": (1, 1), "max_occlusion": 0.35}
    covered = []
    for k in range(12):
        # The occluders are drawn last, so both renders place the same digit at the same spot.
        plain, objects = render_scene(
            np.random.default_rng(k), digits_spec("easy", **settings, occlusion=0.0), 64, pool
        )
        hidden, same = render_scene(np.random.default_rng(k), digits_spec("easy", **settings, occlusion=1.0), 64, pool)
        assert objects == same and len(objects) == 1
        x0, y0, x1, y1 = objects[0]["box"]
        changed = (plain != hidden).any(-1)
        covered.append(changed[y0:y1, x0:x1].mean())
    assert max(covered) <= 0.35 and min(covered) > 0.0
