"""Distillation methods: one file per method, each registered in ``METHODS`` on import."""

from detkd.methods import defeat, detrdistill, fgfi, fitnet, gkd, ida, kd, lgd, tar  # noqa: F401  (registration)
from detkd.methods.base import METHODS, Distiller, MethodConfig, ScheduleConfig

__all__ = ["METHODS", "Distiller", "MethodConfig", "ScheduleConfig"]
