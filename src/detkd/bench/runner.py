"""Running a suite: every run an ordinary ``detkd train``/``distill`` child process in its own folder.

An interrupted suite resumes where it stopped: finished runs are read back, unfinished ones continue from their
``last.pt``; a backbone pretraining (``detkd pretrain``) is reused once its weights file is written, and an
unfinished one resumes from its own checkpoint (``<backbone>.resume.pt``). Stopping ``detkd bench`` (SIGTERM, or
Ctrl-C) stops every child run it started first, so each folder is left as a resumable run (its last checkpoint), and
the same command resumes them.

The timing phase (:mod:`detkd.bench.timing`) runs in this process, after the accuracy runs.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from detkd.bench.plan import Plan, RunSpec, _hash, _stamp, run_seconds
from detkd.bench.progress import Display, RunState, read_log_tail
from detkd.bench.report import aggregate
from detkd.engine.cores import CORES_CHECKED

log = logging.getLogger("detkd")

PROGRESS_TICK_S = 2.0  # how often the running children's logs are read for the progress display
STOP_GRACE_S = 20.0  # how long stopped children get to exit before they are killed


class BenchStopped(Exception):
    """``detkd bench`` was asked to stop (a signal); every child run has been stopped."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`BenchStopped` in the main thread while the suite runs (Ctrl-C already raises
    KeyboardInterrupt), so the runner can stop its children before it exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise BenchStopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_label(spec: RunSpec) -> str:
    """How the progress display names a run: ``frcnn/kd seed 0``, ``frcnn/teacher``, ``pretrain r18``."""
    if spec.kind == "pretrain":
        return f"pretrain {spec.model}"
    return f"{spec.pair}/{spec.row}" + ("" if spec.kind == "teacher" else f" seed {spec.seed}")


STAGES = {"pretrain": 0, "teacher": 1}  # queue order; every other run comes after, in plan order


def done_marker(spec: RunSpec, out: Path) -> Path:
    """The file a finished run leaves last: a pretraining's JSON report, a training run's ``final.json``."""
    return out / f"{spec.model}.json" if spec.kind == "pretrain" else out / "final.json"


