"""The benchmark protocol: ``detkd bench``.

Same data, same schedule and the same seeds for the student baseline and every method; each teacher is trained
once and cached (keyed by everything that defines it). Every run is an ordinary ``detkd train``/``distill``
subprocess with its own run folder, so an interrupted suite resumes where it stopped (finished runs are
skipped, unfinished ones continue from their ``last.pt``).

Besides accuracy, a separate timing phase measures, in one process and interleaved step by step, the student's
training step, the teacher's forward and each method's distillation step on the same batches, so step-time
ratios are not skewed by whatever else the machine did while the training runs went on.

A method's gain is stated against two baselines: the student trained with the same schedule, and the student
trained for the same wall-clock time (the baseline's iterations times the method's measured step-time ratio,
rounded up to a grid so methods of similar cost share one such baseline).

Outputs, under ``--out``/<suite>: ``runs/`` (every run folder), ``results.json`` (one record per run, the timing
and the aggregated table), ``BENCHMARKS.md`` and PNG plots. ``--render FILE`` rewrites the Markdown from the JSON
without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detkd.errors import ConfigError

log = logging.getLogger("detkd")


@dataclass
class DataSpec:
    """The digits dataset a suite uses (generated once and cached)."""

    difficulty: str = "hard"
    train: int = 2000
    val: int = 300
    size: int = 128
    seed: int = 1


@dataclass
class Pair:
    """A teacher/student pair and the rows trained for it.

    Attributes:
        name: short name (``frcnn``).
        teacher: teacher detector (None: only teacher-free rows).
        student: student detector.
        methods: rows of distillation methods (``"kd+fitnet"`` composes).
        teacher_iters: teacher schedule (trained once per suite and data).
        student_iters: schedule of every student row.
        overrides: config overrides for every run of the pair (teacher included).
        student_overrides: overrides for student rows only (baselines and methods).
        method_overrides: per-method extra overrides.
        references: extra student-alone rows ``{key: (detector, overrides)}``, e.g. the real-valued R18 next to a
            binary student.
        variants: method rows with settings of their own ``{row: (methods, overrides)}``, e.g. ``gkd`` with its
            global loss on next to the default ``gkd`` row; trained like method rows, not timed.
        time_matched: train same-wall-clock baselines.
        feature_methods: methods held to the step-overhead goal (feature/logit methods).
    """

    name: str
    teacher: str | None
    student: str
    methods: list[str]
    teacher_iters: int
    student_iters: int
    overrides: list[str] = field(default_factory=list)
    student_overrides: list[str] = field(default_factory=list)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    references: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    variants: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    time_matched: bool = True
    feature_methods: list[str] = field(default_factory=list)


@dataclass
class Suite:
    name: str
    description: str
    data: DataSpec
    pairs: list[Pair]
    seeds: int = 3
    time_grid: float = 0.25  # time-matched iterations: baseline iters x ratio rounded up to this grid
    timing_steps: int = 12
    eval_images: int | None = None
    speed: list[str] = field(default_factory=list)  # detectors whose step time and latency are tabulated


SEED_METHODS = ("tar", "gkd", "ida", "lgd", "detrdistill")
FEATURE_LOGIT = ["fitnet", "kd", "fgfi", "defeat", "kd+fitnet"]
# Recipes for students that do not train well with the SGD default (see configs/): DETRs and 1-bit networks want
# AdamW and their own clipping.
DETR = [
    "optim.name=adamw",
    "optim.lr=0.001",
    "optim.weight_decay=0.0001",
    "optim.steps=[0.8]",
    "optim.warmup_iters=50",
    "optim.clip_grad_norm=0.1",
]
BINARY = [
    "model.binary_neck=true",
    "optim.name=adamw",
    "optim.lr=0.001",
    "optim.weight_decay=0.0001",
    "optim.clip_grad_norm=7.0",
]

# Feature-imitation terms are sums of squares over channels: against a teacher trained from scratch they start
# 10 to 10^4 times larger than the detection loss (about 1-3 at step 10) and, at the papers' weights, swamp it (the
# gradient norm is then the clip value at every step). Each method's feature terms get one factor, 10^-round(log10 F),
# where F is the method's weighted feature loss at step 10 of a 60-step R18 run against the R50 teacher halfway
# through its schedule (fitnet 16, fgfi 843, defeat 640 fg + 4 x 2800 bg, tar 870, gkd 2.6 fg + 4 x 43 bg); the
# ratios between a method's own terms and its soft-label weights stay the papers'. Measured once, not tuned on val.
FEATURE_SCALE = {
    "fitnet": ["distill.weights.fitnet=0.1"],
    "fgfi": ["distill.weights.fgfi=0.001"],
    "defeat": [
        "distill.options.defeat.term_weights.kd_feat_fg=0.0001",
        "distill.options.defeat.term_weights.kd_feat_bg=0.0004",
    ],
    "tar": ["distill.options.tar.term_weights.kd_feat=0.001"],
    "gkd": ["distill.options.gkd.term_weights.kd_feat_fg=0.01", "distill.options.gkd.term_weights.kd_feat_bg=0.04"],
}

# The same measurement on the RetinaNet pair (R18 against the R50 teacher at step 700 of 1500): fitnet 8.6 (0.1, as
# above), gkd 3.9 fg + 4 x 4.1 bg = 20 (0.1: RetinaNet's sampled background is smaller than Faster R-CNN's).
RETINANET_FEATURE_SCALE = {
    "fitnet": ["distill.weights.fitnet=0.1"],
    "gkd": ["distill.options.gkd.term_weights.kd_feat_fg=0.1", "distill.options.gkd.term_weights.kd_feat_bg=0.4"],
}
LGD_SCRATCH = ["distill.options.lgd.freeze_backbone_frac=0.0"]
# GKD's released config leaves the global (prototype-relation) loss off; the paper has it on.
GKD_GLOBAL = {"gkd-global": ("gkd", ["distill.options.gkd.global_loss=true"])}

SUITES: dict[str, Suite] = {
    "smoke": Suite(
        "smoke",
        "pipeline check only: a few steps of everything on tiny data; the numbers mean nothing",
        DataSpec("easy", 32, 16, 64, 0),
        [
            Pair(
                "frcnn",
                "frcnn_r18",
                "frcnn_r18",
                ["kd", "fitnet"],
                6,
                4,
                overrides=[
                    "model.min_size=64",
                    "model.max_size=64",
                    "data.batch_size=4",
                    "optim.warmup_iters=2",
                    "distill.check_teacher=0",
                ],
                feature_methods=["kd", "fitnet"],
            )
        ],
        seeds=1,
        timing_steps=3,
    ),
    "demo": Suite(
        "demo",
        "the README's demo: a slim Faster R-CNN R50 teacher, an R18 student alone and with kd+fitnet",
        DataSpec("easy", 1000, 200, 128, 0),
        [
            Pair(
                "frcnn",
                "frcnn_r50",
                "frcnn_r18",
                ["kd+fitnet"],
                500,
                250,
                time_matched=False,
                feature_methods=["kd+fitnet"],
            )
        ],
        seeds=1,
        timing_steps=6,
    ),
    "cpu": Suite(
        "cpu",
        "slim detectors on the hard digits variant, sized for a 2-core CPU",
        DataSpec("hard", 2000, 300, 128, 1),
        [
            Pair(
                "frcnn",
                "frcnn_r50",
                "frcnn_r18",
                ["tar", "gkd", "fitnet", "kd", "fgfi", "defeat"],
                2000,
                300,
                method_overrides=FEATURE_SCALE,
                feature_methods=["fitnet", "kd", "fgfi", "defeat"],
            ),
            # Teacher-free LGD on the same R18 student: its baseline and same-wall-clock runs are the frcnn pair's
            # (shared run folders). From scratch, LGD's backbone freeze only delays training.
            Pair("lgd", None, "frcnn_r18", ["lgd"], 0, 300, method_overrides={"lgd": LGD_SCRATCH}),
            # RetinaNet's heads need GroupNorm (the slim preset has it) to learn from scratch in a few hundred steps.
            Pair(
                "retinanet",
                "retinanet_r50",
                "retinanet_r18",
                ["gkd", "fitnet", "kd", "lgd"],
                1500,
                300,
                method_overrides={**RETINANET_FEATURE_SCALE, "lgd": LGD_SCRATCH},
                variants=GKD_GLOBAL,
                feature_methods=["fitnet", "kd"],
            ),
            Pair("lgd_r50", None, "retinanet_r50", ["lgd"], 0, 300, method_overrides={"lgd": LGD_SCRATCH}),
            Pair(
                "binary",
                "frcnn_r50",
                "frcnn_bireal18",
                ["ida"],
                2000,
                300,
                student_overrides=BINARY,
                references={"real_r18": ("frcnn_r18", [])},
            ),
            Pair("detr", "deformable_detr_r50", "deformable_detr_r18", ["detrdistill"], 2000, 500, overrides=DETR),
        ],
        seeds=3,
        time_grid=0.5,  # coarse: fewer same-wall-clock baselines, each rounded up (in the baseline's favour)
        speed=[
            "frcnn_r18",
            "frcnn_r50",
            "retinanet_r18",
            "retinanet_r50",
            "fcos_r18",
            "fcos_r50",
            "frcnn_bireal18",
            "deformable_detr_r18",
            "deformable_detr_r50",
        ],
    ),
    "gpu": Suite(
        "gpu",
        "larger images and schedules, more seeds: for a machine with a GPU",
        DataSpec("hard", 8000, 1000, 256, 1),
        [
            Pair(
                "frcnn",
                "frcnn_r50",
                "frcnn_r18",
                ["tar", "gkd", "fitnet", "kd", "fgfi", "defeat"],
                12000,
                3000,
                overrides=["model.min_size=256", "model.max_size=256", "data.batch_size=16"],
                method_overrides=FEATURE_SCALE,
                feature_methods=["fitnet", "kd", "fgfi", "defeat"],
            ),
            Pair(
                "retinanet",
                "retinanet_r50",
                "retinanet_r18",
                ["gkd", "fitnet", "kd", "lgd"],
                12000,
                3000,
                overrides=["model.min_size=256", "model.max_size=256", "data.batch_size=16"],
                method_overrides=RETINANET_FEATURE_SCALE,
                feature_methods=["fitnet", "kd"],
            ),
            Pair(
                "binary",
                "frcnn_r50",
                "frcnn_bireal18",
                ["ida"],
                12000,
                3000,
                overrides=["model.min_size=256", "model.max_size=256", "data.batch_size=16"],
                student_overrides=BINARY,
                references={"real_r18": ("frcnn_r18", [])},
            ),
            Pair(
                "detr",
                "deformable_detr_r50",
                "deformable_detr_r18",
                ["detrdistill"],
                20000,
                6000,
                overrides=DETR + ["model.min_size=256", "model.max_size=256", "data.batch_size=16"],
            ),
        ],
        seeds=5,
        timing_steps=30,
    ),
}


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


class Bench:
    """Plans, runs and reports one suite.

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

    # ----- planning
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
        import detkd.methods  # noqa: F401  (registration)
        from detkd.methods.base import METHODS

        return any(METHODS.get(m).needs_teacher for m in row.split("+"))

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

    # ----- running
    def ensure_data(self) -> Path:
        from detkd.data import make_digits

        done = self.data_dir / "annotations" / "instances_val.json"
        if not done.exists():
            d = self.suite.data
            log.info(
                "building %s digits (%d train / %d val, %d px) in %s",
                d.difficulty,
                d.train,
                d.val,
                d.size,
                self.data_dir,
            )
            make_digits(self.data_dir, train=d.train, val=d.val, size=d.size, seed=d.seed, difficulty=d.difficulty)
        return self.data_dir

    def _launch(self, spec: RunSpec) -> dict[str, Any]:
        out = self.run_dir(spec)
        final = out / "final.json"
        if final.exists():
            return self._record(spec, out)
        pair = self._pair(spec.pair)
        teacher = self.teacher_dir(pair) / "student.pt" if spec.command == "distill" and pair.teacher else None
        if teacher is not None and not self._needs_teacher("+".join(spec.methods)):
            teacher = None
        args = spec.args(self.data_dir, out, teacher)
        if (out / "last.pt").exists():
            args.append("--resume")
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        start = time.perf_counter()
        with open(out / "run.log", "a") as logf:
            logf.write(f"$ detkd {' '.join(args)}\n")
            logf.flush()
            proc = subprocess.run(
                [sys.executable, "-m", "detkd.cli", *args], stdout=logf, stderr=subprocess.STDOUT, env=env
            )
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not final.exists():
            tail = (out / "run.log").read_text().strip().splitlines()[-1:] or ["?"]
            log.error("%s/%s seed %d failed (exit %d): %s", spec.pair, spec.row, spec.seed, proc.returncode, tail[0])
            return {**self._base_record(spec, out), "failed": True, "error": tail[0], "wall_s": round(wall, 1)}
        log.info("%s/%s seed %d done in %.0f s", spec.pair, spec.row, spec.seed, wall)
        return self._record(spec, out)

    def _base_record(self, spec: RunSpec, out: Path) -> dict[str, Any]:
        return {
            "pair": spec.pair,
            "row": spec.row,
            "kind": spec.kind,
            "seed": spec.seed,
            "model": spec.model,
            "methods": spec.methods,
            "iters": spec.iters,
            "run": str(out),
        }

    def _record(self, spec: RunSpec, out: Path) -> dict[str, Any]:
        final = json.loads((out / "final.json").read_text())
        m = final.get("metrics", {})
        return {
            **self._base_record(spec, out),
            "AP": m.get("AP"),
            "AP50": m.get("AP50"),
            "AP75": m.get("AP75"),
            "train_time_s": final.get("train_time_s"),
            "step_time_s": final.get("step_time_s"),
            "peak_memory_mb": final.get("peak_memory_mb"),
            "nonfinite_steps": final.get("nonfinite_steps"),
            "kd_active": final.get("kd_active"),
            "threads": final.get("machine", {}).get("threads"),
        }

    def run_all(self, specs: list[RunSpec]) -> list[dict[str, Any]]:
        """One queue, teachers first, then in plan order; a distillation row waits only for its own pair's teacher
        (and is dropped if that teacher failed), so a free slot never waits on another pair's runs."""
        # Rows with identical settings share a run folder: train it once, then record it under each row.
        unique = {self.run_dir(s): s for s in specs}
        queue = sorted(unique.values(), key=lambda s: s.kind != "teacher")  # stable: plan order otherwise
        waits_for = {self.run_dir(s): self._teacher_run(s) for s in queue}
        waits_for = {d: t if t in unique else None for d, t in waits_for.items()}  # a teacher outside specs is done
        succeeded: dict[Path, bool] = {}
        dropped: set[Path] = set()
        running: dict[Future, Path] = {}
        with ThreadPoolExecutor(self.jobs) as pool:
            while queue or running:
                for spec in list(queue):
                    if len(running) >= self.jobs:
                        break
                    out = self.run_dir(spec)
                    teacher = waits_for[out]
                    if teacher is not None and teacher not in succeeded:
                        continue
                    queue.remove(spec)
                    if teacher is not None and not succeeded[teacher]:
                        log.error("%s/%s seed %d not run: its teacher failed", spec.pair, spec.row, spec.seed)
                        dropped.add(out)
                        continue
                    running[pool.submit(self._launch, spec)] = out
                if not running:
                    if queue:
                        raise RuntimeError(f"bench queue stalled: {len(queue)} run(s) wait on a teacher never run")
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    succeeded[running.pop(future)] = not future.result().get("failed")
        return [self._launch(s) for s in specs if self.run_dir(s) not in dropped]  # finished runs are read back

    def _teacher_run(self, spec: RunSpec) -> Path | None:
        pair = self._pair(spec.pair)
        if spec.command == "distill" and pair.teacher and self._needs_teacher("+".join(spec.methods)):
            return self.teacher_dir(pair)
        return None

    # ----- timing
    def measure(self, saved: dict[str, Any] | None = None) -> dict[str, Any]:
        """Step times in one process, interleaved: student step, teacher forward, each method's step, latency.

        A measurement in ``saved`` (the timing of an earlier results.json of this suite) is kept when it was taken
        from the same checkpoints, rows, settings and machine, so a resumed suite keeps its same-wall-clock plan.
        """
        from detkd import bench_timing

        saved = saved or {}
        machine = machine_info()
        code = _hash(Path(bench_timing.__file__).read_text())

        def timed(name: str, fn: Any, **kwargs: Any) -> dict[str, Any]:
            paths = {k: v for k, v in kwargs.items() if isinstance(v, Path)}
            paths.update({f"references.{k}": v for k, v in (kwargs.get("references") or {}).items()})
            stamps = {k: _stamp(v) for k, v in paths.items()}
            key = _hash({"machine": machine, "code": code, "args": kwargs, "stamps": stamps})
            old = saved.get(name)
            if isinstance(old, dict) and old.get("key") == key:
                log.info("timing %s: kept from %s (same checkpoints and settings)", name, self.results_path)
                return old
            return {**fn(**kwargs), "key": key}

        timing: dict[str, Any] = {}
        if self.suite.speed:
            log.info("timing detectors: %s", ", ".join(self.suite.speed))
            timing["_detectors"] = timed(
                "_detectors",
                bench_timing.time_detectors,
                data=self.data_dir,
                names=self.suite.speed,
                overrides=self.suite.pairs[0].overrides,
                steps=self.suite.timing_steps,
            )
        for pair in self.pairs:
            specs = {(s.row, s.seed): s for s in self.plan() if s.pair == pair.name}
            baseline = self.run_dir(specs[("baseline", 0)]) / "student.pt"
            teacher = self.teacher_dir(pair) / "student.pt" if pair.teacher else None
            if not baseline.exists():
                continue
            rows = self._method_rows(pair)
            log.info("timing %s: %s", pair.name, ", ".join(rows))
            timing[pair.name] = timed(
                pair.name,
                bench_timing.time_pair,
                data=self.data_dir,
                student_ckpt=baseline,
                teacher_ckpt=teacher if teacher and teacher.exists() else None,
                rows=rows,
                overrides=pair.overrides + pair.student_overrides,
                steps=self.suite.timing_steps,
                references={k: self.run_dir(specs[(k, 0)]) / "student.pt" for k in pair.references},
                method_overrides=pair.method_overrides,
            )
        return timing

    def run(self) -> dict[str, Any]:
        self.root.mkdir(parents=True, exist_ok=True)
        self.ensure_data()
        start = time.perf_counter()
        saved = json.loads(self.results_path.read_text()).get("timing") if self.results_path.exists() else None
        specs = self.plan()
        records = self.run_all(specs)
        self.save({"records": records, "complete": False})
        timing = self.measure(saved)
        self.save({"records": records, "timing": timing, "complete": False})
        tm = self.time_matched_specs(timing)
        records += self.run_all(tm)
        results = self.save(
            {
                "records": records,
                "timing": timing,
                "time_matched_planned": len(tm),
                "wall_s": round(time.perf_counter() - start, 1),
                "complete": True,
            }
        )
        return results

    def save(self, partial: dict[str, Any]) -> dict[str, Any]:
        from detkd.engine.evaluate import json_safe

        results = {
            "suite": self.suite.name,
            "description": self.suite.description,
            "data": asdict(self.suite.data),
            "pairs": [asdict(p) for p in self.pairs],
            "pairs_not_run": [p.name for p in self.suite.pairs if p not in self.pairs],
            "seeds": self.seeds,
            "time_grid": self.suite.time_grid,
            "jobs": self.jobs,
            "threads_per_run": self.threads,
            "machine": machine_info(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "detkd " + " ".join(sys.argv[1:]) if sys.argv and "detkd" in sys.argv[0] else "detkd bench",
            **partial,
        }
        results["table"] = aggregate(results)
        self.results_path.write_text(json.dumps(json_safe(results), indent=2))
        return results


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": platform.platform(),
    }


