"""Backbones: bottom-up networks returning stages ``c2..c5`` (strides 4, 8, 16, 32), and the FPN on top.

ImageNet weights are loaded from a local file when the user has one (``backbone_weights: imagenet`` looks in
torch's hub cache, ``backbone_weights: PATH`` reads that file); nothing is downloaded unless the cache is empty
and a network is reachable.

Besides the registered torchvision bodies (``r18`` ... ``mbv3``), any timm model that supports ``features_only``
is a backbone under the name ``timm:<model>`` (the optional ``timm`` extra): its ``feature_info`` says which
outputs sit at strides 4, 8, 16 and 32 and how many channels each has.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from detkd.errors import BuildError, CheckpointError
from detkd.models.outputs import FeatureSpec
from detkd.registry import Registry


@dataclass
class Body:
    """A bottom-up network and what it returns."""

    module: nn.Module  # forward(x) -> OrderedDict c2..c5
    channels: dict[str, int]  # stage name -> channels
    imagenet_weights: object | None = None  # torchvision WeightsEnum member, for `backbone_weights: imagenet`
    weights_target: nn.Module | None = None  # the module the ImageNet state dict loads into


BACKBONES: Registry[Callable[..., Body]] = Registry("backbone")
STAGE_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


def _resnet(depth: int) -> Callable[..., Body]:
    ctor = getattr(torchvision.models, f"resnet{depth}")
    weights_enum = {
        18: torchvision.models.ResNet18_Weights,
        34: torchvision.models.ResNet34_Weights,
        50: torchvision.models.ResNet50_Weights,
        101: torchvision.models.ResNet101_Weights,
    }[depth]

    def build(frozen_bn: bool) -> Body:
        net = ctor(weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
        layers = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
        width = 64 if depth < 50 else 256
        channels = {f"c{i + 2}": width * 2**i for i in range(4)}
        return Body(IntermediateLayerGetter(net, layers), channels, weights_enum.IMAGENET1K_V1, net)

    return build


for _depth in (18, 34, 50, 101):
    BACKBONES.register(f"r{_depth}")(_resnet(_depth))


@BACKBONES.register("mbv3")
def _mobilenet_v3(frozen_bn: bool) -> Body:
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    net = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm)
    # Indices of the last block at strides 4, 8, 16 and 32 in mobilenet_v3_large.features.
    layers = {"3": "c2", "6": "c3", "12": "c4", "16": "c5"}
    channels = {"c2": 24, "c3": 40, "c4": 112, "c5": 960}
    return Body(
        IntermediateLayerGetter(net.features, layers),
        channels,
        torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        net,
    )


TIMM_PREFIX = "timm:"


def get_backbone(name: str) -> Callable[..., Body]:
    """The builder of a registered backbone, or of ``timm:<model>``."""
    if name.startswith(TIMM_PREFIX):
        return partial(_timm_body, name[len(TIMM_PREFIX) :])
    return BACKBONES.get(name)


def is_backbone(name: str) -> bool:
    return name in BACKBONES or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX))


class _TimmStages(nn.Module):
    """A timm ``features_only`` model whose outputs at strides 4, 8, 16 and 32 are named ``c2..c5``."""

    def __init__(self, net: nn.Module, picks: list[int]):
        super().__init__()
        self.net = net
        self.picks = picks  # output index of each stage

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        outputs = self.net(x)
        return OrderedDict((stage, outputs[i]) for stage, i in zip(STAGE_STRIDES, self.picks))


def _import_timm():
    try:
        import timm
    except ModuleNotFoundError:
        raise BuildError("timm backbones need the timm package: pip install 'detkd[timm]'") from None
    return timm


def _timm_body(model: str, frozen_bn: bool, pretrained: bool = False) -> Body:
    timm = _import_timm()
    try:
        net = timm.create_model(model, pretrained=pretrained, features_only=True)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise BuildError(f"timm:{model}: {exc}") from None
    except Exception as exc:  # noqa: BLE001  (no network, no published weights, no features_only support)
        what = "ImageNet weights could not be fetched" if pretrained else "cannot be built with features_only"
        raise BuildError(
            f"timm:{model}: {what} ({type(exc).__name__}); pass model.backbone_weights=PATH (a timm state dict) "
            "or model.backbone_weights=none"
        ) from None
    reductions = net.feature_info.reduction()
    # The last output at each stride: the deepest features of that resolution, as torchvision's layer1..layer4.
    picks = []
    for stride in STAGE_STRIDES.values():
        found = [i for i, r in enumerate(reductions) if r == stride]
        if not found:
            raise BuildError(
                f"timm:{model} has no feature map at stride {stride} (its strides: {reductions}); the FPN needs "
                "outputs at strides 4, 8, 16 and 32"
            )
        picks.append(found[-1])
    channels = dict(zip(STAGE_STRIDES, (net.feature_info.channels()[i] for i in picks)))
    if frozen_bn:
        net = timm.layers.freeze_batch_norm_2d(net)
    return Body(_TimmStages(net, picks), channels, None, net)


def imagenet_file(weights: object) -> Path:
    """Where torch's hub cache keeps the file of a torchvision ``WeightsEnum`` member."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def load_backbone_weights(body: Body, source: str) -> None:
    """Load ImageNet weights into ``body``: ``imagenet`` (hub cache or download) or a file path."""
    if body.weights_target is None:
        raise BuildError("this backbone has no ImageNet weights to load")
    if source == "imagenet":
        if body.imagenet_weights is None:
            raise BuildError(
                "this backbone has no published ImageNet weights; pass model.backbone_weights=PATH or "
                "model.backbone_weights=none"
            )
        path = imagenet_file(body.imagenet_weights)
        if not path.exists():
            try:
                torch.hub.load_state_dict_from_url(body.imagenet_weights.url, progress=False)
            except Exception as exc:
                raise BuildError(
                    f"ImageNet weights not found at {path} and could not be downloaded ({type(exc).__name__}); "
                    f"place {body.imagenet_weights.url} there, or pass model.backbone_weights=PATH "
                    "(or model.backbone_weights=none to train the backbone from scratch)"
                ) from None
    else:
        path = Path(source)
        if not path.exists():
            raise BuildError(f"backbone weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read backbone weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = body.weights_target.state_dict()
    # The classifier (fc / classifier.*) is not part of a detection backbone: drop keys the body lacks.
    usable = {k: v for k, v in state.items() if k in own}
    if not usable:
        raise CheckpointError(f"{path}: no parameter names match the backbone (is it a checkpoint of this backbone?)")
    bad = [k for k, v in usable.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(
            f"{path}: shape mismatch for {bad[0]}: file {tuple(usable[bad[0]].shape)}, model {tuple(own[bad[0]].shape)}"
        )
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    backbone_missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if backbone_missing:
        raise CheckpointError(
            f"{path}: backbone parameter {backbone_missing[0]} missing from the file "
            f"({len(backbone_missing)} missing in all)"
        )
    body.weights_target.load_state_dict(usable, strict=False)


def freeze_stages(body: Body, trainable: int) -> None:
    """Freeze the stem and the first ``4 - trainable`` stages (torchvision's ``trainable_layers`` convention)."""
    if trainable >= 5 or not any(n.startswith("layer1.") for n, _ in body.module.named_parameters()):
        return  # only ResNet stages are named; other bodies train fully
    keep = ["c5", "c4", "c3", "c2"][:trainable]
    names = {"c2": "layer1", "c3": "layer2", "c4": "layer3", "c5": "layer4"}
    keep_prefixes = tuple(names[k] for k in keep)
    for name, param in body.module.named_parameters():
        if not name.startswith(keep_prefixes):
            param.requires_grad_(False)


class FPNBackbone(nn.Module):
    """Bottom-up body + torchvision FPN; returns an ordered dict of levels ``p2..p6`` or ``p3..p7``.

    Args:
        body: the bottom-up network.
        levels: FPN output levels, ``("p2", ..., "p6")`` (two-stage) or ``("p3", ..., "p7")`` (one-stage).
        out_channels: FPN width.
    """

    def __init__(self, body: Body, levels: tuple[str, ...], out_channels: int):
        super().__init__()
        self.body = body.module
        first = int(levels[0][1:])
        stages = [f"c{i}" for i in range(first, 6)]
        self.stages = stages
        if levels[-1] == "p6" and len(levels) == 6 - first + 1:
            extra = LastLevelMaxPool()
        elif levels[-1] == "p7":
            extra = LastLevelP6P7(out_channels, out_channels)
        else:
            raise BuildError(f"unsupported FPN levels {levels}")
        self.fpn = FeaturePyramidNetwork([body.channels[s] for s in stages], out_channels, extra_blocks=extra)
        self.levels = levels
        self.out_channels = out_channels
        self.feature_info = [FeatureSpec(name, out_channels, 2 ** int(name[1:])) for name in levels]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        stages = self.body(x)
        inputs = OrderedDict((f"p{s[1:]}", stages[s]) for s in self.stages)
        out = self.fpn(inputs)
        # torchvision names the extra levels "pool" (max-pool P6) or "p6"/"p7".
        return OrderedDict(zip(self.levels, out.values()))
