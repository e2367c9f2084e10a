"""The getting-started recipe "fine-tune a COCO teacher, then distil" runs as written (slow: R50 standard on CPU).

The commands are read from docs/getting-started.md and run in order with a few options appended that shrink the
work (2 steps, 128-px inputs, 2 val images). torchvision's COCO fetch is replaced by a randomly initialised
torchvision Faster R-CNN of the same shape, and the ImageNet ResNet-18 by a random one: no network.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.models.detection as tvd

from detkd.cli import main
from detkd.config import DATASET_SETTINGS
from detkd.data import make_digits

DOC = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"
SMALL = ["--iters", "2", "model.min_size=128", "model.max_size=128", "data.val_max_images=2", "data.batch_size=2"]
SMALL += ["--no-progress", "train.tensorboard=false", "distill.check_teacher=0", "--device", "cpu"]


def recipe_commands() -> list[list[str]]:
    section = DOC.read_text().split("## Your data: fine-tune a COCO teacher, then distil", 1)[1]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[:1]
    lines = [line.split("#", 1)[0].rstrip() for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.strip()]


def test_the_recipe_commands_are_the_documented_ones():
    commands = recipe_commands()
    assert [c[0] for c in commands] == ["train", "train", "distill", "eval", "predict"]
    assert "--weights" in commands[0] and "--student-weights" in commands[2]


@pytest.mark.slow
def test_recipe_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_digits("data/my_coco", train=8, val=2, size=128)
    (tmp_path / "data" / "my_coco" / DATASET_SETTINGS).unlink()  # a user's own dataset carries no settings
    torch.manual_seed(0)
    coco = tvd.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    monkeypatch.setattr(tvd.FasterRCNN_ResNet50_FPN_Weights, "get_state_dict", lambda self, *a, **k: coco)
    torch.save(torchvision.models.resnet18().state_dict(), "resnet18.pth")
    make_digits("held_out", train=1, val=3, size=128, seed=5)  # images the models never saw
    Path("new_images").mkdir()
    for image in sorted(Path("held_out").rglob("*.png"))[:3]:
        (Path("new_images") / f"{image.parent.name}_{image.name}").write_bytes(image.read_bytes())
    for argv in recipe_commands():
        if argv[0] == "eval":
            assert main([*argv, "--no-progress", "--max-images", "2"]) == 0
            continue
        if argv[0] == "predict":
            assert main([*argv, "--device", "cpu"]) == 0
            continue
        extra = ["--backbone-weights", "resnet18.pth"] if "frcnn_r18" in argv and argv[0] == "train" else []
        assert main([*argv, *SMALL, *extra]) == 0, argv
    assert Path("runs/gkd/best.pt").is_file()
    predictions = json.loads(Path("predictions/predictions.json").read_text())
    assert isinstance(predictions, list) and len(list(Path("new_images").iterdir())) == 3