class Bench(Plan):
    """Runs and records one suite (see :class:`~detkd.bench.plan.Plan` for the arguments).

    ``command`` is what starts one run (``detkd`` in a child Python); the runs' arguments follow it.
    """

    command: list[str] = [sys.executable, "-m", "detkd.cli"]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen] = set()
        self._stopping = False

    def ensure_data(self) -> Path:
        from detkd.config import DATASET_SETTINGS
        from detkd.data import make_digits
        from detkd.data.digits import write_settings

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
        elif not (self.data_dir / DATASET_SETTINGS).is_file():
            # Made before datasets carried their settings: without them runs would get the defaults for photographs.
            write_settings(self.data_dir, self.suite.data.size)
        return self.data_dir

    def _launch(self, spec: RunSpec) -> dict[str, Any]:
        out = self.run_dir(spec)
        final = done_marker(spec, out)
        if final.exists():
            return self._record(spec, out)
        deps = self.dependencies(spec)
        pair = self._pair(spec.pair)
        teacher = self.teacher_dir(pair) / "student.pt" if pair.teacher and self.teacher_dir(pair) in deps else None
        args = spec.args(self.data_dir, out, teacher, self.inputs(spec))
        if spec.kind == "pretrain":
            pass  # `detkd pretrain` resumes from its own checkpoint, if there is one
        elif (out / "last.pt").exists():
            args.append("--resume")
        elif (out / "best.pt").exists() or (out / "student.pt").exists():
            args.append("--overwrite")  # killed after an evaluation but before its first checkpoint: start over
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        env[CORES_CHECKED] = "1"  # checked for every run before the bench started
        start = time.perf_counter()
        with open(out / "run.log", "a") as logf:
            logf.write(f"$ detkd {' '.join(args)}\n")
            logf.flush()
            with self._lock:  # no child starts once the suite is stopping
                if self._stopping:
                    return {**self._base_record(spec, out), "failed": True, "error": "not started: bench stopped"}
                proc = subprocess.Popen([*self.command, *args], stdout=logf, stderr=subprocess.STDOUT, env=env)
                self._children.add(proc)
            try:
                proc.wait()
            finally:
                with self._lock:
                    self._children.discard(proc)
        wall = time.perf_counter() - start
        if self._stopping:
            return {**self._base_record(spec, out), "failed": True, "error": "stopped", "wall_s": round(wall, 1)}
        if proc.returncode != 0 or not final.exists():
            tail = (out / "run.log").read_text().strip().splitlines()[-1:] or ["?"]
            log.error("%s failed (exit %d): %s", run_label(spec), proc.returncode, tail[0])
            return {**self._base_record(spec, out), "failed": True, "error": tail[0], "wall_s": round(wall, 1)}
        log.info("%s done in %.0f s", run_label(spec), wall)
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
        if spec.kind == "pretrain":
            report = json.loads(done_marker(spec, out).read_text())
            return {
                **self._base_record(spec, out),
                "weights": str(out / f"{spec.model}.pt"),
                "top1": report.get("top1"),
                "top1_objects": report.get("top1_objects"),
                "train_time_s": report.get("train_time_s"),
                "threads": report.get("threads"),
            }
        final = json.loads((out / "final.json").read_text())
        m = final.get("metrics", {})
        return {
            **self._base_record(spec, out),
            "AP": m.get("AP"),
            "AP50": m.get("AP50"),
            "AP75": m.get("AP75"),
            "train_time_s": run_seconds(final),
            "step_time_s": final.get("step_time_s"),
            "peak_memory_mb": final.get("peak_memory_mb"),
            "nonfinite_steps": final.get("nonfinite_steps"),
            "kd_active": final.get("kd_active"),
            "threads": final.get("machine", {}).get("threads"),
        }

    def run_all(self, specs: list[RunSpec]) -> list[dict[str, Any]]:
        """One queue, pretrained backbones and teachers first, then in plan order; a run waits only for the runs it
        reads (:meth:`~detkd.bench.plan.Plan.dependencies`: its backbone, its own pair's teacher, the baseline a
        fine-tune starts from) and is dropped if one of them failed, so a free slot never waits on another pair's
        runs. Progress is shown while the runs go; a stop (SIGTERM, Ctrl-C) stops every child run before it
        propagates."""
        # Rows with identical settings share a run folder: train it once, then record it under each row.
        unique = {self.run_dir(s): s for s in specs}
        queue = sorted(unique.values(), key=lambda s: STAGES.get(s.kind, len(STAGES)))  # stable: plan order otherwise
        # A dependency outside specs (a teacher of the time-matched phase) is done already.
        waits_for = {self.run_dir(s): [d for d in self.dependencies(s) if d in unique] for s in queue}
        states = {out: RunState(run_label(s), s.model, s.iters) for out, s in unique.items()}
        succeeded: dict[Path, bool] = {}
        dropped: set[Path] = set()
        running: dict[Future, Path] = {}
        title = f"detkd bench --suite {self.suite.name}"
        with stop_on_sigterm(), Display(title, self.jobs) as display, ThreadPoolExecutor(self.jobs) as pool:
            try:
                while queue or running:
                    for spec in list(queue):
                        if len(running) >= self.jobs:
                            break
                        out = self.run_dir(spec)
                        if any(d not in succeeded for d in waits_for[out]):
                            continue
                        queue.remove(spec)
                        failed = [d.name for d in waits_for[out] if not succeeded[d]]
                        if failed:
                            log.error("%s not run: the run it reads failed (%s)", run_label(spec), ", ".join(failed))
                            dropped.add(out)
                            succeeded[out] = False  # the runs that read this one are dropped in turn
                            states[out].status = "failed"
                            continue
                        running[pool.submit(self._launch, spec)] = out
                        states[out].status = "running"
                    if not running:
                        if queue:
                            raise RuntimeError(f"bench queue stalled: {len(queue)} run(s) wait on a run never run")
                        break
                    finished, _ = wait(running, timeout=PROGRESS_TICK_S, return_when=FIRST_COMPLETED)
                    for future in finished:
                        out = running.pop(future)
                        succeeded[out] = not future.result().get("failed")
                        states[out].status = "done" if succeeded[out] else "failed"
                    for out in running.values():
                        row = read_log_tail(out / "log.jsonl")
                        if row is not None:
                            states[out].step, states[out].step_time = int(row["iter"]), row.get("step_time")
                    display.update(list(states.values()))
            except BaseException:
                self.stop_children()
                raise
        return [self._launch(s) for s in specs if self.run_dir(s) not in dropped]  # finished runs are read back

    def stop_children(self) -> None:
        """Stop every child run (SIGTERM, then SIGKILL after a grace period) and start no new one. A stopped run
        keeps its last checkpoint: the next ``detkd bench`` resumes it."""
        with self._lock:
            self._stopping = True
            children = list(self._children)
        for proc in children:
            proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if children:
            log.warning("stopped %d running training run(s); run the same command again to resume them", len(children))

    # ----- timing
    def measure(self, saved: dict[str, Any] | None = None) -> dict[str, Any]:
        """Step times in one process, interleaved: student step, teacher forward, each method's step, latency.

        A measurement in ``saved`` (the timing of an earlier results.json of this suite) is kept when it was taken
        from the same checkpoints, rows, settings and machine, so a resumed suite keeps its same-wall-clock plan.
        """
        from detkd.bench import timing as bench_timing

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
            "calibrate": self.suite.calibrate,
            "pretrain": {b: asdict(r) for b, r in self.suite.pretrain.items()},
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
