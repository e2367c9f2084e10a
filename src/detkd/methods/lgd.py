"""LGD: Label-guided Self-distillation for Object Detection (Zhang et al., AAAI 2022, arXiv 2109.11496).

There is no pretrained teacher. An *implicit* teacher is built from the ground-truth labels and the student's own
FPN maps, trained end to end with the student, and dropped at inference (it is never part of the exported
student). Per batch:

1. every object becomes a label descriptor: its box normalised to [0, 1] and its one-hot class, rescaled to
   [-1, 1]; optionally one *context* object per image (the whole image, all-zero class);
2. a PointNet-style **label encoder** (two spatial-transformer blocks, per-object MLPs and a max over the objects
   of each image) turns descriptors into label embeddings;
3. the **appearance encoder** averages the projected student map inside each box, on every level;
4. the **inter-object relation adapter**, one multi-head attention, uses the appearance as query and the label
   embeddings as key and value, only among objects of the same image;
5. the **intra-object knowledge mapper** paints each object's output into its box (overlaps summed), adds the
   context vector everywhere and refines with convs: one teacher map ``T_l`` per FPN level, shaped like ``S_l``.

The teacher maps go through the student's own head with the ground-truth loss (``loss_teacher_det``, the paper's
``L_det^I``; it is the only loss the teacher modules learn from, and it is not a distillation term: it is weighted by
``term_weights.loss_teacher_det`` alone, never by ``distill.weights.lgd`` or the schedule), and the student
imitates them:
``kd_feat = mean over every cell of every level of (IN(sg(T)) - IN(A(S)))^2``, with ``IN`` an instance norm and
``A`` an adapter of three 3x3 convs shared across levels.

Recipe phases, as fractions of the run (``train.iters``, read from the run context in ``on_epoch_start``; when
no context was given, no phase applies: nothing is frozen and the student is distilled from step 0), or in
iterations (``freeze_backbone_iters``, ``adapter_only_iters``, ``late_stop_iters``: when set, each replaces its
fraction; the official configs give iterations, e.g. 20000 / 30000 of a 180000-step run):

- ``freeze_backbone_frac`` (default 20k/180k as in the official configs): the student's bottom-up backbone gets
  no update (its gradients are dropped before the optimiser step, so neither momentum nor weight decay moves it);
  the FPN, head and teacher train. With a randomly initialised backbone this only delays learning: set 0.
- ``adapter_only_frac`` (default 30k/180k): ``kd_feat`` trains only the adapter (the student maps are detached).
- ``late_stop_frac`` (default 0; the X-101-DCN configs stop at 130k of 180k, 50/180): the last fraction of the
  run is again adapter-only.

Gradient clipping is the run's ``optim.clip_grad_value``: the official recipe clips every gradient element to
+-1 and clips no norm (``configs/official/lgd_retinanet.yaml``: ``clip_grad_value: 1.0``, ``clip_grad_norm:
null``). A norm clip acts on the combined gradient of student, implicit teacher and adapter, so while it is active
(at initialisation) the teacher's gradient shrinks the student's step. ``configs/retinanet_r18_lgd.yaml`` keeps
detkd's norm clipping (10) as a guard besides the value clip: trained from scratch at LR 0.02, a slim RetinaNet once
had a spike of its classification loss when the teacher began to matter, which value clipping alone let diverge and
norm clipping absorbed. A fair baseline uses the same clipping.

Options (official code = the megvii-research/LGD configs):

- ``context_box``: add the context object. None (default) follows the official configs: on for one-stage
  students (RetinaNet; FCOS R-101+), off for two-stage ones (Faster R-CNN; also FCOS R-50 officially).
- ``detach_appearance``: stop the teacher's gradient into the student maps it pools. None (default) follows the
  official configs: detached for two-stage students, not for one-stage ones.
- ``normalise_by``: ``padded`` (official code) normalises descriptors by the padded batch size, so an object's
  descriptor depends on the batch's padding; ``image`` divides by the object's own image size. Masks are always
  computed on the padded grid, as the features are.
- ``heads`` (8), ``encoder_dims`` (per-object widths 64, 128, 1024) and ``stn_dims`` (spatial transformers:
  64, 128, 1024, 512, 256): the official sizes. ``stn=False`` drops both spatial transformers. The embedding
  width is the FPN's, from ``feature_info``; the number of classes is the detector's.
- ``adapter_layers`` (3): convs in the student-side adapter.
- ``teacher_lr_scale`` (1) and ``teacher_weight_decay`` (None = the optimiser's, applied to every teacher
  parameter as the official code does): the teacher modules' own parameter group (officially a second optimiser
  with the same settings).
- ``pooling``: ``per_image`` (default; the official code pools and paints image by image) or ``batched`` (one
  matmul over the whole batch through a block matrix of ``objects x images x cells``, whose memory grows with the
  square of the batch size). Both give the same result up to float rounding.

Deviations: an image without boxes has no object token (the official code inserts a 1-pixel dummy box); its
teacher map is then the context term alone, or the refined constant map when the context box is off. A cell is
inside a box when ``2|c - i| <= size`` (the code's ``|c - i| / size <= 0.5`` without the division; zero-size boxes
cover no cell in both). The instance norm of a 1x1 map (P7 of a small input) is 0 instead of an error. Faster
R-CNN's teacher pass runs its own RPN and RoI sampling, as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.errors import BuildError, ConfigError
from detkd.methods.base import Distiller, MethodConfig, RunContext
from detkd.methods.connectors import Connector
from detkd.models.outputs import BackboneDetector, DenseHead, Detector, DetOutputs, TwoStageHead


@dataclass
class LGDConfig(MethodConfig):
    context_box: bool | None = None
    detach_appearance: bool | None = None
    normalise_by: Literal["padded", "image"] = "padded"
    heads: int = 8
    stn: bool = True
    encoder_dims: list[int] = field(default_factory=lambda: [64, 128, 1024])
    stn_dims: list[int] = field(default_factory=lambda: [64, 128, 1024, 512, 256])
    adapter_layers: int = 3
    freeze_backbone_frac: float = 20 / 180
    adapter_only_frac: float = 30 / 180
    late_stop_frac: float = 0.0
    freeze_backbone_iters: int | None = None  # when set, replaces freeze_backbone_frac (official: 20000)
    adapter_only_iters: int | None = None  # when set, replaces adapter_only_frac (official: 30000)
    late_stop_iters: int | None = None  # when set, replaces late_stop_frac (official X-101-DCN: 50000)
    pooling: Literal["per_image", "batched"] = "per_image"
    teacher_lr_scale: float = 1.0
    teacher_weight_decay: float | None = None


# --------------------------------------------------------------------------------------------- pure-tensor parts


def label_descriptors(
    boxes: list[Tensor],
    labels: list[Tensor],
    num_classes: int,
    batch_shape: tuple[int, int],
    context: bool,
    image_sizes: list[tuple[int, int]] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Descriptors of every object of the batch, in image order (each image's boxes, then its context object).

    Args:
        boxes: per image ``[N, 4]`` xyxy in padded-batch pixels.
        labels: per image ``[N]`` in ``1..num_classes``.
        num_classes: ``C``.
        batch_shape: ``(H, W)`` of the padded batch; boxes are clamped to ``[0, W-1] x [0, H-1]``.
        context: append one context object per image (box = the whole padded image, all-zero class).
        image_sizes: per image ``(h, w)`` to normalise by instead of the padded size.

    Returns:
        descriptors ``[T, 4 + C]`` in [-1, 1], clamped boxes ``[T, 4]`` (pixels), image index ``[T]`` and a
        context flag ``[T]``.
    """
    height, width = batch_shape
    device = boxes[0].device if boxes else torch.device("cpu")
    rows, raw, image, is_ctx = [], [], [], []
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        b = b.float().reshape(-1, 4)
        onehot = F.one_hot(lab.long().reshape(-1) - 1, num_classes).float() if len(b) else b.new_zeros(0, num_classes)
        flags = torch.zeros(len(b), dtype=torch.bool, device=device)
        if context:
            b = torch.cat([b, b.new_tensor([[0.0, 0.0, width, height]])])
            onehot = torch.cat([onehot, onehot.new_zeros(1, num_classes)])
            flags = torch.cat([flags, flags.new_ones(1)])
        b = torch.minimum(b.clamp(min=0), b.new_tensor([width - 1, height - 1] * 2))
        h, w = image_sizes[i] if image_sizes is not None else (height, width)
        unit = (b / b.new_tensor([w, h, w, h])).clamp(0, 1)
        rows.append(torch.cat([unit, onehot], 1) * 2 - 1)
        raw.append(b)
        image.append(torch.full((len(b),), i, dtype=torch.int64, device=device))
        is_ctx.append(flags)
    if not rows:
        empty = torch.zeros(0, device=device)
        return empty.view(0, 4 + num_classes), empty.view(0, 4), empty.long(), empty.bool()
    return torch.cat(rows), torch.cat(raw), torch.cat(image), torch.cat(is_ctx)


