"""Checkpoints: atomic writes (an exception or a SIGKILL mid-write keeps the previous file), safe loading
(``weights_only=True``: pickled objects are refused, never run), one-line errors, exact random-state round trips."""

from __future__ import annotations

import os
import pickle
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detkd.engine.checkpoint import (
    STUDENT_FORMAT,
    TRAIN_FORMAT,
    load_detector,
    load_state_checked,
    read_checkpoint,
    save_atomic,
    save_student,
)
from detkd.engine.hooks import Checkpointer, Evaluator, rng_state, set_rng_state
from detkd.errors import CheckpointError


def _payload(step: int) -> dict:
    return {"format": TRAIN_FORMAT, "iter": step, "weights": torch.full((64, 64), float(step))}


def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_save_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic(_payload(1), path)
    save_atomic(_payload(2), path)
    ckpt = read_checkpoint(path)
    assert ckpt["iter"] == 2 and torch.equal(ckpt["weights"], torch.full((64, 64), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_exception_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic(_payload(1), path)

    def half_then_fail(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(CheckpointError) as err:
        save_atomic(_payload(2), path)
    monkeypatch.undo()
    assert (
        str(err.value) == f"{path}: cannot write the checkpoint (No space left on device); the previous last.pt is kept"
    )
    assert read_checkpoint(path)["iter"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_no_permission_to_write_is_one_line(tmp_path, monkeypatch):
    """A folder the process may not write to: the temporary file cannot be made (simulated, as root may write
    anywhere), and nothing is left behind."""
    path = tmp_path / "last.pt"
    save_atomic(_payload(1), path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".last.pt.x.tmp"))

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(CheckpointError) as err:
        save_atomic(_payload(2), path)
    monkeypatch.undo()
    assert str(err.value) == f"{path}: cannot write the checkpoint (Permission denied); the previous last.pt is kept"
    assert read_checkpoint(path)["iter"] == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder_is_one_line(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    save_atomic(_payload(1), folder / "last.pt")
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="Permission denied.*the previous last.pt is kept"):
            save_atomic(_payload(2), folder / "last.pt")
    finally:
        folder.chmod(0o755)
    assert read_checkpoint(folder / "last.pt")["iter"] == 1


def test_plain_pickle_is_named_without_a_warning(tmp_path, recwarn):
    path = tmp_path / "weights.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": [1.0, 2.0]}}, f)
    message = _error(path)
    assert "the file is a pickle (pickle.dump), not a torch checkpoint" in message
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


def test_sigkill_during_write_keeps_previous_checkpoint(tmp_path):
    """A process killed half-way through writing the new checkpoint: the old one still loads, and the next run's
    checkpointer removes the torn temporary file."""
    path = tmp_path / "last.pt"
    save_atomic(_payload(1), path)
    real_save = torch.save

    pid = os.fork()
    if pid == 0:  # child: write half of the new file, then die the hard way
        try:

            def half_then_die(obj, f):
                import io

                buffer = io.BytesIO()
                real_save(obj, buffer)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = half_then_die
            save_atomic(_payload(2), path)
        finally:
            os._exit(1)  # not reached when the kill lands
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    torn = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0
    assert read_checkpoint(path)["iter"] == 1
    # A temporary file is not a checkpoint; the checkpointer of the next (resumed) run clears it away.
    Checkpointer(tmp_path, 1, {}, []).before_train(None)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _RunsCode:
    """Unpickling this would create a folder: proof that the file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pickled_object_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": STUDENT_FORMAT, "model": {}, "payload": _RunsCode(marker)}, path)
    message = _error(path)
    assert "refused: the file contains pickled Python objects (posix.mkdir)" in message
    assert "weights_only=True" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "checkpoint file not found"),
        (b"", "not a readable checkpoint"),
        (b"this is a text file\n", "not a readable checkpoint"),
        (b"\x80\x02garbage", "not a readable checkpoint, truncated or corrupt (Unsupported operand"),
        ("truncated", "not a readable checkpoint, truncated or corrupt"),
        ("plain", "not a detkd checkpoint"),
    ],
    ids=["missing", "empty", "text", "bad-opcode", "truncated", "plain-state-dict"],
)
def test_unreadable_checkpoints_give_one_line(tmp_path, content, expected):
    path = tmp_path / "ckpt.pt"
    if content == "truncated":
        save_atomic(_payload(1), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "plain":
        torch.save(nn.Linear(2, 2).state_dict(), path)
    elif content is not None:
        path.write_bytes(content)
    assert expected in _error(path)


def test_state_mismatch_names_the_key(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = model.state_dict()
    with pytest.raises(CheckpointError, match=r"x\.pt: .*shape of 0\.weight: checkpoint \(4, 2\), model \(3, 2\)"):
        load_state_checked(model, {**state, "0.weight": torch.zeros(4, 2)}, "x.pt")
    with pytest.raises(CheckpointError, match=r"1 parameter\(s\) missing .* first 1\.bias"):
        load_state_checked(model, {k: v for k, v in state.items() if k != "1.bias"}, "x.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected parameter\(s\) .* first extra"):
        load_state_checked(model, {**state, "extra": torch.zeros(1)}, "x.pt")


def test_student_checkpoint_round_trip(tmp_path):
    from tests.conftest import tiny

    detector = tiny("retinanet_r18", fpn_channels=16)
    save_student(tmp_path / "student.pt", detector, ["a", "b", "c"], {"iter": 3})
    loaded, ckpt = load_detector(tmp_path / "student.pt")
    assert ckpt["classes"] == ["a", "b", "c"] and ckpt["meta"] == {"iter": 3}
    for (name, a), b in zip(detector.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_random_state_survives_a_weights_only_round_trip(tmp_path):
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    save_atomic({"format": TRAIN_FORMAT, "rng": [rng_state(torch.device("cpu"))]}, tmp_path / "last.pt")
    expected = _draws()
    _draws()
    set_rng_state(read_checkpoint(tmp_path / "last.pt")["rng"][0], torch.device("cpu"))
    assert _draws() == expected


def test_evaluation_does_not_move_the_training_random_stream(tmp_path):
    class Student:
        pass

    class FakeTrainer:
        device = torch.device("cpu")
        iter = 1
        best = {"score": None, "iter": None}

        class model:
            student = Student()

    def evaluate(_):
        torch.rand(100)  # the eval DataLoader seeds itself from the global generator
        return {"AP": 0.0}

    evaluator = Evaluator(evaluate, tmp_path, 1, [], key="none")
    before = torch.get_rng_state()
    evaluator.run(FakeTrainer())
    assert torch.equal(torch.get_rng_state(), before)
    assert (tmp_path / "eval.jsonl").exists()
