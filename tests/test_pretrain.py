"""``detkd pretrain``: a backbone trained on object crops, whose weights load into any detector with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detkd.cli import main
from detkd.data import make_digits
from detkd.distillation import DistillModel
from detkd.models import build_detector
from detkd.models.binary import BinaryConv2d
from detkd.pretrain import output_paths, set_binary_mode
from tests.conftest import make_batch
from tests.data.conftest import SCENE, write_coco


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain") / "digits"
    make_digits(root, train=12, val=4, size=64)
    return root


def _pretrain(data: Path, out: Path, backbone: str, *extra: str) -> dict:
    argv = ["pretrain", "--backbone", backbone, "--data", str(data), "--out", str(out), "--no-progress"]
    argv += ["--iters", "2", "--crop-size", "32", "--batch-size", "4", *extra]
    assert main(argv) == 0
    return json.loads(output_paths(out, backbone)[1].read_text())


def _body_state(detector) -> dict[str, torch.Tensor]:
    return detector.model.backbone.body.state_dict()


@pytest.mark.parametrize(("backbone", "detector"), [("r18", "frcnn_r18"), ("bireal18", "retinanet_bireal18")])
def test_pretrained_weights_load_into_a_detector_that_then_trains(digits, tmp_path, capsys, backbone, detector):
    # --out as a file, and as a folder (no .pt suffix) that gets BACKBONE.pt and BACKBONE.json.
    out = tmp_path / "bireal.pt" if backbone == "bireal18" else tmp_path / "weights"
    report = _pretrain(digits, out, backbone)
    out = Path(report["weights"])
    assert out == (tmp_path / "bireal.pt" if backbone == "bireal18" else tmp_path / "weights" / "r18.pt")
    assert 0.0 <= report["top1"] <= 1.0 and 0.0 <= report["top1_objects"] <= 1.0
    assert report["val_crops"] > report["val_background_crops"] > 0
    assert report["classes"][-1] == "background" and len(report["classes"]) == 11
    assert f"val top-1 {report['top1']:.4f}" in capsys.readouterr().out
    if backbone == "bireal18":
        assert [s["step"] for s in report["steps"]] == [1, 2]  # real-valued weights first, then binary

    saved = torch.load(out, weights_only=True)
    assert not any(k.startswith(("fc.", "classifier.")) for k in saved)
    torch.manual_seed(0)
    plain = build_detector(detector, 10, min_size=64, max_size=64, fpn_channels=16)
    torch.manual_seed(0)
    loaded = build_detector(detector, 10, min_size=64, max_size=64, fpn_channels=16, backbone_weights=str(out))
    body, before = _body_state(loaded), _body_state(plain)
    matched = [k for k in body if k in saved]
    assert len(matched) == len([k for k in body if not k.endswith("num_batches_tracked")])  # every tensor from the file
    for key in matched:
        assert torch.equal(body[key], saved[key]), key
    assert any(not torch.equal(before[k], saved[k]) for k in matched), "loading should change the backbone"

    model = DistillModel(loaded).train()
    params = [p for p in model.trainable_module.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.01)
    images, targets = make_batch(size=64)
    losses, _ = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    optimizer.step()
    assert any(not torch.equal(p, s) for p, s in zip(params, start))


def test_staged_binary_modes():
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 3, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 5)
    set_binary_mode(conv, activations=True, weights=False)  # ReActNet's step 1
    expected = torch.nn.functional.conv2d(torch.where(x >= 0, 1.0, -1.0), conv.weight, padding=1)
    torch.testing.assert_close(conv(x), expected)
    set_binary_mode(conv, activations=False, weights=False)  # all real
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, padding=1))
    with torch.no_grad():
        conv.weight.mul_(3.0)  # step 1 moved the weights: step 2 restarts alpha from them
    set_binary_mode(conv, activations=True, weights=True)
    torch.testing.assert_close(conv.scale.detach(), conv.weight.abs().mean(dim=(1, 2, 3)))
    assert conv.binary_activations and conv.binary_weights


def test_bad_input_is_one_line(tmp_path, digits, capsys):
    empty = [dict(item, boxes=[], labels=[]) for item in SCENE]
    write_coco(tmp_path / "noboxes", empty, split="train")
    write_coco(tmp_path / "noboxes", empty, split="val")
    cases = [
        (["--backbone", "r18", "--data", str(tmp_path / "noboxes")], "split 'train' has no boxes to crop"),
        (["--backbone", "r7", "--data", str(digits)], "unknown backbone 'r7'; known: "),
        (["--backbone", "r18", "--data", str(tmp_path / "missing")], "dataset folder not found"),
        (["--backbone", "r18", "--data", str(digits), "--iters", "0"], "--iters must be >= 1"),
    ]
    for args, message in cases:
        assert main(["pretrain", *args, "--out", str(tmp_path / "w.pt"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "w.pt").exists()


def test_log_file_has_a_line_per_log_window_with_the_step_and_its_time(digits, tmp_path):
    from detkd.pretrain import LOG_EVERY

    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 999}\n')  # a line of an earlier, stopped pretraining: not progress of this one
    _pretrain(digits, tmp_path / "w.pt", "r18", "--iters", str(LOG_EVERY + 2), "--log", str(log))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iter"] for r in rows] == [LOG_EVERY, LOG_EVERY + 2]
    assert all(r["step_time"] > 0 and r["loss"] > 0 for r in rows)


class Stop(Exception):
    """Stands in for the process being killed right after a checkpoint."""


@pytest.mark.parametrize("backbone", ["r18", "bireal18"])
def test_a_stopped_pretraining_resumes_to_the_same_weights(digits, tmp_path, monkeypatch, backbone):
    import detkd.pretrain as pretrain_module

    args = ["--iters", "8", "--checkpoint-every", "3"]  # checkpoints at steps 3 and 6 (bireal18: phases of 4 + 4)
    whole = _pretrain(digits, tmp_path / "whole.pt", backbone, *args)
    assert whole["resumed_from"] is None
    assert not pretrain_module.resume_path(tmp_path / "whole.pt").exists()  # removed once the weights are written

    saved = pretrain_module.save_checkpoint
    calls = []

    def save_then_stop(state, path):
        saved(state, path)
        calls.append(state["step"])
        if len(calls) == 2:
            raise Stop

    monkeypatch.setattr(pretrain_module, "save_checkpoint", save_then_stop)
    out, log = tmp_path / "stopped.pt", tmp_path / "log.jsonl"
    with pytest.raises(Stop):
        _pretrain(digits, out, backbone, *args, "--log", str(log))
    # r18: steps 3 and 6 of one phase; bireal18: step 3 of phase 1, then step 3 of phase 2 (run step 7)
    stopped_at = 6 if backbone == "r18" else 7
    assert not out.exists() and pretrain_module.resume_path(out).exists()
    with open(log, "a") as f:
        f.write('{"iter": 8, "step_time": 1.0, "loss": 1.0}\n')  # a line past the checkpoint: dropped on resume
    monkeypatch.setattr(pretrain_module, "save_checkpoint", saved)
    resumed = _pretrain(digits, out, backbone, *args, "--log", str(log))
    assert resumed["resumed_from"] == stopped_at
    # LOG_EVERY > 8: a line at the end of each phase only (bireal18's phase 1 ends at step 4)
    expected = [8] if backbone == "r18" else [4, 8]
    assert [json.loads(line)["iter"] for line in log.read_text().splitlines()] == expected
    a, b = torch.load(tmp_path / "whole.pt", weights_only=True), torch.load(out, weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["top1"] == whole["top1"] and resumed["steps"] == whole["steps"]
    assert not pretrain_module.resume_path(out).exists()


def test_a_checkpoint_of_other_settings_is_refused(digits, tmp_path, monkeypatch, capsys):
    import detkd.pretrain as pretrain_module

    saved = pretrain_module.save_checkpoint

    def save_then_stop(state, path):
        saved(state, path)
        raise Stop

    monkeypatch.setattr(pretrain_module, "save_checkpoint", save_then_stop)
    out = tmp_path / "w.pt"
    with pytest.raises(Stop):
        _pretrain(digits, out, "r18", "--iters", "4", "--checkpoint-every", "2")
    monkeypatch.undo()
    argv = ["pretrain", "--backbone", "r18", "--data", str(digits), "--out", str(out), "--no-progress"]
    assert main([*argv, "--iters", "5", "--crop-size", "32", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds an unfinished pretraining with other settings (iters 4 -> 5)" in err and "delete" in err, err
    assert not out.exists()


def test_the_crop_loader_keeps_decoded_images_within_its_budget_and_gives_the_same_pixels(digits):
    """Decoded once and kept (uint8) up to cache_bytes, decoded per crop beyond: the batches are identical either way,
    and jitter draws the same shifts."""
    import random

    from detkd.data import build_dataset
    from detkd.pretrain import CropLoader, object_crops

    split = build_dataset(digits, "train", "auto", None)
    crops = object_crops(split.records)
    indices = list(range(len(crops)))
    image_bytes = 3 * 64 * 64  # one 64-px RGB image as uint8
    loaders = {
        "none": CropLoader(split, crops, 32, jitter=True, cache_bytes=0),
        "some": CropLoader(split, crops, 32, jitter=True, cache_bytes=3 * image_bytes),
        "all": CropLoader(split, crops, 32, jitter=True),
    }
    batches = {}
    for name, loader in loaders.items():
        batches[name] = [loader.load(indices, random.Random(7)) for _ in range(2)]  # the second pass reads the cache
    assert loaders["none"].cached_bytes == 0 and not loaders["none"]._decoded
    assert len(loaders["some"]._decoded) == 3 and loaders["some"].cached_bytes == 3 * image_bytes
    used = {crop.image for crop in crops}
    assert set(loaders["all"]._decoded) == used and all(
        p.dtype == torch.uint8 for p in loaders["all"]._decoded.values()
    )
    for name in ("some", "all"):
        for (images, labels), (ref_images, ref_labels) in zip(batches[name], batches["none"], strict=True):
            assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)