def cell_masks(boxes: Tensor, batch_shape: tuple[int, int], level_shape: tuple[int, int]) -> Tensor:
    """Which cells of a level each box covers, ``[N, h, w]`` (float 0/1), as the official ``get_inside_gt_mask``.

    The box is scaled by ``(h / H, w / W)`` (level over padded batch size) and cell ``(y, x)`` is inside when
    ``|y_c - y| <= box_h / 2`` and ``|x_c - x| <= box_w / 2`` with **integer** cell indices (no +0.5 centre), so
    masks lean half a cell towards the origin; a small box can cover no cell on a coarse level.

    Args:
        boxes: ``[N, 4]`` xyxy in padded-batch pixels.
        batch_shape: ``(H, W)`` of the padded batch.
        level_shape: ``(h, w)`` of the level.
    """
    h, w = level_shape
    b = boxes.float() * boxes.new_tensor([w / batch_shape[1], h / batch_shape[0]] * 2).float()
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32)
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32)
    in_y = (2 * (cy[:, None] - ys).abs() <= bh[:, None]) & (bh[:, None] > 0)  # [N, h]
    in_x = (2 * (cx[:, None] - xs).abs() <= bw[:, None]) & (bw[:, None] > 0)  # [N, w]
    return (in_y[:, :, None] & in_x[:, None, :]).float()