# ----- aggregation
def _stats(values: list[float]) -> dict[str, float | int | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def aggregate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (pair, row): accuracy over seeds, gains, gap closed, cost."""
    records = [r for r in results["records"] if not r.get("failed")]
    timing = results.get("timing", {})
    suite = SUITES.get(results["suite"])
    grid = results.get("time_grid") or (suite.time_grid if suite else 0.25)
    table = []
    for pair in results["pairs"]:
        name = pair["name"]
        mine = [r for r in records if r["pair"] == name]
        teacher = next((r for r in records if r["kind"] == "teacher" and r["model"] == pair["teacher"]), None)
        base = _stats([r["AP"] for r in mine if r["row"] == "baseline"])
        base50 = _stats([r["AP50"] for r in mine if r["row"] == "baseline"])
        t = timing.get(name, {})
        row_methods = {key: row for key, (row, _) in (pair.get("variants") or {}).items()}
        rows = [
            "teacher",
            "baseline",
            *pair["references"],
            *pair["methods"],
            *pair.get("variants", {}),
            *sorted({r["row"] for r in mine if r["kind"] == "time_matched"}),
        ]
        for row in rows:
            if row == "teacher":
                runs = [teacher] if teacher else []
            else:
                runs = [r for r in mine if r["row"] == row]
            if not runs:
                continue
            ap, ap50 = _stats([r["AP"] for r in runs]), _stats([r["AP50"] for r in runs])
            entry = {
                "pair": name,
                "row": row,
                "kind": runs[0]["kind"],
                "model": runs[0]["model"],
                "iters": runs[0]["iters"],
                "AP": ap,
                "AP50": ap50,
                # A time-matched row trains the baseline's model and batch for longer: its memory is the baseline's.
                "peak_memory_mb": None
                if runs[0]["kind"] == "time_matched"
                else max((r["peak_memory_mb"] or 0) for r in runs),
                "train_time_s": _stats([r["train_time_s"] for r in runs])["mean"],
                "failed_seeds": sum(
                    1 for r in results["records"] if r["pair"] == name and r["row"] == row and r.get("failed")
                ),
            }
            if runs[0]["kind"] == "method":
                entry["gain"] = None if base["mean"] is None else ap["mean"] - base["mean"]
                entry["gain_AP50"] = None if base50["mean"] is None else ap50["mean"] - base50["mean"]
                entry["gain_over_2std"] = (
                    entry["gain"] is not None and base["std"] is not None and entry["gain"] > 2 * base["std"]
                )
                if teacher and base["mean"] is not None and teacher["AP"] is not None:
                    gap = teacher["AP"] - base["mean"]
                    entry["gap_closed"] = (ap["mean"] - base["mean"]) / gap if gap > 0 else None
                    entry["reaches_teacher"] = ap["mean"] >= teacher["AP"]
                row_t = t.get("rows", {}).get(row, {})
                if row_t.get("nonfinite_steps") or t.get("student_nonfinite_steps"):
                    row_t = {}  # a diverged timed step does different work: its time is not the method's
                entry["step_s"] = row_t.get("step_s")
                # A row that runs no teacher is compared with the student's own step.
                teacher_free = pair["teacher"] is None or not Bench._needs_teacher(row_methods.get(row, row))
                entry["step_ratio"] = row_t.get("ratio_student") if teacher_free else row_t.get("ratio")
                entry["step_ratio_student"] = row_t.get("ratio_student")
                factor = None
                if row_t.get("step_s") and t.get("student_step_s"):
                    factor = max(1.0, math.ceil(row_t["step_s"] / t["student_step_s"] / grid - 1e-9) * grid)
                # Without a measured step time there is nothing to match the baseline's time to.
                tm_row = None if factor is None else f"tm{factor:g}" if factor > 1.0 else "baseline"
                tm = _stats([r["AP"] for r in mine if r["row"] == tm_row])
                entry["time_matched_row"] = tm_row if tm["n"] else None
                entry["gain_time_matched"] = None if tm["mean"] is None else ap["mean"] - tm["mean"]
            cost = t.get("cost", {}).get(runs[0]["model"]) or t.get("cost", {}).get(row)
            if cost:
                entry["cost"] = cost
            table.append(entry)
    return table


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark suite and write BENCHMARKS.md",
        description="Train the teacher (cached), the student baseline and every method with the same data, schedule "
        "and seeds; measure step times in one process; write results.json, BENCHMARKS.md and plots.",
    )
    p.add_argument("--suite", default="smoke", choices=sorted(SUITES), help="which suite (default smoke)")
    p.add_argument("--methods", help="comma-separated method rows to run (default: all of the suite)")
    p.add_argument("--pairs", help="comma-separated teacher-student pairs to run (default: all of the suite)")
    p.add_argument("--seeds", type=int, help="seeds per row (default: the suite's)")
    p.add_argument("--out", default="bench", help="output root (default bench/)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads per run (default: cores / jobs)")
    p.add_argument("--render", metavar="FILE", help="only (re)write FILE (Markdown) from the suite's results.json")
    p.add_argument("--plan", action="store_true", help="print the runs the suite would make, and exit")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from detkd.bench_report import render_markdown, write_plots

    suite = SUITES[args.suite]
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    pairs = [p.strip() for p in args.pairs.split(",")] if args.pairs else None
    bench = Bench(
        suite, Path(args.out), seeds=args.seeds, methods=methods, pairs=pairs, jobs=args.jobs, threads=args.threads
    )
    if args.render:
        if not bench.results_path.exists():
            raise ConfigError(f"{bench.results_path} not found: run `detkd bench --suite {suite.name}` first")
        results = json.loads(bench.results_path.read_text())
        results["table"] = aggregate(results)  # from the records, with this version's aggregation
        plots = write_plots(results, Path(args.render).parent / "docs" / "bench" / suite.name)
        Path(args.render).write_text(render_markdown(results, plots, Path(args.render).parent))
        print(f"wrote {args.render}")
        return 0
    if args.plan:
        for spec in bench.plan():
            print(f"{spec.pair:10s} {spec.row:14s} seed {spec.seed}  {spec.command} {spec.model} {spec.iters} iters")
        print("(+ same-wall-clock baselines after the timing phase)")
        return 0
    results = bench.run()
    plots = write_plots(results, bench.root / "plots")
    md = bench.root / "BENCHMARKS.md"
    md.write_text(render_markdown(results, plots, bench.root))
    print_summary(results)
    print(f"results: {bench.results_path}\nreport:  {md}")
    return 0


def print_summary(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"detkd bench --suite {results['suite']}")
    for col in ("pair", "row", "mAP", "mAP@.5", "gain", "step ratio"):
        table.add_column(col, justify="left" if col in ("pair", "row") else "right")

    def fmt(s: dict[str, Any]) -> str:
        if s["mean"] is None:
            return "-"
        return f"{s['mean']:.3f}" + (f" ±{s['std']:.3f}" if s["n"] > 1 else "")

    for e in results.get("table", []):
        ap, ap50 = e["AP"], e["AP50"]
        gain = e.get("gain")
        ratio = e.get("step_ratio")
        table.add_row(
            e["pair"],
            e["row"],
            fmt(ap),
            fmt(ap50),
            "" if gain is None else f"{gain:+.3f}",
            "" if ratio is None else f"{ratio:.2f}x",
        )
    Console().print(table)
