"""``distill.calibrate=auto``: measured loss scales, fixed once, identical on every rank, kept by resume."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from detkd.calibration import LossCalibration
from detkd.cli import main
from detkd.data import make_digits
from detkd.engine.checkpoint import read_checkpoint, save_student
from tests.conftest import tiny

T = torch.tensor


def _feed(cal: LossCalibration, rows: list[tuple[float, dict[str, float]]], start: int = 0) -> dict[str, float]:
    out: dict[str, float] = {}
    for step, (task, terms) in enumerate(rows, start):
        out = cal.observe(step, T(task), {k: T(v) for k, v in terms.items()})
    return out


def test_factors_bring_the_terms_to_the_share_of_the_detection_loss():
    cal = LossCalibration(iters=2, share=0.5, exclude=["x.kd_kept"])
    assert cal.factor("a.kd_feat") == 0.0 and cal.factor("x.kd_kept") == 1.0  # measuring: not applied
    logged = _feed(
        cal,
        [
            (2.0, {"a.kd_feat": 100.0, "a.kd_cls": 0.01, "x.kd_kept": 9.0}),
            (4.0, {"a.kd_feat": 300.0, "a.kd_cls": 0.03, "x.kd_kept": 9.0}),
        ],
    )
    assert logged == {}  # the choosing step applied weight 0: nothing to log for it
    # mean detection loss 3, two calibrated terms: each should come to 0.25 * 3 = 0.75 at its mean size.
    assert cal.factor("a.kd_feat") == pytest.approx(0.75 / 200.0)
    assert cal.factor("a.kd_cls") == pytest.approx(0.75 / 0.02)
    assert cal.factor("x.kd_kept") == 1.0
    # Fixed from now on, whatever the terms do.
    before = dict(cal.factors)
    logged = _feed(cal, [(1.0, {"a.kd_feat": 1e6, "a.kd_cls": 1e6})], start=2)
    assert cal.factors == before
    assert logged == {"calib.a.kd_feat": cal.factor("a.kd_feat"), "calib.a.kd_cls": cal.factor("a.kd_cls")}


def test_non_finite_values_are_left_out_and_dead_terms_keep_weight_one(caplog):
    cal = LossCalibration(iters=3, share=1.0)
    _feed(
        cal,
        [
            (1.0, {"m.kd_a": 2.0, "m.kd_zero": 0.0}),
            (float("nan"), {"m.kd_a": float("inf"), "m.kd_zero": 0.0}),
            (3.0, {"m.kd_a": 6.0, "m.kd_zero": 0.0}),
        ],
    )
    assert cal.factor("m.kd_a") == pytest.approx(1.0 * 2.0 / 4.0)  # only one positive term: it takes the share
    assert cal.factor("m.kd_zero") == 1.0
    assert cal.factor("m.kd_unseen") == 1.0
    assert "m.kd_zero was never positive" in caplog.text


def test_state_round_trip_and_mismatch():
    cal = LossCalibration(iters=3, share=0.5)
    _feed(cal, [(1.0, {"m.kd": 2.0})])
    again = LossCalibration(iters=3, share=0.5)
    again.load_state_dict(cal.state_dict())
    for other in (cal, again):  # both finish the window the same way
        _feed(other, [(3.0, {"m.kd": 4.0}), (5.0, {"m.kd": 6.0})], start=1)
    assert again.factors == cal.factors and cal.factor("m.kd") == pytest.approx(0.5 * 3.0 / 4.0)
    from detkd.errors import CheckpointError

    with pytest.raises(CheckpointError, match="calibrate_iters=3"):
        LossCalibration(iters=4, share=0.5).load_state_dict(cal.state_dict())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cal = LossCalibration(iters=2, share=0.5)
        # Different batches on each rank; a term only rank 1 saw.
        rows = [(1.0, {"m.kd": 1.0}), (1.0, {"m.kd": 3.0})] if rank == 0 else [(3.0, {"m.kd": 5.0, "m.kd_b": 2.0})] * 2
        _feed(cal, rows)
        Path(out, f"rank{rank}.json").write_text(json.dumps(cal.factors))
    finally:
        dist.destroy_process_group()


def test_ranks_choose_the_same_factors_from_pooled_measurements(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    factors = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert factors[0] == factors[1]
    # Pooled means: detection (1+1+3+3)/4 = 2, m.kd (1+3+5+5)/4 = 3.5, m.kd_b 2 (rank 1 only); two terms.
    assert factors[0]["m.kd"] == pytest.approx(0.25 * 2.0 / 3.5)
    assert factors[0]["m.kd_b"] == pytest.approx(0.25 * 2.0 / 2.0)


CALIB_ITERS = 3
ITERS = 5
SHARE = 0.6


def make_pair(root: Path) -> Path:
    """A tiny digits dataset and an (untrained) tiny Faster R-CNN teacher under ``root``."""
    make_digits(root / "digits", train=8, val=2, size=64)
    save_student(root / "teacher.pt", tiny("frcnn_r18", num_classes=10, fpn_channels=16), [str(d) for d in range(10)])
    return root


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("calib"))


def distill_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--method",
        "fitnet+kd",
        "--teacher",
        str(root / "teacher.pt"),
        "--student",
        "frcnn_r18",
        "--data",
        str(root / "digits"),
        "--out",
        str(out),
        "--iters",
        str(ITERS),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "model.min_size=64",
        "model.max_size=64",
        "model.fpn_channels=16",
        "optim.lr=0.01",
        "optim.warmup_iters=0",
        "train.log_every=1",
        "train.ckpt_every=2",
        "train.tensorboard=false",
        "data.val_max_images=2",
        "distill.check_teacher=0",
        "distill.calibrate=auto",
        f"distill.calibrate_iters={CALIB_ITERS}",
        f"distill.calibrate_share={SHARE}",
        *extra,
    ]


def test_calibrated_run_brings_each_term_to_its_share_and_keeps_the_weights(pair, tmp_path):
    out = tmp_path / "run"
    assert main(distill_args(pair, out)) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == list(range(1, ITERS + 1))
    terms = ["fitnet.kd_feat", "kd.kd_cls"]
    measured, after = rows[:CALIB_ITERS], rows[CALIB_ITERS:]

    # While measuring the terms are computed but not applied, and no weight is logged yet.
    for row in measured:
        assert all(row[f"raw.{t}"] > 0 and row[t] == 0.0 for t in terms)
        assert not any(k.startswith("calib.") for k in row)

    # The expected weights, from the logged raw values alone.
    detection = sum(sum(v for k, v in r.items() if k.startswith("loss_")) for r in measured) / CALIB_ITERS
    expected = {t: SHARE / len(terms) * detection / (sum(r[f"raw.{t}"] for r in measured) / CALIB_ITERS) for t in terms}
    for row in after:
        for t in terms:
            assert row[f"calib.{t}"] == pytest.approx(expected[t], rel=1e-5), t
            assert row[t] == pytest.approx(row[f"raw.{t}"] * row[f"calib.{t}"], rel=1e-5), t  # applied as chosen
    # Each term at its mean measured size is its part of the detection loss.
    for t in terms:
        mean_raw = sum(r[f"raw.{t}"] for r in measured) / CALIB_ITERS
        assert mean_raw * after[0][f"calib.{t}"] == pytest.approx(SHARE / len(terms) * detection, rel=1e-5)
    # Fixed: the same weights at every later step, in final.json and in the checkpoint.
    assert all(r[f"calib.{t}"] == after[0][f"calib.{t}"] for r in after for t in terms)
    final = json.loads((out / "final.json").read_text())
    assert final["calibration"]["factors"] == {t: after[0][f"calib.{t}"] for t in terms}
    assert read_checkpoint(out / "last.pt")["calibration"]["factors"] == final["calibration"]["factors"]


def test_calibration_window_must_fit_the_run(pair, tmp_path, capsys):
    assert main(distill_args(pair, tmp_path / "run", f"distill.calibrate_iters={ITERS}")) == 2
    err = capsys.readouterr().err.strip()
    assert "calibrate_iters (5) must be smaller than train.iters (5)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