def same_image_mask(image_index: Tensor) -> Tensor:
    """Attention mask ``[T, T]``, True where query and key belong to different images (blocked)."""
    return image_index[:, None] != image_index[None, :]


def instance_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``InstanceNorm2d(affine=False)`` in fp32, ``[B, C, H, W]``; a 1x1 map (P7 of a small input) becomes 0
    instead of raising as torch's does in training mode."""
    var, mean = torch.var_mean(x.float(), dim=(-2, -1), correction=0, keepdim=True)
    return (x.float() - mean) * torch.rsqrt(var + eps)


def instance_norm_mse(t_maps: list[Tensor], s_maps: list[Tensor]) -> Tensor:
    """Mean over every element of every level of ``(IN(t) - IN(s))^2``: the levels concatenated, each cell
    weighted equally (so high-resolution levels dominate, as in the official code). fp32."""
    total, count = t_maps[0].new_zeros((), dtype=torch.float32), 0
    for t, s in zip(t_maps, s_maps):
        total = total + (instance_norm(t) - instance_norm(s)).pow(2).sum()
        count += t.numel()
    return total / max(1, count)


def lgd_phases(step: int, total: int | None, cfg: LGDConfig) -> tuple[bool, bool]:
    """``(backbone frozen, student distilled)`` at ``step`` of a ``total``-step run (no phases when unknown)."""
    if total is None:
        return False, True

    def length(iters: int | None, frac: float) -> int:
        return int(iters) if iters is not None else round(frac * total)

    frozen = step < length(cfg.freeze_backbone_iters, cfg.freeze_backbone_frac)
    distilled = step >= length(cfg.adapter_only_iters, cfg.adapter_only_frac)
    late = length(cfg.late_stop_iters, cfg.late_stop_frac)
    if late > 0:
        distilled &= step < total - late
    return frozen, distilled


