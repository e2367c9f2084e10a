"""detkd: knowledge distillation for object detectors.

The Python API (see docs/python-api.md) is importable from here: :func:`load`, :func:`load_config`,
:func:`train`, :func:`distill`, :func:`evaluate`; it lives in :mod:`detkd.api` and is imported on first use.
"""

from importlib import metadata as _metadata
from typing import Any

from detkd._check import TorchMismatchError, check_torchvision_ops

# A mismatched torch/torchvision pair fails deep inside torchvision with a cryptic message; fail here instead,
# with the sentence that says how to fix it. TorchMismatchError is an ImportError: nothing exits the interpreter.
check_torchvision_ops()

try:
    __version__ = _metadata.version("detkd")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Predictor", "TorchMismatchError", "__version__", "distill", "evaluate", "load", "load_config", "train"]
_API = {"Predictor", "distill", "evaluate", "load", "load_config", "train"}


def __getattr__(name: str) -> Any:
    # The API pulls in the data, model and training modules; `import detkd` alone stays cheap.
    if name in _API:
        from detkd import api

        return getattr(api, name)
    raise AttributeError(f"module 'detkd' has no attribute {name!r}")
