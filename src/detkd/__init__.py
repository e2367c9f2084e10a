"""detkd: knowledge distillation for object detectors."""

from detkd._check import check_torchvision_ops

check_torchvision_ops()

__version__ = "0.1.0"