def pool_objects(cells: Tensor, image_index: Tensor, maps: Tensor, per_image: bool = True) -> Tensor:
    """Sum of each object's cells on its own image's map, ``[T, C]``.

    Args:
        cells: ``[T, h*w]`` cell weights of the objects, in image order (as :func:`label_descriptors` gives them).
        image_index: ``[T]`` image of each object.
        maps: ``[B, C, h, w]``.
        per_image: one small matmul per image (memory ``O(T * h * w)``); False builds a ``[T, B * h * w]`` block
            matrix and does one matmul for the batch (memory ``O(T * B * h * w)``).
    """
    num_images, channels = maps.shape[:2]
    flat = maps.flatten(2).transpose(1, 2)  # [B, h*w, C]
    cells = cells.to(maps.dtype)
    if not per_image:
        block = cells.new_zeros(len(cells), num_images, cells.shape[1])
        block[torch.arange(len(cells), device=cells.device), image_index] = cells
        return block.flatten(1) @ flat.reshape(-1, channels)
    counts = torch.bincount(image_index, minlength=num_images).tolist()
    return torch.cat([c @ flat[i] for i, c in enumerate(cells.split(counts))])


def render_objects(
    cells: Tensor, image_index: Tensor, values: Tensor, num_images: int, per_image: bool = True
) -> Tensor:
    """Paint each object's ``[C]`` value into its cells of its own image (overlaps add up): ``[B, h*w, C]``.

    Args:
        cells: ``[T, h*w]`` in image order; image_index: ``[T]``; values: ``[T, C]``; per_image: as
            :func:`pool_objects`.
    """
    cells = cells.to(values.dtype)
    if not per_image:
        block = cells.new_zeros(len(cells), num_images, cells.shape[1])
        block[torch.arange(len(cells), device=cells.device), image_index] = cells
        return (block.flatten(1).t() @ values).view(num_images, cells.shape[1], values.shape[1])
    counts = torch.bincount(image_index, minlength=num_images).tolist()
    return torch.stack([c.t() @ v for c, v in zip(cells.split(counts), values.split(counts))])


# --------------------------------------------------------------------------------------------------- modules


def _mlp(dims: list[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))


def _ln_relu(x: Tensor) -> Tensor:
    # The official code's norms are all LayerNorms without affine parameters.
    return F.relu(F.layer_norm(x, x.shape[-1:]))


class TransformNet(nn.Module):
    """PointNet's spatial transformer on one-point sets: per object a ``k x k`` matrix from an MLP
    ``k -> dims -> k*k`` (LayerNorm + ReLU between layers). As in the official code, no identity is added."""

    def __init__(self, k: int, dims: list[int]):
        super().__init__()
        self.k = k
        self.layers = _mlp([k, *dims, k * k])

    def forward(self, x: Tensor) -> Tensor:
        """``[T, k]`` -> ``[T, k, k]``."""
        for layer in self.layers[:-1]:
            x = _ln_relu(layer(x))
        return self.layers[-1](x).view(-1, self.k, self.k)


