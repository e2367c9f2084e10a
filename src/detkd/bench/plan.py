"""Planning a suite: which runs, in which folders, with which settings; no run is started here.

Every run is keyed by everything that defines it (data, model, schedule, overrides, methods, teacher): a changed
setting never reuses old results, and two rows with identical settings share one run folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detkd.bench.suites import Pair, Suite
from detkd.errors import ConfigError


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _stamp(path: Path) -> list[int] | None:
    """Size and modification time of a file: a re-trained checkpoint at the same path is a new one."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


@dataclass
class RunSpec:
    """One training run of the suite."""

    pair: str
    row: str  # "teacher", "baseline", "tm1.25", a method key, or a reference key
    kind: str  # teacher | baseline | time_matched | method | reference
    command: str  # train | distill
    model: str
    iters: int
    seed: int
    overrides: list[str]
    methods: list[str] = field(default_factory=list)
    teacher_row: bool = False

    def args(self, data: Path, out: Path, teacher: Path | None) -> list[str]:
        args = [
            self.command,
            "--data",
            str(data),
            "--out",
            str(out),
            "--iters",
            str(self.iters),
            "--seed",
            str(self.seed),
            "--no-progress",
        ]
        if self.command == "train":
            args += ["--model", self.model]
        else:
            args += [
                "--student",
                self.model,
                "--method",
                "+".join(self.methods),
                "--teacher",
                str(teacher) if teacher else "none",
            ]
        return args + ["train.tensorboard=false", "train.ckpt_every=100"] + self.overrides


