"""Defaults for real data, the digits' settings travelling with the dataset, and the run's warnings."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from detkd.cli import main
from detkd.config import DATASET_SETTINGS, Config, load_config
from detkd.data import make_digits
from detkd.engine.hooks import loss_balance_warning
from detkd.engine.launch import describe_model, input_size_warning, teacher_input_warning
from detkd.errors import ConfigError
from tests.conftest import tiny


def test_defaults_are_torchvisions():
    model = Config().model
    assert (model.preset, model.min_size, model.max_size) == ("standard", 800, 1333)
    assert (model.backbone_weights, model.weights) == ("imagenet", "none")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults") / "digits"
    summary = make_digits(root, train=4, val=2, size=64)
    return root, summary


def test_digits_write_their_settings(digits):
    root, summary = digits
    assert summary["settings"] == str(root / DATASET_SETTINGS)
    settings = yaml.safe_load((root / DATASET_SETTINGS).read_text())
    assert settings == {"model": {"preset": "slim", "backbone_weights": "none", "min_size": 64, "max_size": 64}}


def test_dataset_settings_sit_between_defaults_and_the_users_layers(digits, tmp_path):
    root, _ = digits
    layers: list[str] = []
    cfg = load_config(overrides=[f"data.root={root}"], dataset_settings=True, layers=layers)
    assert (cfg.model.preset, cfg.model.min_size, cfg.model.backbone_weights) == ("slim", 64, "none")
    assert layers == ["defaults", str(root / DATASET_SETTINGS), "command line"]
    user = tmp_path / "user.yaml"
    user.write_text(f"data: {{root: {root}}}\nmodel: {{preset: standard, min_size: 48}}\n")
    cfg = load_config(user, ["model.min_size=40"], dataset_settings=True, layers=layers)
    assert (cfg.model.preset, cfg.model.min_size, cfg.model.max_size) == ("standard", 40, 64)
    assert layers == ["defaults", str(root / DATASET_SETTINGS), str(user), "command line"]
    # Without the flag (the library's load_config), a dataset's file is never read.
    assert load_config(overrides=[f"data.root={root}"]).model.preset == "standard"


def test_dataset_settings_cannot_move_the_dataset(tmp_path):
    (tmp_path / DATASET_SETTINGS).write_text("data: {root: elsewhere}\n")
    with pytest.raises(ConfigError, match="cannot set data.root"):
        load_config(overrides=[f"data.root={tmp_path}"], dataset_settings=True)


def test_print_config_names_the_layers(digits, capsys):
    root, _ = digits
    assert main(["train", "--data", str(root), "--weights", "w.pt", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f"# layers, lowest first: defaults < {root / DATASET_SETTINGS} < command line" in out
    cfg = yaml.safe_load(out)
    assert cfg["model"]["preset"] == "slim" and cfg["model"]["weights"] == "w.pt"
    argv = ["distill", "--method", "kd", "--teacher", "none", "--data", str(root), "--student-weights", "b.pt"]
    assert main([*argv, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["weights"] == "b.pt"


def test_first_log_line_states_size_preset_and_weights():
    cfg = load_config(overrides=["model.weights=runs/base/best.pt"])
    line = describe_model(cfg)
    for part in ("frcnn_r18", "preset standard", "800 px", "1333", "detector weights runs/base/best.pt"):
        assert part in line
    assert describe_model(load_config()).endswith("backbone weights imagenet")


def records(*sides):
    """A dataset stand-in whose record table holds only the image sizes."""
    widths = np.array([w for w, _ in sides], dtype=np.int32)
    heights = np.array([h for _, h in sides], dtype=np.int32)
    return SimpleNamespace(records=SimpleNamespace(widths=widths, heights=heights))


def test_input_size_warning():
    photos = records((640, 480), (500, 375), (1024, 768))
    warning = input_size_warning(photos, 128)
    assert "model.min_size=128" in warning and "480 px" in warning
    assert input_size_warning(photos, 240) is None  # half of the median short side: fine
    assert input_size_warning(records((128, 128)), 128) is None
    assert input_size_warning(records(), 128) is None


def test_teacher_input_warning():
    student = tiny("frcnn_r18", fpn_channels=16)
    assert teacher_input_warning(tiny("frcnn_r34", fpn_channels=16), student) is None
    from detkd.models import build_detector

    big = build_detector("frcnn_r18", 3, min_size=96, max_size=128, fpn_channels=16)
    big.transform.image_std = [0.5, 0.5, 0.5]
    warning = teacher_input_warning(big, student)
    assert "min_size 96 vs 64" in warning and "max_size 128 vs 64" in warning and "image_std" in warning
    assert "\n" not in warning


def test_loss_balance_warning_names_the_weight():
    record = {"loss_cls": 0.5, "loss_box": 0.5, "fitnet.kd_feat": 500.0, "kd.kd_cls": 2.0, "raw.fitnet.kd_feat": 5e4}
    warning = loss_balance_warning(record)
    assert "fitnet.kd_feat is 500x" in warning and "distill.weights.fitnet" in warning
    assert "kd.kd_cls" not in warning
    assert loss_balance_warning({"loss_cls": 1.0, "fitnet.kd_feat": 99.0}) is None
    assert loss_balance_warning({"fitnet.kd_feat": 5.0}) is None  # no detection loss to compare with


def test_weights_flag_runs_end_to_end(digits, tmp_path, capsys):
    """`detkd train --weights CKPT` loads the checkpoint, says so, and its own student.pt rebuilds (frozen BN)."""
    from detkd.engine.checkpoint import load_detector, save_student

    root, _ = digits
    source = tiny("frcnn_r18", num_classes=10, fpn_channels=16)
    save_student(tmp_path / "base.pt", source, [str(d) for d in range(10)])
    fast = ["--no-progress", "--device", "cpu", "model.fpn_channels=16", "data.batch_size=2", "data.val_max_images=1"]
    argv = ["train", "--data", str(root), "--out", str(tmp_path / "run"), "--iters", "1", "--weights"]
    assert main([*argv, str(tmp_path / "base.pt"), *fast, "train.tensorboard=false"]) == 0
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())  # the log handler wraps lines at the terminal width
    assert "model frcnn_r18: preset slim, input short side 64 px" in text
    assert "tensors loaded into frcnn_r18" in text and "(detkd checkpoint)" in text
    rebuilt, ckpt = load_detector(tmp_path / "run" / "student.pt")
    assert ckpt["spec"]["frozen_bn"] is True
    # model.frozen_bn=false keeps BatchNorm and the first stages training from the same weights.
    out = str(tmp_path / "unfrozen")
    argv[argv.index("--out") + 1] = out
    assert main([*argv, str(tmp_path / "base.pt"), *fast, "train.tensorboard=false", "model.frozen_bn=false"]) == 0
    rebuilt, ckpt = load_detector(tmp_path / "unfrozen" / "student.pt")
    assert "frozen_bn" not in ckpt["spec"]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in rebuilt.modules())


def test_default_imagenet_backbone_offline_says_which_option_to_pass(digits, tmp_path, monkeypatch, capsys):
    """A user's data with the defaults, no cached ImageNet file, no network: one line naming the options."""
    import shutil

    import torch

    user = tmp_path / "user_data"
    shutil.copytree(digits[0], user)
    (user / DATASET_SETTINGS).unlink()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    argv = ["train", "--data", str(user), "--out", str(tmp_path / "run"), "--iters", "1", "--no-progress"]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.backbone_weights=PATH" in err[0] and "model.backbone_weights=none" in err[0]
    assert not (tmp_path / "run").exists()


