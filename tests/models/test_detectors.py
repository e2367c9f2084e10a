from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from detkd.errors import BuildError, CheckpointError, ConfigError
from detkd.models import build_detector, detector_names
from detkd.models.backbones import BACKBONES, imagenet_file
from tests.conftest import make_batch, tiny

FAMILIES = ["frcnn_r18", "retinanet_r18", "fcos_r18"]


@pytest.mark.parametrize("name", FAMILIES + ["frcnn_mbv3"])
def test_feature_info_matches_features(name):
    model = tiny(name)
    images, targets = make_batch()
    batch, targets = model.preprocess(images, targets)
    out = model(batch, targets)
    assert list(out.features) == [f.name for f in model.feature_info]
    for spec in model.feature_info:
        feat = out.features[spec.name]
        assert feat.shape[1] == spec.channels
        assert feat.shape[-1] == -(-batch.tensors.shape[-1] // spec.stride)  # ceil: padding at small sizes


@pytest.mark.parametrize("name", FAMILIES)
def test_training_forward_with_empty_targets(name):
    model = tiny(name)
    model.train()
    images, targets = make_batch(n=2, empty_last=True)
    batch, targets = model.preprocess(images, targets)
    out = model(batch, targets)
    assert out.losses and all(torch.isfinite(v) for v in out.losses.values())
    total = sum(out.losses.values())
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # All-empty batch: still finite.
    images, targets = make_batch(n=1, empty_last=True)
    out = model(*model.preprocess(images, targets))
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_two_stage_head_outputs_are_consistent():
    model = tiny("frcnn_r18")
    images, targets = make_batch(n=2, empty_last=False)
    batch, targets = model.preprocess(images, targets)
    out = model(batch, targets)
    head = out.head
    n_rois = sum(len(r) for r in head.rois)
    assert head.roi_logits.shape == (n_rois, 4)
    assert head.roi_deltas.shape == (n_rois, 16)
    labels = torch.cat(head.roi_labels)
    matched = torch.cat(head.roi_matched_idxs)
    assert ((labels > 0) == (matched >= 0)).all()
    # roi_forward on the same RoIs reproduces the head's own logits.
    logits, deltas = model.roi_forward(out.features, head.rois, out.image_sizes)
    assert torch.allclose(logits, head.roi_logits, atol=1e-5)
    assert len(head.proposals) == 2 and len(head.proposal_scores[0]) == len(head.proposals[0])


def test_one_stage_head_outputs():
    model = tiny("retinanet_r18")
    images, targets = make_batch(n=2)
    out = model(*model.preprocess(images, targets))
    head = out.head
    a = sum(head.num_anchors_per_level)
    assert head.cls_logits.shape == (2, a, 4)
    assert head.bbox_regression.shape == (2, a, 4)
    assert len(head.matched_idxs) == 2 and (head.matched_idxs[1] == -1).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_predict_returns_original_coordinates(name):
    model = tiny(name)
    # A 96x48 image is resized to 64 short side internally; boxes must come back in 96x48 pixels.
    image = torch.rand(3, 48, 96)
    (pred,) = model.predict([image])
    assert set(pred) >= {"boxes", "scores", "labels"}
    if len(pred["boxes"]):
        assert pred["boxes"][:, 2].max() <= 96 + 1e-3 and pred["boxes"][:, 3].max() <= 48 + 1e-3
    assert model.training  # predict restores the mode


def test_preprocess_is_shared_and_does_not_touch_caller_targets():
    model = tiny("frcnn_r18")
    images, targets = make_batch(n=2, size=32)
    before = targets[0]["boxes"].clone()
    batch, resized = model.preprocess(images, targets)
    assert isinstance(batch, ImageList)
    assert torch.equal(targets[0]["boxes"], before)
    assert torch.allclose(resized[0]["boxes"], before * 2)


def test_names_and_errors():
    assert "frcnn_r50" in detector_names() and "retinanet_mbv3" in detector_names()
    with pytest.raises(ConfigError, match="unknown detector"):
        build_detector("yolo_r18", 3)
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_detector("frcnn_r7", 3)
    with pytest.raises(ConfigError, match="preset"):
        build_detector("frcnn_r18", 3, preset="huge")


def test_standard_preset_is_wider():
    slim, std = tiny("frcnn_r18"), tiny("frcnn_r18", preset="standard")
    assert slim.feature_info[0].channels == 64 and std.feature_info[0].channels == 256
    assert tiny("frcnn_r18", fpn_channels=32).feature_info[0].channels == 32


def test_imagenet_weights_from_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    body = BACKBONES.get("r18")(frozen_bn=True)
    fake = {
        k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in body.weights_target.state_dict().items()
    }
    fake["fc.weight"] = torch.zeros(1000, 512)  # classifier keys are ignored
    path = imagenet_file(body.imagenet_weights)
    path.parent.mkdir(parents=True)
    torch.save(fake, path)
    model = build_detector("frcnn_r18", 3, backbone_weights="imagenet", min_size=64, max_size=64)
    conv = model.model.backbone.body.conv1.weight
    assert torch.all(conv == 0.5)
    assert not conv.requires_grad  # stem frozen with pretrained weights, as torchvision does
    assert model.model.backbone.body.layer4[0].conv1.weight.requires_grad
    # An explicit path works too.
    model = build_detector("frcnn_r18", 3, backbone_weights=str(path), min_size=64, max_size=64)
    assert torch.all(model.model.backbone.body.layer1[0].conv1.weight == 0.5)


def test_imagenet_weights_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # Nothing in the cache and no network: a clear error naming where to put the file.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    with pytest.raises(BuildError, match="resnet18"):
        build_detector("frcnn_r18", 3, backbone_weights="imagenet")
    wrong = tmp_path / "wrong.pth"
    torch.save({"something.else": torch.zeros(3)}, wrong)
    with pytest.raises(CheckpointError, match="no parameter names match"):
        build_detector("frcnn_r18", 3, backbone_weights=str(wrong))
    with pytest.raises(BuildError, match="does not exist"):
        build_detector("frcnn_r18", 3, backbone_weights=str(tmp_path / "missing.pth"))


def test_roi_levels_do_not_depend_on_the_first_batch():
    """A first image shrunk by max_size must not change which FPN level later RoIs are pooled from."""
    model = tiny("frcnn_r18")
    pool = model.model.roi_heads.box_roi_pool
    assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    model.predict([torch.rand(3, 48, 80)])  # resized to 38x64: would give a wrong scale if inferred
    assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
