"""The paper regime in the benchmark: pretrained backbones as a cached stage, calibrated rows, fine-tune rows that
start from their baseline, and the learning-curve study. Planning tests are pure; the tiny suite end to end is slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detkd.bench import suites as suites_module
from detkd.bench.curves import MARKER, curve_specs, render_into, summarise
from detkd.bench.runner import Bench
from detkd.bench.suites import SUITES, DataSpec, FineTune, Pair, PretrainRecipe, Suite
from detkd.errors import ConfigError
from tests.bench.test_bench import FakeRuns

TINY = ["model.min_size=64", "model.max_size=64", "data.batch_size=4", "optim.warmup_iters=2"]


def tiny_suite(**pair_kwargs) -> Suite:
    """Two pairs on tiny data: a pretrained one with a calibrated row, its paper-weight variant and a fine-tune
    row, and a teacher-free pair trained from scratch."""
    pair = dict(
        overrides=TINY + ["distill.check_teacher=0"],
        method_overrides={"kd": ["distill.calibrate_iters=2"]},
        variants={"kd-paper": ("kd", suites_module.PAPER_WEIGHTS)},
        finetunes={"kd-finetune": FineTune("kd", 3), "finetune-alone": FineTune("", 3)},  # > calibrate_iters
        time_matched=False,
        pretrained=True,
        calibrate=True,
    )
    pair.update(pair_kwargs)
    return Suite(
        "tiny",
        "test",
        DataSpec("easy", 12, 4, 64, 0),
        [
            Pair("frcnn", "frcnn_r18", "frcnn_r18", ["kd"], 4, 4, **pair),
            Pair("free", None, "frcnn_r18", ["lgd"], 0, 4, overrides=TINY, time_matched=False),
        ],
        seeds=2,
        timing_steps=2,
        pretrain={"r18": PretrainRecipe(iters=4, crop_size=32, batch_size=4)},
    )


def test_a_pretrained_pair_plans_one_pretraining_per_backbone_that_its_runs_read(tmp_path):
    bench = Bench(tiny_suite(), tmp_path)
    specs = bench.plan()
    pretrain = [s for s in specs if s.kind == "pretrain"]
    assert [(s.row, s.command, s.model, s.iters) for s in pretrain] == [("pretrain:r18", "pretrain", "r18", 4)]
    assert specs[0] is pretrain[0]
    weights = bench.pretrain_weights("r18")
    assert weights.parent == bench.run_dir(pretrain[0]) and weights.parent.parent == tmp_path / "cache" / "backbones"
    args = pretrain[0].args(bench.data_dir, bench.run_dir(pretrain[0]), None)
    assert args[:2] == ["pretrain", "--backbone"] and ["--crop-size", "32", "--batch-size", "4"] == args[-4:]
    frcnn = [s for s in specs if s.pair == "frcnn" and s.kind in ("teacher", "baseline", "method")]
    assert {s.row for s in frcnn} == {"teacher", "baseline", "kd", "kd-paper"}
    for spec in frcnn:
        assert f"model.backbone_weights={weights}" in bench.inputs(spec)
        assert bench.pretrain_dir("r18") in bench.dependencies(spec)
    # The pair trained from scratch reads no pretrained backbone.
    free = [s for s in specs if s.pair == "free"]
    assert free and all(s.backbone is None and not bench.inputs(s) for s in free)
    # Another recipe is another folder, and the runs that read it move with it.
    other = tiny_suite()
    other.pretrain["r18"] = PretrainRecipe(iters=5, crop_size=32, batch_size=4)
    moved = Bench(other, tmp_path)
    baseline = next(s for s in specs if s.row == "baseline" and s.pair == "frcnn")
    assert moved.pretrain_dir("r18") != bench.pretrain_dir("r18")
    assert moved.run_dir(baseline) != bench.run_dir(baseline)


def test_a_pretrained_pair_needs_its_backbones_in_the_suite(tmp_path):
    suite = tiny_suite()
    suite.pairs[0] = Pair("frcnn", "frcnn_r50", "frcnn_r18", ["kd"], 4, 4, pretrained=True)
    with pytest.raises(ConfigError, match="pretrains no r50"):
        Bench(suite, tmp_path).plan()


def test_calibration_switch_and_the_paper_weight_variant(tmp_path):
    specs = {(s.pair, s.row, s.seed): s for s in Bench(tiny_suite(), tmp_path).plan()}
    assert "distill.calibrate=auto" in specs["frcnn", "kd", 0].overrides
    paper = specs["frcnn", "kd-paper", 0].overrides
    assert "distill.calibrate=off" in paper and "distill.calibrate=auto" not in paper
    assert not any("calibrate" in o for o in specs["frcnn", "baseline", 0].overrides)
    assert not any("calibrate" in o for o in specs["free", "lgd", 0].overrides)  # the suite's default: off
    suite = tiny_suite(calibrate=None)
    suite.calibrate = True  # the suite-level switch reaches every pair that does not say otherwise
    specs = {(s.pair, s.row, s.seed): s for s in Bench(suite, tmp_path).plan()}
    assert "distill.calibrate=auto" in specs["free", "lgd", 0].overrides
    assert "distill.calibrate=auto" in specs["frcnn", "kd", 0].overrides


def test_a_fine_tune_row_starts_from_the_baseline_of_its_own_seed(tmp_path):
    bench = Bench(tiny_suite(), tmp_path)
    specs = {(s.row, s.seed): s for s in bench.plan() if s.pair == "frcnn"}
    for seed in (0, 1):
        ft, alone, base = specs["kd-finetune", seed], specs["finetune-alone", seed], specs["baseline", seed]
        assert (ft.kind, ft.command, ft.methods, ft.iters) == ("finetune", "distill", ["kd"], 3)
        assert (alone.kind, alone.command, alone.methods) == ("finetune", "train", [])
        for spec in (ft, alone):
            assert bench.run_dir(base) in bench.dependencies(spec)
            # The whole detector comes from the baseline: no backbone file on top of it.
            assert bench.inputs(spec) == [f"model.weights={bench.run_dir(base) / 'student.pt'}"]
        assert "distill.calibrate=auto" in ft.overrides and "distill.calibrate_iters=2" in ft.overrides
        assert bench.teacher_dir(bench.suite.pairs[0]) in bench.dependencies(ft)
    assert bench.run_dir(specs["kd-finetune", 0]) != bench.run_dir(specs["kd-finetune", 1])
    only_lgd = {s.row for s in Bench(tiny_suite(), tmp_path, methods=["lgd"]).plan() if s.pair == "frcnn"}
    assert only_lgd == {"pretrain:r18", "baseline", "finetune-alone"}  # the control is a baseline, always run


def test_runs_start_after_what_they_read_and_a_failed_stage_drops_its_readers(tmp_path, monkeypatch):
    bench = Bench(tiny_suite(), tmp_path, seeds=1, jobs=2)
    runs = FakeRuns(bench)
    monkeypatch.setattr(bench, "_launch", runs)
    records = bench.run_all(bench.plan())
    order = runs.log
    assert order[0] == ("start", "frcnn", "pretrain:r18")
    end_pretrain = order.index(("end", "frcnn", "pretrain:r18"))
    assert order.index(("start", "frcnn", "teacher")) > end_pretrain
    assert order.index(("start", "frcnn", "baseline")) > end_pretrain
    for row in ("kd-finetune", "finetune-alone"):
        assert order.index(("start", "frcnn", row)) > order.index(("end", "frcnn", "baseline"))
    assert len(records) == len(bench.plan())

    bench = Bench(tiny_suite(), tmp_path / "failed", seeds=1, jobs=2)
    runs = FakeRuns(bench, fail={("frcnn", "pretrain:r18")})
    monkeypatch.setattr(bench, "_launch", runs)
    rows = {(r["pair"], r["row"]) for r in bench.run_all(bench.plan())}  # no stall on the fine-tunes
    assert {r for r in rows if r[0] == "frcnn"} == {("frcnn", "pretrain:r18")}
    assert {("free", "baseline"), ("free", "lgd")} <= rows


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_cpu_and_gpu_suites_are_the_paper_regime(tmp_path, name):
    assert not hasattr(suites_module, "FEATURE_SCALE") and not hasattr(suites_module, "RETINANET_FEATURE_SCALE")
    bench = Bench(SUITES[name], tmp_path)
    specs = bench.plan()
    assert bench.seeds == 3
    rows = {
        p: {s.row for s in specs if s.pair == p and s.kind in ("method", "finetune")} for p in ("frcnn", "retinanet")
    }
    assert {"tar", "gkd", "kd", "defeat", "fitnet", "fgfi", "gkd-finetune"} <= rows["frcnn"]
    assert {"gkd", "kd", "lgd"} <= rows["retinanet"]
    pairs = {p.name: p for p in SUITES[name].pairs}
    assert pairs["binary"].references == {"real_r18": ("frcnn_r18", [])} and pairs["binary"].methods == ["ida"]
    assert pairs["detr"].methods == ["detrdistill"]
    # Teacher-free LGD on a dense detector: the RetinaNet pair's R18 student (cpu), also RetinaNet R50 (gpu).
    assert "lgd" in pairs["retinanet"].methods and ("lgd_r50" in pairs) == (name == "gpu")
    assert "lgd_r50" not in pairs or pairs["lgd_r50"].teacher is None
    # Every run except the pretrainings and the fine-tunes starts from a pretrained backbone.
    assert all(s.backbone for s in specs if s.kind not in ("pretrain", "finetune"))
    assert {s.model for s in specs if s.kind == "pretrain"} == {"r18", "r50", "bireal18"}
    # One method both at its paper's weights and calibrated, on the same pair.
    by_row = {(s.pair, s.row): s.overrides for s in specs if s.seed == 0}
    calibrated = {k for k, o in by_row.items() if "distill.calibrate=auto" in o}
    assert ("frcnn", "gkd") in calibrated and ("frcnn", "gkd-paper") not in calibrated
    assert ("retinanet", "gkd") not in calibrated and ("retinanet", "gkd-auto") in calibrated
    # No hand-tuned loss constant in any suite.
    for suite in SUITES.values():
        for pair in suite.pairs:
            for overrides in [*pair.method_overrides.values(), *(o for _, o in pair.variants.values())]:
                assert not [o for o in overrides if "weights" in o], (suite.name, pair.name, overrides)


def test_demo_and_smoke_do_not_pretrain_and_keep_their_run_folders(tmp_path):
    for name in ("demo", "smoke"):
        bench = Bench(SUITES[name], tmp_path)
        specs = bench.plan()
        assert not [s for s in specs if s.kind == "pretrain" or s.backbone or s.init]
        assert all(not bench.inputs(s) for s in specs)
    demo = Bench(SUITES["demo"], tmp_path).plan()
    assert [(s.row, s.iters) for s in demo] == [("teacher", 500), ("baseline", 250), ("kd+fitnet", 250)]


def test_curve_runs_are_teachers_and_students_at_1x_and_2x_with_periodic_evaluation(tmp_path):
    bench = Bench(tiny_suite(time_matched=True), tmp_path)
    specs = curve_specs(bench)
    assert [s.kind for s in specs[:1]] == ["pretrain"]
    frcnn = {(s.row, s.seed): s for s in specs if s.pair == "frcnn"}
    assert set(frcnn) == {
        ("pretrain:r18", 0),
        ("teacher@1x", 0),
        ("teacher@2x", 0),
        ("student@1x", 0),
        ("student@1x", 1),
        ("student@2x", 0),
    }
    assert frcnn["teacher@2x", 0].iters == 8 and frcnn["student@2x", 0].iters == 8
    # The 2x teachers (the longest runs, needed by the plateau test alone) come last in the queue.
    rows = [s.row for s in specs]
    first = rows.index("teacher@2x")
    assert rows[first:] == ["teacher@2x"] * (len(rows) - first) and "student@2x" in rows[:first]
    assert "train.eval_every=1" in frcnn["student@2x", 0].overrides
    assert frcnn["student@1x", 0].backbone == "r18"
    assert {s.row for s in specs if s.pair == "free"} == {"student@1x", "student@2x"}
    # The 1x runs are the suite's teacher and baselines (evaluations do not key a folder), the student's 2x run its
    # same-wall-clock baseline at factor 2; the teacher's 2x run is the teacher of the suite with a doubled teacher
    # schedule.
    plan = {(s.pair, s.row, s.seed): bench.run_dir(s) for s in bench.plan()}
    assert bench.run_dir(frcnn["teacher@1x", 0]) == plan["frcnn", "teacher", 0] == bench.teacher_dir(bench.pairs[0])
    assert bench.run_dir(frcnn["student@1x", 1]) == plan["frcnn", "baseline", 1]
    tm2 = bench.time_matched_specs({"frcnn": {"student_step_s": 1.0, "rows": {"kd": {"step_s": 1.9}}}})
    assert bench.run_dir(frcnn["student@2x", 0]) == bench.run_dir(next(s for s in tm2 if s.seed == 0))
    assert bench.run_dir(frcnn["teacher@2x", 0]) not in plan.values()
    longer = tiny_suite(time_matched=True)
    for pair in longer.pairs:
        pair.teacher_iters *= 2
    doubled = Bench(longer, tmp_path)
    assert bench.run_dir(frcnn["teacher@2x", 0]) == doubled.teacher_dir(doubled.pairs[0])
    assert bench.run_dir(frcnn["teacher@2x", 0]).parent == bench.teacher_dir(bench.pairs[0]).parent


def _curve(pair, row, seed, finals):
    return {
        "pair": pair,
        "row": row,
        "kind": "curve",
        "seed": seed,
        "model": "m",
        "iters": 10,
        "curve": [{"iter": i + 1, "AP": ap, "AP50": None} for i, ap in enumerate(finals)],
        "step_time_s": 0.5,
        "train_time_s": 5.0,
    }


def test_summary_applies_the_protocol_and_render_keeps_the_hand_written_head(tmp_path):
    records = [
        _curve("a", "student@1x", 0, [0.1, 0.40]),
        _curve("a", "student@1x", 1, [0.1, 0.42]),
        _curve("a", "student@2x", 0, [0.2, 0.43]),  # +0.02 < 2 std (0.028): converged
        _curve("a", "teacher@1x", 0, [0.3, 0.60]),
        _curve("a", "teacher@2x", 0, [0.5, 0.605]),  # +0.005: plateau
        _curve("b", "student@1x", 0, [0.1, 0.30]),
        _curve("b", "student@2x", 0, [0.2, 0.35]),  # one seed: only the 0.01 bound
        _curve("b", "teacher@1x", 0, [0.3, 0.33]),
        _curve("b", "teacher@2x", 0, [0.3, 0.36]),
    ]
    pairs = [
        {"name": "a", "teacher": "frcnn_r50", "student": "frcnn_r18", "teacher_iters": 20, "student_iters": 10},
        {"name": "b"},  # a curves.json written before the pairs carried their models and schedules
    ]
    results = {"suite": "tiny", "seeds": 2, "pairs": pairs, "records": records}
    a, b = summarise(results)
    assert a["student_1x"] == pytest.approx(0.41) and a["student_converged"] is True and a["teacher_plateau"] is True
    assert a["gap"] == pytest.approx(0.605 - 0.41) and a["gap_ok"] is True
    assert b["student_converged"] is False and b["teacher_plateau"] is False
    assert b["gap"] == pytest.approx(0.06) and b["gap_ok"] is False

    folder = tmp_path / "out" / "tiny" / "curves"
    folder.mkdir(parents=True)
    (folder / "curves.json").write_text(json.dumps(results))
    doc = tmp_path / "docs" / "regime.md"
    doc.parent.mkdir()
    doc.write_text(f"# Regime\n\nHow it is measured.\n\n{MARKER}\n\nNot run yet.\n")
    render_into(doc, folder / "curves.json")
    text = doc.read_text()
    assert text.startswith("# Regime\n\nHow it is measured.\n") and "Not run yet" not in text
    assert text.count(MARKER) == 1
    assert a["teacher_is_2x"] is False and b["teacher_is_2x"] is False
    assert "| a | frcnn_r50 → frcnn_r18 | 20 / 10 | 0.410 ± 0.014 (n = 2) | 0.430 | +0.020 | yes |" in text
    assert "| b | none → – | – / – | 0.300 ± – (n = 1) | 0.350 | +0.050 | **no** |" in text
    assert "](bench/tiny/regime/a_curves.png)" in text and (doc.parent / "bench/tiny/regime/a_curves.png").exists()
    assert str(tmp_path) not in text


@pytest.mark.slow
def test_tiny_regime_suite_end_to_end(tmp_path, monkeypatch):
    suite = tiny_suite()
    monkeypatch.setitem(SUITES, "tiny", suite)
    bench = Bench(suite, tmp_path, seeds=1, jobs=2, threads=1)
    results = bench.run()
    assert not [r for r in results["records"] if r.get("failed")], results["records"]
    weights = bench.pretrain_weights("r18")
    assert weights.exists() and (weights.parent / "log.jsonl").read_text().strip()
    runs = {(r["pair"], r["row"]): Path(r["run"]) for r in results["records"]}
    assert f"model.backbone_weights={weights}" in (runs["frcnn", "baseline"] / "run.log").read_text()
    ft_log = (runs["frcnn", "kd-finetune"] / "run.log").read_text()
    assert f"model.weights={runs['frcnn', 'baseline'] / 'student.pt'}" in ft_log
    calibration = {
        row: json.loads((runs["frcnn", row] / "final.json").read_text())["calibration"] for row in ("kd", "kd-paper")
    }
    assert calibration["kd"] and calibration["kd-paper"] is None  # calibrated, and the paper's weights beside it
    rows = {e["row"]: e for e in results["table"] if e["pair"] == "frcnn"}
    assert rows["kd-finetune"]["kind"] == "finetune" and rows["kd-finetune"]["gain"] is not None
    # A second run trains nothing again: the pretraining and every run are read back.
    stamp = weights.stat().st_mtime_ns
    again = Bench(suite, tmp_path, seeds=1, jobs=2, threads=1).run_all(bench.plan())
    assert weights.stat().st_mtime_ns == stamp and len(again) == len(bench.plan())
    # The learning curves of the same suite, from the same cached pretraining.
    from detkd.bench.curves import run_curves

    curves = run_curves(bench)
    assert weights.stat().st_mtime_ns == stamp
    # The 1x runs are the suite's (trained before the study here: their final evaluation only); the 2x runs are
    # the study's own, evaluated along the way.
    assert all(r["curve"] for r in curves["records"] if r["kind"] == "curve")
    assert all(len(r["curve"]) >= 2 for r in curves["records"] if r["row"].endswith("@2x"))
    assert (bench.root / "curves" / "frcnn_curves.png").exists()
    assert "| frcnn |" in (bench.root / "curves" / "curves.md").read_text()


def test_report_judges_a_fine_tune_row_against_its_baseline_and_names_the_backbones(tmp_path):
    from detkd.bench.report import aggregate, render_markdown
    from tests.bench.test_bench import fake_results

    results = fake_results()
    base = next(r for r in results["records"] if r["row"] == "baseline")
    results["records"] += [
        {**base, "row": "gkd-finetune", "kind": "finetune", "seed": s, "AP": ap, "iters": 100}
        for s, ap in enumerate([0.45, 0.46, 0.47])
    ]
    pretrain = {"pair": "frcnn", "row": "pretrain:r18", "kind": "pretrain", "seed": 0, "model": "r18", "iters": 40}
    results["records"].append({**pretrain, "run": "/nonexistent/r18", "top1": 0.5, "train_time_s": 30.0})
    results["pairs"][0]["finetunes"] = {"gkd-finetune": {"methods": "gkd", "iters": 100, "overrides": []}}
    results["table"] = aggregate(results)
    row = next(e for e in results["table"] if e["row"] == "gkd-finetune")
    assert row["kind"] == "finetune" and row["iters"] == 100
    assert row["gain"] == pytest.approx(0.05) and row["gap_closed"] == pytest.approx(0.05 / 0.19)
    assert not [e for e in results["table"] if e["row"].startswith("pretrain")]
    md = render_markdown(results, {}, tmp_path)
    assert "r18 40 steps, top-1 0.500" in md
    assert "`gkd-finetune` starts from the baseline's student of the same seed and trains 100 more steps" in md


FAKE = """
import json, os, sys, time
from pathlib import Path

