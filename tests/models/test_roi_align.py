"""detkd's RoIAlign: torchvision's forward, a vectorised CPU backward equal to torchvision's."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import initLevelMapper

from detkd.models.roi_align import FastMultiScaleRoIAlign, roi_align, roi_align_backward


def _rois(n_images: int, count: int, size: int, seed: int) -> torch.Tensor:
    """Boxes of every kind: inside, crossing the border, wholly outside, thinner than a pixel, degenerate."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * (size + 8) - 4
    wh = torch.rand(count, 2, generator=g) * size * 0.6
    wh[: count // 8] *= 0.02  # thinner than a pixel
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[-1] = torch.tensor([size + 3.0, size + 3.0, size + 6.0, size + 9.0])  # outside the map
    boxes[-2] = torch.tensor([2.0, 2.0, 2.0, 2.0])  # empty
    index = torch.randint(0, n_images, (count, 1), generator=g).float()
    return torch.cat([index, boxes], 1)


def _grads(fn, x, rois, out_grad, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, rois, **kw)
    out.backward(out_grad)
    return out.detach(), x.grad


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_forward_and_gradient_equal_torchvisions(aligned, sampling_ratio, scale):
    size = 12
    x = torch.randn(3, 5, size, size + 3)
    rois = _rois(3, 40, int(size / scale), seed=sampling_ratio)
    out_grad = torch.randn(40, 5, 4, 3)
    kw = dict(output_size=(4, 3), spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)
    out, grad = _grads(roi_align, x, rois, out_grad, **kw)
    ref_out, ref_grad = _grads(tv_roi_align, x, rois, out_grad, **kw)
    assert torch.equal(out, ref_out)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_per_image_box_lists_are_accepted():
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    boxes = [torch.tensor([[1.0, 1.0, 6.0, 7.0]]), torch.tensor([[0.0, 2.0, 9.0, 9.0], [3.0, 3.0, 4.0, 8.0]])]
    out = roi_align(x, boxes, 3, 1.0, 2, True)
    torch.testing.assert_close(out, tv_roi_align(x, boxes, 3, 1.0, 2, True), rtol=0, atol=0)


def test_gradient_passes_gradcheck_in_double():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    rois = _rois(2, 9, 7, seed=5).double()
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, 3, 1.0, 2, True), (x,))


def test_backward_is_deterministic_and_handles_no_rois():
    x = torch.randn(2, 4, 16, 16)
    rois = _rois(2, 64, 16, seed=1)
    g = torch.randn(64, 4, 7, 7)
    first = roi_align_backward(g, rois, x.shape, (7, 7), 1.0, 2, False)
    assert torch.equal(first, roi_align_backward(g, rois, x.shape, (7, 7), 1.0, 2, False))
    empty = roi_align_backward(g[:0], rois[:0], x.shape, (7, 7), 1.0, 2, False)
    assert empty.shape == x.shape and not empty.any()


def test_torchvisions_op_is_used_without_gradient_and_for_adaptive_sampling(monkeypatch):
    import detkd.models.roi_align as module

    calls = []
    monkeypatch.setattr(module._RoIAlign, "apply", lambda *a: calls.append(a) or tv_roi_align(*a[:6]))
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = _rois(1, 4, 8, seed=2)
    with torch.no_grad():
        roi_align(x, rois, 2, 1.0, 2)
    roi_align(x, rois, 2, 1.0, -1)  # adaptive: samples per RoI vary
    roi_align(x.detach(), rois, 2, 1.0, 2)
    assert not calls
    roi_align(x, rois, 2, 1.0, 2)
    assert len(calls) == 1


def test_multiscale_pooling_equals_torchvisions_forward_and_backward():
    torch.manual_seed(0)
    names = ["p2", "p3", "p4", "p5"]
    feats = {n: torch.randn(2, 6, 64 // 2**i, 64 // 2**i) for i, n in enumerate(names)}
    boxes = [
        torch.tensor([[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 250.0, 250.0], [5.0, 5.0, 9.0, 7.0]]),
        torch.tensor([[10.0, 20.0, 120.0, 200.0], [3.0, 4.0, 60.0, 90.0]]),
    ]
    shapes = [(256, 256), (256, 256)]
    results = []
    for cls in (MultiScaleRoIAlign, FastMultiScaleRoIAlign):
        pool = cls(names, output_size=7, sampling_ratio=2)
        pool.scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        pool.map_levels = initLevelMapper(2, 5)
        leaves = {n: f.clone().requires_grad_(True) for n, f in feats.items()}
        out = pool(leaves, boxes, shapes)
        out.backward(torch.ones_like(out) + out.detach())
        results.append((out.detach(), [leaves[n].grad for n in names]))
    (out, grads), (ref_out, ref_grads) = results[1], results[0]
    assert torch.equal(out, ref_out)
    assert sum(g.abs().sum() for g in grads) > 0
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)


def test_faster_rcnn_pools_with_it():
    from detkd.models import build_detector

    detector = build_detector("frcnn_r18", 3, preset="slim", min_size=64, max_size=64)
    assert isinstance(detector.model.roi_heads.box_roi_pool, FastMultiScaleRoIAlign)
