"""FGD: Focal and Global Knowledge Distillation for Detectors (Yang et al., CVPR 2022, arXiv 2111.11837), a
feature baseline detection-KD papers compare against.

Per FPN level, with ``S`` and ``T`` the student's (after a 1x1 conv when the widths differ) and the teacher's maps:

- **attention** of a map ``F`` at temperature ``tau``: spatial ``A_s = H W softmax_cells(mean_c |F| / tau)`` and
  channel ``A_c = C softmax_channels(mean_cells |F| / tau)``;
- **focal masks** from the ground-truth boxes: a cell inside a box gets ``1 / (box height x box width)`` in cells
  (the largest over overlapping boxes), every other cell ``1 / (number of background cells)`` of its image;
- ``kd_fg = sum M_fg A_s^T A_c^T (S - T)^2 / N`` and ``kd_bg`` the same with the background mask, both weighted
  by the *teacher's* attention;
- ``kd_attention = (sum |A_c^S - A_c^T| + sum |A_s^S - A_s^T|) / N``: the student's attention imitates the
  teacher's;
- ``kd_global = sum (G_S(S) - G_T(T))^2 / N`` with ``G(F) = F + transform(context(F))`` a global-context block
  (a 1x1 conv scores the cells, their softmax pools ``F`` into one vector, a bottleneck ``C -> C/2 -> C`` with
  LayerNorm and ReLU maps it back, added to every cell), one block for each side, trained with the student; the
  last conv starts at zero, so at first ``kd_global`` is a plain summed squared error.

Sums run over the batch, channels and cells and are divided by the batch size ``N``; each term is summed over
levels. Defaults follow the released configs (yzd-v/FGD, ``configs/distillers/fgd``): ``tau = 0.5``; Faster
R-CNN students on P2-P5 with weights ``alpha, beta, gamma, lambda = 5e-5, 2.5e-5, 5e-5, 5e-7`` (``kd_fg``,
``kd_bg``, ``kd_attention``, ``kd_global``); RetinaNet and FCOS students on every level with ``1e-3, 5e-4, 5e-4,
5e-6``. They are ``term_weights`` (a partial override keeps the others). These weights suit 256-channel FPNs at
COCO sizes, where the sums are large; on other sizes, ``distill.calibrate=auto`` measures the terms instead.

``mask_geometry``: ``paper`` (default) maps a box onto a level through the padded batch size, as the features are
laid out; ``released`` reproduces the released code, which scales boxes by the image's own (unpadded) size and
fills the mask with its x range on the rows and its y range on the columns. Cells of a box are those from
``floor`` of its low side to ``ceil`` of its high side, both included, in both geometries.

Options: ``levels`` (default as above), ``temperature`` (0.5), ``mask_geometry``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.errors import ConfigError
from detkd.methods.base import Distiller, MethodConfig
from detkd.methods.connectors import pair_levels, width_adapter
from detkd.models.outputs import DenseHead, Detector, DetOutputs, FeatureSpec, TwoStageHead

# (kd_fg, kd_bg, kd_attention, kd_global) of the released configs.
TWO_STAGE_WEIGHTS = {"kd_fg": 5e-5, "kd_bg": 2.5e-5, "kd_attention": 5e-5, "kd_global": 5e-7}
ONE_STAGE_WEIGHTS = {"kd_fg": 1e-3, "kd_bg": 5e-4, "kd_attention": 5e-4, "kd_global": 5e-6}


@dataclass
class FGDConfig(MethodConfig):
    levels: list[str] | None = None
    temperature: float = 0.5
    mask_geometry: Literal["paper", "released"] = "paper"


def attention(x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Spatial ``[N, H, W]`` and channel ``[N, C]`` attention of ``[N, C, H, W]`` (each sums to its count)."""
    n, c, h, w = x.shape
    value = x.abs()
    spatial = h * w * F.softmax(value.mean(1).flatten(1) / temperature, dim=1)
    channel = c * F.softmax(value.mean((2, 3)) / temperature, dim=1)
    return spatial.view(n, h, w), channel


