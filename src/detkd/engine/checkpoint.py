"""Checkpoints: plain state dicts + JSON-able metadata, written atomically, read with ``weights_only=True``.

Two kinds:

- a **student** checkpoint (``best.pt``, ``student.pt``): the deployable detector alone, with the spec that
  rebuilds it and its class names. This is what ``detkd eval``/``export`` and ``--teacher`` take.
- a **training** checkpoint (``last.pt``): student + distillers' own modules, optimiser, iteration, RNG state and
  best score, for ``--resume``.
- a **packed** student (``detkd export --packed``): a binary detector whose 1-bit conv weights are stored as sign
  bits, 8 per byte, next to their scales; every other tensor as is. The binarised forward reads only ``sign(w)``
  and ``alpha``, so a packed file gives **identical** outputs, but the latent real-valued weights are gone: a
  packed file is for inference only.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detkd.errors import CheckpointError
from detkd.models.binary import binary_modules
from detkd.models.outputs import Detector

STUDENT_FORMAT = "detkd.student"
TRAIN_FORMAT = "detkd.train"
PACKED_FORMAT = "detkd.packed"  # a student with bit-packed 1-bit weights (inference only)
VERSION = 1


def file_mode() -> int:
    """The permissions ``open()`` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a torn file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        os.chmod(tmp, file_mode())  # mkstemp makes the file private; a checkpoint gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # torch's zip writer reports a failed write of its own as a RuntimeError naming its stream writer.
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "PytorchStreamWriter" in str(exc)):
            raise _write_error(path, exc) from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _write_error(path: Path, exc: BaseException) -> CheckpointError:
    """A failed checkpoint write (full disk, no permission) as one line saying what is left."""
    reason = getattr(exc, "strerror", None) or one_line_reason(exc)
    kept = f"the previous {path.name} is kept" if path.is_file() else f"no {path.name} was written"
    return CheckpointError(f"{path}: cannot write the checkpoint ({reason}); {kept}")


def one_line_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _reason(exc: Exception) -> str:
    """The telling line of a loader's error: the weights-only unpickler puts it after a paragraph of advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Please file an issue"):
            rest = [r.removeprefix("WeightsUnpickler error:").strip() for r in lines[i + 1 :]]
            if any(rest):
                return next(r for r in rest if r)
    # Keep the first sentence: the zip reader appends a paragraph on how files get corrupted.
    return lines[0].split(". ")[0] if lines else type(exc).__name__


# torch.save's pre-1.6 format: a pickle stream whose first object is this magic number.
LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


def is_plain_pickle(path: Path) -> bool:
    """Whether ``path`` is a pickle stream that torch.save did not write (no zip archive, no legacy magic number).

    Only the opcodes of the first pickle are scanned (nothing is unpickled).
    """
    if zipfile.is_zipfile(path):
        return False
    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":  # PROTO opcode: every pickle of protocol 2 or later starts with it
                return False
            f.seek(0)
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name == "PROTO":
                    continue
                return not (opcode.name in ("LONG1", "LONG4", "LONG", "INT") and arg == LEGACY_TORCH_MAGIC)
    except (OSError, ValueError):
        return False  # not a well-formed pickle: torch.load reports it as damaged
    return False


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; every failure is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if is_plain_pickle(path):
        raise CheckpointError(
            f"{path}: the file is a pickle (pickle.dump), not a torch checkpoint; detkd reads files written by "
            "torch.save and never unpickles other files (unpickling can run arbitrary code)"
        )
    try:
        with warnings.catch_warnings():
            # The weights-only unpickler warns about pickle protocols it was not written for; the outcome (a
            # loaded file or one line saying why not) is what the user needs, not the warning.
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler stops at the first GLOBAL (a class or function to import) it does not allow;
        # any other complaint (an unknown opcode, a torn stream) means a damaged file.
        found = re.search(r"GLOBAL (\S+?)[\s.,]*(?:was|whose|$)", str(exc))
        if found:
            raise CheckpointError(
                f"{path}: refused: the file contains pickled Python objects ({found.group(1)}), not only tensors "
                "and plain containers (loading such a file can run arbitrary code; detkd loads checkpoints with "
                "weights_only=True)"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({_reason(exc)})") from None
    except Exception as exc:  # noqa: BLE001  (whatever the parser trips on, the file is at fault)
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({_reason(exc)})") from None
    if not isinstance(obj, dict) or obj.get("format") not in (STUDENT_FORMAT, TRAIN_FORMAT, PACKED_FORMAT):
        raise CheckpointError(
            f"{path}: not a detkd checkpoint (no 'format' field of a detkd student or training checkpoint)"
        )
    return obj


def student_payload(detector: Detector, classes: list[str], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": STUDENT_FORMAT,
        "version": VERSION,
        "spec": dict(detector.spec),
        "classes": list(classes),
        "meta": dict(meta or {}),
        "model": detector.state_dict(),
    }


def save_student(path: str | Path, detector: Detector, classes: list[str], meta: dict[str, Any] | None = None) -> None:
    save_atomic(student_payload(detector, classes, meta), path)


def student_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The student's state dict from either kind of checkpoint."""
    if ckpt["format"] == STUDENT_FORMAT:
        return ckpt["model"]
    if ckpt["format"] == PACKED_FORMAT:
        return unpack_binary_state(ckpt["packed"])
    prefix = "student."
    return {k[len(prefix) :]: v for k, v in ckpt["trainable"].items() if k.startswith(prefix)}


