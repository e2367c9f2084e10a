"""The built-in dataset: scenes of real handwritten digits, written to disk as a COCO dataset.

The digits are scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1797 images
of 8x8 pixels, values 0..16), upscaled smoothly to each digit's size and composed onto a background. The
1797 source digits are split once, the same way for every seed (70/30 within each class), so that train
and val scenes never share a source digit. A scene's random state is derived from
``(seed, split, image index)``, so the same seed writes byte-identical files and a smaller dataset is a
prefix of a larger one.

A box is the tight box of the digit's visible ink: the pixels where the upscaled digit exceeds
:data:`INK_THRESHOLD`. Nothing of a digit is drawn outside its box; what lies outside the boxes is
background, clutter and (in the ``hard`` preset) unlabelled distractor strokes.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detkd.config import DATASET_SETTINGS, from_dict
from detkd.errors import ConfigError

DIGITS_DIFFICULTIES = ("easy", "hard")
DIGIT_CLASSES = [str(d) for d in range(10)]  # category id = digit + 1

INK_THRESHOLD = 0.2  # a pixel of an upscaled digit (scaled to [0, 1]) is ink above this value
# Ink at the threshold is drawn at this opacity, ramping to full opacity at the digit's core; below the
# threshold nothing is drawn, so every drawn pixel of a digit lies inside its box and the box edge is visible.
EDGE_OPACITY = 0.3
VAL_SOURCE_FRACTION = 0.3
_SOURCE_SPLIT_SEED = 20240917  # fixed: the train/val source split must not move with the scene seed


@dataclass
class DigitsSpec:
    """Every knob of the scene generator; ranges are ``(low, high)``, inclusive.

    Attributes:
        digits_per_scene: number of digits a scene tries to place (fewer when placement fails).
        digit_size: side in pixels of a digit's square cell; the ink box inside it is smaller.
        contrast: difference between the background and ink levels, per digit, in [0, 1].
        noise: standard deviation of per-pixel Gaussian noise.
        gradient: brightness change across the image of a smooth background gradient.
        clutter: number of soft, low-contrast blobs in the background.
        textured_clutter: number of textured patches (stripes, checks, speckle) in the background.
        distractors: number of unlabelled curved strokes drawn in ink colour.
        polarity_flip: probability that a scene is light ink on a dark background instead of dark on light.
        occlusion: probability that a digit is partly covered by a clutter patch.
        max_occlusion: largest fraction of a digit's box an occluding patch covers.
        color: tinted background and ink colours; False draws in gray.
        max_iou: largest IoU allowed between two digit boxes (and between a stroke and a digit).
        placement_tries: random positions tried per digit before it is left out.
    """

    digits_per_scene: tuple[int, int] = (2, 6)
    digit_size: tuple[int, int] = (12, 40)
    contrast: tuple[float, float] = (0.55, 0.9)
    noise: float = 0.02
    gradient: float = 0.15
    clutter: tuple[int, int] = (0, 3)
    textured_clutter: tuple[int, int] = (0, 0)
    distractors: tuple[int, int] = (0, 0)
    polarity_flip: float = 0.0
    occlusion: float = 0.0
    max_occlusion: float = 0.35
    color: bool = True
    max_iou: float = 0.1
    placement_tries: int = 30


PRESETS: dict[str, DigitsSpec] = {
    "easy": DigitsSpec(),
    "hard": DigitsSpec(
        digits_per_scene=(4, 10),
        digit_size=(8, 24),
        contrast=(0.2, 0.55),
        noise=0.04,
        gradient=0.3,
        clutter=(2, 5),
        textured_clutter=(2, 5),
        distractors=(2, 6),
        polarity_flip=0.5,
        occlusion=0.3,
        max_occlusion=0.35,
    ),
}

_RANGES = {
    "digits_per_scene": (0, None),
    "digit_size": (4, None),
    "contrast": (0.0, 1.0),
    "clutter": (0, None),
    "textured_clutter": (0, None),
    "distractors": (0, None),
}
_SCALARS = {
    "noise": (0.0, 1.0),
    "gradient": (0.0, 1.0),
    "polarity_flip": (0.0, 1.0),
    "occlusion": (0.0, 1.0),
    "max_occlusion": (0.0, 0.9),
    "max_iou": (0.0, 1.0),
    "placement_tries": (1, None),
}


def digits_spec(difficulty: str = "easy", **overrides: Any) -> DigitsSpec:
    """A preset's :class:`DigitsSpec` with some fields replaced.

    Args:
        difficulty: ``easy`` or ``hard``.
        **overrides: field name -> value; ranges may be given as lists.

    Returns:
        The checked spec.

    Raises:
        ConfigError: unknown difficulty or field, or a value out of its range.
    """
    if difficulty not in PRESETS:
        raise ConfigError(f"digits: unknown difficulty {difficulty!r}; choose one of {', '.join(DIGITS_DIFFICULTIES)}")
    data = dataclasses.asdict(PRESETS[difficulty])
    data.update(overrides)
    for name in _RANGES:
        if isinstance(data.get(name), list):
            data[name] = tuple(data[name])
    spec = from_dict(DigitsSpec, data, where="digits")
    for name, (low, high) in _RANGES.items():
        value = getattr(spec, name)
        kind = float if name == "contrast" else int
        if (
            not isinstance(value, tuple)
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or (kind is int and not all(float(v).is_integer() for v in value))
        ):
            raise ConfigError(f"digits.{name}: expected a range [low, high] of {kind.__name__}s, got {value!r}")
        value = tuple(kind(v) for v in value)
        if value[0] > value[1] or value[0] < low or (high is not None and value[1] > high):
            bound = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise ConfigError(f"digits.{name}: range {list(value)} must have low <= high, both {bound}")
        setattr(spec, name, value)
    for name, (low, high) in _SCALARS.items():
        value = getattr(spec, name)
        if value < low or (high is not None and value > high):
            bound = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise ConfigError(f"digits.{name}: {value} is out of range {bound}")
    return spec


@lru_cache(maxsize=1)
def _sources() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """scikit-learn's digits as ``[1797, 8, 8]`` float32 in [0, 1], their labels and the source split."""
    from sklearn.datasets import load_digits  # imported late: scikit-learn is slow to import

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(_SOURCE_SPLIT_SEED).permutation(len(labels))
    train, val = [], []
    for digit in range(10):
        members = order[labels[order] == digit]  # this class, in the fixed shuffled order
        n_val = round(len(members) * VAL_SOURCE_FRACTION)
        val.append(members[:n_val])
        train.append(members[n_val:])
    split = {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}
    return images, labels, split


