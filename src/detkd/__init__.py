"""detkd: knowledge distillation for object detectors."""

from detkd._check import TorchMismatchError, check_torchvision_ops

try:
    check_torchvision_ops()
except TorchMismatchError as exc:
    # A mismatched torch/torchvision pair fails deep inside torchvision with a cryptic message; stop here with
    # the one sentence that says how to fix it.
    raise SystemExit(str(exc)) from None

__version__ = "0.1.0"
