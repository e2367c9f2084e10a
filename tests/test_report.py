"""``detkd report`` on a distillation run: curves, detections and each method's pictures."""

from __future__ import annotations

from pathlib import Path

from detkd.cli import main
from detkd.data import make_digits

FAST = ["--no-progress", "model.min_size=64", "model.max_size=64", "model.fpn_channels=16", "data.batch_size=2"]
FAST += ["train.tensorboard=false", "data.val_max_images=1", "distill.check_teacher=0", "--device", "cpu"]


def test_report_of_a_distillation_run(tmp_path):
    method = "tar"  # a method with diagnostic pictures, so the distillers are rebuilt and run
    data = tmp_path / "digits"
    make_digits(data, train=4, val=2, size=64)
    teacher = tmp_path / "teacher"
    assert main(["train", "--data", str(data), "--out", str(teacher), "--iters", "1", *FAST]) == 0
    run = tmp_path / "run"
    argv = ["distill", "--method", method, "--teacher", str(teacher / "student.pt"), "--student", "frcnn_r18"]
    assert main([*argv, "--data", str(data), "--out", str(run), "--iters", "2", *FAST]) == 0
    assert main(["report", str(run), "--images", "1"]) == 0
    md = (run / "report" / "report.md").read_text()
    assert f"**method:** {method}" in md
    pictures = [Path(p).name for p in (run / "report").glob("*.png")]
    assert "detections.png" in pictures
    assert any(p.startswith(f"{method}_") for p in pictures), pictures
