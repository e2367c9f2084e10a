"""The code in the docs runs as written."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def doc_method(name: str):
    """Run the example of docs/adding-a-method.md that registers ``name``; yields the class, then unregisters it."""
    from detkd.methods.base import METHODS

    (code,) = [b for b in python_blocks(DOCS / "adding-a-method.md") if f'name = "{name}"' in b]
    module = types.ModuleType(f"detkd_doc_{name}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(code, "adding-a-method.md", "exec"), module.__dict__)
        yield METHODS.get(name)
    finally:
        METHODS._items.pop(name, None)
        sys.modules.pop(module.__name__, None)


@pytest.fixture
def at_method():
    """The feature example of docs/adding-a-method.md, registered for the test."""
    yield from doc_method("at")


@pytest.fixture
def boxkd_method():
    """The logit/RoI example of docs/adding-a-method.md, registered for the test."""
    yield from doc_method("boxkd")


def test_adding_a_method_example_imports_only_base_outputs_and_shared_parts():
    allowed = {"detkd.methods.base", "detkd.models.outputs", "detkd.methods.losses", "detkd.methods.connectors"}
    for code in python_blocks(DOCS / "adding-a-method.md"):
        modules = set(re.findall(r"^from (detkd\S*) import", code, flags=re.M))
        assert modules <= allowed | {"detkd.errors"}, modules


def test_adding_a_method_example_works(at_method):
    from detkd.distillation import DistillModel, build_distillers
    from tests.conftest import make_batch, tiny

    student, teacher = tiny("frcnn_r18", fpn_channels=32), tiny("frcnn_r34")
    distillers = build_distillers(["at", "kd"], {"at": {"p": 3.0}}, student, teacher)
    model = DistillModel(student, teacher, distillers, weights={"at": 10.0}).train()
    losses, stats = model(*make_batch(), step=0)
    assert {"at.kd_att", "kd.kd_cls"} <= set(losses)
    assert losses["at.kd_att"].item() == pytest.approx(10 * stats["raw.at.kd_att"], rel=1e-5)
    losses["at.kd_att"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    same = DistillModel(student, student, build_distillers(["at"], {}, student, student))
    with torch.no_grad():
        losses, _ = same(*make_batch(), step=0)
    assert losses["at.kd_att"].item() == pytest.approx(0.0, abs=1e-6)


# The schedule, sizes and device of docs/python-api.md's examples, shrunk to seconds; appended after the doc's own
# overrides (so they win), every other setting is the doc's.
TINY = [
    "train.iters=2",
    "train.device=cpu",
    "train.progress=false",
    "train.tensorboard=false",
    "train.ckpt_every=0",
    "optim.warmup_iters=0",
    "model.min_size=64",
    "model.max_size=64",
    "model.fpn_channels=32",
    "data.batch_size=2",
    "distill.check_teacher=0",  # a 2-step teacher scores 0, which the check rightly refuses
]


def test_python_api_examples_run(tmp_path, monkeypatch, capsys):
    import detkd
    import detkd.api
    import detkd.data

    real_load_config, real_make_digits = detkd.api.load_config, detkd.data.make_digits
    monkeypatch.setattr(
        detkd.api, "load_config", lambda path=None, overrides=(): real_load_config(path, [*overrides, *TINY])
    )
    monkeypatch.setattr(detkd.data, "make_digits", lambda out, **kw: real_make_digits(out, train=4, val=2, size=64))
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOCS / "python-api.md")
    assert len(blocks) == 3
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"python-api.md block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "teacher mAP" in printed and "student mAP" in printed and "mAP@0.5" in printed
    assert (tmp_path / "runs" / "kd_fitnet" / "best.pt").is_file()
    results = json.loads((tmp_path / "runs" / "kd_fitnet" / "val.json").read_text())
    assert isinstance(results, list)
    # The last block's detector and result are real objects, not just printed text.
    assert isinstance(namespace["detector"], detkd.Predictor)
    assert set(namespace["result"]) == {"boxes", "scores", "labels", "names"}
    assert bool((namespace["result"]["scores"] >= 0.3).all())


@pytest.mark.parametrize("name,space", [("frcnn_r18", "deltas"), ("frcnn_r18", "boxes"), ("retinanet_r18", "deltas")])
def test_adding_a_method_logit_example_works(boxkd_method, name, space):
    from detkd.distillation import DistillModel, build_distillers
    from detkd.errors import ConfigError
    from tests.conftest import make_batch, tiny

    assert boxkd_method.kinds == ("two_stage", "one_stage")
    student, teacher = tiny(name), tiny(name.replace("r18", "r34"))
    options = {"boxkd": {"space": space, "min_score": 0.0}}
    model = DistillModel(student, teacher, build_distillers(["boxkd", "kd"], options, student, teacher)).train()
    losses, stats = model(*make_batch(), step=0)
    assert stats["boxkd.distilled"] > 0 and losses["boxkd.kd_box"].item() > 0
    losses["boxkd.kd_box"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # Against itself the term is zero; with an impossible confidence nothing is distilled.
    same = DistillModel(student, student, build_distillers(["boxkd"], options, student, student)).eval()
    with torch.no_grad():
        batch, targets = student.preprocess(*make_batch())
        s_out, t_out = student(batch, targets), same.run_teacher(batch)
        same.share_rois(s_out, t_out)
        assert same.distillers["boxkd"](s_out, t_out, targets, 0)["kd_box"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match=r"distill\.options\.boxkd\.space: 'corners' is not one of"):
        build_distillers(["boxkd"], {"boxkd": {"space": "corners"}}, student, teacher)
