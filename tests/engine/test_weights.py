"""Whole-detector weights: torchvision-format state dicts, detkd checkpoints, torchvision's COCO weights (no network).

A randomly initialised torchvision detector stands in for the COCO weights: what is checked is that every tensor
with a counterpart lands in the right place, which random values show as well as trained ones.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torchvision.models.detection as tvd

from detkd.engine.checkpoint import save_student
from detkd.engine.weights import load_weights
from detkd.errors import BuildError
from detkd.models import build_detector

TORCHVISION = {
    "frcnn": tvd.fasterrcnn_resnet50_fpn,
    "retinanet": tvd.retinanet_resnet50_fpn,
    "fcos": tvd.fcos_resnet50_fpn,
}
CLASS_LAYERS = {
    "frcnn": ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"),
    "retinanet": ("head.classification_head.cls_logits",),
    "fcos": ("head.classification_head.cls_logits",),
}


_BUILT: dict[tuple[str, int], torch.nn.Module] = {}


def standard(family: str, num_classes: int = 4):
    """A fresh copy of the standard-preset r50 detector (each built once per module: r50 builds take seconds)."""
    if (family, num_classes) not in _BUILT:
        torch.manual_seed(1)
        _BUILT[family, num_classes] = build_detector(
            f"{family}_r50", num_classes, preset="standard", min_size=64, max_size=64, frozen_bn=True
        )
    return copy.deepcopy(_BUILT[family, num_classes])


@pytest.fixture(scope="module", params=sorted(TORCHVISION))
def torchvision_file(request, tmp_path_factory):
    """(family, path, state dict) of a randomly initialised torchvision COCO-shaped detector (91 classes)."""
    torch.manual_seed(0)
    model = TORCHVISION[request.param](weights=None, weights_backbone=None, num_classes=91)
    state = model.state_dict()
    path = tmp_path_factory.mktemp("tv") / f"{request.param}.pth"
    torch.save(state, path)
    return request.param, path, state


def test_torchvision_state_dict_loads_into_the_standard_preset(torchvision_file, caplog):
    family, path, state = torchvision_file
    detector = standard(family)
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="detkd"):
        report = load_weights(detector, str(path))
    after = detector.state_dict()
    class_keys = [f"model.{stem}.{p}" for stem in CLASS_LAYERS[family] for p in ("weight", "bias")]
    compared = 0
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # torchvision's untrained backbone has BatchNorm, detkd's loaded one is frozen
        own = f"model.{key}"
        if own in class_keys:
            assert value.shape != after[own].shape
            assert torch.equal(after[own], before[own]), f"{own} should keep its initialisation"
        else:
            assert torch.equal(after[own], value), own
            compared += 1
    assert compared == len(report["loaded"]) > 200
    assert sorted(report["reinitialised"]) == sorted(class_keys)
    assert report["skipped"] == []
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"{len(report['loaded'])} tensors loaded into {family}_r50" in line for line in lines)
    (reinit,) = [line for line in lines if "class count differs" in line]
    assert all(stem in reinit for stem in CLASS_LAYERS[family])


def test_same_class_count_loads_every_tensor(torchvision_file):
    family, path, state = torchvision_file
    detector = standard(family, num_classes=90)  # 90 + background = torchvision's 91
    report = load_weights(detector, str(path))
    assert report["reinitialised"] == [] and report["skipped"] == []
    for key in CLASS_LAYERS[family]:
        assert torch.equal(detector.state_dict()[f"model.{key}.weight"], state[f"{key}.weight"])


def test_other_architecture_is_refused_in_one_sentence(tmp_path):
    torch.manual_seed(0)
    r18 = build_detector("frcnn_r18", 4, preset="standard", min_size=64, max_size=64)
    path = tmp_path / "r18.pt"
    save_student(path, r18, ["a", "b", "c", "d"])
    with pytest.raises(BuildError, match=r"do not fit frcnn_r50 .*layer1\.0\.conv1\.weight") as info:
        load_weights(standard("frcnn"), str(path))
    assert "\n" not in str(info.value)


@pytest.mark.slow  # builds one more torchvision R50 detector
def test_v2_detector_is_refused(tmp_path):
    """fasterrcnn_resnet50_fpn_v2 shares the ResNet-50 but not the FPN (BatchNorm, no biases) or the heads."""
    path = tmp_path / "v2.pth"
    torch.save(tvd.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict(), path)
    with pytest.raises(BuildError, match=r"the file lacks \d+ of the model's tensors, first model.backbone.fpn"):
        load_weights(standard("frcnn"), str(path))


@pytest.mark.slow  # builds one more torchvision R50 detector
def test_extra_file_tensors_are_skipped_and_named(tmp_path, caplog):
    """A Mask R-CNN file holds every Faster R-CNN tensor and a mask head: the mask head is skipped, by name."""
    torch.manual_seed(0)
    path = tmp_path / "mask.pth"
    torch.save(tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5).state_dict(), path)
    detector = standard("frcnn")
    with caplog.at_level(logging.INFO, logger="detkd"):
        report = load_weights(detector, str(path))
    assert report["reinitialised"] == [] and report["skipped"]
    assert all(".mask_" in k for k in report["skipped"])
    (line,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert f"skipped {len(report['skipped'])} file tensor(s)" in line and "mask_" in line


def test_backbone_only_file_is_refused(tmp_path):
    import torchvision

    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(BuildError, match="no tensor name matches.*model.backbone_weights"):
        load_weights(standard("frcnn"), str(path))


def test_detkd_checkpoint_loads_across_class_counts(tmp_path):
    source = build_detector("frcnn_r18", 3, min_size=64, max_size=64, frozen_bn=True)
    path = tmp_path / "student.pt"
    save_student(path, source, ["a", "b", "c"])
    target = build_detector("frcnn_r18", 5, min_size=64, max_size=64, frozen_bn=True)
    report = load_weights(target, str(path))
    assert len(report["reinitialised"]) == 4 and report["skipped"] == []
    body = "model.backbone.body.layer3.0.conv1.weight"
    assert torch.equal(target.state_dict()[body], source.state_dict()[body])


def test_torchvision_weights_use_torchvisions_api(monkeypatch, torchvision_file):
    family, _, state = torchvision_file
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return state

    monkeypatch.setattr(tvd.FasterRCNN_ResNet50_FPN_Weights, "get_state_dict", fake_get_state_dict, raising=False)
    monkeypatch.setattr(tvd.RetinaNet_ResNet50_FPN_Weights, "get_state_dict", fake_get_state_dict, raising=False)
    monkeypatch.setattr(tvd.FCOS_ResNet50_FPN_Weights, "get_state_dict", fake_get_state_dict, raising=False)
    report = load_weights(standard(family), "torchvision")
    assert len(calls) == 1 and "COCO" in calls[0].name and len(report["loaded"]) > 200


def test_torchvision_weights_without_network_fail_in_one_sentence(monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tvd.FasterRCNN_ResNet50_FPN_Weights, "get_state_dict", offline, raising=False)
    with pytest.raises(BuildError, match=r"could not be fetched \(OSError\); download https://.*--weights PATH"):
        load_weights(standard("frcnn"), "torchvision")
    with pytest.raises(BuildError, match="publishes COCO weights for frcnn_r50"):
        load_weights(build_detector("frcnn_r18", 3, min_size=64, max_size=64), "torchvision")
