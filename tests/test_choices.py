"""Every choice the run configuration declares (a ``typing.Literal``) is one the code handles, and no other.

The config rejects anything else at load time, so the code behind each choice does not check it again; these tests
keep the declared choices and the code's tables from drifting apart.
"""

from __future__ import annotations

import typing

import pytest
import torch

from detkd.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from detkd.data.formats import READERS
from detkd.distillation import DistillModel
from detkd.engine.hooks import lr_factor
from detkd.engine.launch import build_optimizer
from detkd.engine.trainer import amp_dtype
from detkd.errors import ConfigError
from detkd.models.detectors import PRESETS
from detkd.models.detr import DETR_PRESETS


def choices(cls: type, name: str) -> tuple:
    tp = typing.get_type_hints(cls)[name]
    assert typing.get_origin(tp) is typing.Literal, f"{cls.__name__}.{name} is not a Literal"
    return typing.get_args(tp)


def test_data_formats_are_the_readers():
    assert set(choices(DataConfig, "format")) == {"auto", *READERS}


def test_presets_are_those_of_every_family():
    assert set(choices(ModelConfig, "preset")) == set(PRESETS)
    for variant, presets in DETR_PRESETS.items():
        assert set(presets) == set(PRESETS), variant


def test_every_optimiser_is_built():
    model = DistillModel(torch.nn.Linear(2, 2), None, {})
    built = {name: type(build_optimizer(OptimConfig(name=name), model)) for name in choices(OptimConfig, "name")}
    assert built == {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def test_every_schedule_has_its_own_shape():
    curves = {
        name: [lr_factor(OptimConfig(schedule=name, warmup_iters=0), step, 100) for step in (0, 50, 80, 95)]
        for name in choices(OptimConfig, "schedule")
    }
    assert curves["constant"] == [1.0] * 4
    assert curves["step"] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    assert curves["cosine"] == pytest.approx([1.0, 0.5, 0.0954915, 0.0061558], rel=1e-5)


def test_every_amp_mode_has_a_dtype():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    dtypes = {mode: (amp_dtype(mode, cpu), amp_dtype(mode, cuda)) for mode in choices(TrainConfig, "amp")}
    assert dtypes == {
        "auto": (None, torch.bfloat16),
        "off": (None, None),
        "bf16": (torch.bfloat16, torch.bfloat16),
        "fp16": (torch.float16, torch.float16),
    }


@pytest.mark.parametrize(
    "override",
    ["data.format=cocoo", "model.preset=tiny", "optim.name=adam", "optim.schedule=cosin", "train.amp=fp8"],
)
def test_anything_else_is_refused_at_load_time_in_one_line(override):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    key, value = override.split("=")
    assert str(err.value).startswith(f"config.{key}: {value!r} is not one of ") and "\n" not in str(err.value)


def test_the_choices_checked_here_are_all_the_run_config_declares():
    declared = {
        f"{section}.{f}"
        for section, cls in typing.get_type_hints(Config).items()
        for f, tp in typing.get_type_hints(cls).items()
        if typing.get_origin(tp) is typing.Literal
    }
    assert declared == {"data.format", "distill.calibrate", "model.preset", "optim.name", "optim.schedule", "train.amp"}
