"""Run configuration: dataclasses hold the defaults, YAML files and ``key=value`` pairs hold overrides.

Unknown keys are errors. There are no base-file chains and no interpolation: what a run used is the
dataclass defaults plus the overrides, and the resolved result is saved as ``config.yaml`` in the run folder.
The command line applies, lowest first: the defaults, the dataset folder's ``detkd.yaml`` (if any), the
``--config`` file, then options and ``key=value`` pairs.
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

AmpMode = Literal["auto", "off", "bf16", "fp16"]


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

    name: str = "frcnn_r18"  # <family>_<backbone>, see `detkd list detectors`; timm: frcnn_timm:resnet18
    # The defaults are torchvision's for real data; `detkd data digits` writes the digits' own settings
    # (slim, 128 px, no pretrained backbone) into the dataset folder (DATASET_SETTINGS), read under --config.
    preset: Literal["slim", "standard"] = "standard"
    backbone_weights: str = "imagenet"  # imagenet | none | path to a backbone state-dict file
    # Whole detector: none | torchvision (COCO) | a torchvision state dict or detkd checkpoint; when set, it replaces
    # backbone_weights, and BatchNorm is frozen as for a pretrained backbone.
    weights: str = "none"
    # BatchNorm statistics, stem and first stage frozen (torchvision's convention for ImageNet weights, the papers'
    # frozen_stages=1 / norm_eval). None: frozen when the run starts from backbone or detector weights; false trains
    # them, e.g. from a backbone of `detkd pretrain` whose statistics come from small crops.
    frozen_bn: bool | None = None
    min_size: int = 800  # images are resized so the short side is min_size ...
    max_size: int = 1333  # ... and the long side at most max_size
    # Multi-scale training: each training image's short side drawn from these sizes (long side still <= max_size);
    # evaluation and prediction use min_size. The official LGD recipe draws from 640-800 in steps of 32, Deformable
    # DETR's from 480-800.
    train_sizes: list[int] | None = None
    train_max_size: int | None = None  # long-side cap in training (None: max_size); IDa-Det's code: 1500
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
    amp: AmpMode = "auto"
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
    # auto: measure each kd term against the detection loss over the first calibrate_iters steps (terms not applied
    # meanwhile), then fix its weight so the terms together are calibrate_share of it (see detkd/calibration.py)
    calibrate: Literal["off", "auto"] = "off"
    calibrate_iters: int = 20
    calibrate_share: float = 0.5
    calibrate_exclude: list[str] = field(default_factory=list)  # method.term kept at weight 1


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# A dataset folder may carry the settings it was made for (``detkd data digits`` writes them): a YAML file of
# overrides applied under the user's --config and key=value pairs.
DATASET_SETTINGS = "detkd.yaml"


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
    obj = cls(**kwargs)
    return check_ranges(obj) if cls is Config else obj


def _range_errors(cfg: Config) -> list[str]:
    """One sentence per numeric field whose value is outside its valid range."""
    d, m, o, t, k = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.distill
    errors = []

    def need(ok: bool, key: str, rule: str, value: Any) -> None:
        if not ok:
            errors.append(f"{key} must be {rule}, got {value!r}.")

    need(d.batch_size >= 1, "data.batch_size", ">= 1", d.batch_size)
    need(d.workers >= 0, "data.workers", ">= 0", d.workers)
    need(0.0 <= d.hflip <= 1.0, "data.hflip", "a probability in [0, 1]", d.hflip)
    jitter = d.scale_jitter
    need(
        jitter is None or (len(jitter) == 2 and 0 < jitter[0] <= jitter[1]),
        "data.scale_jitter",
        "[low, high] with 0 < low <= high",
        jitter,
    )
    need(
        d.val_max_images is None or d.val_max_images >= 1,
        "data.val_max_images",
        ">= 1 (or null for all)",
        d.val_max_images,
    )
    need(m.min_size >= 1, "model.min_size", ">= 1", m.min_size)
    need(m.max_size >= max(1, m.min_size), "model.max_size", f">= model.min_size ({m.min_size})", m.max_size)
    if m.train_sizes is not None:
        need(
            len(m.train_sizes) > 0 and all(isinstance(s, int) and s >= 1 for s in m.train_sizes),
            "model.train_sizes",
            "a non-empty list of sizes >= 1 (or null)",
            m.train_sizes,
        )
    if m.train_max_size is not None:
        need(m.train_max_size >= 1, "model.train_max_size", ">= 1 (or null)", m.train_max_size)
    need(m.fpn_channels is None or m.fpn_channels >= 1, "model.fpn_channels", ">= 1 (or null)", m.fpn_channels)
    need(o.lr > 0, "optim.lr", "> 0", o.lr)
    need(0.0 <= o.momentum < 1.0, "optim.momentum", "in [0, 1)", o.momentum)
    need(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    need(all(0.0 < s <= 1.0 for s in o.steps), "optim.steps", "fractions of train.iters in (0, 1]", o.steps)
    need(o.gamma > 0, "optim.gamma", "> 0", o.gamma)
    need(o.warmup_iters >= 0, "optim.warmup_iters", ">= 0", o.warmup_iters)
    need(0.0 < o.warmup_factor <= 1.0, "optim.warmup_factor", "in (0, 1]", o.warmup_factor)
    need(o.clip_grad_norm is None or o.clip_grad_norm > 0, "optim.clip_grad_norm", "> 0 (or null)", o.clip_grad_norm)
    need(
        o.clip_grad_value is None or o.clip_grad_value > 0, "optim.clip_grad_value", "> 0 (or null)", o.clip_grad_value
    )
    for key, mult in o.lr_mult.items():
        need(mult >= 0, f"optim.lr_mult.{key}", ">= 0", mult)
    need(t.iters >= 1, "train.iters", ">= 1", t.iters)
    need(t.eval_every >= 0, "train.eval_every", ">= 0 (0 = only at the end)", t.eval_every)
    need(t.ckpt_every >= 0, "train.ckpt_every", ">= 0 (0 = only at the end)", t.ckpt_every)
    need(t.log_every >= 1, "train.log_every", ">= 1", t.log_every)
    need(t.seed >= 0, "train.seed", ">= 0", t.seed)
    need(t.max_nonfinite >= 1, "train.max_nonfinite", ">= 1", t.max_nonfinite)
    need(t.threads is None or t.threads >= 1, "train.threads", ">= 1 (or null for torch's default)", t.threads)
    for key, weight in k.weights.items():
        need(weight >= 0, f"distill.weights.{key}", ">= 0", weight)
    need(k.check_teacher >= 0, "distill.check_teacher", ">= 0 (0 = skip)", k.check_teacher)
    return errors


def check_ranges(cfg: Config) -> Config:
    """Check every numeric field's range; all bad values are named at once, one sentence each.

    Raises:
        ConfigError: a value is out of range (e.g. ``optim.lr`` <= 0, ``train.iters`` < 1).
    """
    errors = _range_errors(cfg)
    if errors:
        raise ConfigError(" ".join(errors))
    return cfg


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
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: Config | None = None,
    *,
    dataset_settings: bool = False,
    layers: list[str] | None = None,
) -> Config:
    """Defaults (or ``base``), then the YAML file, then the dotted overrides.

    Args:
        path: YAML file of overrides.
        overrides: ``key=value`` pairs, applied last.
        base: start from this config instead of the defaults.
        dataset_settings: between the defaults and the YAML file, apply the dataset's own settings file
            (``<data.root>/detkd.yaml``, see :data:`DATASET_SETTINGS`) when there is one; ``data.root`` is read
            from the file and overrides.
        layers: if given, receives the names of the layers applied, lowest first (for ``--print-config``).
    """
    upper: dict[str, Any] = {}
    names = ["base config" if base is not None else "defaults"]
    if path is not None:
        upper = _merge(upper, read_yaml(path))
    pairs = parse_overrides(overrides) if overrides else {}
    data = to_dict(base or Config())
    if dataset_settings:
        root = _merge(_merge(data, upper), pairs)["data"]["root"]
        settings = Path(str(root)) / DATASET_SETTINGS
        if settings.is_file():
            dataset = read_yaml(settings)
            if "data" in dataset and isinstance(dataset["data"], dict) and "root" in dataset["data"]:
                raise ConfigError(f"{settings}: a dataset's settings cannot set data.root")
            data = _merge(data, dataset)
            names.append(str(settings))
    if path is not None:
        data = _merge(data, upper)
        names.append(str(path))
    if pairs:
        data = _merge(data, pairs)
        names.append("command line")
    if layers is not None:
        layers[:] = names
    return from_dict(Config, data)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
