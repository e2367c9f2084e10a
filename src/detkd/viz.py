"""Pictures: detections, masks and selected regions drawn over images, and training curves.

All drawing functions take and return ``HxWx3 uint8`` numpy arrays so they compose; :func:`save_png` writes one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from detkd.errors import DetkdError

PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
]


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the file-only Agg backend, or a one-line error saying how to install it.

    Raises:
        DetkdError: matplotlib is not installed (it is the optional ``plots`` extra).
    """
    try:
        import matplotlib
    except ImportError:
        raise DetkdError(
            "drawing charts needs matplotlib, which is not installed: `pip install 'detkd[plots]'`"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """``[3, H, W]`` float in [0, 1] (tensor) or ``HxWx3`` array -> ``HxWx3`` uint8."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image.clip(0, 255).astype(np.uint8)


def overlay_mask(
    image: np.ndarray, mask: Tensor | np.ndarray, color: tuple[int, int, int] = (255, 0, 0), alpha: float = 0.6
) -> np.ndarray:
    """Blend a ``[h, w]`` mask with values in [0, 1] (any resolution; resized to the image) over ``image``."""
    mask = mask.detach().float().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask, dtype=np.float32)
    h, w = image.shape[:2]
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((w, h), Image.NEAREST))
    mask = np.clip(mask, 0, 1)[..., None] * alpha
    out = image.astype(np.float32) * (1 - mask) + np.array(color, dtype=np.float32) * mask
    return out.clip(0, 255).astype(np.uint8)


def draw_boxes(
    image: np.ndarray,
    boxes: Tensor | np.ndarray,
    color: tuple[int, int, int] | None = None,
    labels: list[str] | None = None,
    width: int = 1,
) -> np.ndarray:
    """Draw xyxy boxes (image pixels) on a copy of ``image``; colours cycle through a palette if none given."""
    if isinstance(boxes, Tensor):
        boxes = boxes.detach().float().cpu().numpy()
    pil = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(pil)
    for i, box in enumerate(np.asarray(boxes).reshape(-1, 4)):
        c = color or PALETTE[i % len(PALETTE)]
        draw.rectangle([float(v) for v in box], outline=c, width=width)
        if labels is not None and i < len(labels):
            draw.text((float(box[0]) + 1, float(box[1]) + 1), labels[i], fill=c)
    return np.asarray(pil)


def draw_detections(
    image: Tensor | np.ndarray, boxes: Tensor | np.ndarray, labels: Tensor | np.ndarray, captions: list[str]
) -> np.ndarray:
    """Boxes with a caption each (e.g. ``"cat 0.91"``) over an image, one colour per class label.

    Args:
        image: ``[3, H, W]`` float tensor in [0, 1] or ``HxWx3`` uint8 array.
        boxes: ``[N, 4]`` xyxy pixels.
        labels: ``[N]`` class labels (they pick the colours).
        captions: ``N`` texts written at the top-left corner of each box, on a filled band.

    Returns:
        The picture, ``HxWx3`` uint8.
    """
    picture = to_uint8(image)
    boxes = boxes.detach().float().cpu().numpy() if isinstance(boxes, Tensor) else np.asarray(boxes, np.float32)
    labels = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    pil = Image.fromarray(picture)
    draw = ImageDraw.Draw(pil)
    width = max(1, round(min(picture.shape[:2]) / 250))
    for box, label, caption in zip(boxes.reshape(-1, 4), labels.reshape(-1), captions):
        color = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), caption)
        # The caption sits above the box, or inside it when the box touches the top edge.
        ty = y0 - (bottom - top) - 2 if y0 >= (bottom - top) + 2 else y0
        tx = max(0.0, min(x0, picture.shape[1] - (right - left) - 2))  # kept inside the right edge
        draw.rectangle([tx, ty, tx + (right - left) + 2, ty + (bottom - top) + 2], fill=color)
        draw.text((tx + 1, ty - top + 1), caption, fill=(255, 255, 255))
    return np.asarray(pil)


def tile(images: list[np.ndarray], columns: int = 4, pad: int = 2) -> np.ndarray:
    """Arrange images (any sizes) in a grid on a white background."""
    if not images:
        return np.full((1, 1, 3), 255, np.uint8)
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y : y + im.shape[0], x : x + im.shape[1]] = im
    return out


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so small images stay readable."""
    return np.asarray(Image.fromarray(image).resize((image.shape[1] * factor, image.shape[0] * factor), Image.NEAREST))


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def unnormalize(batch_image: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """Undo a detector's input normalisation: ``[3, H, W]`` back to [0, 1]."""
    m = torch.tensor(mean, device=batch_image.device)[:, None, None]
    s = torch.tensor(std, device=batch_image.device)[:, None, None]
    return (batch_image * s + m).clamp(0, 1)


def _labels_overlap(fig: Any, labels: list[Any]) -> bool:
    """Whether any two of ``labels`` (matplotlib texts) overlap as drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels if t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _wrap(name: str, width: int = 14) -> str:
    """Break a long row name at its ``+``, ``_`` or ``-`` joins so a tick label stays narrow."""
    if len(name) <= width:
        return name
    lines, line = [], ""
    for part in re.split(r"(?<=[+_\-])", name):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return "\n".join([*lines, line])


def map_bar_chart(
    names: list[str],
    means: list[float],
    stds: list[float],
    path: str | Path,
    colors: list[str] | None = None,
    baseline: float | None = None,
    title: str = "",
    ylabel: str = "val mAP@[.5:.95]",
) -> Path:
    """Bars of mAP (mean ± std) per row, with each bar's value written on it.

    The axis starts at zero, so the bars' heights compare as the numbers do (a cut axis inflates small gains); long
    names are wrapped and, if the labels would still overlap, turned.

    Args:
        names: one label per bar.
        means: bar heights.
        stds: error bars (0 where there is one seed).
        path: the PNG to write.
        colors: one matplotlib colour per bar.
        baseline: draw a dashed line at this value.
        title: the chart's title.
        ylabel: the y axis label.

    Returns:
        ``path``.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.4))
    bars = ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
    ax.bar_label(bars, labels=[f"{m:.3f}" for m in means], fontsize=7, padding=2)
    if baseline is not None:
        ax.axhline(baseline, color="#aa0000", lw=0.8, ls="--", label="baseline")
        ax.legend(loc="lower right", fontsize=7)
    top = max((m + s for m, s in zip(means, stds)), default=0.0)
    ax.set_ylim(0.0, min(1.0, top * 1.15 + 0.02) if top < 1.0 else top * 1.05)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xticks(range(len(names)), [_wrap(n) for n in names], fontsize=8)
    if _labels_overlap(fig, ax.get_xticklabels()):
        ax.set_xticks(range(len(names)), [_wrap(n) for n in names], fontsize=8, rotation=90)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def eval_curve(steps: list[int], series: dict[str, list[float | None]], path: str | Path) -> Path:
    """Evaluation metrics over training steps, y axis from zero; points are marked, and written with their values
    when there are few of them (a run evaluated once shows one labelled point, not an empty chart).

    Args:
        steps: the evaluation steps.
        series: metric name -> one value per step (None where undefined; left out).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    top = 0.0
    for (name, values), marker in zip(series.items(), "os^dv"):
        pts = [(s, v) for s, v in zip(steps, values) if v is not None and v == v]
        if not pts:
            continue
        xs, ys = zip(*pts)
        (line,) = ax.plot(xs, ys, marker=marker, ls="-", label=name)
        top = max(top, *ys)
        if len(pts) <= 3:
            for x, y in pts:
                ax.annotate(
                    f"{y:.3f}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                    fontsize=7,
                    color=line.get_color(),
                )
    if len(set(steps)) == 1:
        ax.set_xlim(steps[0] - 1, steps[0] + 1)  # one step: centre it rather than let the axis collapse
        ax.set_xticks([steps[0]])
    ax.set_ylim(0.0, min(1.0, top * 1.2 + 0.05))
    ax.set_xlabel("step")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