@lru_cache(maxsize=64)
def _upscale_matrix(side: int, source: int = 8) -> np.ndarray:
    """``[side, source]`` bicubic (Keys, a = -0.5) interpolation weights between pixel centres.

    Taps outside the source are dropped and the rest renormalised, so the edges do not darken.
    """
    centres = (np.arange(side) + 0.5) * source / side - 0.5  # output centres in source pixel coordinates
    offsets = np.abs(centres[:, None] - np.arange(source)[None, :])  # [side, source]
    a = -0.5
    near = (a + 2) * offsets**3 - (a + 3) * offsets**2 + 1
    far = a * offsets**3 - 5 * a * offsets**2 + 8 * a * offsets - 4 * a
    weights = np.where(offsets <= 1, near, np.where(offsets < 2, far, 0.0))
    return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def _upscale(digit: np.ndarray, side: int) -> np.ndarray:
    """Bicubic resize of a square digit image to ``side x side``, clipped to [0, 1]."""
    matrix = _upscale_matrix(side, digit.shape[0])
    return np.clip(matrix @ digit @ matrix.T, 0.0, 1.0)


def _ink_opacity(alpha: np.ndarray) -> np.ndarray:
    """Drawing opacity of an upscaled digit: zero up to the ink threshold, then EDGE_OPACITY ramping to 1."""
    ramp = EDGE_OPACITY + (1.0 - EDGE_OPACITY) * (alpha - INK_THRESHOLD) / (1.0 - INK_THRESHOLD)
    return np.where(alpha > INK_THRESHOLD, np.clip(ramp, 0.0, 1.0), 0.0).astype(np.float32)


