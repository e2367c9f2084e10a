"""Import-time check that torch and torchvision's compiled ops belong together."""

from __future__ import annotations

FIX = (
    "detkd: torchvision's compiled ops do not load against the installed torch (the two builds do not match); "
    "reinstall them as a pair in a fresh virtual environment, e.g. `python -m venv .venv && "
    ".venv/bin/pip install 'torch>=2.4' 'torchvision>=0.19'` (or run `make test`, which does this)."
)


class TorchMismatchError(ImportError):
    """torch and torchvision are installed but their builds do not match."""


def check_torchvision_ops() -> None:
    """Raise :class:`TorchMismatchError` with a one-sentence fix if torchvision's ops cannot run."""
    try:
        import torch
        import torchvision  # noqa: F401
        from torchvision.ops import nms

        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except ModuleNotFoundError:
        raise
    except Exception as exc:  # the failure modes of a mismatched pair are many: RuntimeError, AttributeError...
        raise TorchMismatchError(f"{FIX} (underlying error: {type(exc).__name__}: {exc})") from None
