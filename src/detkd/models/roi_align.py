"""RoIAlign with a vectorised CPU backward pass.

torchvision's RoIAlign backward on CPU recomputes every sample point's bilinear corners once per channel; in a
profile of a slim Faster R-CNN training step on one CPU thread it was most of RoIAlign's quarter of the step. The
backward here computes the corners and weights once for all channels, as a sparse (pixels x output bins) matrix, and
the input's gradient is one sparse-dense product with the output's gradient. The forward is torchvision's own op;
the gradient is the same sum in another order, equal to torchvision's to float rounding
(tests/models/test_roi_align.py), and deterministic. On CUDA, in reduced precision, in inference and with an
adaptive sampling ratio (``sampling_ratio <= 0``, where the number of samples differs per RoI) torchvision's op is
used as it is.

The geometry follows RoIAlign as torchvision defines it: with ``aligned`` the box corners move by half a pixel;
without it, boxes are at least one pixel wide and high; a sample point more than one pixel outside the map
contributes nothing; one inside but below zero is moved to zero; one past the last row or column uses that row or
column alone.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align


def roi_align(
    input: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align``, with the vectorised backward on CPU when ``sampling_ratio > 0``. ``rois`` is
    (K, 5) = (batch index, x1, y1, x2, y2), or one (K_i, 4) box tensor per image."""
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if isinstance(rois, (list, tuple)):
        rois = boxes_to_rois(rois)
    own = input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64) and sampling_ratio > 0
    if not (own and torch.is_grad_enabled() and input.requires_grad):
        return tv_roi_align(input, rois, size, spatial_scale, sampling_ratio, aligned)
    return _RoIAlign.apply(input, rois, size, float(spatial_scale), int(sampling_ratio), bool(aligned))


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """Per-image (K_i, 4) boxes as one (K, 5) tensor whose first column is the image index."""
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0)


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, size, spatial_scale, sampling_ratio, aligned):  # noqa: ANN001, ANN205
        ctx.save_for_backward(rois)
        ctx.settings = (input.shape, size, spatial_scale, sampling_ratio, aligned)
        return torch.ops.torchvision.roi_align(input, rois, spatial_scale, size[0], size[1], sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (rois,) = ctx.saved_tensors
        shape, size, spatial_scale, sampling_ratio, aligned = ctx.settings
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = roi_align_backward(grad, rois, shape, size, spatial_scale, sampling_ratio, aligned)
        return grad_input, None, None, None, None, None


def _axis(start: Tensor, length: Tensor, bins: int, grid: int, limit: int) -> tuple[Tensor, Tensor]:
    """Per RoI, bin and sample along one axis: the two neighbouring pixel indices and their bilinear weights,
    shaped (K, bins, grid, 2); weights are zero for samples more than a pixel outside [0, limit]."""
    bin_size = length / bins
    dtype = start.dtype
    bin_index = torch.arange(bins, dtype=dtype)[None, :, None]
    offset = (torch.arange(grid, dtype=dtype) + 0.5)[None, None, :]
    pos = start[:, None, None] + bin_index * bin_size[:, None, None] + offset * bin_size[:, None, None] / grid
    valid = (pos >= -1.0) & (pos <= limit)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    last = low >= limit - 1
    low = torch.where(last, torch.full_like(low, limit - 1), low)
    pos = torch.where(last, low.to(dtype), pos)
    high = torch.where(last, low, low + 1)
    frac = pos - low.to(dtype)
    weights = torch.stack([1 - frac, frac], -1) * valid[..., None].to(dtype)
    return torch.stack([low, high], -1), weights


def roi_align_backward(
    grad: Tensor,
    rois: Tensor,
    shape: torch.Size,
    size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """The gradient of RoIAlign's input for the output gradient ``grad`` (K, C, PH, PW)."""
    n, c, height, width = shape
    ph, pw = size
    grid = sampling_ratio
    if rois.numel() == 0:
        return grad.new_zeros(shape)
    boxes = rois.to(grad.dtype)
    shift = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, i] * spatial_scale - shift for i in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    count = float(max(grid * grid, 1))
    y_idx, y_w = _axis(y1, roi_h, ph, grid, height)  # (k, ph, grid, 2)
    x_idx, x_w = _axis(x1, roi_w, pw, grid, width)  # (k, pw, grid, 2)
    batch = rois[:, 0].long()[:, None, None, None, None, None, None]
    # (k, ph, pw, gy, 2, gx, 2): the four corners of every sample, grouped by output bin
    pixel = batch * (height * width) + y_idx[:, :, None, :, :, None, None] * width + x_idx[:, None, :, None, None, :, :]
    weight = y_w[:, :, None, :, :, None, None] * x_w[:, None, :, None, None, :, :] / count
    bins = rois.shape[0] * ph * pw
    per_bin = pixel[0, 0, 0].numel()
    bin_of = torch.arange(bins).repeat_interleave(per_bin)
    # grad_input = S^T grad, with S the sparse (bins x pixels) interpolation matrix of the forward pass
    spread = torch.sparse_coo_tensor(
        torch.stack([pixel.reshape(-1), bin_of]),
        weight.reshape(-1),
        (n * height * width, bins),
        check_invariants=False,
    )
    out = torch.sparse.mm(spread, grad.permute(0, 2, 3, 1).reshape(bins, c))
    return out.view(n, height, width, c).permute(0, 3, 1, 2).contiguous()


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same levels, scales and level mapping) pooling with ``roi_align``
    above while it trains on CPU; otherwise (inference, export, CUDA, scales not set yet) torchvision's own."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        own = torch.is_grad_enabled() and features[0].requires_grad and features[0].device.type == "cpu"
        if not own or self.scales is None or self.map_levels is None or torch.jit.is_tracing():
            return super().forward(x, boxes, image_shapes)
        rois = boxes_to_rois(boxes)
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        first = features[0]
        result = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio)
            result.index_put_((index,), pooled.to(result.dtype))
        return result
