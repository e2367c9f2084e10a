"""Run-level options of the official recipes: weight decay on every parameter, the task-loss weight."""

from __future__ import annotations

import pytest
import torch

from detkd.config import OptimConfig
from detkd.distillation import DistillModel
from detkd.engine.launch import build_optimizer
from detkd.models import build_detector
from tests.conftest import make_batch, tiny


def _decay_by_name(model: DistillModel, opt) -> dict[str, float]:
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    return {n: decay[id(p)] for n, p in model.trainable_module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("decay_norm_bias", [False, True])
def test_decay_norm_bias_decays_norms_and_biases(decay_norm_bias):
    model = DistillModel(build_detector("deformable_detr_r18", 3))
    cfg = OptimConfig(name="adamw", lr=2e-4, weight_decay=1e-4, decay_norm_bias=decay_norm_bias)
    cfg.lr_mult = {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}
    opt = build_optimizer(cfg, model)
    decay = _decay_by_name(model, opt)
    norms_and_biases = [n for n, p in model.trainable_module.named_parameters() if p.requires_grad and p.ndim <= 1]
    assert any(n.endswith(".bias") for n in norms_and_biases) and any("norm" in n for n in norms_and_biases)
    assert all(decay[n] == (1e-4 if decay_norm_bias else 0.0) for n in norms_and_biases)
    assert all(v == 1e-4 for n, v in decay.items() if n not in norms_and_biases)
    # The official DETR recipe's 0.1x parameters include the reference points.
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.trainable_module.named_parameters())
    assert lr[id(named["student.transformer.reference_points.weight"])] == pytest.approx(2e-5)


def test_task_loss_weight_scales_the_student_losses_only():
    images, targets = make_batch(n=2)
    losses = {}
    for weight in (1.0, 5.0):
        model = DistillModel(tiny("frcnn_r18"), task_weight=weight)
        model.train()
        torch.manual_seed(0)
        losses[weight], _ = model(images, targets)
    assert set(losses[1.0]) == set(losses[5.0])
    for key, value in losses[1.0].items():
        assert float(losses[5.0][key].detach()) == pytest.approx(5.0 * float(value.detach()), rel=1e-5), key
