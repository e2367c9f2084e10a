"""Student -> teacher feature adapters, sized from ``feature_info`` (never from config numbers)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from detkd.errors import BuildError
from detkd.models.outputs import FeatureSpec


def pair_levels(
    student: list[FeatureSpec], teacher: list[FeatureSpec], levels: list[str] | None = None
) -> list[tuple[FeatureSpec, FeatureSpec]]:
    """Pair student and teacher levels by name (``p3`` with ``p3``).

    Args:
        student: the student's feature_info.
        teacher: the teacher's feature_info.
        levels: restrict to these names; None = every level both have.

    Raises:
        BuildError: naming both sides' levels and shapes when nothing (or a requested level) cannot be paired.
    """
    s_by, t_by = {f.name: f for f in student}, {f.name: f for f in teacher}

    def describe(info: list[FeatureSpec]) -> str:
        return ", ".join(f"{f.name}[{f.channels}ch, stride {f.stride}]" for f in info)

    names = levels if levels is not None else [n for n in s_by if n in t_by]
    missing = [n for n in names if n not in s_by or n not in t_by]
    if missing or not names:
        raise BuildError(
            f"cannot pair feature levels {missing or '(none in common)'}: student has {describe(student)}; "
            f"teacher has {describe(teacher)}"
        )
    return [(s_by[n], t_by[n]) for n in names]


class Connector(nn.Module):
    """Map a student level onto its teacher level: conv to the teacher's channels, resize if strides differ.

    A single conv between equal channel counts starts as the identity.

    Args:
        student: the student level.
        teacher: the teacher level.
        kernel: 1 or 3 (kernel of the conv); 0 = identity (requires equal channels).
        layers: number of convs (ReLU between them), e.g. LGD uses 3.
    """

    def __init__(self, student: FeatureSpec, teacher: FeatureSpec, kernel: int = 1, layers: int = 1):
        super().__init__()
        self.student_spec, self.teacher_spec = student, teacher
        if kernel == 0:
            if student.channels != teacher.channels:
                raise BuildError(
                    f"identity connector needs equal channels: student {student.name} has {student.channels}, "
                    f"teacher {teacher.name} has {teacher.channels}"
                )
            self.net = nn.Identity()
        else:
            convs: list[nn.Module] = []
            channels = student.channels
            for i in range(layers):
                convs.append(nn.Conv2d(channels, teacher.channels, kernel, padding=kernel // 2))
                if i < layers - 1:
                    convs.append(nn.ReLU(inplace=True))
                channels = teacher.channels
            self.net = nn.Sequential(*convs)
            if layers == 1 and student.channels == teacher.channels:
                # Start from the identity: the student is compared with the teacher as it is, and the adapter
                # learns only the correction it needs.
                nn.init.dirac_(convs[0].weight)
                nn.init.zeros_(convs[0].bias)

    def forward(self, s_feat: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Adapt ``s_feat`` ``[B, Cs, H, W]``; resize to ``size`` (the teacher map's ``(H, W)``) when it differs."""
        out = self.net(s_feat)
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


def width_adapter(student: FeatureSpec, teacher: FeatureSpec) -> Connector:
    """The identity where the widths agree (nothing to learn), a 1x1 conv to the teacher's width where they differ:
    for methods whose released code compares the maps as they are (PKD, CWD, FGD)."""
    return Connector(student, teacher, kernel=0 if student.channels == teacher.channels else 1)


def build_connectors(
    student: list[FeatureSpec],
    teacher: list[FeatureSpec],
    levels: list[str] | None = None,
    kernel: int = 1,
    layers: int = 1,
) -> nn.ModuleDict:
    """One :class:`Connector` per paired level, keyed by level name."""
    return nn.ModuleDict({s.name: Connector(s, t, kernel, layers) for s, t in pair_levels(student, teacher, levels)})
