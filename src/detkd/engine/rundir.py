"""The run folder's rules: a folder holding results is never replaced by accident.

A folder *holds results* when it has a checkpoint (``last.pt``, ``best.pt``, ``student.pt``) or a ``final.json``.
A new run there is refused unless ``--resume`` (continue it from ``last.pt``) or ``--overwrite`` (replace it) is
given. The logs and ``config.yaml`` of a run that died before its first checkpoint are not results: a new run may
start over them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from detkd.errors import ConfigError

log = logging.getLogger("detkd")

RESULTS = ("last.pt", "best.pt", "student.pt", "final.json")
# Everything a run writes; --overwrite removes these (and nothing else) before the new run starts.
RUN_FILES = (*RESULTS, "config.yaml", "log.jsonl", "eval.jsonl")
RUN_FOLDERS = ("tb",)  # TensorBoard scalars


def results_in(out: Path) -> list[str]:
    """The result files present in ``out``, in :data:`RESULTS` order."""
    return [name for name in RESULTS if (out / name).is_file()]


def finished_summary(out: Path, done: int, iters: int) -> dict[str, Any] | None:
    """The saved summary (``final.json``) of a resumed run whose ``last.pt`` is at step ``done``, if the run has
    already reached ``iters`` steps and finished; else None (there is training, or its end, still to do)."""
    final = out / "final.json"
    if done < iters or not final.is_file():
        return None
    try:
        summary = json.loads(final.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn final.json: the run ends again and rewrites it
    if not isinstance(summary, dict) or int(summary.get("iters") or 0) != done:
        return None
    log.info("%s already finished (%d/%d steps); nothing to do", out, done, iters)
    return summary


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Decide what a run may do with ``out``, before anything is written.

    Args:
        out: the run folder (--out).
        resume: ``--resume`` was given.
        overwrite: ``--overwrite`` was given.

    Raises:
        ConfigError: ``out`` is a file; it holds results and neither flag was given; ``--resume`` without a
            ``last.pt``; both flags at once.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: the run folder (--out) is an existing file")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    last = out / "last.pt"
    if resume:
        if not last.is_file():
            raise ConfigError(f"--resume: {last} not found (nothing to resume in {out})")
        return
    found = results_in(out) if out.is_dir() else []
    if found and not overwrite:
        if "last.pt" in found:
            raise ConfigError(
                f"{out} already holds a run (last.pt); pass --resume to continue it, --overwrite to replace it, "
                "or choose another --out"
            )
        raise ConfigError(
            f"{out} already holds a run's results ({', '.join(found)}); pass --overwrite to replace them or choose "
            "another --out"
        )


def clear_run_folder(out: Path) -> None:
    """Remove what an earlier run wrote in ``out`` (for ``--overwrite``), once every check has passed."""
    import shutil

    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