def load_state_checked(module: torch.nn.Module, state: dict[str, Any], source: str | Path) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first offending key."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        if wrong:
            k = wrong[0]
            detail = f"shape of {k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        elif missing:
            detail = f"{len(missing)} parameter(s) missing from the checkpoint, first {missing[0]}"
        else:
            detail = f"{len(unexpected)} unexpected parameter(s) in the checkpoint, first {unexpected[0]}"
        raise CheckpointError(f"{source}: checkpoint does not match the model ({detail})")
    module.load_state_dict(state)


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> tuple[Detector, dict[str, Any]]:
    """Rebuild the detector a checkpoint was saved from and load its weights; returns (detector, checkpoint)."""
    from detkd.models import build_detector

    ckpt = read_checkpoint(path)
    spec = ckpt.get("spec")
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(f"{path}: checkpoint has no detector spec")
    try:
        detector = build_detector(**spec)
    except TypeError as exc:
        raise CheckpointError(f"{path}: detector spec does not fit this detkd version ({exc})") from None
    load_state_checked(detector, student_state(ckpt), path)
    return detector.to(device), ckpt


# ----- packed 1-bit students
def pack_bits(weight: Tensor) -> Tensor:
    """Sign bits of ``weight`` (1 for ``>= 0``), flattened and packed 8 per ``uint8``, most significant first."""
    bits = (weight.detach().reshape(-1) >= 0).to(torch.uint8)
    pad = (-len(bits)) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).view(-1, 8)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return (bits << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: list[int] | tuple[int, ...]) -> Tensor:
    """``+1/-1`` float tensor of ``shape`` from :func:`pack_bits`'s bytes."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = ((packed[:, None] >> shifts) & 1).reshape(-1)
    n = 1
    for s in shape:
        n *= int(s)
    return bits[:n].float().mul(2).sub(1).view(*shape)


def pack_binary_state(detector: nn.Module) -> dict[str, Any]:
    """The detector's state with binary conv weights as packed sign bits (see :func:`unpack_binary_state`).

    Returns:
        ``{"keys": [...state-dict order...], "bits": {key: uint8 tensor}, "shapes": {key: [dims]},
        "tensors": {key: tensor}}``: binary conv weights in ``bits``, everything else (their scales and biases
        included) as is in ``tensors``. Only tensors, lists, dicts, ints and strings: loadable with
        ``weights_only=True``.
    """
    binary = {f"{name}.weight" for name in binary_modules(detector)}
    state = detector.state_dict()
    bits, shapes, tensors = {}, {}, {}
    for key, value in state.items():
        if key in binary:
            bits[key] = pack_bits(value).cpu()
            shapes[key] = [int(s) for s in value.shape]
        else:
            tensors[key] = value.detach().cpu()
    return {"keys": list(state), "bits": bits, "shapes": shapes, "tensors": tensors}


def unpack_binary_state(packed: dict[str, Any]) -> dict[str, Tensor]:
    """The full state dict from :func:`pack_binary_state`'s output.

    Binary conv weights come back as ``+1/-1`` latent weights: the same signs, hence the same binarised forward
    and identical outputs once loaded, but not the trained real values (inference only).
    """
    try:
        out: dict[str, Tensor] = {}
        for key in packed["keys"]:
            if key in packed["bits"]:
                out[key] = unpack_bits(packed["bits"][key], packed["shapes"][key])
            else:
                out[key] = packed["tensors"][key]
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"malformed packed state ({type(exc).__name__}: {exc})") from None
    return out


def packed_payload(detector: Detector, classes: list[str], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": PACKED_FORMAT,
        "version": VERSION,
        "spec": dict(detector.spec),
        "classes": list(classes),
        "meta": dict(meta or {}),
        "packed": pack_binary_state(detector),
    }


def save_packed(path: str | Path, detector: Detector, classes: list[str], meta: dict[str, Any] | None = None) -> None:
    """Write a bit-packed, inference-only student file (atomically)."""
    save_atomic(packed_payload(detector, classes, meta), path)


def load_packed(path: str | Path, device: str | torch.device = "cpu") -> tuple[Detector, dict[str, Any]]:
    """Rebuild the detector of a :func:`save_packed` file; returns ``(detector, payload)``.

    Raises:
        CheckpointError: the file is missing, not a packed detkd file, or does not match its spec.
    """
    if read_checkpoint(path)["format"] != PACKED_FORMAT:
        raise CheckpointError(f"{path}: not a detkd packed file (format is not {PACKED_FORMAT!r})")
    return load_detector(path, device)
