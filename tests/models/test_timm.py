"""timm backbones (``<family>_timm:<model>``): built from feature_info, trained, distilled, weights loaded."""

from __future__ import annotations

import pytest
import torch

from detkd.distillation import DistillModel, build_distillers
from detkd.engine.checkpoint import load_detector, save_student
from detkd.errors import BuildError, ConfigError
from detkd.models import build_detector
from tests.conftest import make_batch, tiny

timm = pytest.importorskip("timm")

MODEL = "resnet10t"  # 5 M parameters, strides 2..32; no download (pretrained=False)


def timm_detector(family: str, **kw):
    torch.manual_seed(0)
    # FCOS's head has GroupNorm(32): at 64 px its 1x1 P7 needs two channels per group.
    width = 64 if family == "fcos" else 32
    return build_detector(f"{family}_timm:{MODEL}", 3, min_size=64, max_size=64, fpn_channels=width, **kw)


@pytest.fixture(scope="module", params=["frcnn", "retinanet", "fcos"])
def detector(request):
    return timm_detector(request.param)


def test_fpn_is_sized_from_timm_feature_info(detector):
    reference = timm.create_model(MODEL, features_only=True)
    by_stride = dict(zip(reference.feature_info.reduction(), reference.feature_info.channels()))
    fpn = detector.model.backbone.fpn
    inner = [block[0].in_channels for block in fpn.inner_blocks]
    first = 2 if detector.spec["name"].startswith("frcnn") else 3  # c2.. for two-stage, c3.. for one-stage
    assert inner == [by_stride[2**i] for i in range(first, 6)]
    assert [f.channels for f in detector.feature_info] == [fpn.layer_blocks[0][0].out_channels] * 5
    assert [f.stride for f in detector.feature_info] == [2 ** int(f.name[1:]) for f in detector.feature_info]


def test_train_step_and_predict(detector):
    detector.train()
    out = detector(*detector.preprocess(*make_batch()))
    total = sum(out.losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in detector.model.backbone.body.parameters())
    detector.zero_grad()
    (pred,) = detector.predict([torch.rand(3, 64, 64)])
    assert set(pred) >= {"boxes", "scores", "labels"}


@pytest.mark.parametrize("timm_is", ["student", "teacher"])
def test_fitnet_step_with_a_torchvision_backbone_on_the_other_side(timm_is):
    timm_det, torchvision_det = timm_detector("frcnn"), tiny("frcnn_r18", fpn_channels=16)
    student, teacher = (timm_det, torchvision_det) if timm_is == "student" else (torchvision_det, timm_det)
    distillers = build_distillers(["fitnet"], {}, student, teacher)
    model = DistillModel(student, teacher, distillers).train()
    losses, _ = model(*make_batch(), step=0)
    assert losses["fitnet.kd_feat"].item() > 0
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.model.backbone.body.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_backbone_weights_file_round_trip(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model(MODEL)  # the whole classifier, head included, as a user would save it
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    detector = timm_detector("retinanet", backbone_weights=str(path))
    net = detector.model.backbone.body.net
    for key, value in net.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    # Pretrained: frozen BatchNorm, recorded in the spec, so the checkpoint rebuilds with the same layers.
    assert detector.spec["frozen_bn"] is True
    save_student(tmp_path / "student.pt", detector, ["a", "b", "c"])
    rebuilt, _ = load_detector(tmp_path / "student.pt")
    for key, value in detector.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_bad_timm_names_fail_at_build():
    with pytest.raises(BuildError, match="timm:no_such_net"):
        build_detector("frcnn_timm:no_such_net", 3)
    with pytest.raises(BuildError, match="does not support backbone"):
        build_detector(f"deformable_detr_timm:{MODEL}", 3)
    with pytest.raises(ConfigError, match="timm:<model>"):
        build_detector("frcnn_r7", 3)


def test_list_backbones_mentions_timm(capsys):
    from detkd.cli import main

    assert main(["list", "backbones"]) == 0
    assert "timm:<model>" in capsys.readouterr().out


def test_timm_imagenet_weights_go_through_timm(monkeypatch):
    """``backbone_weights=imagenet`` asks timm for its pretrained weights; offline, one sentence names the options."""
    asked = []
    create = timm.create_model

    def offline(name, pretrained=False, **kw):
        asked.append(pretrained)
        if pretrained:
            raise OSError("no network")
        return create(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BuildError, match=r"could not be fetched \(OSError\); pass model.backbone_weights=PATH"):
        build_detector(f"frcnn_timm:{MODEL}", 3, backbone_weights="imagenet", min_size=64, max_size=64)
    assert asked == [True]
