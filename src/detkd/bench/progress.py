"""Live progress of a suite: which runs are going, step of total, and the time left for the runs of this phase.

Runs are child processes; each appends a line to its ``log.jsonl`` every ``train.log_every`` steps with the step
(``iter``) and the mean seconds per step of the last window (``step_time``). :func:`read_log_tail` reads that line;
:func:`estimate` turns the runs' states into what is shown (a pure function, tested on its own); :class:`Display`
shows it with rich, live on a terminal and as one log line a minute otherwise.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("detkd")

Status = Literal["queued", "running", "done", "failed"]


@dataclass
class RunState:
    """One run of the phase, as last seen.

    Attributes:
        label: what the display calls it (``frcnn/kd seed 0``).
        model: the detector trained (runs of one model have about the same step time).
        total: the run's steps.
        status: queued, running, done or failed.
        step: steps done, from its ``log.jsonl`` (0 before the first line).
        step_time: seconds per step in its last logged window, None before the first line.
    """

    label: str
    model: str
    total: int
    status: Status = "queued"
    step: int = 0
    step_time: float | None = None


def read_log_tail(path: Path, chunk: int = 4096) -> dict[str, Any] | None:
    """The last complete JSON line of a ``log.jsonl`` (None if there is none yet); reads only the file's end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - chunk))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written, or cut by the chunk's start
        if isinstance(row, dict) and "iter" in row:
            return row
    return None


@dataclass
class Estimate:
    """What the display shows: ``running`` rows ``(label, step, total, seconds left or None)``, the counts of runs,
    and ``left_s``, the phase's time left (None until some run has logged a step time)."""

    running: list[tuple[str, int, int, float | None]]
    done: int
    failed: int
    total: int
    left_s: float | None


def estimate(states: list[RunState], jobs: int) -> Estimate:
    """Time left: each unfinished run's remaining steps times its seconds per step, shared over ``jobs`` slots.

    A run that has not logged yet is costed at the mean step time of the runs of its model that have, else of all
    runs that have (a rough figure until its own first log line).
    """
    by_model: dict[str, list[float]] = {}
    for s in states:
        if s.step_time is not None:
            by_model.setdefault(s.model, []).append(s.step_time)
    known = [t for times in by_model.values() for t in times]

    def rate(s: RunState) -> float | None:
        if s.step_time is not None:
            return s.step_time
        if s.model in by_model:
            return statistics.fmean(by_model[s.model])
        return statistics.fmean(known) if known else None

    running = []
    work, unknown, unfinished = 0.0, False, 0
    for s in states:
        if s.status in ("done", "failed"):
            continue
        unfinished += 1
        r = rate(s)
        left = None if r is None else (s.total - s.step) * r
        if left is None:
            unknown = True
        else:
            work += left
        if s.status == "running":
            running.append((s.label, s.step, s.total, left))
    return Estimate(
        running,
        done=sum(s.status == "done" for s in states),
        failed=sum(s.status == "failed" for s in states),
        total=len(states),
        left_s=None if unknown else work / max(1, min(jobs, unfinished)),
    )


def duration(seconds: float | None) -> str:
    """``1h 05m``, ``12m 30s``, ``45s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


def summary_line(est: Estimate) -> str:
    """One line: runs done of total, failures, time left."""
    failed = f", {est.failed} failed" if est.failed else ""
    return f"{est.done}/{est.total} runs done{failed}; time left for these runs ≈ {duration(est.left_s)}"


class Display:
    """Shows the phase's progress: a rich live table on a terminal, else a log line every ``every_s`` seconds."""

    def __init__(self, title: str, jobs: int, every_s: float = 60.0):
        from rich.console import Console

        self.title, self.jobs, self.every_s = title, jobs, every_s
        self.console = Console(stderr=True)
        self.live: Any = None
        self.last_line = 0.0

    def __enter__(self) -> Display:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=1, transient=True)
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.stop()

    def update(self, states: list[RunState]) -> None:
        est = estimate(states, self.jobs)
        if self.live is not None:
            self.live.update(self.render(est))
        elif time.monotonic() - self.last_line >= self.every_s:
            self.last_line = time.monotonic()
            going = "; ".join(f"{label} {step}/{total}" for label, step, total, _ in est.running)
            log.info("%s: %s%s", self.title, summary_line(est), f" (running: {going})" if going else "")

    def render(self, est: Estimate) -> Any:
        from rich.table import Table

        table = Table(title=self.title, caption=summary_line(est), expand=False)
        table.add_column("run")
        table.add_column("step", justify="right")
        table.add_column("left", justify="right")
        for label, step, total, left in est.running:
            table.add_row(label, f"{step}/{total}" if step else f"starting/{total}", duration(left))
        return table
