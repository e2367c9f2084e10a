"""Distillation methods: one file per method, registered in ``METHODS`` here, by explicit import.

A new method is its own file in this package plus one entry in :data:`BUILTIN_METHODS`.
"""

from detkd.methods.base import METHODS, Distiller, MethodConfig, ScheduleConfig, register
from detkd.methods.cwd import CWD
from detkd.methods.defeat import DeFeat
from detkd.methods.detrdistill import DETRDistill
from detkd.methods.fgd import FGD
from detkd.methods.fgfi import FGFI
from detkd.methods.fitnet import FitNet
from detkd.methods.gkd import GKD
from detkd.methods.ida import IDa
from detkd.methods.kd import KD
from detkd.methods.lgd import LGD
from detkd.methods.pkd import PKD
from detkd.methods.tar import TAR

# The methods detkd ships; each is registered under its ``name``.
BUILTIN_METHODS: tuple[type[Distiller], ...] = (
    TAR,
    GKD,
    IDa,
    LGD,
    DETRDistill,
    FitNet,
    KD,
    FGFI,
    DeFeat,
    PKD,
    CWD,
    FGD,
)
for _method in BUILTIN_METHODS:
    register(_method)

__all__ = ["BUILTIN_METHODS", "METHODS", "Distiller", "MethodConfig", "ScheduleConfig", "register"]