def _iou(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> float:
    if not others:
        return 0.0
    b = np.asarray(others, dtype=np.float64)
    iw = np.clip(np.minimum(box[2], b[:, 2]) - np.maximum(box[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], b[:, 3]) - np.maximum(box[1], b[:, 1]), 0, None)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    union = area + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return float((inter / union).max())


def _blend(canvas: np.ndarray, y: int, x: int, opacity: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend ``colour`` (``[3]`` or ``[h, w, 3]``) onto ``canvas`` at ``(y, x)`` with ``opacity`` ``[h, w]``.

    The patch may hang over the canvas edge; the part outside is dropped.
    """
    h, w = opacity.shape
    H, W = canvas.shape[:2]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
    if y1 <= y0 or x1 <= x0:
        return
    a = opacity[y0 - y : y1 - y, x0 - x : x1 - x, None]
    if colour.ndim == 3:
        colour = colour[y0 - y : y1 - y, x0 - x : x1 - x]
    region = canvas[y0:y1, x0:x1]
    region *= 1.0 - a
    region += a * colour


class _Scene:
    """Draws one scene; all randomness comes from ``rng``."""

    def __init__(self, rng: np.random.Generator, spec: DigitsSpec, size: int):
        self.rng, self.spec, self.size = rng, spec, size
        self.flipped = bool(rng.random() < spec.polarity_flip)
        low, high = spec.contrast
        # Background level leaves room for the strongest contrast on the ink side.
        level = high + (1.0 - high) * rng.random()
        self.bg_level = 1.0 - level if self.flipped else level
        tint = rng.uniform(-0.08, 0.08, 3) if spec.color else np.zeros(3)
        self.bg = np.clip(self.bg_level + tint, 0.0, 1.0).astype(np.float32)
        self.canvas = np.empty((size, size, 3), dtype=np.float32)
        self.canvas[:] = self.bg
        if spec.gradient > 0:
            angle = rng.uniform(0, 2 * np.pi)
            coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
            ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]  # [H, W]
            self.canvas += (spec.gradient * ramp)[:, :, None]

    def _count(self, bounds: tuple[int, int]) -> int:
        return int(self.rng.integers(bounds[0], bounds[1] + 1))

    def ink_colour(self) -> np.ndarray:
        contrast = self.rng.uniform(*self.spec.contrast)
        level = self.bg_level + contrast if self.flipped else self.bg_level - contrast
        tint = self.rng.uniform(-0.15, 0.15, 3) if self.spec.color else np.zeros(3)
        return np.clip(level + tint, 0.0, 1.0).astype(np.float32)

    def _texture(self, h: int, w: int) -> np.ndarray:
        """A ``[h, w]`` pattern in [-1, 1]: stripes, checks or blocky speckle."""
        rng = self.rng
        kind = rng.integers(3)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        if kind == 0:
            angle, period = rng.uniform(0, np.pi), rng.uniform(3, 10)
            return np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform(0, 6.3))
        if kind == 1:
            cell = int(rng.integers(2, 7))
            return np.where(((yy // cell) + (xx // cell)) % 2 == 0, 1.0, -1.0).astype(np.float32)
        block = int(rng.integers(1, 4))
        coarse = rng.uniform(-1, 1, (h // block + 1, w // block + 1)).astype(np.float32)
        return np.repeat(np.repeat(coarse, block, 0), block, 1)[:h, :w]

    def _patch_shape(self, h: int, w: int, soft: float) -> np.ndarray:
        """Opacity ``[h, w]`` of an ellipse or a rectangle with edges softened over ``soft`` of its half-size."""
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        dy, dx = (yy + 0.5) / h * 2 - 1, (xx + 0.5) / w * 2 - 1
        dist = np.sqrt(dx**2 + dy**2) if self.rng.random() < 0.5 else np.maximum(abs(dx), abs(dy))
        return np.clip((1.0 - dist) / max(soft, 1e-3), 0.0, 1.0)

    def add_clutter(self) -> None:
        """Soft low-contrast blobs, then textured patches, all behind the digits."""
        rng, size = self.rng, self.size
        for _ in range(self._count(self.spec.clutter)):
            h, w = (int(v) for v in rng.integers(size // 8, size // 2 + 1, 2))
            shift = rng.uniform(-0.12, 0.12, 1 if not self.spec.color else 3)
            opacity = self._patch_shape(h, w, soft=0.6) * rng.uniform(0.4, 0.9)
            colour = np.clip(self.bg + shift, 0, 1).astype(np.float32)
            _blend(self.canvas, int(rng.integers(-h // 2, size)), int(rng.integers(-w // 2, size)), opacity, colour)
        for _ in range(self._count(self.spec.textured_clutter)):
            h, w = (int(v) for v in rng.integers(size // 10, size // 3 + 1, 2))
            self._textured_patch(int(rng.integers(-h // 2, size)), int(rng.integers(-w // 2, size)), h, w, 0.2)

    def _textured_patch(self, y: int, x: int, h: int, w: int, soft: float) -> None:
        rng = self.rng
        # Levels span the whole background-to-ink range, so texture competes with ink; tints stay muted
        # like the ink's, so colour alone does not separate the two.
        base = rng.uniform(0, 1) + (rng.uniform(-0.2, 0.2, 3) if self.spec.color else np.zeros(1))
        amplitude = rng.uniform(0.05, 0.3)
        colour = np.clip(base[None, None, :] + amplitude * self._texture(h, w)[:, :, None], 0, 1)
        colour = np.broadcast_to(colour, (h, w, 3)).astype(np.float32)
        _blend(self.canvas, y, x, self._patch_shape(h, w, soft), colour)

    def place(self, side: tuple[int, int], ink: tuple[int, int, int, int], boxes: list) -> tuple[int, int] | None:
        """A cell position whose ink box overlaps ``boxes`` by at most ``max_iou``, or None."""
        for _ in range(self.spec.placement_tries):
            y = int(self.rng.integers(0, self.size - side[0] + 1))
            x = int(self.rng.integers(0, self.size - side[1] + 1))
            box = (x + ink[0], y + ink[1], x + ink[2], y + ink[3])
            if _iou(box, boxes) <= self.spec.max_iou:
                return y, x
        return None

    def add_digits(self, images: np.ndarray, pool: np.ndarray) -> list[tuple[tuple[int, int, int, int], int]]:
        """Place and draw digits from ``pool``; returns ``(xyxy ink box, source index)`` per drawn digit."""
        rng, spec = self.rng, self.spec
        placed: list[tuple[tuple[int, int, int, int], int]] = []
        for _ in range(self._count(spec.digits_per_scene)):
            source = int(pool[rng.integers(len(pool))])
            side = int(rng.integers(spec.digit_size[0], spec.digit_size[1] + 1))
            alpha = _upscale(images[source], side)
            rows, cols = np.nonzero(alpha > INK_THRESHOLD)
            if len(rows) == 0:
                continue
            ink = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
            at = self.place((side, side), ink, [b for b, _ in placed])
            if at is None:
                continue
            y, x = at
            _blend(self.canvas, y, x, _ink_opacity(alpha), self.ink_colour())
            placed.append(((x + ink[0], y + ink[1], x + ink[2], y + ink[3]), source))
        return placed

    def add_distractors(self, boxes: list[tuple[int, int, int, int]]) -> None:
        """Curved ink strokes with no label, kept off the digits."""
        rng, spec = self.rng, self.spec
        for _ in range(self._count(spec.distractors)):
            side = int(rng.integers(spec.digit_size[0], spec.digit_size[1] + 1))
            # Three control points of a quadratic Bezier; the middle one is pushed off the chord so the
            # stroke is curved, not a "1".
            p0, p2 = rng.uniform(0.1, 0.9, (2, 2)) * side
            normal = np.array([-(p2 - p0)[1], (p2 - p0)[0]])
            p1 = (p0 + p2) / 2 + normal * rng.choice([-1, 1]) * rng.uniform(0.3, 0.7)
            t = np.linspace(0, 1, 16)[:, None]
            curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # [16, 2] as (x, y)
            lo = np.floor(curve.min(0)).astype(int) - 2
            hi = np.ceil(curve.max(0)).astype(int) + 2
            w, h = (hi - lo).tolist()
            ink = (0, 0, w, h)
            at = self.place((h, w), ink, boxes) if h < self.size and w < self.size else None
            if at is None:
                continue
            radius = max(0.6, side / 16)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            points = np.stack([xx.ravel(), yy.ravel()], 1) + lo + 0.5  # pixel centres in curve coordinates
            a, b = curve[:-1], curve[1:]  # segments [15, 2]
            ab = b - a
            proj = np.clip(((points[:, None] - a) * ab).sum(-1) / np.maximum((ab**2).sum(-1), 1e-9), 0, 1)
            dist = np.linalg.norm(points[:, None] - (a + proj[..., None] * ab), axis=-1).min(1).reshape(h, w)
            opacity = np.clip(radius + 0.5 - dist, 0, 1).astype(np.float32)
            _blend(self.canvas, at[0], at[1], opacity, self.ink_colour())

    def add_occluders(self, boxes: list[tuple[int, int, int, int]]) -> None:
        """Cover a strip along one side of some digits, at most ``max_occlusion`` of the box."""
        rng, spec = self.rng, self.spec
        for x0, y0, x1, y1 in boxes:
            if rng.random() >= spec.occlusion or spec.max_occlusion <= 0:
                continue
            fraction = rng.uniform(min(0.1, spec.max_occlusion), spec.max_occlusion)
            side = int(rng.integers(4))
            margin = int(rng.integers(0, 3))
            if side < 2:  # left or right strip
                depth = int(np.floor((x1 - x0) * fraction))
                x = x0 if side == 0 else x1 - depth
                y, h, w = y0 - margin, y1 - y0 + 2 * margin, depth
            else:  # top or bottom strip
                depth = int(np.floor((y1 - y0) * fraction))
                y = y0 if side == 2 else y1 - depth
                x, h, w = x0 - margin, depth, x1 - x0 + 2 * margin
            if depth < 1:
                continue
            colour = np.clip(self.bg[None, None] + 0.15 * self._texture(h, w)[:, :, None], 0, 1).astype(np.float32)
            _blend(self.canvas, y, x, np.ones((h, w), dtype=np.float32), colour)

    def finish(self) -> np.ndarray:
        """The scene as ``[H, W, 3]`` uint8, with pixel noise added."""
        if self.spec.noise > 0:
            # Brightness noise, one value per pixel: a third of the cost of per-channel noise.
            noise = self.rng.standard_normal((self.size, self.size, 1), dtype=np.float32)
            noise *= self.spec.noise
            self.canvas += noise
        self.canvas *= 255.0
        self.canvas += 0.5
        return np.clip(self.canvas, 0.0, 255.0, out=self.canvas).astype(np.uint8)


def render_scene(
    rng: np.random.Generator, spec: DigitsSpec, size: int, pool: np.ndarray
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one scene.

    Args:
        rng: the scene's random state.
        spec: generator settings.
        size: image side in pixels.
        pool: indices of the source digits this split may use.

    Returns:
        ``[size, size, 3]`` uint8 RGB image and one ``{"box": xyxy ints, "digit", "source"}`` per digit.
    """
    images, labels, _ = _sources()
    scene = _Scene(rng, spec, size)
    scene.add_clutter()
    placed = scene.add_digits(images, pool)
    boxes = [box for box, _ in placed]
    scene.add_distractors(boxes)
    scene.add_occluders(boxes)
    objects = [{"box": box, "digit": int(labels[source]), "source": source} for box, source in placed]
    return scene.finish(), objects


def make_digits(
    out: str | Path,
    train: int = 2000,
    val: int = 300,
    size: int = 128,
    seed: int = 0,
    difficulty: str = "easy",
    **overrides: Any,
) -> dict[str, Any]:
    """Write the digits dataset to ``out`` in COCO layout.

    Files: ``out/{train,val}/NNNNNN.png``, ``out/annotations/instances_{train,val}.json`` and ``out/detkd.yaml`` with
    categories 1..10 named ``"0"``..``"9"`` (category id = digit + 1). Each annotation also records the
    index of its source digit (``digit_source``).

    Args:
        out: output folder (created; existing files of the same names are overwritten).
        train: number of training scenes.
        val: number of validation scenes.
        size: image side in pixels.
        seed: seed of the scenes; the same seed writes identical files.
        difficulty: preset, ``easy`` or ``hard``.
        **overrides: :class:`DigitsSpec` fields to change from the preset.

    Returns:
        A summary: ``path``, ``difficulty``, ``seed``, ``size``, per split the numbers of ``images``,
        ``annotations`` and ``sources`` (source digits available to the split), and ``settings`` (the file of
        model settings the dataset was made for, see :func:`digits_settings`).

    Raises:
        ConfigError: unknown difficulty or override, a value out of range, or digits larger than the image.
    """
    spec = digits_spec(difficulty, **overrides)
    if train < 0 or val < 0:
        raise ConfigError(f"digits: image counts must be >= 0, got train={train}, val={val}")
    if size < spec.digit_size[1]:
        raise ConfigError(f"digits: image size {size} is smaller than the largest digit ({spec.digit_size[1]} px)")
    out = Path(out)
    summary: dict[str, Any] = {"path": str(out), "difficulty": difficulty, "seed": seed, "size": size}
    # PNG encoding costs more than drawing and releases the GIL, so writer threads overlap it with drawing.
    with ThreadPoolExecutor(max_workers=2) as writers:
        pending: deque[Future] = deque()
        for split_index, (split, count) in enumerate((("train", train), ("val", val))):
            summary[split] = _write_split(
                out, split, split_index, count, size, seed, difficulty, spec, writers, pending
            )
        while pending:
            pending.popleft().result()
    write_settings(out, size)
    summary["settings"] = str(out / DATASET_SETTINGS)
    return summary


def digits_settings(size: int = 128) -> dict[str, Any]:
    """The model settings the digits were made for: the slim preset at the images' own size, no pretrained
    backbone (the defaults are torchvision's, for real photographs)."""
    return {"model": {"preset": "slim", "backbone_weights": "none", "min_size": size, "max_size": size}}


def write_settings(out: Path, size: int) -> None:
    """``out/detkd.yaml``: :func:`digits_settings`, which ``detkd train``/``distill`` apply under ``--config``."""
    import yaml

    header = (
        "# Settings this dataset was made for, written by `detkd data digits`. detkd train and distill apply them\n"
        "# above the defaults and below --config and key=value overrides.\n"
    )
    (out / DATASET_SETTINGS).write_text(header + yaml.safe_dump(digits_settings(size), sort_keys=False))


def _save_png(pixels: np.ndarray, path: Path) -> None:
    # Huffman-only deflate: these images are noisy, so a full search costs time and saves little space.
    Image.fromarray(pixels).save(path, compress_level=1, compress_type=2)


def _write_split(
    out: Path,
    split: str,
    split_index: int,
    count: int,
    size: int,
    seed: int,
    difficulty: str,
    spec: DigitsSpec,
    writers: ThreadPoolExecutor,
    pending: deque[Future],
) -> dict[str, int]:
    """Draw one split's scenes, queue their PNGs on ``writers`` and write its annotation file; returns counts."""
    pool = _sources()[2][split]
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        pixels, objects = render_scene(np.random.default_rng([seed % 2**64, split_index, i]), spec, size, pool)
        file_name = f"{i:06d}.png"
        pending.append(writers.submit(_save_png, pixels, image_dir / file_name))
        while len(pending) > 16:  # bounds the images held in memory
            pending.popleft().result()
        images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": obj["digit"] + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "digit_source": obj["source"],
                }
            )
    categories = [{"id": d + 1, "name": name, "supercategory": "digit"} for d, name in enumerate(DIGIT_CLASSES)]
    info = {
        "description": "detkd digits: scenes of scikit-learn handwritten digits",
        "difficulty": difficulty,
        "seed": seed,
        "spec": dataclasses.asdict(spec),
    }
    coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
    return {"images": count, "annotations": len(annotations), "sources": len(pool)}
