from __future__ import annotations

import pytest
import torch
from torch import nn

from detkd.models.backbones import BACKBONES
from detkd.models.binary import BinaryConv2d
from detkd.models.complexity import MB, format_cost, model_cost
from detkd.models.outputs import Detector
from tests.conftest import tiny


class ToyDetector(Detector):
    """A real 3x3 conv (3->8) then a binary 3x3 conv (8->4), both at full resolution; no head."""

    kind = "one_stage"

    def __init__(self, body: nn.Module | None = None):
        super().__init__()
        self.body = body or nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BinaryConv2d(8, 4, 3, padding=1))
        self.spec = {"name": "toy", "min_size": 16}

    def extract(self, images):
        return {"p": self.body(images.tensors)}

    def head_losses(self, features, images, targets):
        return {}, {}


def test_counts_on_a_hand_computed_model():
    cost = model_cost(ToyDetector(), (16, 16))
    real_macs = 16 * 16 * 8 * 3 * 9
    binary_macs = 16 * 16 * 4 * 8 * 9
    assert cost["flops"] == real_macs  # MACs, the 1-bit literature's "FLOPs"
    assert cost["bops"] == binary_macs
    assert cost["ops"] == pytest.approx(binary_macs / 64 + real_macs)
    params = (8 * 3 * 9 + 8) + (4 * 8 * 9 + 4 + 4)  # conv + bias; binary conv weight + bias + scale
    assert cost["params"] == params and cost["binary_params"] == 4 * 8 * 9
    assert cost["fp32_mb"] == pytest.approx(4 * params / MB)
    assert cost["packed_mb"] == pytest.approx((4 * 8 * 9 / 8 + 4 * (params - 4 * 8 * 9)) / MB)


@pytest.mark.parametrize("name", ["frcnn_r18", "retinanet_r18"])
def test_real_detectors_have_no_binary_cost(name):
    cost = model_cost(tiny(name), (64, 64))
    assert cost["bops"] == 0 and cost["binary_params"] == 0
    assert cost["packed_mb"] == cost["fp32_mb"] and cost["ops"] == cost["flops"] > 0


def test_binary_detector_is_smaller_and_cheaper():
    real = model_cost(tiny("frcnn_r18"), (64, 64))
    binary = model_cost(tiny("frcnn_bireal18", binary_neck=True), (64, 64))
    # At 64 px the real RoI head (100 RoIs through a 3136 -> 256 FC) is a large share of either model.
    assert binary["bops"] > 0 and binary["flops"] < real["flops"] / 2
    assert binary["ops"] < real["ops"] / 2
    assert binary["packed_mb"] < binary["fp32_mb"] / 4
    assert "BOPs" in format_cost(binary)


def test_bireal18_matches_the_published_count():
    """Bi-Real Net-18 at 224 px: 1.68e9 BOPs in its 16 binary 3x3 convs (Liu et al. 2018, Table 4)."""
    body = BACKBONES.get("bireal18")(frozen_bn=False).module
    cost = model_cost(ToyDetector(body), (224, 224))
    assert cost["bops"] == pytest.approx(1.68e9, rel=0.01)
    # Real part: the 7x7 stem (118 M MACs) and the three 1x1 shortcut convs (6.4 M each stage, 19 M in all).
    assert cost["flops"] == pytest.approx(118013952 + 3 * 6422528, rel=1e-6)


def test_model_state_restored():
    model = tiny("frcnn_r18")
    model.train()
    model_cost(model, (64, 64))
    assert model.training
    assert torch.is_grad_enabled()
