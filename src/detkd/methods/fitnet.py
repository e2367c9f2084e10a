"""FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015, arXiv 1412.6550), applied to detector FPNs.

The student's FPN maps pass through an adapter (a conv per level, sized from ``feature_info``; identity-
initialised when the channel counts match) and are pulled towards the teacher's maps with a mean squared error
over every cell. It is the plain "hint" baseline every detection-KD paper compares against: no notion of where
the objects are.

Options: ``levels`` (default: every level both detectors have), ``kernel`` (adapter kernel, 1 or 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detkd.methods.base import Distiller, MethodConfig
from detkd.methods.connectors import build_connectors
from detkd.models.outputs import DenseHead, Detector, DetOutputs, SetHead, TwoStageHead


@dataclass
class FitNetConfig(MethodConfig):
    levels: list[str] | None = None
    kernel: int = 1


class FitNet(Distiller):
    name = "fitnet"
    summary = "FPN feature imitation through an adapter, MSE over all cells (Romero et al. 2015)"
    Config = FitNetConfig
    heads = (TwoStageHead, DenseHead, SetHead)

    def __init__(self, cfg: FitNetConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        self.connectors = build_connectors(student.feature_info, teacher.feature_info, cfg.levels, cfg.kernel)

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        losses = []
        for level, connector in self.connectors.items():
            t_feat = teacher.features[level]
            s_feat = connector(student.features[level], t_feat.shape[-2:])
            losses.append((s_feat.float() - t_feat.float()).pow(2).mean())
        return {"kd_feat": torch.stack(losses).mean()}