class Plan:
    """The runs of one suite, and where each one lives.

    Args:
        suite: the suite.
        out: root folder (``<out>/<suite>`` for runs and results, ``<out>/cache`` for data and teachers).
        seeds: override the suite's seed count.
        methods: restrict method rows to these (baselines, teachers and references always run).
        pairs: restrict the suite to these teacher-student pairs (default: all).
        jobs: training runs at a time (each gets ``threads`` CPU threads).
        threads: CPU threads per run (default: all cores / jobs).
    """

    def __init__(
        self,
        suite: Suite,
        out: Path,
        seeds: int | None = None,
        methods: list[str] | None = None,
        pairs: list[str] | None = None,
        jobs: int = 1,
        threads: int | None = None,
    ):
        self.suite = suite
        self.root = out / suite.name
        self.cache = out / "cache"
        self.seeds = seeds or suite.seeds
        self.only = methods
        unknown = sorted(set(pairs or []) - {p.name for p in suite.pairs})
        if unknown:
            names = ", ".join(p.name for p in suite.pairs)
            raise ConfigError(f"suite {suite.name} has no pair {', '.join(unknown)} (it has: {names})")
        self.pairs = [p for p in suite.pairs if not pairs or p.name in pairs]
        self.jobs = max(1, jobs)
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.jobs)
        self.results_path = self.root / "results.json"

    @property
    def data_dir(self) -> Path:
        return self.cache / "data" / f"digits-{_hash(asdict(self.suite.data))}"

    def teacher_dir(self, pair: Pair) -> Path:
        key = _hash(
            {
                "data": asdict(self.suite.data),
                "model": pair.teacher,
                "iters": pair.teacher_iters,
                "overrides": pair.overrides,
            }
        )
        return self.cache / "teachers" / f"{pair.teacher}-{key}"

    def run_dir(self, spec: RunSpec) -> Path:
        """A run's folder, keyed by everything that defines the run: a changed setting never reuses old results."""
        pair = self._pair(spec.pair)
        if spec.kind == "teacher":
            return self.teacher_dir(pair)
        teacher = self.teacher_dir(pair).name if pair.teacher and spec.command == "distill" else None
        key = _hash(
            {
                "data": asdict(self.suite.data),
                "model": spec.model,
                "iters": spec.iters,
                "overrides": spec.overrides,
                "methods": spec.methods,
                "teacher": teacher,
            }
        )
        # Content-addressed: two rows with identical settings (e.g. a reference student that equals another pair's
        # baseline) share one run.
        name = spec.model + ("+" + "+".join(spec.methods) if spec.methods else "")
        return self.root / "runs" / name / key / f"seed{spec.seed}"

    def _pair(self, name: str) -> Pair:
        return next(p for p in self.pairs if p.name == name)

    def _selected(self, row: str) -> bool:
        return not self.only or row in self.only or any(m in self.only for m in row.split("+"))

    def _method_rows(self, pair: Pair) -> list[str]:
        return [r for r in pair.methods if self._selected(r)]

    def plan(self) -> list[RunSpec]:
        """Teachers first, then per seed: baseline, references, methods (time-matched runs come later)."""
        specs: list[RunSpec] = []
        eval_cap = [f"data.val_max_images={self.suite.eval_images}"] if self.suite.eval_images else []
        teachers: set[Path] = set()
        for pair in self.pairs:
            needed = pair.teacher and any(self._needs_teacher(m) for m in self._method_rows(pair))
            if needed and self.teacher_dir(pair) not in teachers:  # pairs may share a teacher
                teachers.add(self.teacher_dir(pair))
                specs.append(
                    RunSpec(
                        pair.name,
                        "teacher",
                        "teacher",
                        "train",
                        pair.teacher,
                        pair.teacher_iters,
                        0,
                        pair.overrides + eval_cap,
                        teacher_row=True,
                    )
                )
        for seed in range(self.seeds):
            for pair in self.pairs:
                student = pair.overrides + pair.student_overrides + eval_cap
                specs.append(
                    RunSpec(pair.name, "baseline", "baseline", "train", pair.student, pair.student_iters, seed, student)
                )
                for key, (model, extra) in pair.references.items():
                    specs.append(
                        RunSpec(
                            pair.name,
                            key,
                            "reference",
                            "train",
                            model,
                            pair.student_iters,
                            seed,
                            pair.overrides + extra + eval_cap,
                        )
                    )
                rows = [(row, row, []) for row in self._method_rows(pair)]
                rows += [(key, row, extra) for key, (row, extra) in pair.variants.items() if self._selected(row)]
                for key, row, own in rows:
                    extra = [o for m in row.split("+") for o in pair.method_overrides.get(m, [])] + own
                    specs.append(
                        RunSpec(
                            pair.name,
                            key,
                            "method",
                            "distill",
                            pair.student,
                            pair.student_iters,
                            seed,
                            student + extra,
                            methods=row.split("+"),
                        )
                    )
        return specs

    @staticmethod
    def _needs_teacher(row: str) -> bool:
        return needs_teacher(row)

    def time_matched_specs(self, timing: dict[str, Any]) -> list[RunSpec]:
        """Baselines trained for as long (in wall-clock) as each method's runs, from the measured ratios."""
        specs = []
        eval_cap = [f"data.val_max_images={self.suite.eval_images}"] if self.suite.eval_images else []
        for pair in self.pairs:
            if not pair.time_matched:
                continue
            grid = sorted({self.tm_factor(timing, pair.name, row) for row in self._method_rows(pair)} - {None})
            for factor in grid:
                if factor <= 1.0:
                    continue
                for seed in range(self.seeds):
                    specs.append(
                        RunSpec(
                            pair.name,
                            f"tm{factor:g}",
                            "time_matched",
                            "train",
                            pair.student,
                            int(round(pair.student_iters * factor)),
                            seed,
                            pair.overrides + pair.student_overrides + eval_cap,
                        )
                    )
        return specs

    def tm_factor(self, timing: dict[str, Any], pair: str, row: str) -> float | None:
        """Wall-clock factor of a method over the plain student step, rounded up to the suite's grid."""
        t = timing.get(pair, {})
        step, base = t.get("rows", {}).get(row, {}).get("step_s"), t.get("student_step_s")
        if not step or not base:
            return None
        g = self.suite.time_grid
        return max(1.0, math.ceil(step / base / g - 1e-9) * g)


def needs_teacher(row: str) -> bool:
    """Whether any method of a row (``"kd+fitnet"``) distils from a teacher."""
    from detkd.methods import METHODS

    return any(METHODS.get(m).needs_teacher for m in row.split("+"))
