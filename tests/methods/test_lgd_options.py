"""LGD options that reproduce the official recipe: phases in iterations, per-image pooling, the teacher's own loss."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from detkd.distillation import DistillModel, build_distillers
from detkd.engine.launch import RunContext
from detkd.methods.lgd import LGDConfig, lgd_phases, pool_objects, render_objects
from tests.conftest import make_batch, tiny


def test_phases_in_iterations_replace_the_fractions():
    cfg = LGDConfig(freeze_backbone_iters=3, adapter_only_iters=7, late_stop_iters=10)
    assert lgd_phases(2, 100, cfg) == (True, False)
    assert lgd_phases(3, 100, cfg) == (False, False)
    assert lgd_phases(7, 100, cfg) == (False, True)
    assert lgd_phases(89, 100, cfg) == (False, True)
    assert lgd_phases(90, 100, cfg) == (False, False)
    # Independent of the run length, unlike the fractions.
    assert lgd_phases(6, 1000, cfg) == (False, False) and lgd_phases(7, 1000, cfg) == (False, True)


def random_objects(num_images: int, per_image: int, hw: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cells = (torch.rand(num_images * per_image, hw, generator=g) > 0.7).float()
    image_index = torch.arange(num_images).repeat_interleave(per_image)
    return cells, image_index


def test_per_image_pooling_equals_the_batched_result():
    torch.manual_seed(0)
    cells, image_index = random_objects(3, 4, 6 * 5)
    cells = torch.cat([cells[:4], cells[8:]])  # image 1 has no object
    image_index = torch.cat([image_index[:4], image_index[8:]])
    maps = torch.randn(3, 8, 6, 5)
    pooled = pool_objects(cells, image_index, maps, per_image=True)
    assert torch.allclose(pooled, pool_objects(cells, image_index, maps, per_image=False), atol=1e-5)
    # Independent check of one object: sum of its cells on its own image's map.
    expected = (maps[2].flatten(1) * cells[-1]).sum(1)
    assert torch.allclose(pooled[-1], expected, atol=1e-5)
    values = torch.randn(len(cells), 8)
    painted = render_objects(cells, image_index, values, 3, per_image=True)
    assert torch.allclose(painted, render_objects(cells, image_index, values, 3, per_image=False), atol=1e-5)
    assert painted[1].abs().sum() == 0  # nothing painted on the image without objects


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode and still alive (each storage counted once)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, live tensors on it]

    def _release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self.refs:
                    self.refs[ptr] = [storage.nbytes(), 0]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.refs[ptr][1] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def peak_bytes(num_images: int, per_image: bool) -> int:
    cells, image_index = random_objects(num_images, 5, 32 * 32)
    maps = torch.randn(num_images, 4, 32, 32)
    values = torch.randn(len(cells), 4)
    with torch.no_grad(), PeakMemory() as mem:
        pool_objects(cells, image_index, maps, per_image)
        render_objects(cells, image_index, values, num_images, per_image)
    return mem.peak


def test_per_image_pooling_memory_does_not_grow_with_the_batch():
    # Per image of the batch, the peak is constant when pooling image by image ...
    small, large = peak_bytes(2, True) / 2, peak_bytes(16, True) / 16
    assert large <= 1.1 * small
    # ... and grows with the batch through the block matrix of the batched form (so the measure can fail).
    assert peak_bytes(16, False) / 16 > 4 * peak_bytes(2, False) / 2


def build(options: dict, weight: float = 1.0, total: int = 90) -> DistillModel:
    student = tiny("retinanet_r18")
    distillers = build_distillers(["lgd"], {"lgd": options}, student, None)
    model = DistillModel(student, None, distillers, {"lgd": weight}, total_iters=total)
    model.train()
    model.distillers["lgd"].on_epoch_start(0, RunContext(None, torch.device("cpu"), 2, 10, total, None))
    return model


def test_teacher_detection_loss_is_not_a_distillation_term():
    # Method weight 0.25 and a schedule that has not started: the distillation term is 0, the teacher's own
    # detection loss keeps its own weight (term_weights.loss_teacher_det = 2) and nothing else.
    options = {"schedule": {"start_iter": 1000}, "term_weights": {"loss_teacher_det": 2.0}}
    model = build(options, weight=0.25)
    images, targets = make_batch(n=2, empty_last=True)
    losses, stats = model(images, targets, step=50)
    parts = sum(v for k, v in stats.items() if k.startswith("lgd.teacher_det."))
    assert float(losses["lgd.loss_teacher_det"].detach()) == pytest.approx(2.0 * parts, rel=1e-5)
    assert float(losses["lgd.kd_feat"].detach()) == 0.0
    assert "raw.lgd.loss_teacher_det" not in stats and "raw.lgd.kd_feat" in stats
