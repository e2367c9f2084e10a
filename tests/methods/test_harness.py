"""Every registered method, on tiny detectors: the contract of DESIGN.md's "Contracts" section."""

from __future__ import annotations

import copy

import pytest
import torch

import detkd.methods  # noqa: F401  (registration)
from detkd.distillation import DistillModel, build_distillers
from detkd.methods.base import METHODS
from tests.conftest import make_batch, tiny

# One small detector per kind; the student of each pair, and (another instance of) its teacher.
KIND_EXAMPLES = {"two_stage": "frcnn_r18", "one_stage": "retinanet_r18", "detr": "deformable_detr_r18"}
TOTAL = 100  # nominal schedule length; steps below are taken mid-schedule, where every method is active


def cases() -> list:
    from detkd.models import detector_names

    available = set(detector_names())
    return [
        pytest.param(name, kind, id=f"{name}-{kind}")
        for name in METHODS.names()
        for kind in METHODS.get(name).kinds
        if KIND_EXAMPLES[kind] in available
    ]


def build(method: str, kind: str, same_weights: bool = False, student_channels: int | None = None):
    cls = METHODS.get(method)
    student = tiny(KIND_EXAMPLES[kind], fpn_channels=student_channels)
    teacher = None
    if cls.needs_teacher:
        teacher = copy.deepcopy(student) if same_weights else tiny(KIND_EXAMPLES[kind].replace("r18", "r34"))
    distillers = build_distillers([method], {}, student, teacher)
    model = DistillModel(student, teacher, distillers, total_iters=TOTAL, iters_per_epoch=10)
    model.train()
    return model


def run_context(model):
    """Give methods with epoch callbacks (prototypes, caches) their start-of-training call."""
    from detkd.data.base import DetectionDataset  # noqa: F401  (the type methods may expect)

    class Tiny(torch.utils.data.Dataset):
        classes = ["a", "b", "c"]

        def __init__(self):
            self.images, self.targets = make_batch(n=4, empty_last=True)

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.images[i], self.targets[i]

    from detkd.methods.base import RunContext

    context = RunContext(Tiny(), torch.device("cpu"), 2, 10, TOTAL, None)
    for d in model.distillers.values():
        d.on_epoch_start(0, context)


def kd_sum(losses):
    return sum(v for k, v in losses.items() if "." in k)


@pytest.mark.parametrize("method,kind", cases())
def test_loss_finite_and_gradients_reach_student_and_distiller(method, kind):
    model = build(method, kind)
    run_context(model)
    images, targets = make_batch(n=2, empty_last=True)
    losses, stats = model(images, targets, step=TOTAL // 2)
    kd_terms = {k: v for k, v in losses.items() if "." in k}
    assert kd_terms, "a method must return at least one term"
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    for key in kd_terms:
        # Distillation terms are kd_*; a method's own module's training loss (LGD's teacher) is declared in own_losses.
        name, term = key.split(".", 1)
        assert term.startswith("kd_") or (term in model.distillers[name].own_losses and term.startswith("loss_")), key
    kd_sum(losses).backward()
    student_grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert any(g.abs().sum() > 0 for g in student_grads), "distillation must reach the student"
    own = [p for p in model.trainable_module.distillers.parameters() if p.requires_grad]
    if own:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own), "distiller parts must learn"
    if model.teacher is not None:
        assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("method,kind", cases())
def test_teacher_untouched_by_a_training_step(method, kind):
    model = build(method, kind)
    if model.teacher is None:
        pytest.skip("teacher-free method")
    run_context(model)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    opt = torch.optim.SGD(model.trainable_module.parameters(), lr=0.1)
    for step in (TOTAL // 2, TOTAL // 2 + 1):
        images, targets = make_batch(n=2, empty_last=True, seed=step)
        losses, _ = model(images, targets, step=step)
        opt.zero_grad()
        sum(losses.values()).backward()
        if not METHODS.get(method).has_unused_parameters:
            # Multi-GPU training counts on it: DDP looks for parameters without gradient only where declared.
            missing = [n for n, p in model.trainable_module.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, f"no gradient for {missing[:3]}: declare has_unused_parameters = True"
        opt.step()
    assert not model.teacher.training
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher {key} changed"


@pytest.mark.parametrize("method,kind", cases())
def test_images_without_boxes(method, kind):
    model = build(method, kind)
    run_context(model)
    images, targets = make_batch(n=2, empty_last=True)
    targets[0] = targets[1]  # no box anywhere in the batch
    losses, _ = model(images, targets, step=TOTAL // 2)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.parametrize("method,kind", [c for c in cases() if METHODS.get(c.values[0]).needs_teacher])
def test_feature_terms_zero_when_student_equals_teacher(method, kind):
    model = build(method, kind, same_weights=True)
    # Same weights, and BatchNorm in inference mode on both sides, so the features are identical.
    for m in model.student.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    run_context(model)
    images, targets = make_batch(n=2, empty_last=False)
    losses, stats = model(images, targets, step=TOTAL // 2)
    feat = {k: v for k, v in losses.items() if "feat" in k}
    for key, value in feat.items():
        assert abs(float(value.detach())) < 1e-5, f"{key} = {float(value.detach())} although student == teacher"


@pytest.mark.parametrize(
    "method", [m for m in METHODS.names() if METHODS.get(m).needs_teacher and "two_stage" in METHODS.get(m).kinds]
)
def test_heterogeneous_channels(method):
    """A student with a narrower FPN than its teacher: connectors adapt, or the build says why not."""
    from detkd.errors import BuildError

    try:
        model = build(method, "two_stage", student_channels=32)
    except BuildError as exc:
        assert "32" in str(exc) or "channels" in str(exc)
        return
    run_context(model)
    images, targets = make_batch(n=2)
    losses, _ = model(images, targets, step=TOTAL // 2)
    assert all(torch.isfinite(v) for v in losses.values())
