"""CWD: Channel-wise Knowledge Distillation for Dense Prediction (Shu et al., ICCV 2021, arXiv 2011.13256), a
feature baseline detection-KD papers compare against.

Each channel of an FPN map becomes a distribution over the cells of its level, ``softmax(x_c / tau)`` over the
``H x W`` cells, and the student's distribution of every channel is pulled towards the teacher's with the
Kullback-Leibler divergence ``KL(teacher || student)``, scaled by ``tau^2``, summed over cells and averaged over
images and channels. Where a channel fires most in the teacher is what the student learns, not the activations'
scale: adding a constant to a channel of either map changes nothing.

Defaults follow the released configs (MMRazor's ``configs/distill/mmdet/cwd``, Faster R-CNN and RetinaNet R101 to
R50): every FPN level both detectors share, ``tau = 1``, weight 10 per level, summed over levels. With equal
channel counts nothing is learned besides the student; where they differ, a 1x1 conv maps the student to the
teacher's width (the paper's alignment for students of another width); when the maps of a level differ in size,
the student's is resized to the teacher's.

Options: ``levels`` (default: every level both have), ``tau`` (1.0), ``level_weight`` (10).
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
class CWDConfig(MethodConfig):
    levels: list[str] | None = None
    tau: float = 1.0
    level_weight: float = 10.0


def channel_kl(s: Tensor, t: Tensor, tau: float = 1.0) -> Tensor:
    """``tau^2 * KL(softmax(t_c / tau) || softmax(s_c / tau))`` over the cells of each channel of two ``[N, C, H,
    W]`` maps, summed over cells and averaged over ``N`` and ``C``; fp32."""
    s_log = F.log_softmax(s.float().flatten(2) / tau, dim=2)
    t_log = F.log_softmax(t.float().flatten(2) / tau, dim=2)
    kl = (t_log.exp() * (t_log - s_log)).sum(2)  # [N, C]
    return tau**2 * kl.mean()


class CWD(Distiller):
    name = "cwd"
    summary = "channel-wise distillation: each FPN channel's spatial softmax, KL to the teacher's (Shu et al. 2021)"
    Config = CWDConfig
    heads = (TwoStageHead, DenseHead)

    def __init__(self, cfg: CWDConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        if cfg.tau <= 0:
            raise ConfigError(f"cwd.tau must be > 0, got {cfg.tau}")
        pairs = pair_levels(student.feature_info, teacher.feature_info, cfg.levels)
        self.connectors = nn.ModuleDict({s.name: width_adapter(s, t) for s, t in pairs})

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        losses = []
        for level, connector in self.connectors.items():
            t_feat = teacher.features[level]
            losses.append(channel_kl(connector(student.features[level], t_feat.shape[-2:]), t_feat, self.cfg.tau))
        return {"kd_feat": self.cfg.level_weight * torch.stack(losses).sum()}
