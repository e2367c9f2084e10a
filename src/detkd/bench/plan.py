"""Planning a suite: which runs, in which folders, with which settings; no run is started here.

Every run is keyed by everything that defines it (data, model, schedule, overrides, methods, teacher, pretrained
backbone, initial weights): a changed setting never reuses old results, and two rows with identical settings share
one run folder. A run waits for the runs it reads (:meth:`Plan.dependencies`): its pretrained backbone, its teacher,
and for a fine-tune row the baseline of the same seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detkd.bench.suites import Pair, PretrainRecipe, Suite
from detkd.engine.cores import crowded
from detkd.errors import ConfigError


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def key_overrides(overrides: list[str]) -> list[str]:
    """The overrides that define a run's result: ``train.eval_every`` only adds evaluations along the way (training
    is the same with or without them), so a learning-curve run and a suite run of the same settings share a folder."""
    return [o for o in overrides if not o.startswith("train.eval_every=")]


def _stamp(path: Path) -> list[int] | None:
    """Size and modification time of a file: a re-trained checkpoint at the same path is a new one."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def run_seconds(final: dict[str, Any]) -> float | None:
    """A finished run's training time: its ``train_time_s`` (every part of a resumed run), or where that misses a
    part (``train_time_partial``: resumed from a checkpoint that did not time it; a resumed run older than that
    flag) its steady seconds per step times its steps."""
    partial = final.get("train_time_partial", bool(final.get("resumed_from")))
    if partial and final.get("step_time_s"):
        return round(float(final["step_time_s"]) * int(final.get("iters", 0)), 1)
    return final.get("train_time_s")


