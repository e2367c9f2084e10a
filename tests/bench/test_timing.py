"""The benchmark's step timing runs the trainer's own training step."""

from __future__ import annotations

import copy

import torch

from detkd.bench.timing import frozen_train_step, frozen_trainer
from detkd.config import OptimConfig
from detkd.distillation import DistillModel, build_distillers
from detkd.engine.hooks import MethodSteps
from detkd.engine.launch import build_optimizer
from detkd.engine.trainer import Trainer
from tests.conftest import tiny


def test_a_timed_step_is_the_trainers_first_step_at_lr_0(batch, monkeypatch):
    student, teacher = tiny("frcnn_r18"), tiny("frcnn_r18").eval().requires_grad_(False)
    model = DistillModel(student, teacher, build_distillers(["kd", "fitnet"], {}, student, teacher), {})
    twin = copy.deepcopy(model)
    cfg = OptimConfig(lr=0.0)

    trainer = Trainer(twin, build_optimizer(cfg, twin), iter([batch]), 1, [MethodSteps()], torch.device("cpu"), "off")
    torch.manual_seed(3)  # the samplers of the RPN and RoI heads draw at random
    trainer.run()

    timed = frozen_trainer(model, cfg, [batch], step=0)
    torch.manual_seed(3)
    timed.run_step()
    assert timed.record["loss"] == trainer.record["loss"]
    assert {k: v for k, v in timed.record.items() if k.startswith(("loss", "kd_"))} == {
        k: v for k, v in trainer.record.items() if k.startswith(("loss", "kd_"))
    }

    steps = []
    monkeypatch.setattr(Trainer, "run_step", lambda self: steps.append(self))
    step = frozen_train_step(model, cfg, [batch])
    assert step() and step() and len(steps) == 2 and isinstance(steps[0], Trainer)
