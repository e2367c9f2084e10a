"""A run killed with SIGKILL and continued with ``--resume`` ends exactly where an uninterrupted run ends.

Both runs are real ``detkd train`` processes on a generated digits dataset. Faster R-CNN is used because its
training draws random numbers every step (RPN and RoI sampling, and here the multi-scale input sizes), so a resume
that restored the wrong random state, or fed the wrong batches, would change the result. Evaluation and checkpoints
fall on the same steps, the case where an evaluation's random draws could leak into training. Expected:
bit-identical student weights, metrics and logged losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detkd.data import make_digits
from detkd.engine.checkpoint import read_checkpoint
from detkd.errors import CheckpointError

ITERS = 6
KILL_AFTER = 2  # kill once last.pt holds at least this step
TIMING_KEYS = {"step_time", "data_time", "elapsed_s", "eval_time_s"}


def _args(data: Path, out: Path) -> list[str]:
    return [
        "train",
        "--model",
        "frcnn_r18",
        "--data",
        str(data),
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
        "model.train_sizes=[48,56,64]",  # multi-scale training draws a size per image: the resume must replay it
        "model.fpn_channels=16",
        "optim.lr=0.01",
        "optim.warmup_iters=2",
        "train.ckpt_every=2",
        "train.eval_every=2",
        "train.log_every=1",
        "train.tensorboard=false",
        "data.val_max_images=2",
    ]


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "detkd.cli", *args]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _checkpoint_iter(path: Path) -> int:
    try:
        return int(read_checkpoint(path)["iter"])
    except CheckpointError:  # not there yet
        return -1


def _wait_for_checkpoint(proc: subprocess.Popen, path: Path, step: int) -> None:
    """Poll until ``path`` holds at least ``step``; the file is read only when it changed."""
    deadline, seen = time.monotonic() + 300, None
    while True:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if stamp is not None and stamp != seen:
            seen = stamp
            if _checkpoint_iter(path) >= step:
                return
        time.sleep(0.05)


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    make_digits(root, train=8, val=2, size=64)
    return root


def test_sigkill_then_resume_matches_uninterrupted_run(data, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = subprocess.Popen(
        _command(_args(data, full)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )

    victim = subprocess.Popen(
        _command(_args(data, killed)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_checkpoint(victim, killed / "last.pt", KILL_AFTER)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    stopped_at = _checkpoint_iter(killed / "last.pt")
    assert KILL_AFTER <= stopped_at < ITERS and not (killed / "final.json").exists(), "killed too late to test"
    time_before = float(read_checkpoint(killed / "last.pt")["train_time_s"])
    assert time_before > 0

    # Only --resume and the folder: the rest comes from the run's own config.yaml.
    resumed = subprocess.run(
        _command(["train", "--out", str(killed), "--resume", "--no-progress"]), env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    final_full = json.loads((full / "final.json").read_text())
    final_killed = json.loads((killed / "final.json").read_text())
    assert final_killed["resumed_from"] == stopped_at and final_killed["iters"] == ITERS
    assert final_killed["train_time_s"] > time_before  # the time before the kill counts too
    assert final_killed["train_time_partial"] is False and final_full["train_time_partial"] is False
    for key in ("per_class_AP", "best", "nonfinite_steps"):
        assert final_killed[key] == final_full[key], key
    metrics = [{k: v for k, v in f["metrics"].items() if k not in TIMING_KEYS} for f in (final_killed, final_full)]
    assert metrics[0] == metrics[1]

    # The logs read as one run: every step once, the same losses to the last bit.
    assert _rows(killed / "log.jsonl") == _rows(full / "log.jsonl")
    assert [r["iter"] for r in _rows(killed / "log.jsonl")] == list(range(1, ITERS + 1))
    assert _rows(killed / "eval.jsonl") == _rows(full / "eval.jsonl")

    a = read_checkpoint(full / "student.pt")["model"]
    b = read_checkpoint(killed / "student.pt")["model"]
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"{len(changed)} tensors differ, first {changed[0]}"


@pytest.fixture(scope="module")
def calibrated_pair(tmp_path_factory):
    from detkd.cli import main
    from tests.test_calibration import distill_args, make_pair

    root = make_pair(tmp_path_factory.mktemp("calibrated_resume"))
    assert main(distill_args(root, root / "full")) == 0  # the uninterrupted reference
    return root


@pytest.mark.parametrize("kill_at", [2, 4], ids=["while-measuring", "after-choosing"])
def test_calibrated_distillation_resumes_exactly(calibrated_pair, tmp_path, monkeypatch, kill_at):
    """``distill.calibrate=auto`` (3 measuring steps of 5): a run stopped after its checkpoint at ``kill_at`` and
    resumed ends bit-identical to an uninterrupted one. Stopped while measuring, the resume must continue the
    partial means; stopped after choosing, it must keep the chosen weights and never measure again."""
    from detkd.cli import main
    from detkd.engine.trainer import Trainer
    from tests.test_calibration import CALIB_ITERS, distill_args

    full, killed = calibrated_pair / "full", tmp_path / "killed"

    run_step = Trainer.run_step

    def stop_at(trainer: Trainer) -> None:
        if trainer.iter == kill_at:
            raise KeyboardInterrupt  # the process dies here; last.pt holds step kill_at
        run_step(trainer)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "run_step", stop_at)
        assert main(distill_args(calibrated_pair, killed)) == 130
    state = read_checkpoint(killed / "last.pt")
    assert state["iter"] == kill_at
    assert (state["calibration"]["factors"] is None) == (kill_at < CALIB_ITERS)
    assert main(["distill", "--out", str(killed), "--resume", "--no-progress"]) == 0

    final_full = json.loads((full / "final.json").read_text())
    final_killed = json.loads((killed / "final.json").read_text())
    assert final_killed["resumed_from"] == kill_at
    assert final_killed["calibration"] == final_full["calibration"]
    assert final_full["calibration"]["factors"], "the run should have calibrated"
    assert _rows(killed / "log.jsonl") == _rows(full / "log.jsonl")
    a = read_checkpoint(full / "student.pt")["model"]
    b = read_checkpoint(killed / "student.pt")["model"]
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"{len(changed)} tensors differ, first {changed[0]}"


def test_a_resume_from_a_checkpoint_that_did_not_time_its_part_says_its_time_is_partial(data, tmp_path, monkeypatch):
    """Checkpoints written before they carried ``train_time_s`` cannot give the time of the part before the resume:
    ``final.json`` says ``train_time_partial`` (the benchmark then costs the run by its step time), and so does
    every later checkpoint of that run, so that a second resume does not forget it."""
    from detkd.cli import main
    from detkd.engine.checkpoint import save_atomic
    from detkd.engine.trainer import Trainer

    out = tmp_path / "old"
    run_step = Trainer.run_step

    def run_until(step: int, args: list[str]) -> None:
        """Run ``detkd`` with ``args`` and stop it after its checkpoint at ``step``."""

        def stop(trainer: Trainer) -> None:
            if trainer.iter == step:
                raise KeyboardInterrupt
            run_step(trainer)

        with monkeypatch.context() as patch:
            patch.setattr(Trainer, "run_step", stop)
            assert main(args) == 130

    run_until(2, _args(data, out))
    state = read_checkpoint(out / "last.pt")
    assert state["train_time_partial"] is False and state["train_time_s"] > 0
    del state["train_time_s"], state["train_time_partial"]  # as an older detkd wrote it
    save_atomic(state, out / "last.pt")
    run_until(4, ["train", "--out", str(out), "--resume", "--no-progress"])
    assert read_checkpoint(out / "last.pt")["train_time_partial"] is True
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["resumed_from"] == 4 and final["train_time_partial"] is True