class LabelEncoder(nn.Module):
    """PointNet-style encoder of the label descriptors (every object is one point of length 1).

    ``x = d STN(d)``; ``f = h1 STN(h1)`` with ``h1 = MLP(x)``; ``h3 = MLP(f)``; ``g`` = max of ``h3`` over the
    objects of the image; ``e = MLP([f, g])``. The max over each image is the only set-level operation.

    Args:
        in_dim: descriptor length ``4 + C``.
        out_dim: embedding width (the FPN's).
        dims: per-object widths ``[local, mid, global]`` (official 64, 128, 1024).
        stn_dims: hidden widths of both transformers (official 64, 128, 1024, 512, 256), or None for none.
    """

    def __init__(self, in_dim: int, out_dim: int, dims: list[int], stn_dims: list[int] | None):
        super().__init__()
        local, mid, wide = dims
        self.stn_in = TransformNet(in_dim, stn_dims) if stn_dims else None
        self.stn_local = TransformNet(local, stn_dims) if stn_dims else None
        self.local = nn.Linear(in_dim, local)
        self.mid = nn.Linear(local, mid)
        self.wide = nn.Linear(mid, wide)
        self.fuse = nn.Linear(local + wide, out_dim)

    def forward(self, desc: Tensor, image_index: Tensor, num_images: int) -> Tensor:
        """``[T, 4 + C]`` descriptors, ``[T]`` image index -> ``[T, out_dim]``."""
        x = desc
        if self.stn_in is not None:
            x = torch.bmm(x[:, None], self.stn_in(x))[:, 0]
        f = _ln_relu(self.local(x))  # [T, 64]
        if self.stn_local is not None:
            f = torch.bmm(f[:, None], self.stn_local(f))[:, 0]
        h = _ln_relu(self.wide(_ln_relu(self.mid(f))))  # [T, 1024], >= 0
        index = image_index[:, None].expand_as(h)
        g = h.new_zeros(num_images, h.shape[1]).scatter_reduce(0, index, h, "amax", include_self=False)
        return _ln_relu(self.fuse(torch.cat([f, g[image_index]], 1)))


