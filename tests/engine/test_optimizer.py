"""The optimiser's parameter groups: weight decay only on weights, per-name LR multipliers (``optim.lr_mult``)."""

from __future__ import annotations

import pytest

from detkd.config import OptimConfig, load_config
from detkd.distillation import DistillModel
from detkd.engine.launch import build_optimizer
from detkd.errors import ConfigError
from detkd.models import build_detector


def _model(name: str = "deformable_detr_r18") -> DistillModel:
    return DistillModel(build_detector(name, 3))


def _lr_by_name(model: DistillModel, opt) -> dict[str, float]:
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {n: lr[id(p)] for n, p in model.trainable_module.named_parameters() if p.requires_grad}


def test_without_multipliers_two_groups_in_the_usual_order():
    model = _model("frcnn_r18")
    opt = build_optimizer(OptimConfig(lr=0.02), model)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == 0.02 for g in opt.param_groups)
    assert all(p.ndim > 1 for p in opt.param_groups[0]["params"])
    assert all(p.ndim <= 1 for p in opt.param_groups[1]["params"])


def test_multipliers_match_whole_name_parts_and_longest_key_wins():
    model = _model()
    cfg = OptimConfig(lr=1e-3, lr_mult={"backbone": 0.1, "sampling_offsets": 0.1, "backbone.conv1": 0.5})
    by_name = _lr_by_name(model, build_optimizer(cfg, model))
    assert by_name["student.backbone.conv1.weight"] == pytest.approx(5e-4)
    assert by_name["student.backbone.bn1.weight"] == pytest.approx(1e-4)
    assert by_name["student.transformer.encoder.0.attn.sampling_offsets.weight"] == pytest.approx(1e-4)
    # "backbone" is a whole part only: names merely containing the letters keep the base LR.
    others = [n for n in by_name if ".backbone." not in n and ".sampling_offsets." not in n]
    assert others and all(by_name[n] == pytest.approx(1e-3) for n in others)


def test_multipliers_keep_no_decay_on_norms_and_biases():
    model = _model()
    opt = build_optimizer(OptimConfig(lr=1e-3, lr_mult={"backbone": 0.1}), model)
    for group in opt.param_groups:
        assert len({p.ndim > 1 for p in group["params"]}) == 1
        assert group["weight_decay"] == (1e-4 if group["params"][0].ndim > 1 else 0.0)


def test_a_key_that_matches_nothing_is_an_error():
    with pytest.raises(ConfigError, match="sampling_ofsets"):
        build_optimizer(OptimConfig(lr=1e-3, lr_mult={"sampling_ofsets": 0.1}), _model())
    with pytest.raises(ConfigError, match=">= 0"):
        build_optimizer(OptimConfig(lr=1e-3, lr_mult={"backbone": -1.0}), _model())


def test_multipliers_from_a_command_line_override():
    cfg = load_config(overrides=["optim.lr_mult={backbone: 0.1, sampling_offsets: 0.1}"])
    assert cfg.optim.lr_mult == {"backbone": 0.1, "sampling_offsets": 0.1}
