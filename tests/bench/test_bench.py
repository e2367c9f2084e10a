"""The benchmark's planning, aggregation and report; the smoke suite end to end is a slow test."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from detkd.bench.report import aggregate, goals, render_markdown
from detkd.bench.runner import Bench
from detkd.bench.suites import SUITES


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_suite_plans_registered_detectors_and_methods(suite, tmp_path):
    from detkd.methods import METHODS
    from detkd.models.backbones import BACKBONES
    from detkd.models.detectors import split_name

    bench = Bench(SUITES[suite], tmp_path)
    specs = bench.plan()
    assert specs
    for spec in specs:
        if spec.kind == "pretrain":
            BACKBONES.get(spec.model)
            continue
        split_name(spec.model)
        for m in spec.methods:
            METHODS.get(m)
    # Same schedule and seeds for the baseline and every method row of a pair, except the context rows the pair
    # trains for seed 0 only; no method a goal judges is one of those.
    every = list(range(SUITES[suite].seeds))
    for pair in SUITES[suite].pairs:
        rows = [s for s in specs if s.pair == pair.name and s.kind in ("baseline", "method")]
        assert len({s.iters for s in rows}) == 1
        seeds = {s.row: sorted(x.seed for x in rows if x.row == s.row) for s in rows}
        assert seeds == {row: [0] if row in pair.one_seed else every for row in seeds}
        assert not any(METHODS.get(m).benchmark_goal for row in pair.one_seed for m in row.split("+"))


def test_pairs_filter_plans_only_those_pairs_and_names_bad_ones(tmp_path):
    from detkd.errors import ConfigError

    bench = Bench(SUITES["gpu"], tmp_path, pairs=["lgd_r50"])
    specs = bench.plan()
    assert {s.pair for s in specs} == {"lgd_r50"}
    assert not any(s.kind == "teacher" for s in specs)  # the lgd pair of the gpu suite is teacher-free
    with pytest.raises(ConfigError, match="no pair nope"):
        Bench(SUITES["cpu"], tmp_path, pairs=["nope"])


def test_a_bench_that_would_crowd_the_cores_says_so_and_how_to_fit(tmp_path):
    # Two cores, one bench already training with one thread: a second bench's default threads (cores / jobs = 2)
    # would give the machine three busy threads for two cores; one thread fits.
    crowded = Bench(SUITES["cpu"], tmp_path, jobs=1, threads=2).crowding(load=1.0, cores=2)
    assert crowded and "load is 1.0 on 2 cores" in crowded and "--threads 1" in crowded
    assert Bench(SUITES["cpu"], tmp_path, jobs=1, threads=1).crowding(load=1.0, cores=2) is None
    assert Bench(SUITES["cpu"], tmp_path, jobs=2, threads=1).crowding(load=0.1, cores=2) is None
    assert "--jobs 1 --threads 1" in Bench(SUITES["cpu"], tmp_path, jobs=2, threads=1).crowding(load=1.0, cores=2)
    assert "--threads 4" in Bench(SUITES["cpu"], tmp_path, jobs=2, threads=8).crowding(load=8.0, cores=16)


def test_variants_are_method_rows_with_their_own_settings(tmp_path):
    bench = Bench(SUITES["cpu"], tmp_path, pairs=["retinanet"], seeds=1)
    specs = {s.row: s for s in bench.plan()}
    plain, auto = specs["gkd"], specs["gkd-auto"]
    assert auto.kind == "method" and auto.methods == ["gkd"]
    assert auto.overrides == plain.overrides + ["distill.calibrate=auto"]
    assert bench.run_dir(auto) != bench.run_dir(plain)
    pretrain = {"pretrain:r18", "pretrain:r50"}
    only_kd = {s.row for s in Bench(SUITES["cpu"], tmp_path, pairs=["retinanet"], seeds=1, methods=["kd"]).plan()}
    assert only_kd == pretrain | {"teacher", "baseline", "kd"}
    only_gkd = {s.row for s in Bench(SUITES["cpu"], tmp_path, pairs=["retinanet"], seeds=1, methods=["gkd"]).plan()}
    assert only_gkd == pretrain | {"teacher", "baseline", "gkd", "gkd-auto"}


class FakeRuns:
    """Stands in for ``Bench._launch``: logs when each run folder starts and ends; a run in ``hold`` waits for its
    event (10 s at most), a run in ``signal`` sets its event once started, a run in ``fail`` fails."""

    def __init__(self, bench, hold=None, signal=None, fail=()):
        self.bench, self.hold, self.signal, self.fail = bench, hold or {}, signal or {}, set(fail)
        self.log: list[tuple[str, str, str]] = []
        self.seen: set = set()
        self.lock = threading.Lock()

    def __call__(self, spec):
        out = self.bench.run_dir(spec)
        with self.lock:
            first = out not in self.seen
            self.seen.add(out)
        if first:
            self.log.append(("start", spec.pair, spec.row))
            if (spec.pair, spec.row) in self.signal:
                self.signal[spec.pair, spec.row].set()
            if (spec.pair, spec.row) in self.hold:
                self.hold[spec.pair, spec.row].wait(timeout=10)
            self.log.append(("end", spec.pair, spec.row))
        failed = (spec.pair, spec.row) in self.fail
        record = {"pair": spec.pair, "row": spec.row, "kind": spec.kind, "seed": spec.seed}
        return {**record, "failed": True} if failed else record


def test_a_distillation_row_starts_once_its_own_teacher_is_done(tmp_path, monkeypatch):
    bench = Bench(SUITES["gpu"], tmp_path, seeds=1, pairs=["frcnn", "lgd_r50"], methods=["kd", "lgd"], jobs=2)
    kd_started = threading.Event()
    runs = FakeRuns(bench, hold={("lgd_r50", "lgd"): kd_started}, signal={("frcnn", "kd"): kd_started})
    monkeypatch.setattr(bench, "_launch", runs)
    records = bench.run_all(bench.plan())
    assert runs.log.index(("start", "frcnn", "teacher")) > runs.log.index(("end", "frcnn", "pretrain:r50"))
    assert runs.log.index(("start", "frcnn", "kd")) > runs.log.index(("end", "frcnn", "teacher"))
    # kd started while the teacher-free lgd row of the other pair was still running (that row waits for kd).
    assert runs.log.index(("start", "frcnn", "kd")) < runs.log.index(("end", "lgd_r50", "lgd"))
    assert sorted((r["pair"], r["row"]) for r in records) == sorted((s.pair, s.row) for s in bench.plan())


def test_rows_of_a_failed_teacher_are_dropped_and_the_rest_run(tmp_path, monkeypatch):
    bench = Bench(SUITES["gpu"], tmp_path, seeds=2, pairs=["frcnn", "lgd_r50"], methods=["kd", "lgd"], jobs=2)
    runs = FakeRuns(bench, fail={("frcnn", "teacher")})
    monkeypatch.setattr(bench, "_launch", runs)
    rows = {(r["pair"], r["row"]) for r in bench.run_all(bench.plan())}
    assert ("frcnn", "kd") not in rows and not any(e[2] == "kd" for e in runs.log)
    assert {("frcnn", "teacher"), ("frcnn", "baseline"), ("lgd_r50", "baseline"), ("lgd_r50", "lgd")} <= rows


def test_a_resumed_suite_keeps_its_timing_unless_a_checkpoint_changed(tmp_path, monkeypatch):
    from detkd.bench import timing as bench_timing

    bench = Bench(SUITES["gpu"], tmp_path, seeds=1, pairs=["lgd_r50"])
    baseline = bench.run_dir(next(s for s in bench.plan() if s.row == "baseline")) / "student.pt"
    baseline.parent.mkdir(parents=True)
    baseline.write_bytes(b"weights")
    calls = []
    monkeypatch.setattr(bench_timing, "time_pair", lambda **kw: calls.append(kw) or {"student_step_s": len(calls)})
    monkeypatch.setattr(bench_timing, "time_detectors", lambda **kw: {"detectors": {}})
    first = bench.measure()
    assert len(calls) == 1 and first["lgd_r50"]["student_step_s"] == 1
    again = bench.measure(saved=json.loads(json.dumps(first)))  # as read back from results.json
    assert len(calls) == 1 and again["lgd_r50"] == first["lgd_r50"]
    baseline.write_bytes(b"other weights")  # re-trained: measured anew
    assert bench.measure(saved=first)["lgd_r50"]["student_step_s"] == 2
    narrower = Bench(SUITES["gpu"], tmp_path, seeds=1, pairs=["lgd_r50"], methods=["nothing"])
    assert narrower.measure(saved=first)["lgd_r50"]["student_step_s"] == 3  # other rows: measured anew


def fake_results() -> dict:
    def rec(row, kind, seed, ap, model="frcnn_r18", iters=300):
        return {
            "pair": "frcnn",
            "row": row,
            "kind": kind,
            "seed": seed,
            "model": model,
            "methods": [],
            "iters": iters,
            "run": "/nonexistent",
            "AP": ap,
            "AP50": ap + 0.2,
            "AP75": ap,
            "train_time_s": 100.0,
            "step_time_s": 0.5,
            "peak_memory_mb": 1000.0,
        }

    records = [rec("teacher", "teacher", 0, 0.60, "frcnn_r50", 2000)]
    records += [rec("baseline", "baseline", s, ap) for s, ap in enumerate([0.40, 0.42, 0.41])]
    records += [rec("kd", "method", s, ap) for s, ap in enumerate([0.47, 0.48, 0.49])]
    records += [rec("fitnet", "method", s, ap) for s, ap in enumerate([0.41, 0.42, 0.40])]
    records += [rec("tm1.25", "time_matched", s, ap, iters=375) for s, ap in enumerate([0.44, 0.45, 0.43])]
    pair = {
        "name": "frcnn",
        "teacher": "frcnn_r50",
        "student": "frcnn_r18",
        "methods": ["kd", "fitnet"],
        "teacher_iters": 2000,
        "student_iters": 300,
        "overrides": [],
        "student_overrides": [],
        "method_overrides": {},
        "references": {},
        "time_matched": True,
        "feature_methods": ["kd", "fitnet"],
    }
    timing = {
        "frcnn": {
            "student_step_s": 0.5,
            "teacher_forward_s": 0.2,
            "batch_size": 8,
            "threads": 2,
            "rows": {
                "kd": {"step_s": 0.6, "ratio": 0.6 / 0.7, "ratio_student": 1.2},
                "fitnet": {"step_s": 0.9, "ratio": 0.9 / 0.7, "ratio_student": 1.8},
            },
        }
    }
    return {
        "suite": "cpu",
        "description": "test",
        "data": {"difficulty": "hard", "train": 10, "val": 5, "size": 64, "seed": 0},
        "pairs": [pair],
        "seeds": 3,
        "time_grid": 0.25,
        "jobs": 1,
        "threads_per_run": 2,
        "machine": {"cpu": "x", "cores": 2, "gpu": None, "python": "3", "torch": "2"},
        "date": "today",
        "command": "detkd bench",
        "records": records,
        "timing": timing,
        "wall_s": 3600,
    }


def test_aggregate_gains_gap_and_time_matched():
    results = fake_results()
    table = {e["row"]: e for e in aggregate(results)}
    assert table["baseline"]["AP"]["mean"] == pytest.approx(0.41)
    assert table["baseline"]["AP"]["std"] == pytest.approx(0.01)
    kd = table["kd"]
    assert kd["gain"] == pytest.approx(0.07)
    assert kd["gain_over_2std"] is True
    assert kd["gap_closed"] == pytest.approx(0.07 / 0.19)
    # kd costs 1.2x the student step -> rounded up to the 1.25 grid -> compared with tm1.25 (mean 0.44).
    assert kd["time_matched_row"] == "tm1.25" and kd["gain_time_matched"] == pytest.approx(0.04)
    fitnet = table["fitnet"]
    assert fitnet["gain_over_2std"] is False
    # 1.8x has no time-matched baseline in the records -> reported as missing, not silently compared.
    assert fitnet["time_matched_row"] is None and fitnet["gain_time_matched"] is None
    # The time-matched row is the baseline's model and batch: no memory figure of its own.
    assert table["tm1.25"]["peak_memory_mb"] is None and table["baseline"]["peak_memory_mb"] == 1000.0


def test_diverged_timing_row_gets_no_step_ratio():
    results = fake_results()
    results["timing"]["frcnn"]["rows"]["kd"]["nonfinite_steps"] = 3
    table = {e["row"]: e for e in aggregate(results)}
    assert table["kd"]["step_ratio"] is None and table["kd"]["time_matched_row"] is None
    assert table["fitnet"]["step_ratio"] == pytest.approx(0.9 / 0.7)


def test_teacher_free_row_in_a_teacher_pair_is_timed_against_the_student_alone():
    results = fake_results()
    results["pairs"][0]["methods"].append("lgd")
    results["timing"]["frcnn"]["rows"]["lgd"] = {"step_s": 1.0, "ratio": 1.0 / 0.7, "ratio_student": 2.0}
    results["records"] += [
        {**results["records"][1], "row": "lgd", "kind": "method", "seed": s, "AP": 0.42} for s in range(3)
    ]
    table = {e["row"]: e for e in aggregate(results)}
    assert table["lgd"]["step_ratio"] == pytest.approx(2.0)
    assert table["kd"]["step_ratio"] == pytest.approx(0.6 / 0.7)


def test_timed_steps_keep_the_weights_even_when_the_loss_blows_up(batch):
    from detkd.bench.timing import frozen_train_step
    from detkd.config import load_config
    from detkd.distillation import DistillModel, build_distillers
    from tests.conftest import tiny

    student, teacher = tiny("frcnn_r18"), tiny("frcnn_r18").eval().requires_grad_(False)
    torch.manual_seed(1)
    for p in teacher.parameters():
        p.data.add_(0.1 * torch.randn_like(p))  # a teacher unlike the student: a large feature loss
    model = DistillModel(student, teacher, build_distillers(["fitnet"], {}, student, teacher), {"fitnet": 1e6})
    before = {k: v.clone() for k, v in model.trainable_module.named_parameters()}
    step = frozen_train_step(model, load_config().optim, [batch])
    assert all(step() for _ in range(3))
    after = dict(model.trainable_module.named_parameters())
    assert max(p.grad.abs().max() for p in after.values() if p.grad is not None) > 0  # a real step would move
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_goals_and_markdown(tmp_path):

    results = fake_results()
    results["table"] = aggregate(results)
    g = {goal: ok for goal, ok, _ in goals(results)}
    assert g["at least one method's student reaches its teacher's mAP"] is False
    overhead = {k: v for k, v in g.items() if "overhead" in k}
    assert overhead == {
        "step overhead ≤ 1.15× (student step + teacher forward): frcnn/kd": True,
        "step overhead ≤ 1.15× (student step + teacher forward): frcnn/fitnet": False,
    }
    md = render_markdown(results, {}, tmp_path)
    assert "| kd | 300 | 0.480 ± 0.010" in md
    assert "**no**" in md and "not run here" in md


def test_goal_evidence_states_the_same_wall_clock_gain():
    results = fake_results()  # kd stands in for a seed method here
    for record in results["records"]:
        record["row"] = "gkd" if record["row"] == "kd" else record["row"]
    results["pairs"][0]["methods"] = ["gkd", "fitnet"]
    results["timing"]["frcnn"]["rows"]["gkd"] = results["timing"]["frcnn"]["rows"].pop("kd")
    results["table"] = aggregate(results)
    evidence = {goal: text for goal, _, text in goals(results)}
    assert evidence["`gkd` (frcnn) beats its baseline by > 2 std of the baseline's seeds"] == (
        "gain +0.070, 2 std = 0.020 (n = 3); +0.040 against the same-wall-clock baseline `tm1.25`; "
        "gap closed 37% (paper: 157%)"  # GKD.paper_gap_closed
    )


def test_the_report_states_the_regime_study_under_each_pair_and_beside_a_missed_goal(tmp_path):
    results = fake_results()
    for record in results["records"]:  # gkd stands in for a seed method, and misses its goal
        if record["row"] == "kd":
            record["row"], record["AP"] = "gkd", record["AP"] - 0.065
    results["pairs"][0]["methods"] = ["gkd", "fitnet"]
    results["timing"]["frcnn"]["rows"]["gkd"] = results["timing"]["frcnn"]["rows"].pop("kd")
    results["table"] = aggregate(results)
    plain = {goal: text for goal, _, text in goals(results)}
    results["regime"] = [
        {
            "pair": "frcnn",
            "student_2x": 0.44,
            "student_2x_gain": 0.03,
            "student_converged": False,
            "teacher_2x": 0.61,
            "teacher_plateau": True,
            "gap": 0.055,
            "gap_ok": False,
        }
    ]
    goal = "`gkd` (frcnn) beats its baseline by > 2 std of the baseline's seeds"
    met = {g: ok for g, ok, _ in goals(results)}
    evidence = {g: text for g, _, text in goals(results)}
    assert met[goal] is False
    assert evidence[goal] == plain[goal] + (
        "; the pair's regime: teacher − student is 0.055, below the protocol's 0.08, and the student alone still "
        "gains +0.030 at twice the schedule"
    )
    md = render_markdown(results, {}, tmp_path)
    assert (
        "Regime study: the student alone at twice the schedule 0.440 (+0.030; converged: **no**); the teacher at "
        "twice its schedule 0.610 (at its plateau: yes); teacher − student 0.055 (≥ 0.08: **no**)."
    ) in md
    assert "**Regime:**" in md
    # A pair whose teacher is the study's 2x run says so, with the 1x run it was measured against.
    results["regime"][0].update(teacher_1x=0.55, teacher_plateau=False, teacher_is_2x=True)
    assert (
        "the teacher above is the study's 2x run, 0.610 against 0.550 at half its steps (at its plateau at half: "
        "**no**; its own 2x not run); teacher − student 0.055"
    ) in render_markdown(results, {}, tmp_path)
    results["regime"][0].update(teacher_plateau=True, teacher_is_2x=False)
    # A met goal, ahead of the same-wall-clock baseline or not timed against one, gets no shortfalls beside it.
    for record in results["records"]:
        if record["row"] == "gkd":
            record["AP"] += 0.065
    results["table"] = aggregate(results)
    assert "regime" not in {g: text for g, _, text in goals(results)}[goal]
    for e in results["table"]:
        e["gain_time_matched"] = None
    assert "regime" not in {g: text for g, _, text in goals(results)}[goal]
    results["regime"] = None  # a suite run without the study says nothing of it
    md = render_markdown(results, {}, tmp_path)
    assert "Regime study" not in md and "**Regime:**" not in md


def test_the_suite_reads_the_regime_study_from_its_own_runs(tmp_path):
    from detkd.bench.curves import curve_specs, regime
    from tests.bench.test_regime import tiny_suite

    bench = Bench(tiny_suite(), tmp_path)
    assert regime(bench) is None  # no study has run
    specs = {(s.pair, s.row, s.seed): s for s in curve_specs(bench)}
    for key, ap in (
        (("frcnn", "teacher@1x", 0), 0.5),
        (("frcnn", "student@1x", 0), 0.44),
        (("frcnn", "student@1x", 1), 0.46),
        (("frcnn", "student@2x", 0), 0.47),
    ):
        out = bench.run_dir(specs[key])
        out.mkdir(parents=True)
        (out / "final.json").write_text(json.dumps({"iters": 4, "metrics": {"AP": ap}}))
    entry = next(e for e in regime(bench) if e["pair"] == "frcnn")
    assert entry["gap"] == pytest.approx(0.05) and entry["gap_ok"] is False
    assert entry["student_2x_gain"] == pytest.approx(0.02) and entry["student_converged"] is True  # < 2 std


def test_methods_join_the_goals_through_their_class_attributes(monkeypatch):
    from detkd.bench.report import goal_methods, paper_share
    from detkd.methods import METHODS

    assert sorted(m.name for m in goal_methods()) == ["detrdistill", "gkd", "ida", "lgd", "tar"]
    assert [paper_share(METHODS.get(m).paper_gap_closed) for m in ("tar", "detrdistill", "lgd")] == [
        "105%",
        "> 300%",
        "–",
    ]
    monkeypatch.setattr(METHODS.get("kd"), "benchmark_goal", True)
    results = fake_results()
    results["table"] = aggregate(results)
    goal = {g for g, _, _ in goals(results)}
    assert "`kd` (frcnn) beats its baseline by > 2 std of the baseline's seeds" in goal


@pytest.mark.slow
def test_smoke_suite_end_to_end(tmp_path):
    from detkd.cli import main

    assert main(["bench", "--suite", "smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert not [r for r in results["records"] if r.get("failed")]
    rows = {e["row"] for e in results["table"]}
    assert {"teacher", "baseline", "kd", "fitnet"} <= rows
    assert Path(tmp_path / "smoke" / "BENCHMARKS.md").exists()
    assert main(["bench", "--suite", "smoke", "--out", str(tmp_path), "--render", str(tmp_path / "B.md")]) == 0


def test_report_command_names_no_machine_folder():
    from detkd.bench.report import portable_command

    assert portable_command("detkd bench --suite cpu --out /srv/x/benchruns --jobs 2") == (
        "detkd bench --suite cpu --out benchruns --jobs 2"
    )


def test_timing_uses_the_dataset_settings_the_runs_use(tmp_path, monkeypatch):
    """time_pair reads the dataset's detkd.yaml as the training runs do: cost accounted at the runs' image size."""
    from detkd.bench import timing as bench_timing
    from detkd.data import make_digits
    from detkd.engine.checkpoint import save_student
    from tests.conftest import tiny

    data = tmp_path / "digits"
    make_digits(data, train=8, val=2, size=64)
    ckpt = tmp_path / "student.pt"
    save_student(ckpt, tiny("frcnn_r18", 10), [str(i) for i in range(10)])
    sizes = []
    monkeypatch.setattr(bench_timing, "model_cost_or_none", lambda detector, size: sizes.append(size) or {})
    # latency: once
    monkeypatch.setattr(bench_timing, "_median_time", lambda fn, repeats, warmup=2, device=None: fn() or 0.01)
    result = bench_timing.time_pair(data, ckpt, ckpt, ["fitnet"], ["data.batch_size=2"], steps=1)
    assert sizes == [64] and result["batch_size"] == 2
    assert set(result["rows"]) == {"fitnet"} and result["rows"]["fitnet"]["step_s"] > 0


def test_the_published_report_has_the_gpu_suites_table_or_says_it_has_not_run(tmp_path):
    """`--render` of the cpu suite appends the gpu suite: its report one heading level down when a complete run is in
    the output root, else a paragraph saying it has none (and whether an unfinished one is there)."""
    from detkd.bench.report import gpu_section

    base = tmp_path / "repo"
    base.mkdir()
    none = gpu_section(tmp_path, base)
    assert "## Suite `gpu`" in none and "has no complete run;" in none and "docs/benchmark-regime.md" in none

    (tmp_path / "gpu").mkdir()
    unfinished = {**fake_results(), "suite": "gpu", "complete": False}
    (tmp_path / "gpu" / "results.json").write_text(json.dumps(unfinished))
    assert "has no complete run in `gpu/` (its results.json is of an unfinished run)" in gpu_section(tmp_path, base)

    finished = {**fake_results(), "suite": "gpu", "complete": True, "machine": {**unfinished["machine"], "gpu": "H"}}
    (tmp_path / "gpu" / "results.json").write_text(json.dumps(finished))
    text = gpu_section(tmp_path, base)
    assert text.startswith("## detkd benchmark — suite `gpu`") and "\n### Goals" in text and "GPU H" in text
    assert "| kd | 300 | 0.480 ± 0.010" in text
    assert not any(line.startswith("# ") for line in text.splitlines())
