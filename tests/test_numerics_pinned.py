"""Pinned numerics: a fixed-seed tiny run of every method (and of plain training) gives the recorded losses.

Each case builds tiny slim detectors, gives the distillers their start-of-training call, then takes a few SGD
steps on generated batches and compares every weighted loss of every step with ``numerics_pinned.json``. A change
of the code's layout must leave these numbers alone; a change of a method's maths shows up here and the fixture is
re-recorded on purpose with ``DETKD_RECORD_NUMERICS=1 python -m pytest tests/test_numerics_pinned.py``.

The fixture names the torch it was recorded with. On that torch every loss must agree to 1e-5. Another torch
release computes the same maths with other kernels (a RoIAlign backward that moved gradients by 1e-6 moved TAR's
second-step losses by up to 1.5e-3), and ``pip install`` takes the newest release: there the first step, a forward
pass of the seeded initial weights, must still agree to 1e-4, and the second, after one update, to 2e-2. A
method whose maths changed misses both.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import detkd.methods  # noqa: F401  (registration)
from detkd.distillation import DistillModel, build_distillers
from detkd.methods.base import METHODS
from tests.conftest import make_batch, tiny

FIXTURE = Path(__file__).with_name("numerics_pinned.json")
RECORD = os.environ.get("DETKD_RECORD_NUMERICS") == "1"
STUDENTS = {"two_stage": "frcnn_r18", "one_stage": "retinanet_r18", "detr": "deformable_detr_r18"}
TOTAL = 100
# Step 8 lies in LGD's frozen-backbone phase; 50 is mid-schedule, where every method is active.
STEPS = (8, 50)
REL = 1e-5
# On a torch other than the recorded one, per step: the first (before any update), the second.
REL_OTHER_TORCH = (1e-4, 2e-2)
TORCH_KEY = "_torch"  # the fixture's entry naming the torch it was recorded with

# (case id, methods, student, options). Every registered method on each kind it supports, plain training of each
# family, a composition (the shared-RoI pass used twice) and a few non-default options that take other paths.
EXTRA = [
    ("plain-frcnn", [], "frcnn_r18", {}),
    ("plain-retinanet", [], "retinanet_r18", {}),
    ("plain-fcos", [], "fcos_r18", {}),
    ("plain-deformable_detr", [], "deformable_detr_r18", {}),
    ("tar+kd-two_stage", ["tar", "kd"], "frcnn_r18", {}),
    ("kd-positive-two_stage", ["kd"], "frcnn_r18", {"kd": {"rois": "positive"}}),
    ("tar-proposal-two_stage", ["tar"], "frcnn_r18", {"tar": {"gate": "proposal"}}),
    ("gkd-anchors-one_stage", ["gkd"], "retinanet_r18", {"gkd": {"one_stage_instances": "anchors"}}),
]


def cases() -> list[tuple[str, list[str], str, dict]]:
    out = [
        (f"{name}-{kind}", [name], STUDENTS[kind], {})
        for name in sorted(METHODS.names())
        for kind in METHODS.get(name).kinds
    ]
    return out + EXTRA


class TinyData(torch.utils.data.Dataset):
    classes = ["a", "b", "c"]

    def __init__(self):
        self.images, self.targets = make_batch(n=4, empty_last=True, seed=7)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def run_context():
    # The run context's home moved during a refactor; the test must run unchanged on both sides of it.
    try:
        from detkd.methods.base import RunContext
    except ImportError:
        from detkd.engine.launch import RunContext
    return RunContext(
        dataset=TinyData(),
        device=torch.device("cpu"),
        batch_size=2,
        iters_per_epoch=10,
        total_iters=TOTAL,
        out=None,
    )


def run_case(methods: list[str], student_name: str, options: dict) -> list[dict[str, float]]:
    student = tiny(student_name)
    needs_teacher = any(METHODS.get(m).needs_teacher for m in methods)
    teacher = tiny(student_name.replace("r18", "r34")) if needs_teacher else None
    distillers = build_distillers(methods, options, student, teacher)
    model = DistillModel(student, teacher, distillers, total_iters=TOTAL, iters_per_epoch=10)
    model.train()
    context = run_context()
    for d in distillers.values():
        d.on_epoch_start(0, context)
    torch.manual_seed(1234)
    params = list(model.trainable_module.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    history = []
    for step in STEPS:
        images, targets = make_batch(n=2, empty_last=True, seed=step)
        losses, _ = model(images, targets, step=step)
        opt.zero_grad()
        sum(losses.values()).backward()
        for d in distillers.values():
            d.before_optimizer_step(step)
        # Clipped as the trainer does, so that the second step starts from a sane model whatever a term's scale.
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append({k: float(v.detach()) for k, v in sorted(losses.items())})
    return history


@pytest.fixture(scope="module")
def pinned() -> dict:
    if RECORD:
        return {}
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module", autouse=True)
def record(pinned):
    recorded: dict = {}
    yield recorded
    if RECORD:
        recorded[TORCH_KEY] = torch.__version__
        FIXTURE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


def tolerances(pinned: dict) -> tuple[float, ...]:
    """The relative tolerance of each step in ``STEPS`` against ``pinned`` on the running torch."""
    if pinned.get(TORCH_KEY) == torch.__version__:
        return (REL,) * len(STEPS)
    return REL_OTHER_TORCH


@pytest.mark.parametrize("case,methods,student,options", cases(), ids=[c[0] for c in cases()])
def test_losses_match_the_recorded_run(case, methods, student, options, pinned, record):
    history = run_case(methods, student, options)
    if RECORD:
        record[case] = history
        return
    assert case in pinned, f"{case} has no recorded numbers; record them with DETKD_RECORD_NUMERICS=1"
    expected = pinned[case]
    assert len(history) == len(expected)
    recorded_with = pinned.get(TORCH_KEY, "an unnamed torch")
    for step, rel, got, want in zip(STEPS, tolerances(pinned), history, expected):
        assert sorted(got) == sorted(want), f"{case} step {step}: loss keys {sorted(got)} != {sorted(want)}"
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=rel, abs_tol=1e-9), (
                f"{case} step {step} {key}: {got[key]!r} != {value!r} recorded with torch {recorded_with} "
                f"(relative tolerance {rel:g} on torch {torch.__version__})"
            )


def test_a_fixture_from_another_torch_is_held_to_the_cross_release_tolerances():
    assert tolerances({TORCH_KEY: torch.__version__}) == (REL, REL)
    assert tolerances({TORCH_KEY: "1.0.0"}) == REL_OTHER_TORCH
    assert tolerances({}) == REL_OTHER_TORCH  # recorded before the fixture named its torch