class LabelGuidedTeacher(nn.Module):
    """The implicit teacher: label encoder, appearance encoder, relation adapter and knowledge mapper.

    All modules are shared across levels. ``forward`` returns one map per student level, shaped like it.

    Args:
        channels: FPN width.
        num_classes: ``C``.
        context_box: add one context object per image.
        detach_appearance: pool appearance from detached student maps.
        normalise_by: ``padded`` or ``image`` (descriptor normalisation).
        heads: attention heads.
        encoder_dims: label-encoder widths.
        stn_dims: spatial-transformer widths, or None.
        per_image: pool and paint image by image (see :func:`pool_objects`).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        context_box: bool,
        detach_appearance: bool,
        normalise_by: str,
        heads: int,
        encoder_dims: list[int],
        stn_dims: list[int] | None,
        per_image: bool = True,
    ):
        super().__init__()
        self.num_classes, self.context_box, self.detach_appearance = num_classes, context_box, detach_appearance
        self.per_image = per_image
        self.normalise_by = normalise_by
        self.label_encoder = LabelEncoder(4 + num_classes, channels, encoder_dims, stn_dims)
        self.label_proj = nn.Linear(channels, channels)
        self.appearance_proj = nn.Conv2d(channels, channels, 3, padding=1)
        self.attention = nn.MultiheadAttention(channels, heads)
        self.object_proj = nn.Linear(channels, channels)
        self.render_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.context_proj = nn.Linear(channels, channels)

        def block(relu: bool) -> list[nn.Module]:
            layers = [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels, affine=False)]
            return [*layers, nn.ReLU(inplace=True)] if relu else layers

        self.refine = nn.Sequential(*block(True), *block(True), *block(False))

    def objects(
        self, targets: list[dict[str, Tensor]], batch_shape: tuple[int, int], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Descriptors, clamped boxes, image index and context flag of the batch's objects (no gradient)."""
        with torch.no_grad():
            return label_descriptors(
                [t["boxes"] for t in targets],
                [t["labels"] for t in targets],
                self.num_classes,
                batch_shape,
                self.context_box,
                image_sizes if self.normalise_by == "image" else None,
            )

    def forward(
        self,
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        batch_shape: tuple[int, int],
        image_sizes: list[tuple[int, int]],
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Teacher maps ``{level: [B, C, h, w]}`` and numbers for logging."""
        first = next(iter(features.values()))
        num_images, channels = first.shape[:2]
        desc, boxes, image_index, is_ctx = self.objects(targets, batch_shape, image_sizes)
        desc = desc.to(first.device)
        count = len(desc)
        stats = {"objects": float((~is_ctx).sum())}
        if count == 0:
            # No object and no context token anywhere: nothing is rendered, every map starts from zeros.
            zeros = {lv: f.new_zeros(f.shape) for lv, f in features.items()}
            return {lv: self.refine(F.relu(self.render_conv(z))) for lv, z in zeros.items()}, stats

        label = _ln_relu(self.label_proj(self.label_encoder(desc, image_index, num_images)))  # [T, C]
        appearance, masks = [], []
        for feat in features.values():
            feat = feat.detach() if self.detach_appearance else feat
            proj = F.relu(F.group_norm(self.appearance_proj(feat), 1))  # [B, C, h, w]
            cells = cell_masks(boxes, batch_shape, tuple(feat.shape[-2:])).flatten(1)  # [T, h*w]
            cells[is_ctx] = 1.0  # the context object covers the whole padded map
            pooled = pool_objects(cells, image_index, proj, self.per_image)  # [T, C]
            appearance.append(pooled / cells.sum(1, keepdim=True).clamp(min=1.0).to(pooled.dtype))
            masks.append(cells)
        if (~is_ctx).any():
            stats["empty_boxes_coarsest"] = float((masks[-1][~is_ctx].sum(1) == 0).float().mean())

        # Every level at once: sequence = the T objects, batch = the levels. Query = appearance (student),
        # key = value = label embedding; objects of different images never attend to each other.
        query = torch.stack(appearance, 1)  # [T, L, C]
        memory = label[:, None].expand(-1, len(appearance), -1).to(query.dtype)
        out, _ = self.attention(query, memory, memory, attn_mask=same_image_mask(image_index), need_weights=False)

        maps = {}
        for i, (level, feat) in enumerate(features.items()):
            o = out[:, i]  # [T, C]
            painted = self.object_proj(o)
            cells = masks[i] * (~is_ctx)[:, None].to(masks[i].dtype)  # context objects are not painted
            h, w = feat.shape[-2:]
            # Overlapping boxes add up (no division by the number of boxes), as in the official code.
            rendered = render_objects(cells, image_index, painted, num_images, self.per_image)
            rendered = rendered.view(num_images, h, w, channels).permute(0, 3, 1, 2)
            u = self.render_conv(rendered.contiguous())
            if self.context_box:
                u = u + self.context_proj(o[is_ctx])[:, :, None, None]  # one context object per image, in order
            maps[level] = self.refine(F.relu(u))
        return maps, stats


class LGD(Distiller):
    name = "lgd"
    summary = "label-guided self-distillation: a teacher built from labels + student features (Zhang et al. 2022)"
    Config = LGDConfig
    needs_teacher = False
    heads = (TwoStageHead, DenseHead)
    benchmark_goal = True  # teacher-free: no gap to close
    # The context projection exists whatever context_box says and gets no gradient when it is off (the two-stage
    # default).
    has_unused_parameters = True
    own_losses = ("loss_teacher_det",)

    def __init__(self, cfg: LGDConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        widths = {f.channels for f in student.feature_info}
        if len(widths) != 1:
            raise BuildError(
                "lgd shares its modules across FPN levels and needs one width; the student has "
                + ", ".join(f"{f.name}[{f.channels}ch]" for f in student.feature_info)
            )
        channels = widths.pop()
        if channels % cfg.heads:
            raise ConfigError(f"lgd.heads={cfg.heads} must divide the FPN width {channels}")
        if len(cfg.encoder_dims) != 3:
            raise ConfigError(f"lgd.encoder_dims needs 3 widths (local, mid, global), got {cfg.encoder_dims}")
        if cfg.freeze_backbone_frac > 0 and not isinstance(student, BackboneDetector):
            raise BuildError(f"lgd cannot find the bottom-up backbone of {type(student).__name__} to freeze")
        two_stage = student.head_type is TwoStageHead
        self.label_teacher = LabelGuidedTeacher(
            channels,
            student.num_classes,
            context_box=not two_stage if cfg.context_box is None else cfg.context_box,
            detach_appearance=two_stage if cfg.detach_appearance is None else cfg.detach_appearance,
            normalise_by=cfg.normalise_by,
            heads=cfg.heads,
            encoder_dims=list(cfg.encoder_dims),
            stn_dims=list(cfg.stn_dims) if cfg.stn else None,
            per_image=cfg.pooling == "per_image",
        )
        spec = student.feature_info[0]
        self.adapter = Connector(spec, spec, kernel=3, layers=cfg.adapter_layers)  # shared across levels
        self.total_iters: int | None = None

    def on_epoch_start(self, epoch: int, context: RunContext | None) -> None:
        self.total_iters = int(context.total_iters) if context is not None else None

    def phases(self, step: int) -> tuple[bool, bool]:
        """``(backbone frozen, student distilled)`` at ``step``."""
        return lgd_phases(step, self.total_iters, self.cfg)

    def teacher_maps(self, student: DetOutputs, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        maps, stats = self.label_teacher(student.features, targets, student.batch_shape, student.image_sizes)
        self.stats.update(stats)
        return maps

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        maps = self.teacher_maps(student, targets)
        det, _ = self.student.head_losses(maps, student.images, targets)
        for key, value in det.items():
            self.stats[f"teacher_det.{key}"] = float(value.detach())
        frozen, distilled = self.phases(step)
        s_maps = [self.adapter(f if distilled else f.detach()) for f in student.features.values()]
        # The teacher learns only from its detection loss; the distillation term never reaches it.
        kd_feat = instance_norm_mse([m.detach() for m in maps.values()], s_maps)
        self.stats.update({"phase.frozen": float(frozen), "phase.distilled": float(distilled)})
        return {"loss_teacher_det": torch.stack([v.float() for v in det.values()]).sum(), "kd_feat": kd_feat}

    def before_optimizer_step(self, step: int) -> None:
        if self.phases(step)[0]:
            for p in self.student.backbone_body().parameters():
                p.grad = None

    def optim_groups(self) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": list(self.label_teacher.parameters()), "lr_scale": self.cfg.teacher_lr_scale}
        if self.cfg.teacher_weight_decay is not None:
            group["weight_decay"] = self.cfg.teacher_weight_decay
        return [group]

    @torch.no_grad()
    def visualize(
        self, image: Tensor, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]]
    ) -> dict[str, Any]:
        """Channel norms of the teacher map and the student map on the finest level, over the first image."""
        from detkd.viz import draw_boxes, overlay_mask, tile, to_uint8

        maps = self.teacher_maps(student, targets)
        level = next(iter(maps))
        h, w = student.image_sizes[0]
        batch_h, batch_w = student.batch_shape
        base = draw_boxes(to_uint8(image), targets[0]["boxes"], color=(255, 255, 255))
        panels = [base]
        for m in (maps[level][0], student.features[level][0]):
            norm = m.float().norm(dim=0)
            norm = norm[: -(-norm.shape[0] * h // batch_h), : -(-norm.shape[1] * w // batch_w)]
            norm = (norm - norm.min()) / (norm.max() - norm.min()).clamp(min=1e-6)
            panels.append(overlay_mask(base, norm, alpha=0.7))
        return {f"lgd_{level}_teacher_vs_student": tile(panels, columns=3)}
