"""Size and compute of any detector, counted the way the 1-bit literature reports them.

Conventions (Bi-Real Net, ReActNet, IDa-Det and the BNN detectors they compare with):

- ``flops``: real-valued **multiply-accumulates** (MACs) of convolutions and fully connected layers, what those
  papers call "FLOPs" (ResNet-18 at 224 px: 1.8 G). Counted with :class:`torch.utils.flop_counter.FlopCounterMode`
  (which reports 2 per MAC, halved here); element-wise ops, normalisation, pooling, NMS and RoIAlign are not
  counted, as in the papers.
- ``bops``: binary MACs (1-bit input x 1-bit weight) of :class:`~detkd.models.binary.BinaryConv2d` layers. They
  are taken out of the FlopCounterMode total, so a binary conv is counted once, as BOPs only.
- ``ops = bops / 64 + flops``: a 64-bit CPU performs 64 binary MACs (XNOR + popcount) per instruction.
- ``fp32_mb``: parameters and buffers at 4 bytes each; ``packed_mb``: binary conv weights at 1 bit each, everything
  else (their per-channel scales included) at 4 bytes. MB = 2**20 bytes, as torchvision reports weight files.
  A real-valued detector has ``bops == 0`` and ``packed_mb == fp32_mb``.

The counted forward is one image of ``image_size`` (the network input, after resizing and padding) through
``extract`` and ``head_losses`` in eval mode; a two-stage detector's box head is counted on as many RoIs as its RPN
keeps at test time (the maximum, so the count does not depend on how many proposals survive NMS).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection.image_list import ImageList

from detkd.models.binary import BinaryConv2d
from detkd.models.outputs import Detector, RoIHeadDetector

MB = 2**20


def _dummy_rois(n: int, height: int, width: int, device: torch.device) -> Tensor:
    """``n`` boxes of various sizes spread over the image (only their number matters for the count)."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
    wh = (0.05 + 0.25 * torch.rand(n, 2, generator=g)) * torch.tensor([width, height])
    return torch.cat([xy, xy + wh], 1).to(device)


def _storage(detector: nn.Module, binary_weights: set[int]) -> tuple[int, int, int]:
    """(fp32 bytes, packed bytes, binary weight count) of parameters and buffers."""
    fp32 = packed_bits = binary = 0
    seen: set[int] = set()
    for tensor in [*detector.parameters(), *detector.buffers()]:
        if id(tensor) in seen or not tensor.is_floating_point():
            continue
        seen.add(id(tensor))
        n = tensor.numel()
        fp32 += 4 * n
        if id(tensor) in binary_weights:
            binary += n
            packed_bits += n
        else:
            packed_bits += 32 * n
    return fp32, (packed_bits + 7) // 8, binary


def model_cost(detector: Detector, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Parameters, sizes and compute of ``detector`` for one image.

    Args:
        detector: any detkd detector (real-valued or binary).
        image_size: ``(H, W)`` of the network input; default a square of the detector's ``min_size``.

    Returns:
        ``params`` (all parameters), ``binary_params`` (1-bit weights), ``fp32_mb``, ``packed_mb``, ``flops``
        (real MACs), ``bops`` (binary MACs), ``ops`` (``bops / 64 + flops``), and ``image_size``.
    """
    if image_size is None:
        side = int(getattr(detector, "spec", {}).get("min_size", 128))
        image_size = (side, side)
    height, width = (int(s) for s in image_size)
    binary_layers = [m for m in detector.modules() if isinstance(m, BinaryConv2d)]
    fp32, packed, binary_params = _storage(detector, {id(m.weight) for m in binary_layers})

    bops = 0

    def count_bops(module: BinaryConv2d, inputs: Any, output: Tensor) -> None:
        nonlocal bops
        kh, kw = module.kernel_size
        bops += output.numel() * module.weight.shape[1] * kh * kw

    handles = [m.register_forward_hook(count_bops) for m in binary_layers]
    device = next(detector.parameters()).device
    was_training = detector.training
    detector.eval()
    try:
        g = torch.Generator().manual_seed(0)
        images = ImageList(torch.randn(1, 3, height, width, generator=g).to(device), [(height, width)])
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            features = detector.extract(images)
            detector.head_losses(features, images, None)
            if isinstance(detector, RoIHeadDetector):
                n = detector.test_proposals
                detector.roi_forward(features, [_dummy_rois(n, height, width, device)], [(height, width)])
    finally:
        for h in handles:
            h.remove()
        detector.train(was_training)
    # FlopCounterMode counts 2 per MAC and includes the binary convs (as ordinary convs): take them out.
    flops = counter.get_total_flops() // 2 - bops
    return {
        "params": sum(p.numel() for p in detector.parameters()),
        "binary_params": binary_params,
        "fp32_mb": fp32 / MB,
        "packed_mb": packed / MB,
        "flops": int(flops),
        "bops": int(bops),
        "ops": bops / 64 + flops,
        "image_size": [height, width],
    }


def format_cost(cost: dict[str, Any]) -> str:
    """One line for logs and tables."""
    return (
        f"{cost['params'] / 1e6:.2f} M params ({cost['binary_params'] / 1e6:.2f} M binary), "
        f"{cost['fp32_mb']:.2f} MB fp32 / {cost['packed_mb']:.2f} MB packed, "
        f"{cost['flops'] / 1e9:.3f} G FLOPs (MACs) + {cost['bops'] / 1e9:.3f} G BOPs = {cost['ops'] / 1e9:.3f} G OPs "
        f"at {cost['image_size'][0]}x{cost['image_size'][1]}"
    )
