"""The contract between detectors and methods: typed heads, detector protocols, and what a method file may use."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import torch

import detkd.methods  # noqa: F401  (registration)
from detkd.distillation import build_distillers
from detkd.errors import ConfigError
from detkd.methods.base import METHODS
from detkd.models.outputs import (
    AnchorDetector,
    BackboneDetector,
    DenseHead,
    RoIHeadDetector,
    SetDetector,
    SetHead,
    TwoStageHead,
)
from tests.conftest import make_batch, tiny

METHODS_DIR = Path(detkd.methods.__file__).parent
METHOD_MODULES = {p.stem for p in METHODS_DIR.glob("*.py")} - {"__init__", "base", "losses", "connectors"}


@pytest.mark.parametrize(
    "name,head,protocols",
    [
        ("frcnn_r18", TwoStageHead, {RoIHeadDetector, AnchorDetector, BackboneDetector}),
        ("retinanet_r18", DenseHead, {AnchorDetector, BackboneDetector}),
        ("fcos_r18", DenseHead, {AnchorDetector, BackboneDetector}),
        ("deformable_detr_r18", SetHead, {SetDetector, BackboneDetector}),
    ],
)
def test_each_detector_returns_its_typed_head_and_implements_its_protocols(name, head, protocols):
    model = tiny(name)
    assert model.head_type is head and model.kind == head.kind
    for protocol in (RoIHeadDetector, AnchorDetector, BackboneDetector, SetDetector):
        assert isinstance(model, protocol) == (protocol in protocols), (name, protocol.__name__)
    batch, targets = model.preprocess(*make_batch(n=2, empty_last=True))
    out = model(batch, targets)
    assert type(out.head) is head
    if head is DenseHead:
        # Every dense head reports its own matching, -1 everywhere on the image without boxes.
        assert len(out.head.matched_idxs) == 2 and (out.head.matched_idxs[1] == -1).all()
        assert (out.head.matched_idxs[0] >= 0).any()
        centres = out.head.anchor_centres()
        assert centres.shape == (2, out.head.cls_logits.shape[1], 2)
        assert torch.allclose(centres[0], (out.head.anchors[0][:, :2] + out.head.anchors[0][:, 2:]) / 2)


def test_fcos_matching_gives_torchvisions_loss():
    """The FCOS adapter assigns the locations itself (to expose the assignment); the loss is torchvision's."""
    model = tiny("fcos_r18")
    batch, targets = model.preprocess(*make_batch(n=2, empty_last=True))
    features = model.extract(batch)
    losses, head = model.head_losses(features, batch, targets)
    raw = {"cls_logits": head.cls_logits, "bbox_regression": head.bbox_regression, "bbox_ctrness": head.bbox_ctrness}
    expected = model.model.compute_loss(targets, raw, head.anchors, head.num_anchors_per_level)
    assert torch.equal(losses["loss_cls"], expected["classification"])
    assert torch.equal(losses["loss_box"], expected["bbox_regression"])
    assert torch.equal(losses["loss_ctrness"], expected["bbox_ctrness"])


def test_decode_boxes_inverts_the_regression_targets():
    model = tiny("frcnn_r18")
    batch, targets = model.preprocess(*make_batch(n=2, empty_last=False))
    head = model(batch, targets).head
    rois, regression = torch.cat(head.rois), torch.cat(head.roi_regression_targets)
    positive = torch.cat(head.roi_labels) > 0
    decoded = model.decode_boxes(regression[positive], rois[positive])
    assert torch.allclose(decoded, torch.cat(head.roi_matched_gt)[positive], atol=1e-3)


def _method_sources() -> dict[str, str]:
    # The package's __init__ is the registry of the built-in methods, which it imports by name: not a method file.
    return {p.name: p.read_text() for p in METHODS_DIR.glob("*.py") if p.name != "__init__.py"}


def test_no_method_file_reaches_into_a_detector_or_another_method():
    for name, source in _method_sources().items():
        assert not re.search(r"\.model\b", source), f"{name} names .model"
        assert not re.search(r"_post_nms_top_n|roi_heads|\.rpn\b|backbone\.body|\.box_coder\b", source), name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("detkd.methods."):
                imported = node.module.split(".")[2]
                assert imported not in METHOD_MODULES, f"{name} imports method module {imported}"


def test_no_method_branches_on_a_kind_string():
    for name, source in _method_sources().items():
        if name == "base.py":
            continue
        assert not re.search(r"""kind\s*[!=]=|["'](two_stage|one_stage|detr)["']""", source), name


@pytest.mark.parametrize("name", METHODS.names())
def test_every_choice_is_a_literal_and_bad_choices_are_config_errors(name):
    """Each ``str`` option of a method with a fixed set of values is a ``Literal``, rejected by name at load time."""
    cls = METHODS.get(name)
    hints = typing.get_type_hints(cls.Config)
    literals = {
        f.name: typing.get_args(hints[f.name])
        for f in dataclasses.fields(cls.Config)
        if typing.get_origin(hints[f.name]) is typing.Literal
    }
    plain = [f.name for f in dataclasses.fields(cls.Config) if hints[f.name] is str]
    assert not plain, f"{name}: free-text string options {plain}"
    if not literals:
        return
    field_name, choices = next(iter(literals.items()))
    student = tiny("deformable_detr_r18" if cls.kinds == ("detr",) else "frcnn_r18")
    teacher = student if cls.needs_teacher else None
    with pytest.raises(ConfigError, match=rf"distill\.options\.{name}\.{field_name}: 'bogus' is not one of") as err:
        build_distillers([name], {name: {field_name: "bogus"}}, student, teacher)
    assert all(repr(c) in str(err.value) for c in choices)


def test_schedule_choices_are_checked():
    student = tiny("frcnn_r18")
    with pytest.raises(ConfigError, match=r"distill\.options\.fitnet\.schedule\.decay: 'cosine' is not one of"):
        build_distillers(["fitnet"], {"fitnet": {"schedule": {"decay": "cosine"}}}, student, student)