args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
weights, out = (out, out.parent) if args[0] == "pretrain" else (None, out)
out.mkdir(parents=True, exist_ok=True)
with open(out / "calls.jsonl", "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "command": args[0], "resume": "--resume" in args}) + "\\n")
if args[0] == "pretrain":
    if os.environ.get("FAKE_HANG") == "1":
        (out / "log.jsonl").write_text(json.dumps({"iter": 10, "step_time": 1.0}) + "\\n")
        time.sleep(600)
    weights.write_bytes(b"weights")
    weights.with_suffix(".json").write_text(json.dumps({"top1": 0.5}))
else:
    (out / "student.pt").write_bytes(b"student")
    (out / "final.json").write_text(json.dumps({"metrics": {"AP": 0.1, "AP50": 0.2}}))
"""

BENCH = """
import json, sys
from pathlib import Path
from detkd.bench.runner import Bench, BenchStopped
from tests.bench.test_regime import tiny_suite

bench = Bench(tiny_suite(), Path(sys.argv[1]), seeds=1, jobs=2)
bench.command = [sys.executable, sys.argv[2]]
try:
    records = bench.run_all(bench.plan())
except BenchStopped as stop:
    sys.exit(128 + stop.signum)
print(json.dumps(records))
"""


@pytest.mark.slow  # child processes: about 20 s
def test_sigterm_stops_a_pretraining_and_the_same_command_runs_it_again(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.bench.test_stop import alive, calls

    fake, script = tmp_path / "fake.py", tmp_path / "bench.py"
    fake.write_text(FAKE)
    script.write_text(BENCH)
    root = tmp_path / "bench"
    env = dict(os.environ, FAKE_HANG="1", PYTHONPATH=os.pathsep.join(sys.path))
    bench = subprocess.Popen([sys.executable, str(script), str(root), str(fake)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(c["command"] == "pretrain" for c in calls(root)) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # the other slot runs the pair trained from scratch meanwhile
        pretrain = [c["pid"] for c in calls(root) if c["command"] == "pretrain"]
        assert len(pretrain) == 1 and alive(pretrain[0])
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        bench.kill()
    time.sleep(0.5)
    assert not alive(pretrain[0])
    # Nothing that reads the backbone started.
    planned = Bench(tiny_suite(), root, seeds=1)
    readers = [s for s in planned.plan() if s.pair == "frcnn" and s.kind != "pretrain"]
    assert readers and not [s.row for s in readers if (planned.run_dir(s) / "calls.jsonl").exists()]
    again = subprocess.run(
        [sys.executable, str(script), str(root), str(fake)],
        env=dict(env, FAKE_HANG="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    records = json.loads(again.stdout)
    assert not [r for r in records if r.get("failed")]
    assert {r["row"] for r in records if r["pair"] == "frcnn"} == {
        "pretrain:r18",
        "teacher",
        "baseline",
        "kd",
        "kd-paper",
        "kd-finetune",
        "finetune-alone",
    }
    assert [c["command"] for c in calls(root)].count("pretrain") == 2  # stopped, then run again (it resumes itself)


def test_a_run_without_evaluations_along_the_way_gives_its_final_point(tmp_path):
    from detkd.bench.curves import read_curve

    assert read_curve(tmp_path) == []
    (tmp_path / "final.json").write_text(json.dumps({"iters": 600, "metrics": {"AP": 0.25, "AP50": 0.5}}))
    assert read_curve(tmp_path) == [{"iter": 600, "AP": 0.25, "AP50": 0.5}]
    (tmp_path / "eval.jsonl").write_text('{"iter": 300, "AP": 0.2, "AP50": 0.4}\n{"iter": 600, "AP": 0.3}\n')
    assert [p["AP"] for p in read_curve(tmp_path)] == [0.2, 0.3]


def test_a_study_part_way_renders_what_finished_and_names_the_rest(tmp_path):
    from detkd.bench.curves import run_curves

    bench = Bench(tiny_suite(), tmp_path)
    specs = {(s.pair, s.row, s.seed): s for s in curve_specs(bench)}
    for key, ap in ((("frcnn", "teacher@1x", 0), 0.5), (("frcnn", "student@1x", 0), 0.2)):
        out = bench.run_dir(specs[key])
        out.mkdir(parents=True)
        (out / "final.json").write_text(json.dumps({"iters": 4, "metrics": {"AP": ap}}))
        (out / "eval.jsonl").write_text(
            json.dumps({"iter": 2, "AP": ap / 2}) + "\n" + json.dumps({"iter": 4, "AP": ap})
        )
    results = run_curves(bench, train=False)
    assert {(r["row"], r["seed"]) for r in results["records"]} == {("teacher@1x", 0), ("student@1x", 0)}
    assert "frcnn/student@1x seed 1" in results["missing"] and "pretrain r18" in results["missing"]
    entry = next(e for e in summarise(results) if e["pair"] == "frcnn")
    assert entry["teacher_1x"] == 0.5 and entry["student_1x"] == 0.2 and entry.get("student_converged") is None
    text = (bench.root / "curves" / "curves.md").read_text()
    assert "Part-way" in text and "frcnn/teacher@2x seed 0" in text
    # The table names each pair's models and schedules from the suite, the teacher-free pair with no teacher.
    assert "| frcnn | frcnn_r18 → frcnn_r18 | 4 / 4 | 0.200 ± – (n = 1) |" in text
    assert "| free | none → frcnn_r18 | – / 4 |" in text


def test_the_plan_is_costed_by_the_step_times_of_finished_runs(tmp_path):
    from detkd.bench.cli import plan_cost

    bench = Bench(tiny_suite(), tmp_path, jobs=2)
    specs = bench.plan()
    assert plan_cost(bench, specs).startswith("cost: unknown")
    baseline = next(s for s in specs if s.row == "baseline" and s.seed == 0)
    out = bench.run_dir(baseline)
    out.mkdir(parents=True)
    (out / "final.json").write_text(json.dumps({"train_time_s": 8.0, "step_time_s": 2.0}))
    pretrain = next(s for s in specs if s.kind == "pretrain")
    bench.run_dir(pretrain).mkdir(parents=True)
    (bench.run_dir(pretrain) / "r18.json").write_text(json.dumps({"train_time_s": 12.0, "iters": 4}))
    assert bench.measured_seconds(baseline) == 8.0  # its own time
    other_seed = next(s for s in specs if s.row == "baseline" and s.seed == 1)
    assert bench.measured_seconds(other_seed) == 2.0 * other_seed.iters  # a finished run of the same detector
    assert bench.measured_seconds(pretrain) == 12.0
    assert bench.measured_seconds(next(s for s in specs if s.row == "kd")) is None  # no kd run finished yet
    line = plan_cost(bench, specs)
    assert "h of training for" in line and "not yet measurable" in line
    # Left to train: every run but the finished baseline and pretraining; one more finished, one fewer left.
    runs = len({bench.run_dir(s) for s in specs})
    assert f"; left to train: {runs - 2} run(s), " in line
    (bench.run_dir(other_seed)).mkdir(parents=True)
    (bench.run_dir(other_seed) / "final.json").write_text(json.dumps({"train_time_s": 8.0, "step_time_s": 2.0}))
    assert f"; left to train: {runs - 3} run(s), " in plan_cost(bench, specs)


def test_a_resumed_run_costs_its_timed_parts_or_its_steps_at_its_step_time():
    from detkd.bench.plan import run_seconds

    whole = {"iters": 2000, "train_time_s": 2600.0, "step_time_s": 1.3, "resumed_from": None}
    assert run_seconds(whole) == 2600.0
    # Resumed at step 1600 from a checkpoint that timed the first part: train_time_s holds both parts.
    timed = {"iters": 2000, "train_time_s": 2700.0, "step_time_s": 1.3, "resumed_from": 1600}
    assert run_seconds({**timed, "train_time_partial": False}) == 2700.0
    # ... from one that did not (or a run older than the flag): train_time_s holds only the last 400 steps.
    partial = {"iters": 2000, "train_time_s": 520.0, "step_time_s": 1.3, "resumed_from": 1600}
    assert run_seconds({**partial, "train_time_partial": True}) == 2600.0
    assert run_seconds(partial) == 2600.0


def test_a_one_seed_row_trains_seed_0_only_and_the_report_says_so(tmp_path):
    from detkd.bench.report import aggregate, render_markdown
    from tests.bench.test_bench import fake_results

    specs = Bench(tiny_suite(one_seed=["kd-paper"]), tmp_path).plan()
    rows = {(s.row, s.seed) for s in specs if s.pair == "frcnn"}
    assert ("kd-paper", 0) in rows and ("kd-paper", 1) not in rows
    assert {("kd", 0), ("kd", 1), ("baseline", 1), ("kd-finetune", 1)} <= rows  # every other row keeps its seeds
    results = fake_results()
    assert results["seeds"] > 1
    results["table"] = aggregate(results)
    results["pairs"][0]["one_seed"] = ["fitnet"]
    assert "`fitnet` ran seed 0 only" in render_markdown(results, {}, tmp_path)
    results["pairs"][0]["one_seed"] = []
    assert "seed 0 only" not in render_markdown(results, {}, tmp_path)


def test_a_same_wall_clock_baseline_only_seed_0_rows_need_trains_seed_0_only(tmp_path):
    bench = Bench(tiny_suite(time_matched=True, one_seed=["fitnet"]), tmp_path)
    bench.pairs[0].methods = ["kd", "fitnet"]
    timing = {"frcnn": {"student_step_s": 1.0, "rows": {"kd": {"step_s": 1.9}, "fitnet": {"step_s": 1.4}}}}
    runs = {(s.row, s.seed, s.iters) for s in bench.time_matched_specs(timing)}
    # kd (every seed) needs factor 2, fitnet (seed 0 only) factor 1.5: 4 steps x 2 for both seeds, x 1.5 for seed 0.
    assert runs == {("tm2", 0, 8), ("tm2", 1, 8), ("tm1.5", 0, 6)}
    timing["frcnn"]["rows"]["fitnet"]["step_s"] = 1.8  # the same factor as kd: kd's seeds decide
    assert {(s.row, s.seed) for s in bench.time_matched_specs(timing)} == {("tm2", 0), ("tm2", 1)}


def test_a_pair_may_take_the_studys_2x_teacher_and_keep_the_studys_schedule(tmp_path):
    from detkd.bench.curves import run_curves

    suite = tiny_suite()
    suite.pairs[0] = Pair("frcnn", "frcnn_r18", "frcnn_r18", ["kd"], 8, 4, overrides=TINY, study_teacher_iters=4)
    bench = Bench(suite, tmp_path)
    teachers = {s.row: s for s in curve_specs(bench) if s.pair == "frcnn" and s.row.startswith("teacher@")}
    assert {row: s.iters for row, s in teachers.items()} == {"teacher@1x": 4, "teacher@2x": 8}
    assert bench.run_dir(teachers["teacher@2x"]) == bench.teacher_dir(bench.pairs[0])  # not trained again
    run_curves(bench, train=False)
    assert "| frcnn | frcnn_r18 → frcnn_r18 | 8 (teacher 2x) / 4 |" in (bench.root / "curves" / "curves.md").read_text()
    results = run_curves(bench, train=False)
    assert {e["pair"]: e["teacher_is_2x"] for e in summarise(results)} == {"frcnn": True, "free": False}
    with pytest.raises(ConfigError, match="twice study_teacher_iters"):
        Pair("frcnn", "frcnn_r18", "frcnn_r18", ["kd"], 6, 4, study_teacher_iters=4)


def test_regime_pairs_can_take_the_studys_2x_teachers():
    plain = {p.name: p for p in suites_module.regime_pairs(4000, 2400, 300, 3000, 1000)}
    doubled = {p.name: p for p in suites_module.regime_pairs(4000, 2400, 300, 3000, 1000, teacher_2x=("retinanet",))}
    assert (doubled["retinanet"].teacher_iters, doubled["retinanet"].study_teacher_iters) == (8000, 4000)
    assert (plain["retinanet"].teacher_iters, plain["retinanet"].study_teacher_iters) == (4000, None)
    assert doubled["frcnn"].teacher_iters == 4000 and doubled["frcnn"].study_teacher_iters is None
    with pytest.raises(ConfigError, match="names no pair: retina"):
        suites_module.regime_pairs(4000, 2400, 300, 3000, 1000, teacher_2x=("retina",))
