"""Import-time check that torch and torchvision's compiled ops belong together."""

from __future__ import annotations

FIX = (
    "detkd: torchvision's compiled ops do not load against the installed torch (the two builds do not match); "
    "reinstall them as a pair in a fresh virtual environment, e.g. `python -m venv .venv && "
    ".venv/bin/pip install torch torchvision` (pip then picks builds made for each other; or run `make test`, "
    "which does this)."
)


class TorchMismatchError(ImportError):
    """torch and torchvision are installed but their builds do not match.

    An :class:`ImportError`, so ``import detkd`` fails the way a missing dependency does, and a program or notebook
    that imports detkd can catch it instead of being exited.
    """


def probe_torchvision_ops() -> None:
    """Run one of torchvision's compiled ops; raises whatever a mismatched pair raises."""
    import torch
    import torchvision  # noqa: F401
    from torchvision.ops import nms

    nms(torch.zeros(1, 4), torch.zeros(1), 0.5)


def check_torchvision_ops() -> None:
    """Raise :class:`TorchMismatchError` with a one-sentence fix if torchvision's ops cannot run."""
    try:
        probe_torchvision_ops()
    except ModuleNotFoundError:
        raise
    except Exception as exc:  # the failure modes of a mismatched pair are many: RuntimeError, AttributeError...
        raise TorchMismatchError(f"{FIX} (underlying error: {type(exc).__name__}: {exc})") from None
