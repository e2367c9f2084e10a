"""The bad-input matrix (docs/robustness.md): data, config, checkpoints and command-line arguments.

Every case goes through the real entry point, ``detkd.cli.main``, and must exit non-zero with exactly one line on
stderr that names the file or entry at fault, no traceback, and leave every file already in the run folder as it
was. Cases that fail before training must not create anything at all. One case also runs as a real subprocess,
where nothing (pytest's capture included) could hide extra output.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from detkd.cli import main
from detkd.data import make_digits
from detkd.engine.checkpoint import STUDENT_FORMAT, save_student
from tests.conftest import tiny

CLASSES = [str(d) for d in range(10)]
FAST = ["--no-progress", "model.min_size=64", "model.max_size=64", "model.fpn_channels=16", "data.batch_size=2"]
FAST += ["train.tensorboard=false", "data.val_max_images=1", "distill.check_teacher=0", "--device", "cpu"]


class RunsCode:
    """Unpickling (or YAML-constructing) this would create a folder: proof that the file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return __import__("os").mkdir, (str(self.marker),)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A small dataset, checkpoints good and bad, and one finished run."""
    root = tmp_path_factory.mktemp("bad_input")
    data = root / "digits"
    make_digits(data, train=8, val=2, size=64)
    w = {"root": root, "data": data, "marker": root / "code_ran"}
    w["teacher"] = root / "teacher.pt"
    save_student(w["teacher"], tiny("frcnn_r18", num_classes=10, fpn_channels=16), CLASSES)
    w["retina_teacher"] = root / "retina_teacher.pt"
    save_student(w["retina_teacher"], tiny("retinanet_r18", num_classes=10, fpn_channels=16), CLASSES)
    w["abc_teacher"] = root / "abc_teacher.pt"
    save_student(w["abc_teacher"], tiny("frcnn_r18", num_classes=3, fpn_channels=16), ["a", "b", "c"])
    w["truncated"] = root / "truncated.pt"
    w["truncated"].write_bytes(w["teacher"].read_bytes()[:4096])
    w["pickled"] = root / "pickled.pt"
    torch.save({"format": STUDENT_FORMAT, "model": {}, "hook": RunsCode(w["marker"])}, w["pickled"])
    w["pickle_dump"] = root / "pickle_dump.pt"
    with open(w["pickle_dump"], "wb") as f:
        pickle.dump({"model": {"weight": [1.0, 2.0]}}, f)
    w["plain"] = root / "plain.pt"
    torch.save(nn.Linear(2, 2).state_dict(), w["plain"])
    w["run"] = root / "run"
    assert main(["train", "--data", str(data), "--out", str(w["run"]), "--iters", "1", *FAST]) == 0
    return w


def _tree(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


# --- how each case prepares its inputs -------------------------------------------------------------------------


def _copy_data(w: dict, tmp: Path) -> Path:
    data = tmp / "data"
    shutil.copytree(w["data"], data)
    return data


def _edit_annotations(w: dict, tmp: Path, edit: Callable[[dict], None]) -> Path:
    data = _copy_data(w, tmp)
    path = data / "annotations" / "instances_train.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    return data


def _replace_file(w: dict, tmp: Path, name: str, content: bytes | None) -> Path:
    data = _copy_data(w, tmp)
    target = data / name
    if content is None:
        target.unlink()
    else:
        target.write_bytes(content)
    return data


def _corrupt_images(w: dict, tmp: Path, content: bytes) -> Path:
    """Every training image replaced by bytes no decoder reads, so the first batch fails (whatever the order)."""
    data = _copy_data(w, tmp)
    for image in (data / "train").iterdir():
        image.write_bytes(content)
    return data


def _empty_split(w: dict, tmp: Path, split: str) -> Path:
    """A copy of the data whose ``split`` lists no images at all."""
    data = _copy_data(w, tmp)
    path = data / "annotations" / f"instances_{split}.json"
    content = json.loads(path.read_text())
    content["images"], content["annotations"] = [], []
    path.write_text(json.dumps(content))
    return data


def _without(out: Path, name: str) -> Path:
    (out / name).unlink()
    return out


def _yaml(tmp: Path, text: str) -> Path:
    path = tmp / "config.yaml"
    path.write_text(text)
    return path


def _finished_run(w: dict, tmp: Path) -> Path:
    out = tmp / "run"
    shutil.copytree(w["run"], out)
    return out


def _train(data: Path | str, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--iters", "1", *FAST, *extra]


def _distill(w: dict, out: Path, teacher: Path | str, method: str = "kd", *extra: str) -> list[str]:
    return ["distill", "--method", method, "--teacher", str(teacher), "--student", "frcnn_r18", "--data",
            str(w["data"]), "--out", str(out), "--iters", "1", *FAST, *extra]  # fmt: skip


@dataclass
class Case:
    """argv(world, tmp, out) -> arguments; ``expected``: piece(s) of the one-line message (``{...}`` filled from
    the world, ``{out}``, ``{tmp}``); ``writes``: the case may fail after training began (new files allowed, the
    old ones must not change); ``existing_run``: the run folder holds a finished run."""

    argv: Callable[[dict, Path, Path], list[str]]
    expected: str | tuple[str, ...]
    writes: bool = False
    existing_run: bool = False


def _no_boxes(d: dict) -> None:
    d["annotations"] = []


def _category_99(d: dict) -> None:
    d["annotations"][0]["category_id"] = 99


def _bad_bbox(d: dict) -> None:
    d["annotations"][2]["bbox"] = [1, 2, "x", 4]


CASES: dict[str, Case] = {
    # data
    "data-folder-missing": Case(lambda w, t, o: _train(t / "nope", o), "{tmp}/nope: dataset folder not found"),
    "annotation-file-missing": Case(
        lambda w, t, o: _train(_replace_file(w, t, "annotations/instances_train.json", None), o),
        "{tmp}/data: no dataset for split 'train'; looked for COCO (annotations/instances_train.json)",
    ),
    "annotation-json-malformed": Case(
        lambda w, t, o: _train(_replace_file(w, t, "annotations/instances_train.json", b'{"images": ['), o),
        "{tmp}/data/annotations/instances_train.json: not valid JSON (",
    ),
    "annotation-entry-malformed": Case(
        lambda w, t, o: _train(_edit_annotations(w, t, _bad_bbox), o),
        "instances_train.json: annotation 3: bbox must be 4 finite numbers [x, y, w, h], got [1, 2, 'x', 4]",
    ),
    "unknown-category-id": Case(
        lambda w, t, o: _train(_edit_annotations(w, t, _category_99), o),
        "instances_train.json: annotation 1: category_id 99 is not in 'categories'",
    ),
    "image-missing": Case(
        lambda w, t, o: _train(_replace_file(w, t, "train/000003.png", None), o),
        "{tmp}/data/train/000003.png: image file not found (listed in {tmp}/data/annotations/instances_train.json)",
    ),
    "image-corrupt": Case(
        lambda w, t, o: _train(_corrupt_images(w, t, b"\x89PNG\r\n\x1a\nnot really"), o),
        ("{tmp}/data/train/0000", ".png: cannot read image ("),
        writes=True,
    ),
    "image-corrupt-in-worker": Case(
        lambda w, t, o: _train(_corrupt_images(w, t, b"GIF89a"), o, "data.workers=1"),
        ("{tmp}/data/train/0000", ".png: cannot read image ("),
        writes=True,
    ),
    "no-boxes": Case(
        lambda w, t, o: _train(_edit_annotations(w, t, _no_boxes), o),
        "{tmp}/data: split 'train' has no boxes to train on (8 images, none with a usable annotation)",
    ),
    "empty-val-split": Case(
        lambda w, t, o: _train(_empty_split(w, t, "val"), o),
        "{tmp}/data: split 'val' has no images (evaluation needs at least one;",
    ),
    "empty-train-split": Case(
        lambda w, t, o: _train(_empty_split(w, t, "train"), o),
        "{tmp}/data: split 'train' has no images (training needs at least one;",
    ),
    "eval-empty-split": Case(
        lambda w, t, o: ["eval", str(w["teacher"]), "--data", str(_empty_split(w, t, "val")), "--no-progress"],
        "{tmp}/data: split 'val' has no images (evaluation needs at least one;",
    ),
    # config
    "config-negative-lr": Case(lambda w, t, o: _train(w["data"], o, "optim.lr=-1"), "optim.lr must be > 0, got -1.0."),
    "config-zero-batch": Case(
        lambda w, t, o: _train(w["data"], o, "data.batch_size=0"), "data.batch_size must be >= 1, got 0."
    ),
    "config-negative-workers": Case(
        lambda w, t, o: _train(w["data"], o, "data.workers=-1"), "data.workers must be >= 0, got -1."
    ),
    "config-zero-min-size": Case(
        lambda w, t, o: _train(w["data"], o, "model.min_size=0"), "model.min_size must be >= 1, got 0."
    ),
    "config-negative-iters": Case(
        lambda w, t, o: ["train", "--data", str(w["data"]), "--out", str(o), *FAST, "train.iters=-5"],
        "train.iters must be >= 1, got -5.",
    ),
    "config-two-bad-values": Case(
        lambda w, t, o: _train(w["data"], o, "optim.lr=0", "model.max_size=32"),
        ("model.max_size must be >= model.min_size (64), got 32.", "optim.lr must be > 0, got 0.0."),
    ),
    "config-unknown-key": Case(
        lambda w, t, o: _train(w["data"], o, "train.itres=3"),
        "config.train: unknown key(s) itres; valid keys: amp, ckpt_every,",
    ),
    "config-wrong-type": Case(
        lambda w, t, o: _train(w["data"], o, "train.iters=abc"), "config.train.iters: expected int, got 'abc'"
    ),
    "config-bad-value": Case(
        lambda w, t, o: _train(w["data"], o, "train.amp=fp8"),
        "config.train.amp: 'fp8' is not one of 'auto', 'off', 'bf16', 'fp16'",
    ),
    "config-bad-schedule": Case(
        lambda w, t, o: _train(w["data"], o, "optim.schedule=cosin"),
        "config.optim.schedule: 'cosin' is not one of 'step', 'cosine', 'constant'",
    ),
    "config-override-syntax": Case(
        lambda w, t, o: _train(w["data"], o, "train.iters"),
        "override 'train.iters' is not of the form key=value (e.g. optim.lr=0.01)",
    ),
    "yaml-malformed": Case(
        lambda w, t, o: _train(w["data"], o, "--config", str(_yaml(t, "train: [1, 2\n"))),
        "{tmp}/config.yaml: not valid YAML (",
    ),
    "yaml-python-tag": Case(
        lambda w, t, o: _train(
            w["data"], o, "--config", str(_yaml(t, f"train: !!python/object/apply:os.mkdir ['{w['marker']}']\n"))
        ),
        "{tmp}/config.yaml: not valid YAML (could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.mkdir')",
    ),
    "yaml-not-a-mapping": Case(
        lambda w, t, o: _train(w["data"], o, "--config", str(_yaml(t, "- 1\n- 2\n"))),
        "{tmp}/config.yaml: expected a mapping at the top level, got list",
    ),
    "yaml-missing": Case(
        lambda w, t, o: _train(w["data"], o, "--config", str(t / "nope.yaml")),
        "{tmp}/nope.yaml: cannot read config file (No such file or directory)",
    ),
    # checkpoints
    "teacher-missing": Case(
        lambda w, t, o: _distill(w, o, t / "nope.pt"), "--teacher {tmp}/nope.pt: file not found (train one with"
    ),
    "teacher-truncated": Case(
        lambda w, t, o: _distill(w, o, w["truncated"]), "{truncated}: not a readable checkpoint, truncated or corrupt"
    ),
    "teacher-pickled-object": Case(
        lambda w, t, o: _distill(w, o, w["pickled"]),
        "{pickled}: refused: the file contains pickled Python objects (posix.mkdir)",
    ),
    "teacher-plain-pickle": Case(
        lambda w, t, o: _distill(w, o, w["pickle_dump"]),
        "{pickle_dump}: the file is a pickle (pickle.dump), not a torch checkpoint;",
    ),
    "teacher-not-detkd": Case(
        lambda w, t, o: _distill(w, o, w["plain"]), "{plain}: not a detkd checkpoint (no 'format' field"
    ),
    "teacher-wrong-detector": Case(
        lambda w, t, o: _distill(w, o, w["retina_teacher"]),
        "kd: logit distillation needs the same detector kind; student frcnn_r18 is two_stage, teacher "
        "retinanet_r18 is one_stage",
    ),
    "teacher-classes-mismatch": Case(
        lambda w, t, o: _distill(w, o, w["abc_teacher"]),
        "{abc_teacher}: the teacher was trained on classes ['a', 'b', 'c'], the data has ['0', '1',",
    ),
    "resume-truncated-checkpoint": Case(
        lambda w, t, o: _truncate_last(o) + ["--resume"],
        "{out}/last.pt: not a readable checkpoint, truncated or corrupt",
        existing_run=True,
    ),
    "resume-other-detector": Case(
        lambda w, t, o: ["train", "--out", str(o), "--resume", "--model", "retinanet_r18", "--no-progress"],
        "{out}/last.pt: checkpoint does not match the model (",
        existing_run=True,
    ),
    "eval-checkpoint-missing": Case(
        lambda w, t, o: ["eval", str(t / "nope.pt"), "--data", str(w["data"])],
        "{tmp}/nope.pt: checkpoint file not found",
    ),
    "eval-classes-mismatch": Case(
        lambda w, t, o: ["eval", str(w["abc_teacher"]), "--data", str(w["data"]), "--no-progress"],
        "{abc_teacher} was trained on classes ['a', 'b', 'c'],",
    ),
    "export-packed-not-binary": Case(
        lambda w, t, o: ["export", str(w["teacher"]), "--packed", str(o / "student.packed")],
        "--packed: frcnn_r18 has no 1-bit layers",
        existing_run=True,
    ),
    "export-nothing-to-do": Case(
        lambda w, t, o: ["export", str(w["teacher"])], "export: nothing to do; pass --onnx FILE,"
    ),
    # command line
    "unknown-method": Case(lambda w, t, o: _distill(w, o, w["teacher"], "kd+nope"), "unknown method 'nope'; known: "),
    "method-bad-choice": Case(
        lambda w, t, o: _distill(w, o, w["teacher"], "kd", "distill.options.kd.rois=some"),
        "distill.options.kd.rois: 'some' is not one of 'all', 'positive'",
    ),
    "method-needs-teacher": Case(
        lambda w, t, o: _distill(w, o, "none"), "method 'kd' needs a teacher (--teacher CKPT)"
    ),
    "no-method": Case(
        lambda w, t, o: ["distill", "--data", str(w["data"]), "--out", str(o), *FAST],
        "no method given: pass --method NAME[+NAME]",
    ),
    "resume-without-run": Case(
        lambda w, t, o: _train(w["data"], o, "--resume"), "--resume: {out}/last.pt not found (nothing to resume"
    ),
    "existing-run-without-resume": Case(
        lambda w, t, o: _train(w["data"], o),
        "{out} already holds a run (last.pt); pass --resume to continue it, --overwrite to replace it, or choose "
        "another --out",
        existing_run=True,
    ),
    "finished-run-without-last-pt": Case(
        lambda w, t, o: _train(w["data"], _without(o, "last.pt")),
        "{out} already holds a run's results (best.pt, student.pt, final.json); pass --overwrite to replace them",
        existing_run=True,
    ),
    "resume-and-overwrite": Case(
        lambda w, t, o: _train(w["data"], o, "--resume", "--overwrite"),
        "--resume and --overwrite exclude each other",
        existing_run=True,
    ),
    "unknown-backbone": Case(
        lambda w, t, o: _train(w["data"], o, "--model", "frcnn_r999"),
        "unknown backbone 'r999' in detector 'frcnn_r999'; known: ",
    ),
    "unknown-detector": Case(
        lambda w, t, o: _train(w["data"], o, "--model", "yolo_r18"),
        "unknown detector 'yolo_r18': expected <family>_<backbone> with family in ",
    ),
    "unknown-device": Case(lambda w, t, o: _train(w["data"], o, "--device", "tpu"), "train.device: unknown device"),
    "unknown-option": Case(
        lambda w, t, o: _train(w["data"], o, "--bogus"),
        "detkd: error: unrecognized arguments: --bogus (see `detkd --help`)",
    ),
    "option-wrong-type": Case(
        lambda w, t, o: ["train", "--iters", "x"],
        "detkd train: error: argument --iters: invalid int value: 'x' (see `detkd train --help`)",
    ),
    "unknown-command": Case(lambda w, t, o: ["trian"], "detkd: error: argument COMMAND: invalid choice: 'trian'"),
    "out-is-a-file": Case(
        lambda w, t, o: _train(w["data"], _a_file(t)), "{tmp}/file.txt: the run folder (--out) is an existing file"
    ),
}


def _truncate_last(out: Path) -> list[str]:
    last = out / "last.pt"
    last.write_bytes(last.read_bytes()[:2048])
    return ["train", "--out", str(out), "--no-progress"]


def _a_file(tmp: Path) -> Path:
    path = tmp / "file.txt"
    path.write_text("not a folder\n")
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, world, tmp_path, capsys):
    case = CASES[name]
    out = _finished_run(world, tmp_path) if case.existing_run else tmp_path / "out"
    argv = case.argv(world, tmp_path, out)
    before = _tree(out)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code
    err = capsys.readouterr().err
    fields = {k: str(v) for k, v in world.items()} | {"out": str(out), "tmp": str(tmp_path)}
    expected = [e.format(**fields) for e in ((case.expected,) if isinstance(case.expected, str) else case.expected)]
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("detkd"), lines[0]
    assert all(e in lines[0] for e in expected), lines[0]
    after = _tree(out)
    assert {k: after.get(k) for k in before} == before, "a file already in the run folder changed"
    if not case.writes:
        assert after == before, f"new files: {sorted(set(after) - set(before))}"
    assert not world["marker"].exists(), "code inside an input file ran"


def test_degenerate_boxes_are_skipped_and_reported(world, tmp_path, capsys):
    """Not an error: zero-area boxes are dropped with a count in the log (documented in docs/robustness.md)."""

    def degenerate(d: dict) -> None:
        d["annotations"][0]["bbox"][2] = 0.0  # width 0

    data = _edit_annotations(world, tmp_path, degenerate)
    assert main(_train(data, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "annotations left out of training targets: zero_area 1" in " ".join(out.split())


def test_one_line_in_a_real_process(world, tmp_path):
    """A bad teacher through the installed entry point: the whole stderr is one line, the exit status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "detkd.cli", *_distill(world, tmp_path / "out", world["pickled"])],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"detkd: error: {world['pickled']}: refused")
    assert not (tmp_path / "out").exists() and not world["marker"].exists()


