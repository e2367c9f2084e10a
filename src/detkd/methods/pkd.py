"""PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient (Cao et al.,
NeurIPS 2022, arXiv 2207.02039), a feature baseline detection-KD papers compare against.

The student imitates the teacher's FPN maps after both are standardised channel by channel: every channel of a
level is brought to zero mean and unit standard deviation over the batch and all cells, so the loss
``mean((norm(S) - norm(T))^2) / 2`` per level is ``1 - r`` with ``r`` the Pearson correlation of the two channels.
The magnitude of the teacher's activations, which differs across detectors and levels and makes a plain MSE
need a per-pair scale, no longer matters: what is imitated is where each channel fires, relative to itself.

Defaults follow the released configs (MMRazor's ``configs/distill/mmdet/pkd``): the first four FPN levels both
detectors share (P2-P5 of Faster R-CNN, P3-P6 of RetinaNet and FCOS), weight 6 per level for two-stage students
and 10 for one-stage ones, summed over levels. The standard deviation is the unbiased one plus ``1e-6``. When the
two maps of a level differ in size (different input sizes), the larger one is resized bilinearly to the smaller,
as in the released code. With equal channel counts nothing is learned besides the student; where the channel
counts differ (a student FPN narrower than the teacher's), a 1x1 conv maps the student to the teacher's width,
which the released code, made for equal FPN widths, does not have.

Options: ``levels`` (default: the first ``num_levels`` levels both have), ``num_levels`` (4), ``level_weight``
(None: 6 for two-stage, 10 for one-stage students).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.errors import ConfigError
from detkd.methods.base import Distiller, MethodConfig
from detkd.methods.connectors import pair_levels, width_adapter
from detkd.models.outputs import DenseHead, Detector, DetOutputs, TwoStageHead


@dataclass
class PKDConfig(MethodConfig):
    levels: list[str] | None = None
    num_levels: int = 4
    level_weight: float | None = None  # None: the released configs' 6 (two-stage) or 10 (one-stage)


def standardise(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Each channel of ``[N, C, H, W]`` to zero mean and unit (unbiased) standard deviation over ``N, H, W``; fp32."""
    x = x.float()
    flat = x.transpose(0, 1).flatten(1)  # [C, N*H*W]
    mean = flat.mean(1)[None, :, None, None]
    std = flat.std(1)[None, :, None, None]
    return (x - mean) / (std + eps)


def pearson_loss(s: Tensor, t: Tensor) -> Tensor:
    """``mean((standardise(s) - standardise(t))^2) / 2`` of two maps of one level; the larger is resized to the
    smaller first."""
    if s.shape[-2:] != t.shape[-2:]:
        if s.shape[-2] > t.shape[-2]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        else:
            t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
    return (standardise(s) - standardise(t)).pow(2).mean() / 2


class PKD(Distiller):
    name = "pkd"
    summary = "FPN imitation of channel-standardised maps, i.e. 1 - Pearson correlation (Cao et al. 2022)"
    Config = PKDConfig
    heads = (TwoStageHead, DenseHead)

    def __init__(self, cfg: PKDConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        if cfg.num_levels < 1:
            raise ConfigError(f"pkd.num_levels must be >= 1, got {cfg.num_levels}")
        pairs = pair_levels(student.feature_info, teacher.feature_info, cfg.levels)
        if cfg.levels is None:
            pairs = pairs[: cfg.num_levels]
        self.connectors = nn.ModuleDict({s.name: width_adapter(s, t) for s, t in pairs})
        two_stage = student.head_type is TwoStageHead
        self.level_weight = cfg.level_weight if cfg.level_weight is not None else (6.0 if two_stage else 10.0)

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        losses = [
            pearson_loss(connector(student.features[level]), teacher.features[level])
            for level, connector in self.connectors.items()
        ]
        return {"kd_feat": self.level_weight * torch.stack(losses).sum()}
