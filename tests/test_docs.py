"""The code in the docs runs as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.fixture
def at_method():
    """The example method of docs/adding-a-method.md, registered for the test and removed afterwards."""
    from detkd.methods.base import METHODS

    (code,) = python_blocks(DOCS / "adding-a-method.md")
    module = types.ModuleType("detkd_doc_at")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(code, "adding-a-method.md", "exec"), module.__dict__)
        yield METHODS.get("at")
    finally:
        METHODS._items.pop("at", None)
        sys.modules.pop(module.__name__, None)


def test_adding_a_method_example_works(at_method):
    from detkd.distill import DistillModel, build_distillers
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