def test_overwrite_replaces_a_finished_run(world, tmp_path, capsys):
    out = _finished_run(world, tmp_path)
    (out / "last.pt").unlink()
    assert main(_train(world["data"], out, "--overwrite", "--seed", "3")) == 0
    assert (out / "last.pt").is_file()
    assert len((out / "eval.jsonl").read_text().splitlines()) == 1  # the old run's rows are gone
    assert "seed: 3" in (out / "config.yaml").read_text()


def test_resume_of_a_finished_run_changes_nothing(world, tmp_path, capsys):
    out = _finished_run(world, tmp_path)
    before = _tree(out)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert _tree(out) == before  # no second evaluation row, no final.json with step_time_s null
    assert "already finished" in " ".join(capsys.readouterr().out.split())
    assert json.loads((out / "final.json").read_text())["step_time_s"] is not None


def test_disk_full_during_a_checkpoint_is_one_line(world, tmp_path, capsys, monkeypatch):
    """The second write of last.pt hits a full disk: one line, exit 2, the first last.pt still loads."""
    from detkd.engine.checkpoint import read_checkpoint

    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == "detkd.train":
            calls.append(obj["iter"])
            if len(calls) > 1:
                f.write(b"PK\x03\x04 partial")
                raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(_train(world["data"], out, "train.ckpt_every=1", "train.iters=2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    expected = f"{out}/last.pt: cannot write the checkpoint (No space left on device); the previous last.pt is kept"
    assert err[0] == f"detkd: error: {expected}"
    monkeypatch.undo()
    assert read_checkpoint(out / "last.pt")["iter"] == 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_log_write_on_a_full_disk_is_one_line(world, tmp_path, capsys, monkeypatch):
    """A full disk while appending a log line (an open file: the error names no file) is one line too."""
    from detkd.engine import hooks

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hooks.Logger, "after_step", full)
    capsys.readouterr()
    code = main(_train(world["data"], tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == "detkd: error: No space left on device (the run folder keeps its last checkpoint)"