def focal_masks(
    boxes: list[Tensor],
    level_shape: tuple[int, int],
    batch_shape: tuple[int, int],
    image_sizes: list[tuple[int, int]],
    geometry: str = "paper",
) -> tuple[Tensor, Tensor]:
    """Foreground ``[N, H, W]`` (``1 / box area in cells``, max over boxes) and background (``1 / background
    cells`` of each image) masks of one level; boxes are xyxy in input pixels (see the module docstring)."""
    h, w = level_shape
    device = boxes[0].device if boxes else torch.device("cpu")
    fg = torch.zeros(len(boxes), h, w, device=device)
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    for i, b in enumerate(boxes):
        if len(b) == 0:
            continue
        ref_h, ref_w = batch_shape if geometry == "paper" else image_sizes[i]
        b = b.float()
        x1, x2 = (b[:, 0] * w / ref_w).floor(), (b[:, 2] * w / ref_w).ceil()
        y1, y2 = (b[:, 1] * h / ref_h).floor(), (b[:, 3] * h / ref_h).ceil()
        value = 1.0 / ((y2 + 1 - y1) * (x2 + 1 - x1))  # [B]
        if geometry == "paper":
            inside = (rows >= y1[:, None, None]) & (rows <= y2[:, None, None])
            inside = inside & (cols >= x1[:, None, None]) & (cols <= x2[:, None, None])
        else:  # the released code's row range is the box's x range, its column range the y range
            inside = (rows >= x1[:, None, None]) & (rows <= x2[:, None, None])
            inside = inside & (cols >= y1[:, None, None]) & (cols <= y2[:, None, None])
        fg[i] = (inside.float() * value[:, None, None]).amax(0)
    bg = (fg == 0).float()
    bg = bg / bg.sum((1, 2), keepdim=True).clamp(min=1.0)
    return fg, bg


class GlobalContext(nn.Module):
    """``F + bottleneck(softmax-pooled F)``: a 1x1 conv scores the cells, their softmax pools the map into one
    ``[C]`` vector, ``C -> C/2`` (LayerNorm, ReLU) ``-> C`` maps it back (last conv zero-initialised)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // 2)
        self.score = nn.Conv2d(channels, 1, 1)
        nn.init.kaiming_normal_(self.score.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.score.bias)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        weights = F.softmax(self.score(x).flatten(2), dim=2)  # [N, 1, HW]
        context = torch.einsum("nck,nok->nc", x.flatten(2), weights)[:, :, None, None]
        return x + self.transform(context)


class FGDLevel(nn.Module):
    """The learned parts of one level: the width adapter (identity when equal) and both global-context blocks."""

    def __init__(self, student: FeatureSpec, teacher: FeatureSpec):
        super().__init__()
        self.align = width_adapter(student, teacher)
        self.context_s = GlobalContext(teacher.channels)
        self.context_t = GlobalContext(teacher.channels)


class FGD(Distiller):
    name = "fgd"
    summary = "focal (box-masked, attention-weighted) and global-context feature imitation (Yang et al. 2022)"
    Config = FGDConfig
    heads = (TwoStageHead, DenseHead)

    def __init__(self, cfg: FGDConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        if cfg.temperature <= 0:
            raise ConfigError(f"fgd.temperature must be > 0, got {cfg.temperature}")
        two_stage = student.head_type is TwoStageHead
        pairs = pair_levels(student.feature_info, teacher.feature_info, cfg.levels)
        if cfg.levels is None and two_stage:
            pairs = pairs[:4]  # P2-P5: the released Faster R-CNN configs leave the pooled P6 out
        self.levels = nn.ModuleDict({s.name: FGDLevel(s, t) for s, t in pairs})
        defaults = TWO_STAGE_WEIGHTS if two_stage else ONE_STAGE_WEIGHTS
        cfg.term_weights = {**defaults, **cfg.term_weights}

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        tau = self.cfg.temperature
        boxes = [t["boxes"] for t in targets]
        terms: dict[str, list[Tensor]] = {"kd_fg": [], "kd_bg": [], "kd_attention": [], "kd_global": []}
        for level, parts in self.levels.items():
            t = teacher.features[level].float()
            s = parts.align(student.features[level], t.shape[-2:]).float()
            n = len(s)
            spatial_t, channel_t = attention(t, tau)
            spatial_s, channel_s = attention(s, tau)
            fg, bg = focal_masks(
                boxes, tuple(t.shape[-2:]), student.batch_shape, student.image_sizes, self.cfg.mask_geometry
            )
            diff2 = (s - t).pow(2) * spatial_t[:, None] * channel_t[:, :, None, None]
            terms["kd_fg"].append((diff2 * fg[:, None]).sum() / n)
            terms["kd_bg"].append((diff2 * bg[:, None]).sum() / n)
            terms["kd_attention"].append(
                ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n
            )
            terms["kd_global"].append((parts.context_s(s) - parts.context_t(t)).pow(2).sum() / n)
        return {key: torch.stack(values).sum() for key, values in terms.items()}
