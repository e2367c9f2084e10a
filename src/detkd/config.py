"""Run configuration: dataclasses hold the defaults, YAML files and ``key=value`` pairs hold overrides.

Unknown keys are errors. There are no base-file chains and no interpolation: what a run used is the
dataclass defaults plus the overrides, and the resolved result is saved as ``config.yaml`` in the run folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from detkd.errors import ConfigError


@dataclass
class DataConfig:
    """Where the data is and how it is batched and augmented."""

    root: str = "data/digits"
    format: Literal["auto", "coco", "voc", "yolo"] = "auto"
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 8
    workers: int = 0
    hflip: float = 0.5  # probability of a horizontal flip in training
    scale_jitter: list[float] | None = None  # [low, high] random rescale of training images, None = off
    # [low, high]: crop height and width drawn as fractions of the image's, applied with random_crop_prob; boxes are
    # cut to the crop. DETR's recipe: resize to 400-600 px then crop 384-600 px, about [0.64, 1.0] with p 0.5.
    random_crop: list[float] | None = None
    random_crop_prob: float = 0.5
    val_max_images: int | None = None  # evaluate on the first N val images only


@dataclass
class ModelConfig:
    """Which detector to build."""

    name: str = "frcnn_r18"  # <family>_<backbone>, see `detkd list detectors`
    preset: Literal["slim", "standard"] = "slim"
    backbone_weights: str = "none"  # none | imagenet | path to a state-dict file
    min_size: int = 128  # images are resized so the short side is min_size ...
    max_size: int = 128  # ... and the long side at most max_size
    fpn_channels: int | None = None  # override the preset's FPN / transformer width
    binary_neck: bool = False  # 1-bit FPN and RPN convs (with a binary backbone such as bireal18)
    # Multiplier of the binary convs' latent-weight straight-through gradient; IDa-Det's code: 50 (see models/binary.py)
    binary_grad_scale: float = 1.0
    task_loss_weight: float = 1.0  # multiplies every detection loss of the student (IDa-Det's student config: 5)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    decay_norm_bias: bool = False  # also decay norms, biases and other 1-D parameters (mmdet/DETR official code)
    schedule: Literal["step", "cosine", "constant"] = "step"
    steps: list[float] = field(default_factory=lambda: [0.75, 0.9])  # fractions of train.iters (step schedule)
    gamma: float = 0.1
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    clip_grad_norm: float | None = 10.0
    clip_grad_value: float | None = None
    # LR multipliers by parameter name: a key matches the parameters whose dotted name contains it as whole parts
    # ("backbone" matches student.backbone.conv1.weight, "backbone.body" only torchvision's ResNet trunk); the
    # longest matching key wins. DETR recipes with a pretrained backbone:
    # {backbone: 0.1, sampling_offsets: 0.1, reference_points: 0.1}.
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The training loop."""

    iters: int = 300
    eval_every: int = 0  # 0 = evaluate only at the end
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 on CUDA (not yet measured against fp32 on a GPU), off on CPU; official recipes train in fp32 (off)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    max_nonfinite: int = 20  # abort after this many consecutive non-finite losses
    progress: bool = True
    tensorboard: bool = True
    threads: int | None = None  # CPU threads for torch (None = torch's default, all cores)


@dataclass
class DistillConfig:
    """Distillation: methods, teacher and per-method settings."""

    methods: list[str] = field(default_factory=list)
    teacher: str | None = None  # checkpoint path; None for teacher-free methods
    weights: dict[str, float] = field(default_factory=dict)  # method -> overall weight (default 1)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> overrides of its Config
    check_teacher: int = 16  # evaluate the teacher on this many val images before training (0 = skip)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert int->float and dict->dataclass."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and value not in choices and ("on" if value else "off") in choices:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as false/true
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool) and tp is not bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    defaults = cls()
    kwargs = {}
    for key, value in data.items():
        default = getattr(defaults, key)
        if isinstance(value, dict) and (dataclasses.is_dataclass(default) or isinstance(default, dict)):
            # A partial mapping overrides the field's own default (e.g. a method's default term weights or
            # schedule), key by key, instead of replacing it.
            value = _merge(to_dict(default), value)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass as plain, YAML- and JSON-friendly containers."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=0.01", "train.iters=50"]`` into a nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key=value (e.g. optim.lr=0.01)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {pair!r} has an empty key part")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: Config | None = None
) -> Config:
    """Defaults (or ``base``), then the YAML file, then the dotted overrides."""
    data = to_dict(base or Config())
    if path is not None:
        data = _merge(data, read_yaml(path))
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return from_dict(Config, data)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
