"""The bench's progress figures, computed from the runs' states alone."""

from __future__ import annotations

import json
import logging

import pytest

from detkd.bench.progress import Display, RunState, duration, estimate, read_log_tail, summary_line


def states() -> list[RunState]:
    return [
        RunState("frcnn/teacher", "frcnn_r50", 500, "running", step=100, step_time=2.0),
        RunState("frcnn/baseline seed 0", "frcnn_r18", 250, "running"),  # no log line yet
        RunState("frcnn/kd seed 0", "frcnn_r18", 250, "done", step=250, step_time=0.5),
        RunState("frcnn/fitnet seed 0", "frcnn_r18", 250, "queued"),
        RunState("lgd/lgd seed 0", "frcnn_r18", 250, "failed", step=30, step_time=9.0),
    ]


def test_time_left_costs_each_unfinished_run_at_its_own_or_its_models_step_time():
    est = estimate(states(), jobs=2)
    # teacher 400 steps x 2.0 s; baseline and fitnet 250 steps x the R18 mean (0.5 and 9.0 -> 4.75 s): shared by 2.
    assert est.left_s == pytest.approx((400 * 2.0 + 2 * 250 * 4.75) / 2)
    assert est.running == [
        ("frcnn/teacher", 100, 500, pytest.approx(800.0)),
        ("frcnn/baseline seed 0", 0, 250, pytest.approx(1187.5)),
    ]
    assert (est.done, est.failed, est.total) == (1, 1, 5)


def test_a_model_never_seen_is_costed_at_the_mean_of_all_runs_and_one_run_left_uses_one_slot():
    est = estimate(
        [
            RunState("a", "frcnn_r50", 100, "running", step=50, step_time=1.0),
            RunState("b", "retinanet_r18", 10, "queued"),
        ],
        jobs=4,
    )
    assert est.left_s == pytest.approx((50 * 1.0 + 10 * 1.0) / 2)
    assert estimate([RunState("a", "m", 100, "running", step=40, step_time=0.5)], jobs=4).left_s == pytest.approx(30)


def test_time_left_is_unknown_until_a_run_has_logged():
    est = estimate([RunState("a", "m", 100, "running"), RunState("b", "m", 100)], jobs=1)
    assert est.left_s is None and est.running == [("a", 0, 100, None)]
    assert summary_line(est) == "0/2 runs done; time left for these runs ≈ ?"


def test_durations_read_like_a_clock():
    assert [duration(s) for s in (None, 45, 750, 3900)] == ["?", "45s", "12m 30s", "1h 05m"]


def test_the_last_complete_log_line_is_read(tmp_path):
    path = tmp_path / "log.jsonl"
    assert read_log_tail(path) is None
    path.write_text(json.dumps({"iter": 10, "step_time": 0.4}) + "\n" + json.dumps({"iter": 20, "step_time": 0.3}))
    assert read_log_tail(path) == {"iter": 20, "step_time": 0.3}
    with open(path, "a") as f:
        f.write('\n{"iter": 30, "step_ti')  # being written
    assert read_log_tail(path)["iter"] == 20
    path.write_text("x" * 10000 + "\n" + json.dumps({"iter": 40}) + "\n")  # the end of a long file
    assert read_log_tail(path, chunk=64) == {"iter": 40}


def test_without_a_terminal_progress_is_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="detkd"), Display("detkd bench --suite demo", jobs=2) as display:
        display.update(states())
        display.update(states())  # within the minute: not repeated
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "detkd bench --suite demo: 1/5 runs done, 1 failed; time left for these runs ≈ 26m 28s "
        "(running: frcnn/teacher 100/500; frcnn/baseline seed 0 0/250)"
    ]
