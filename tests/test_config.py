from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from detkd.config import Config, from_dict, load_config, parse_overrides, save_config
from detkd.errors import ConfigError
from detkd.methods.base import MethodConfig, ScheduleConfig


def test_overrides_types_and_unknown_keys(tmp_path):
    cfg = load_config(
        overrides=[
            "optim.lr=0.01",
            "train.iters=50",
            "data.scale_jitter=[0.8, 1.2]",
            "distill.options.fgfi.psi=0.4",
            "distill.teacher=null",
        ]
    )
    assert cfg.optim.lr == 0.01 and cfg.train.iters == 50 and cfg.data.scale_jitter == [0.8, 1.2]
    assert cfg.distill.options == {"fgfi": {"psi": 0.4}} and cfg.distill.teacher is None
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected float"):
        load_config(overrides=["optim.lr=fast"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(overrides=["train.iters=1.5"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])
    # YAML file + overrides, and the saved config reads back identically.
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.05\nmodel:\n  name: retinanet_r18\n")
    cfg = load_config(path, ["optim.momentum=0.8"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.model.name) == (0.05, 0.8, "retinanet_r18")
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("optim: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tagged)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


@dataclass
class _Method(MethodConfig):
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(decay="linear", exempt=["kd_cls"]))
    term_weights: dict[str, float] = field(default_factory=lambda: {"kd_fg": 1.0, "kd_bg": 4.0})


def test_partial_nested_overrides_keep_the_fields_own_defaults():
    cfg = from_dict(_Method, {"schedule": {"warmup_iters": 10}, "term_weights": {"kd_fg": 2.0}})
    assert cfg.schedule.decay == "linear" and cfg.schedule.exempt == ["kd_cls"] and cfg.schedule.warmup_iters == 10
    assert cfg.term_weights == {"kd_fg": 2.0, "kd_bg": 4.0}
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(_Method, {"schedule": {"warmup": 10}})


def test_schedule_factor():
    s = ScheduleConfig(warmup_iters=10)
    assert s.factor(0, 100, 10) == pytest.approx(0.1) and s.factor(9, 100, 10) == 1.0
    lin = ScheduleConfig(decay="linear")
    assert [lin.factor(t, 100, 10) for t in (0, 50, 99)] == pytest.approx([1.0, 0.5, 0.01])
    ep = ScheduleConfig(decay="linear", decay_unit="epoch")
    assert [ep.factor(t, 100, 25) for t in (0, 24, 25, 99)] == pytest.approx([1.0, 1.0, 0.75, 0.25])
    step = ScheduleConfig(decay="step", decay_steps=[0.5], decay_gamma=0.1)
    assert step.factor(49, 100, 10) == 1.0 and step.factor(50, 100, 10) == pytest.approx(0.1)
    window = ScheduleConfig(start_iter=5, stop_iter=8)
    assert [window.factor(t, 100, 10) for t in (4, 5, 7, 8)] == [0.0, 1.0, 1.0, 0.0]


def test_default_config_roundtrip():
    assert from_dict(Config, {}) == Config()


def test_literal_fields_accept_only_their_choices():
    cfg = load_config(overrides=["optim.name=adamw", "train.amp=off", "model.preset=standard"])
    assert (cfg.optim.name, cfg.train.amp, cfg.model.preset) == ("adamw", "off", "standard")
    with pytest.raises(ConfigError, match=r"optim\.name: 'adam' is not one of 'sgd', 'adamw'"):
        load_config(overrides=["optim.name=adam"])
    with pytest.raises(ConfigError, match="is not one of"):
        load_config(overrides=["optim.schedule=true"])