@dataclass
class RunSpec:
    """One training run of the suite."""

    pair: str
    row: str  # "pretrain:r18", "teacher", "baseline", "tm1.25", a method, variant, fine-tune or reference key
    kind: str  # pretrain | teacher | baseline | time_matched | method | finetune | reference
    command: str  # pretrain | train | distill
    model: str  # a detector; for a pretrain run, the backbone
    iters: int
    seed: int
    overrides: list[str]  # config overrides; for a pretrain run, its command-line options
    methods: list[str] = field(default_factory=list)
    teacher_row: bool = False  # the pair's teacher (at this run's schedule): its folder is a cached teacher
    backbone: str | None = None  # the suite's pretrained backbone this run starts from
    init: RunSpec | None = None  # the run whose student.pt initialises this one (model.weights)

    def args(self, data: Path, out: Path, teacher: Path | None, extra: list[str] | None = None) -> list[str]:
        """The ``detkd`` command line of the run; ``extra`` overrides (paths of the runs it reads) go last."""
        if self.command == "pretrain":
            return [
                "pretrain",
                "--backbone",
                self.model,
                "--data",
                str(data),
                "--out",
                str(out / f"{self.model}.pt"),
                "--iters",
                str(self.iters),
                "--seed",
                str(self.seed),
                "--log",
                str(out / "log.jsonl"),
                "--no-progress",
                *self.overrides,
            ]
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
        return args + ["train.tensorboard=false", "train.ckpt_every=100"] + self.overrides + list(extra or [])


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

    def crowding(self, load: float | None = None, cores: int | None = None) -> str | None:
        """A warning when this bench's runs would share the CPU cores with work that is already running, or None.

        Every run gets ``threads`` threads whatever else the machine does, and runs whose threads outnumber the
        cores are several times slower. ``load`` and ``cores`` are read from the machine when None (see
        :func:`detkd.engine.cores.crowded`)."""
        found = crowded(self.jobs * self.threads, load, cores)
        if found is None:
            return None
        load, cores, free = found
        fit = f"--threads {free // self.jobs}" if free >= self.jobs else f"--jobs {free} --threads 1"
        return (
            f"the machine's load is {load:.1f} on {cores} cores before this bench starts, and it runs {self.jobs} "
            f"run(s) at a time with {self.threads} thread(s) each: runs that share cores train several times slower. "
            f"Choose --jobs and --threads so that all the machine's threads together fit its cores (here: {fit})"
        )

    @property
    def data_dir(self) -> Path:
        return self.cache / "data" / f"digits-{_hash(asdict(self.suite.data))}"

    def pretrain_dir(self, backbone: str) -> Path:
        """The cached pretraining of one backbone on the suite's data (shared by every suite with that data)."""
        recipe = self.suite.pretrain[backbone]
        key = _hash({"data": asdict(self.suite.data), "backbone": backbone, "recipe": asdict(recipe)})
        return self.cache / "backbones" / f"{backbone}-{key}"

    def pretrain_weights(self, backbone: str) -> Path:
        return self.pretrain_dir(backbone) / f"{backbone}.pt"

    def backbone_of(self, pair: Pair, model: str) -> str | None:
        """The pretrained backbone a run of ``pair`` on detector ``model`` starts from (None: the pair does not)."""
        if not pair.pretrained:
            return None
        from detkd.models.detectors import split_name

        backbone = split_name(model)[1]
        if backbone not in self.suite.pretrain:
            raise ConfigError(
                f"suite {self.suite.name}: pair {pair.name} is pretrained but the suite pretrains no {backbone} "
                f"(it pretrains: {', '.join(self.suite.pretrain) or 'nothing'})"
            )
        return backbone

    def teacher_dir(self, pair: Pair, iters: int | None = None) -> Path:
        """The cached teacher of ``pair`` trained for ``iters`` steps (default: the pair's teacher schedule). A
        teacher trained at another schedule (the regime study's 2x run) is the pair's teacher once its schedule
        becomes that one."""
        fields: dict[str, Any] = {
            "data": asdict(self.suite.data),
            "model": pair.teacher,
            "iters": pair.teacher_iters if iters is None else iters,
            "overrides": key_overrides(pair.overrides),
        }
        backbone = self.backbone_of(pair, pair.teacher) if pair.teacher else None
        if backbone:  # only when set: the folders of teachers trained from scratch keep their names
            fields["backbone"] = self.pretrain_dir(backbone).name
        return self.cache / "teachers" / f"{pair.teacher}-{_hash(fields)}"

    def run_dir(self, spec: RunSpec) -> Path:
        """A run's folder, keyed by everything that defines the run: a changed setting never reuses old results."""
        if spec.kind == "pretrain":
            return self.pretrain_dir(spec.model)
        pair = self._pair(spec.pair)
        if spec.kind == "teacher" or spec.teacher_row:
            return self.teacher_dir(pair, spec.iters)
        teacher = self.teacher_dir(pair).name if pair.teacher and spec.command == "distill" else None
        fields: dict[str, Any] = {
            "data": asdict(self.suite.data),
            "model": spec.model,
            "iters": spec.iters,
            "overrides": key_overrides(spec.overrides),
            "methods": spec.methods,
            "teacher": teacher,
        }
        # Only when set, so that the folders of runs without them keep their names.
        if spec.backbone:
            fields["backbone"] = self.pretrain_dir(spec.backbone).name
        if spec.init is not None:
            fields["init"] = self.run_dir(spec.init).relative_to(self.root).as_posix()
        # Content-addressed: two rows with identical settings (e.g. a reference student that equals another pair's
        # baseline) share one run.
        name = spec.model + ("+" + "+".join(spec.methods) if spec.methods else "")
        return self.root / "runs" / name / _hash(fields) / f"seed{spec.seed}"

    def measured_seconds(self, spec: RunSpec) -> float | None:
        """What ``spec`` costs by the runs of this output folder that have finished: its own time when it has run,
        else its iterations times the step time of a finished run of the same detector and methods (a pretraining:
        of the same backbone); None when no such run has finished."""
        out = self.run_dir(spec)
        if spec.kind == "pretrain":
            report = out / f"{spec.model}.json"
            if report.exists():
                return json.loads(report.read_text()).get("train_time_s")
            rates = [
                json.loads(p.read_text())["train_time_s"] / max(1, json.loads(p.read_text())["iters"])
                for p in self.cache.glob(f"backbones/{spec.model}-*/{spec.model}.json")
            ]
            return statistics.median(rates) * spec.iters if rates else None
        if (out / "final.json").exists():
            return run_seconds(json.loads((out / "final.json").read_text()))
        name = spec.model + ("+" + "+".join(spec.methods) if spec.methods else "")
        finals = [*self.root.glob(f"runs/{name}/*/seed*/final.json")]
        if spec.kind == "teacher" or spec.teacher_row or not spec.methods:
            finals += [*self.cache.glob(f"teachers/{spec.model}-*/final.json")]
        rates = [r for r in (json.loads(p.read_text()).get("step_time_s") for p in finals) if r]
        return statistics.median(rates) * spec.iters if rates else None

    def dependencies(self, spec: RunSpec) -> list[Path]:
        """The run folders ``spec`` reads: its pretrained backbone, its teacher, the run it is initialised from."""
        deps = [self.pretrain_dir(spec.backbone)] if spec.backbone else []
        if spec.kind not in ("pretrain", "teacher"):
            pair = self._pair(spec.pair)
            if spec.command == "distill" and pair.teacher and needs_teacher("+".join(spec.methods)):
                deps.append(self.teacher_dir(pair))
        if spec.init is not None:
            deps.append(self.run_dir(spec.init))
        return deps

    def inputs(self, spec: RunSpec) -> list[str]:
        """Overrides naming the files ``spec`` reads (paths are not part of its key, the folders' names are)."""
        extra = [f"model.backbone_weights={self.pretrain_weights(spec.backbone)}"] if spec.backbone else []
        if spec.init is not None:
            extra.append(f"model.weights={self.run_dir(spec.init) / 'student.pt'}")
        return extra

    def _pair(self, name: str) -> Pair:
        return next(p for p in self.pairs if p.name == name)

    def _selected(self, row: str) -> bool:
        return not self.only or row in self.only or any(m in self.only for m in row.split("+"))

    def _method_rows(self, pair: Pair) -> list[str]:
        return [r for r in pair.methods if self._selected(r)]

    def _calibrate(self, pair: Pair) -> list[str]:
        on = self.suite.calibrate if pair.calibrate is None else pair.calibrate
        return ["distill.calibrate=auto"] if on else []

    def _eval_cap(self) -> list[str]:
        return [f"data.val_max_images={self.suite.eval_images}"] if self.suite.eval_images else []

    def pretrain_specs(self, all_teachers: bool = False) -> list[RunSpec]:
        """One pretrain run per backbone that a planned run starts from (``all_teachers``: also the backbone of
        teachers no selected row needs, for the learning curves)."""
        backbones: dict[str, str] = {}
        for pair in self.pairs:
            models = [pair.student, *(m for m, _ in pair.references.values())]
            if pair.teacher and (all_teachers or any(self._needs_teacher(m) for m in self._method_rows(pair))):
                models.append(pair.teacher)
            for model in models:
                backbone = self.backbone_of(pair, model)
                if backbone:
                    backbones.setdefault(backbone, pair.name)
        specs = []
        cap = ["--val-max-images", str(self.suite.eval_images)] if self.suite.eval_images else []
        for backbone, pair_name in backbones.items():
            recipe: PretrainRecipe = self.suite.pretrain[backbone]
            options = ["--crop-size", str(recipe.crop_size), "--batch-size", str(recipe.batch_size), *cap]
            specs.append(
                RunSpec(pair_name, f"pretrain:{backbone}", "pretrain", "pretrain", backbone, recipe.iters, 0, options)
            )
        return specs

    def plan(self) -> list[RunSpec]:
        """Pretrained backbones and teachers first, then per seed: baseline, references, methods, variants and
        fine-tunes (time-matched runs come later)."""
        specs = self.pretrain_specs()
        eval_cap = self._eval_cap()
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
                        backbone=self.backbone_of(pair, pair.teacher),
                    )
                )
        for seed in range(self.seeds):
            for pair in self.pairs:
                student = pair.overrides + pair.student_overrides + eval_cap
                backbone = self.backbone_of(pair, pair.student)
                baseline = RunSpec(
                    pair.name,
                    "baseline",
                    "baseline",
                    "train",
                    pair.student,
                    pair.student_iters,
                    seed,
                    student,
                    backbone=backbone,
                )
                specs.append(baseline)
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
                            backbone=self.backbone_of(pair, model),
                        )
                    )
                calibrate = self._calibrate(pair)
                rows = [(row, row, []) for row in self._method_rows(pair)]
                rows += [(key, row, extra) for key, (row, extra) in pair.variants.items() if self._selected(row)]
                for key, row, own in rows:
                    if seed and key in pair.one_seed:
                        continue
                    # A variant that sets the calibration itself shows the other choice on the same pair.
                    own_calibration = any(o.startswith("distill.calibrate=") for o in own)
                    extra = (
                        ([] if own_calibration else calibrate)
                        + [o for m in row.split("+") for o in pair.method_overrides.get(m, [])]
                        + own
                    )
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
                            backbone=backbone,
                        )
                    )
                for key, ft in pair.finetunes.items():
                    if ft.methods and not self._selected(ft.methods):
                        continue
                    methods = ft.methods.split("+") if ft.methods else []
                    extra = (calibrate if methods else []) + [
                        o for m in methods for o in pair.method_overrides.get(m, [])
                    ]
                    specs.append(
                        RunSpec(
                            pair.name,
                            key,
                            "finetune",
                            "distill" if methods else "train",
                            pair.student,
                            ft.iters,
                            seed,
                            student + extra + ft.overrides,
                            methods=methods,
                            init=baseline,  # model.weights replaces the pretrained backbone
                        )
                    )
        return specs

    @staticmethod
    def _needs_teacher(row: str) -> bool:
        return needs_teacher(row)

    def time_matched_specs(self, timing: dict[str, Any]) -> list[RunSpec]:
        """Baselines trained for as long (in wall-clock) as each method's runs, from the measured ratios: every seed
        of a factor that a row with every seed needs, seed 0 only of one that only seed-0 rows (``one_seed``) need."""
        specs = []
        eval_cap = self._eval_cap()
        for pair in self.pairs:
            if not pair.time_matched:
                continue
            needs: dict[float, list[str]] = {}
            for row in self._method_rows(pair):
                factor = self.tm_factor(timing, pair.name, row)
                if factor is not None and factor > 1.0:
                    needs.setdefault(factor, []).append(row)
            for factor, rows in sorted(needs.items()):
                seeds = 1 if all(row in pair.one_seed for row in rows) else self.seeds
                for seed in range(seeds):
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
                            backbone=self.backbone_of(pair, pair.student),
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