def test_thread_warning_says_how_many_threads_fit():
    from detkd.engine.cores import thread_warning

    warning = thread_warning(2, load=1.0, cores=2)
    assert "load is 1.0 on 2 cores" in warning and "trains with 2 CPU thread(s)" in warning
    assert "--threads 1" in warning
    assert thread_warning(1, load=1.0, cores=2) is None  # one thread on the free core
    assert thread_warning(2, load=0.2, cores=2) is None  # a briefly busy machine: half a core of slack
    assert "--threads 4" in thread_warning(8, load=12.0, cores=16)
    assert "--threads 1" in thread_warning(4, load=3.9, cores=2)  # never fewer than one


def test_train_on_busy_cores_warns_unless_the_bench_checked_them(digits, tmp_path, monkeypatch, capsys):
    """`detkd train --threads 2` on a 2-core machine already at load 1.9 warns; a run the bench started does not."""
    import os

    from detkd.engine import cores
    from detkd.engine.cores import CORES_CHECKED

    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.9, 1.9))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cores, "busy_cores", lambda n: 1.9)  # and the cores are busy now, too
    monkeypatch.delenv(CORES_CHECKED, raising=False)
    fast = ["--no-progress", "--device", "cpu", "--threads", "2", "model.backbone_weights=none", "data.batch_size=2"]
    fast += ["model.fpn_channels=16", "data.val_max_images=1", "train.tensorboard=false"]
    argv = ["train", "--data", str(digits[0]), "--iters", "1", *fast]
    try:
        assert main([*argv, "--out", str(tmp_path / "alone")]) == 0
        captured = capsys.readouterr()
        text = " ".join((captured.out + captured.err).split())  # the log handler wraps lines at the terminal width
        assert "the machine's load is 1.9 on 2 cores before this run starts" in text and "--threads 1" in text
        monkeypatch.setenv(CORES_CHECKED, "1")
        assert main([*argv, "--out", str(tmp_path / "bench")]) == 0
        captured = capsys.readouterr()
        assert "the machine's load is" not in captured.out + captured.err
    finally:
        torch.set_num_threads(2)  # the suite's setting (tests/conftest.py)


def test_a_load_average_that_counts_ended_work_is_checked_against_the_cores_now(monkeypatch):
    """Right after `pip install` the 1-minute average still says 2.0; the cores' busy time now decides."""
    import os

    from detkd.engine import cores

    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cores, "busy_cores", lambda n: 0.1)
    assert cores.thread_warning(2) is None
    monkeypatch.setattr(cores, "busy_cores", lambda n: 1.8)
    assert "load is 1.8 on 2 cores" in cores.thread_warning(2)
    monkeypatch.setattr(cores, "busy_cores", lambda n: None)  # no /proc/stat: the average stands
    assert "load is 2.0 on 2 cores" in cores.thread_warning(2)
    looked = []
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    monkeypatch.setattr(cores, "busy_cores", lambda n: looked.append(n))
    assert cores.thread_warning(2) is None and not looked  # an idle average needs no second look


def test_busy_cores_is_the_busy_share_of_the_ticks_between_two_readings(monkeypatch):
    from detkd.engine import cores

    real = cores.cpu_times()
    if real is not None:  # Linux: a real reading over a short window is a core count
        assert 0.0 <= cores.busy_cores(2, window=0.05) <= 2.0 + 1e-6
    readings = iter([(100.0, 400.0), (150.0, 500.0)])
    monkeypatch.setattr(cores, "cpu_times", lambda: next(readings))
    assert cores.busy_cores(2, window=0) == pytest.approx(1.0)  # 50 of 100 ticks busy on 2 cores
    monkeypatch.setattr(cores, "cpu_times", lambda: None)
    assert cores.busy_cores(2, window=0) is None
