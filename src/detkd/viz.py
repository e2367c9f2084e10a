"""Pictures: detections, masks and selected regions drawn over images, and training curves.

All drawing functions take and return ``HxWx3 uint8`` numpy arrays so they compose; :func:`save_png` writes one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

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
