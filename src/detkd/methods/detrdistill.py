"""DETRDistill: A Universal Knowledge Distillation Framework for DETR-families (Chang et al., ICCV 2023,
arXiv 2211.10156).

A DETR's predictions are a set, and the order of its queries means nothing, so a student query cannot simply
imitate the teacher query with the same index. DETRDistill distils three things, at every decoder layer:

- **Hungarian-matching logits distillation (LD)**: the student's predictions are matched one-to-one to the
  teacher's by a Hungarian assignment (soft-label cost + L1 + GIoU), and each matched pair is pulled together:
  the teacher's sigmoid scores as soft targets, its boxes as box targets.
- **Target-aware feature distillation (FD)**: the neck maps (the transformer's inputs) are imitated under a mask
  built from the teacher's own queries: the cosine similarity of each selected query with every cell, weighted
  by the query's quality (class score x IoU with the ground truth), summed, floored and max-normalised.
- **Query-prior assignment distillation (AD)**: the teacher's learned queries (detached) run through the
  student's decoder as a second, training-only group, supervised with the teacher's own Hungarian assignment of
  those queries to the ground truth (no re-matching), which gives the student a stable assignment to learn from.

The official code adds a fourth term, a contrastive (InfoNCE) loss between the student's decoder embeddings
and the teacher's ones matched to them by LD, through trainable projection heads.

Options (defaults follow the official code unless noted):

- ``mode``: ``soft_all`` (default, official code: one soft matching over all predictions, soft-target
  classification on every pair, boxes on every pair; unmatched student rows, when the student has more queries,
  get background targets) or ``pos_neg`` (paper reading, reconstructed: the teacher predictions assigned to the
  ground truth are pseudo ground truth for a standard Hungarian loss with focal classification and the teacher's
  argmax labels; the remaining student queries are matched box-only to the remaining teacher predictions and
  learn their boxes).
- ``ld_cost``: LD's matching weights (class, L1, GIoU), default 1 / 5 / 2. The classification loss is the
  official soft-target binary cross-entropy minus the teacher's entropy, i.e. a Bernoulli KL divergence: the
  same gradients, and zero when the student equals the teacher.
- ``clamp_teacher_boxes``: True (official code) clips the teacher's box targets to the image; then a student
  identical to its teacher still has small box terms where the teacher's boxes leave the image. False keeps them.
- ``fd_topk`` (100), ``fd_floor`` (0.01): queries selected per image (over queries x classes, so a query may be
  picked once per class) and the mask's floor. ``mask_padding``: False (official: padded cells count in the
  mean) or True (only image cells). ``fd_kernel``: None = identity between equal widths (official: both 256),
  a 1x1 conv otherwise; 1 or 3 forces a conv. ``fd_levels``: levels to imitate (default: all shared).
  ``fd_source``: ``neck`` (default, official code: the encoder's inputs) or ``memory`` (the paper's wording,
  "encoder features": the encoder's output, cut back into its levels).
- ``use_ld``, ``use_fd``, ``use_ad``, ``use_query_contrast``: switch each part (all on; the contrastive term is
  on for parity with the official code, which is not one of the paper's three components).
- ``ad_projection``: AD needs the teacher's queries in the student's format and width; False raises a
  BuildError when they differ, True learns a linear projection (not in the paper).
- ``layer_mapping``: which teacher layer each student layer learns from when the depths differ: ``last``
  (default; aligns the last layers, student k <-> teacher K_T - K_S + k; the paper's mapping is unknown) or
  ``first`` (official code: same index). ``teacher_layers`` lists one teacher layer per student layer
  explicitly (-1: none).
- ``contrast_dim`` (512), ``contrast_temperature`` (0.07): the contrastive heads.
- ``contrast_direction``: ``teacher_to_student`` (default, the official code: logits ``T S^T``, each teacher
  embedding picks its matched student embedding among the student rows) or ``student_to_teacher`` (``S T^T``, each
  student embedding picks its teacher; detkd's default before this option existed). The two differ in which
  softmax normalises the logits, i.e. which side supplies the negatives.

Terms (unweighted, summed over the paired layers): ``kd_ld_cls``, ``kd_ld_bbox``, ``kd_ld_giou`` (and in
``pos_neg`` mode ``kd_ld_neg_bbox``, ``kd_ld_neg_giou``), ``kd_feat``, ``kd_ad_cls``, ``kd_ad_bbox``,
``kd_ad_giou``, ``kd_contrast``. Default ``term_weights`` are the official ones: LD 1 / 5 / 2 (focal 2 in
``pos_neg``), FD 1, AD 2 / 5 / 2, contrast 0.2; the paper's lambda_LD, lambda_FD, lambda_AD and lambda_CL (1 by
default) are these weights scaled. A partial ``term_weights`` override keeps the defaults of the terms it does
not name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss

from detkd.errors import BuildError, ConfigError
from detkd.methods.base import Distiller, MethodConfig
from detkd.methods.connectors import Connector, pair_levels
from detkd.models.detr.criterion import num_boxes, set_losses
from detkd.models.detr.matcher import (
    Assignment,
    HungarianMatcher,
    box_cost,
    cxcywh_to_pixel_xyxy,
    image_wh,
    normalize_targets,
    solve,
)
from detkd.models.detr.neck import level_masks, padding_mask
from detkd.models.outputs import Detector, DetOutputs, SetDetector, SetHead

DEFAULT_WEIGHTS = {
    "kd_ld_cls": 1.0,
    "kd_ld_bbox": 5.0,
    "kd_ld_giou": 2.0,
    "kd_ld_neg_bbox": 5.0,
    "kd_ld_neg_giou": 2.0,
    "kd_feat": 1.0,
    "kd_ad_cls": 2.0,
    "kd_ad_bbox": 5.0,
    "kd_ad_giou": 2.0,
    "kd_contrast": 0.2,
}


@dataclass
class DETRDistillConfig(MethodConfig):
    term_weights: dict[str, float] = field(default_factory=dict)  # merged over DEFAULT_WEIGHTS
    mode: Literal["soft_all", "pos_neg"] = "soft_all"
    ld_cost: list[float] = field(default_factory=lambda: [1.0, 5.0, 2.0])  # class, L1, GIoU
    clamp_teacher_boxes: bool = True
    use_ld: bool = True
    use_fd: bool = True
    use_ad: bool = True
    use_query_contrast: bool = True
    fd_topk: int = 100
    fd_floor: float = 0.01
    fd_source: Literal["neck", "memory"] = "neck"
    fd_levels: list[str] | None = None
    fd_kernel: int | None = None
    mask_padding: bool = False
    ad_projection: bool = False
    layer_mapping: Literal["last", "first"] = "last"
    teacher_layers: list[int] | None = None
    contrast_dim: int = 512
    contrast_temperature: float = 0.07
    contrast_direction: Literal["teacher_to_student", "student_to_teacher"] = "teacher_to_student"


def layer_pairs(
    student_layers: int, teacher_layers: int, mapping: str = "last", explicit: list[int] | None = None
) -> list[tuple[int, int]]:
    """``(student layer, teacher layer)`` pairs that are distilled.

    Args:
        student_layers: student decoder depth.
        teacher_layers: teacher decoder depth.
        mapping: ``last`` aligns the last layers; ``first`` pairs equal indices.
        explicit: one teacher layer per student layer (-1 = none); overrides ``mapping``.
    """
    if explicit is not None:
        if len(explicit) != student_layers:
            raise ConfigError(
                f"detrdistill.teacher_layers needs one entry per student decoder layer ({student_layers}), "
                f"got {len(explicit)}"
            )
        bad = [t for t in explicit if t >= teacher_layers or t < -1]
        if bad:
            raise ConfigError(f"detrdistill.teacher_layers: {bad[0]} is not a teacher layer (0..{teacher_layers - 1})")
        return [(s, t) for s, t in enumerate(explicit) if t >= 0]
    if mapping == "last":
        offset = teacher_layers - student_layers
        return [(s, s + offset) for s in range(student_layers) if 0 <= s + offset < teacher_layers]
    if mapping == "first":
        return [(s, s) for s in range(min(student_layers, teacher_layers))]
    raise ConfigError(f"detrdistill.layer_mapping must be 'last' or 'first', got {mapping!r}")


def soft_bce_cost(s_logits: Tensor, t_prob: Tensor) -> Tensor:
    """``[N, M]``: binary cross-entropy of student logits ``[N, C]`` against teacher probabilities ``[M, C]``,
    summed over classes (not divided by C), for every (student, teacher) pair."""
    s, t = s_logits.float(), t_prob.float()
    return F.softplus(s) @ (1 - t).T + F.softplus(-s) @ t.T


def soft_kl(s_logits: Tensor, t_prob: Tensor) -> Tensor:
    """Bernoulli KL ``KL(t || sigmoid(s))`` per element: soft-target BCE minus the target's entropy (0 when the
    target is the student's own probability; the target may be exactly 0 or 1)."""
    s, t = s_logits.float(), t_prob.float()
    entropy = torch.special.xlogy(t, t) + torch.special.xlogy(1 - t, 1 - t)
    return entropy - t * F.logsigmoid(s) - (1 - t) * F.logsigmoid(-s)


def clamp_boxes(boxes: Tensor) -> Tensor:
    """Normalised cxcywh boxes clipped to the image (the teacher's box targets)."""
    return box_convert(box_convert(boxes.float(), "cxcywh", "xyxy").clamp(0, 1), "xyxy", "cxcywh")


@torch.no_grad()
def soft_match(
    s_logits: Tensor, s_boxes: Tensor, t_prob: Tensor, t_boxes: Tensor, size_wh: Tensor, weights: list[float]
) -> list[Assignment]:
    """LD's one-to-one matching of student predictions to teacher predictions, per image.

    Cost = ``w_cls * soft BCE + w_l1 * L1 + w_giou * (-GIoU)``. Returns per image (student, teacher) indices.
    """
    w_cls, w_l1, w_giou = weights
    return [
        solve(
            w_cls * soft_bce_cost(s_logits[b], t_prob[b]) + box_cost(s_boxes[b], t_boxes[b], size_wh[b], w_l1, w_giou)
        )
        for b in range(len(s_logits))
    ]


def pair_box_losses(
    s_boxes: Tensor, t_boxes: Tensor, pairs: list[Assignment], size_wh: Tensor
) -> tuple[Tensor, Tensor, int]:
    """Summed L1 (normalised cxcywh) and 1 - GIoU (pixels) over matched (student, teacher) pairs, and their count."""
    b_idx = torch.cat([torch.full_like(s, b) for b, (s, _) in enumerate(pairs)])
    s = s_boxes[b_idx, torch.cat([s for s, _ in pairs])].float()
    t = t_boxes[b_idx, torch.cat([t for _, t in pairs])].float()
    wh = size_wh[b_idx]
    giou = generalized_box_iou_loss(cxcywh_to_pixel_xyxy(s, wh), cxcywh_to_pixel_xyxy(t, wh), reduction="sum")
    return (s - t).abs().sum(), giou, len(b_idx)


def soft_all_terms(
    s_logits: Tensor, s_boxes: Tensor, t_prob: Tensor, t_boxes: Tensor, size_wh: Tensor, pairs: list[Assignment]
) -> dict[str, Tensor]:
    """LD of one layer pair in the official (``soft_all``) form, given the matching.

    Every student query is classified: a matched one against its teacher's scores, an unmatched one (when the
    student has more queries) against background. The class term is divided by the number of student queries,
    the box terms by the number of pairs.

    Args:
        s_logits: ``[B, Ns, C]`` student logits.
        s_boxes: ``[B, Ns, 4]`` student boxes (normalised cxcywh).
        t_prob: ``[B, Nt, C]`` teacher probabilities.
        t_boxes: ``[B, Nt, 4]`` teacher boxes (clamped).
        size_wh: ``[B, 2]`` image sizes.
        pairs: per image (student, teacher) indices.
    """
    target = torch.zeros_like(s_logits, dtype=torch.float32)
    for b, (s, t) in enumerate(pairs):
        target[b, s] = t_prob[b, t].float()
    cls = soft_kl(s_logits, target).sum() / max(1, s_logits.shape[0] * s_logits.shape[1])
    l1, giou, count = pair_box_losses(s_boxes, t_boxes, pairs, size_wh)
    return {"kd_ld_cls": cls, "kd_ld_bbox": l1 / max(1, count), "kd_ld_giou": giou / max(1, count)}


def pos_neg_terms(
    s_logits: Tensor,
    s_boxes: Tensor,
    t_prob: Tensor,
    t_boxes: Tensor,
    size_wh: Tensor,
    t_assignment: list[Assignment],
    matcher: HungarianMatcher,
    box_weights: tuple[float, float],
) -> tuple[dict[str, Tensor], list[Assignment]]:
    """LD of one layer pair in the paper's (``pos_neg``) reading.

    Teacher positives (its predictions assigned to the ground truth) are pseudo ground truth with the teacher's
    argmax label and box: Hungarian loss with focal classification (unmatched student queries learn background).
    The remaining student queries are matched box-only to the teacher's negatives and learn their boxes.

    Returns the terms and the (student, teacher) pairs of both groups, per image.
    """
    pseudo = [
        {"labels": t_prob[b, t_idx].argmax(-1), "boxes": t_boxes[b, t_idx].float()}
        for b, (t_idx, _) in enumerate(t_assignment)
    ]
    pos = matcher(s_logits, s_boxes, pseudo, size_wh)
    normalizer = num_boxes(pseudo, s_logits.device)
    focal, l1, giou = set_losses(s_logits, s_boxes, pseudo, pos, size_wh, normalizer)
    neg, pairs = [], []
    w_l1, w_giou = box_weights
    for b, ((s_pos, p_idx), (t_pos, _)) in enumerate(zip(pos, t_assignment)):
        s_rest = _complement(s_pos, s_logits.shape[1])
        t_rest = _complement(t_pos, t_prob.shape[1])
        with torch.no_grad():
            rows, cols = solve(box_cost(s_boxes[b, s_rest], t_boxes[b, t_rest], size_wh[b], w_l1, w_giou))
        neg.append((s_rest[rows], t_rest[cols]))
        pairs.append((torch.cat([s_pos, s_rest[rows]]), torch.cat([t_pos[p_idx], t_rest[cols]])))
    neg_l1, neg_giou, count = pair_box_losses(s_boxes, t_boxes, neg, size_wh)
    terms = {
        "kd_ld_cls": focal,
        "kd_ld_bbox": l1,
        "kd_ld_giou": giou,
        "kd_ld_neg_bbox": neg_l1 / max(1, count),
        "kd_ld_neg_giou": neg_giou / max(1, count),
    }
    return terms, pairs


def _complement(idx: Tensor, n: int) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool, device=idx.device)
    keep[idx] = False
    return keep.nonzero().flatten()


def select_queries(
    t_logits: Tensor, t_embeddings: Tensor, t_boxes: Tensor, targets: list[dict[str, Tensor]], size_wh: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """FD's teacher queries and their quality, per image.

    The top-``k`` (query, class) scores of each image; quality = score x the best IoU of the query's box with a
    ground-truth box (pixels, plain IoU), or the score alone for an image without boxes.

    Args:
        t_logits: ``[B, N, C]``.
        t_embeddings: ``[B, N, d]``.
        t_boxes: ``[B, N, 4]`` normalised cxcywh.
        targets: preprocessed targets (``boxes`` xyxy in input pixels).
        size_wh: ``[B, 2]``.
        k: queries per image.

    Returns:
        ``(embeddings [B, k, d], quality [B, k])``.
    """
    probs = t_logits.float().sigmoid().flatten(1)  # [B, N*C]
    scores, idx = probs.topk(min(k, probs.shape[1]), dim=1)
    query = idx // t_logits.shape[-1]
    embeddings = torch.gather(t_embeddings, 1, query[..., None].expand(-1, -1, t_embeddings.shape[-1]))
    quality = scores.clone()
    for b, t in enumerate(targets):
        if len(t["boxes"]):
            boxes = cxcywh_to_pixel_xyxy(clamp_boxes(t_boxes[b, query[b]]), size_wh[b])
            quality[b] = scores[b] * box_iou(boxes, t["boxes"].float()).amax(1)
    return embeddings, quality


def quality_mask(queries: Tensor, t_feat: Tensor, quality: Tensor, floor: float) -> Tensor:
    """FD's mask ``[B, H, W]`` in (0, 1]: quality-weighted sum of query-cell cosine similarities, floored and
    divided by its maximum.

    Args:
        queries: ``[B, K, d]`` teacher query embeddings.
        t_feat: ``[B, d, H, W]`` teacher map.
        quality: ``[B, K]`` weights.
        floor: smallest mask value before normalisation.
    """
    q = F.normalize(queries.float(), dim=-1)
    f = F.normalize(t_feat.float(), dim=1)
    similarity = torch.einsum("bkc,bchw->bkhw", q, f)
    mask = torch.einsum("bkhw,bk->bhw", similarity, quality.float()).clamp(min=floor)
    return mask / mask.flatten(1).amax(1)[:, None, None]


def masked_feature_loss(s_feat: Tensor, t_feat: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """``mean((m * t - m * s)^2)`` over batch, channels and cells; with ``valid`` ``[B, H, W]``, over image cells
    only."""
    diff2 = (mask[:, None] * (t_feat.float() - s_feat.float())).pow(2)
    if valid is None:
        return diff2.mean()
    valid = valid.float()[:, None]
    return (diff2 * valid).sum() / (valid.sum() * diff2.shape[1]).clamp(min=1.0)


def memory_maps(out: DetOutputs, detector: Detector) -> dict[str, Tensor]:
    """The encoder output of a DETR cut back into its levels: level name -> ``[B, d, H, W]``."""
    memory = out.head.memory
    shapes = memory["spatial_shapes"]
    parts = memory["memory"].split([h * w for h, w in shapes], dim=1)
    return {
        spec.name: part.transpose(1, 2).reshape(part.shape[0], -1, h, w)
        for spec, part, (h, w) in zip(detector.feature_info, parts, shapes)
    }


def info_nce(s_emb: Tensor, t_emb: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """InfoNCE with the diagonal as positives, for L2-normalised ``[M, D]`` rows; returns (loss, top-1 accuracy).

    The logits are ``s_emb @ t_emb^T / temperature``: each row of ``s_emb`` classifies its partner among the rows of
    ``t_emb``. Swap the arguments for the other direction."""
    logits = s_emb.float() @ t_emb.float().T / temperature
    labels = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()


class ProjectionHead(nn.Module):
    """Linear, then Linear-BN-ReLU-Linear: the contrastive term's projection of decoder embeddings."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, dim), nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x.float()), dim=-1)


class DETRDistill(Distiller):
    name = "detrdistill"
    summary = "Hungarian-matched logits, query-masked features, teacher-query assignment group (Chang et al. ICCV 2023)"
    Config = DETRDistillConfig
    heads = (SetHead,)
    benchmark_goal = True
    paper_gap_closed = 3.0  # the paper reports more than 300%

    def __init__(self, cfg: DETRDistillConfig, student: SetDetector, teacher: SetDetector | None):
        super().__init__(cfg, student, teacher)
        if len(cfg.ld_cost) != 3:
            raise ConfigError("distill.options.detrdistill.ld_cost needs three weights: class, L1, GIoU")
        defaults = dict(DEFAULT_WEIGHTS, kd_ld_cls=2.0) if cfg.mode == "pos_neg" else DEFAULT_WEIGHTS
        cfg.term_weights = {**defaults, **cfg.term_weights}
        s_name, t_name = student.spec["name"], teacher.spec["name"]
        if student.num_classes != teacher.num_classes:
            raise BuildError(
                f"detrdistill: student {s_name} predicts {student.num_classes} classes, teacher {t_name} "
                f"{teacher.num_classes}"
            )
        self.pairs = layer_pairs(student.num_layers, teacher.num_layers, cfg.layer_mapping, cfg.teacher_layers)
        if not self.pairs:
            raise ConfigError("detrdistill: no (student, teacher) decoder layer pair to distil")
        self.matcher = HungarianMatcher(2.0, 5.0, 2.0)
        self.connectors = nn.ModuleDict()
        if cfg.use_fd:
            for s_spec, t_spec in pair_levels(student.feature_info, teacher.feature_info, cfg.fd_levels):
                kernel = cfg.fd_kernel if cfg.fd_kernel is not None else int(s_spec.channels != t_spec.channels)
                self.connectors[s_spec.name] = Connector(s_spec, t_spec, kernel)
        self.query_projection: nn.Module | None = None
        if cfg.use_ad:
            s_q, t_q = (student.query_format, student.query_dim), (teacher.query_format, teacher.query_dim)
            if s_q != t_q:
                if not cfg.ad_projection:
                    raise BuildError(
                        f"detrdistill: the query-prior group feeds the teacher's queries to the student's decoder, "
                        f"but teacher {t_name} has {t_q[0]} queries of width {t_q[1]} and student {s_name} "
                        f"{s_q[0]} queries of width {s_q[1]}; set distill.options.detrdistill.ad_projection=true "
                        "to learn a projection, or use_ad=false"
                    )
                self.query_projection = nn.Linear(t_q[1], s_q[1])
        if cfg.use_query_contrast:
            self.contrast_student = ProjectionHead(student.hidden_dim, cfg.contrast_dim)
            self.contrast_teacher = ProjectionHead(teacher.hidden_dim, cfg.contrast_dim)

    def needs_teacher_head(self) -> bool:
        return True

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        s_head, t_head = student.head, teacher.head
        sizes = image_wh(student.image_sizes, s_head.logits.device)
        t_assignments: dict[int, list[Assignment]] = {}
        if cfg.use_ad or cfg.mode == "pos_neg":
            for kt in sorted({kt for _, kt in self.pairs}):
                t_assignments[kt] = self.teacher.match(
                    t_head.logits[kt], t_head.boxes[kt], targets, student.image_sizes
                )
            self.stats["teacher_positives"] = float(sum(len(p) for p, _ in t_assignments[self.pairs[-1][1]]))
        terms: dict[str, Tensor] = {}
        if cfg.use_ld or cfg.use_query_contrast:
            ld_terms, ld_pairs = self._logits(s_head, t_head, sizes, t_assignments)
            if cfg.use_ld:
                terms.update(ld_terms)
            if cfg.use_query_contrast:
                terms["kd_contrast"] = self._contrast(s_head, t_head, ld_pairs)
        if cfg.use_fd:
            terms["kd_feat"] = self._features(student, teacher, targets, sizes)
        if cfg.use_ad:
            terms.update(self._assignment(student, t_head, targets, sizes, t_assignments))
        return terms

    def _logits(
        self, s_head: SetHead, t_head: SetHead, sizes: Tensor, t_assignments: dict[int, list[Assignment]]
    ) -> tuple[dict[str, Tensor], dict[tuple[int, int], list[Assignment]]]:
        """LD summed over layer pairs, and each pair's (student, teacher) matching."""
        sums: dict[str, Tensor] = {}
        matchings = {}
        pairs_count = 0
        for ks, kt in self.pairs:
            s_logits, s_boxes = s_head.logits[ks], s_head.boxes[ks]
            t_prob = t_head.logits[kt].float().sigmoid()
            t_boxes = t_head.boxes[kt].float()
            if self.cfg.clamp_teacher_boxes:
                t_boxes = clamp_boxes(t_boxes)
            if self.cfg.mode == "soft_all":
                matching = soft_match(s_logits, s_boxes, t_prob, t_boxes, sizes, self.cfg.ld_cost)
                layer = soft_all_terms(s_logits, s_boxes, t_prob, t_boxes, sizes, matching)
            else:
                layer, matching = pos_neg_terms(
                    s_logits,
                    s_boxes,
                    t_prob,
                    t_boxes,
                    sizes,
                    t_assignments[kt],
                    self.matcher,
                    tuple(self.cfg.ld_cost[1:]),
                )
            matchings[(ks, kt)] = matching
            pairs_count += sum(len(s) for s, _ in matching)
            for key, value in layer.items():
                sums[key] = sums[key] + value if key in sums else value
        self.stats["ld_pairs"] = pairs_count / len(self.pairs)
        return sums, matchings

    def _contrast(self, s_head: SetHead, t_head: SetHead, matchings: dict[tuple[int, int], list[Assignment]]) -> Tensor:
        losses, accuracy = [], []
        for (ks, kt), matching in matchings.items():
            s_rows = torch.cat([s_head.embeddings[ks][b, s] for b, (s, _) in enumerate(matching)])
            t_rows = torch.cat([t_head.embeddings[kt][b, t] for b, (_, t) in enumerate(matching)])
            if len(s_rows) < 2:  # no negatives to contrast with (and BatchNorm needs two rows)
                continue
            s_emb, t_emb = self.contrast_student(s_rows), self.contrast_teacher(t_rows.detach())
            if self.cfg.contrast_direction == "teacher_to_student":
                t_emb, s_emb = s_emb, t_emb  # rows of the logits are the teacher's, as in the official code
            loss, acc = info_nce(s_emb, t_emb, self.cfg.contrast_temperature)
            losses.append(loss)
            accuracy.append(float(acc))
        if not losses:
            return s_head.embeddings.sum() * 0.0
        self.stats["contrast_acc"] = sum(accuracy) / len(accuracy)
        return torch.stack(losses).sum()

    def _features(
        self, student: DetOutputs, teacher: DetOutputs, targets: list[dict[str, Tensor]], sizes: Tensor
    ) -> Tensor:
        cfg, t_head = self.cfg, teacher.head
        s_maps, t_maps = self._maps(student, self.student), self._maps(teacher, self.teacher)
        valid = {}
        if cfg.mask_padding:
            full = padding_mask(student.image_sizes, student.batch_shape, sizes.device)
            shapes = [tuple(t_maps[level].shape[-2:]) for level in self.connectors]
            valid = {level: ~m for level, m in zip(self.connectors, level_masks(full, shapes))}
        adapted = {
            level: connector(s_maps[level], t_maps[level].shape[-2:]) for level, connector in self.connectors.items()
        }
        losses, coverage, quality_mean = [], [], []
        for _, kt in self.pairs:
            queries, quality = select_queries(
                t_head.logits[kt], t_head.embeddings[kt], t_head.boxes[kt], targets, sizes, cfg.fd_topk
            )
            quality_mean.append(float(quality.mean()))
            for level, s_feat in adapted.items():
                t_feat = t_maps[level]
                mask = quality_mask(queries, t_feat, quality, cfg.fd_floor)
                if level in valid:
                    mask = mask * valid[level]
                losses.append(masked_feature_loss(s_feat, t_feat, mask, valid.get(level)))
                coverage.append(float(mask.mean()))
        self.stats["fd_mask_mean"] = sum(coverage) / len(coverage)
        self.stats["fd_quality_mean"] = sum(quality_mean) / len(quality_mean)
        return torch.stack(losses).sum()

    def _maps(self, out: DetOutputs, detector: Detector) -> dict[str, Tensor]:
        return out.features if self.cfg.fd_source == "neck" else memory_maps(out, detector)

    def visualize(
        self, image: Tensor, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]]
    ) -> dict[str, Any]:
        """FD's mask on the finest distilled level (red) with the teacher's 10 best boxes of the last paired layer
        (green) and the ground truth (white), for the first image."""
        from detkd import viz

        if not self.connectors:
            return {}
        kt = self.pairs[-1][1]
        t_head = teacher.head
        sizes = image_wh(student.image_sizes[:1], t_head.logits.device)
        queries, quality = select_queries(
            t_head.logits[kt][:1], t_head.embeddings[kt][:1], t_head.boxes[kt][:1], targets[:1], sizes, 100
        )
        level = next(iter(self.connectors))
        stride = self.connectors[level].teacher_spec.stride
        mask = quality_mask(queries, self._maps(teacher, self.teacher)[level][:1], quality, self.cfg.fd_floor)[0]
        h, w = student.image_sizes[0]
        picture = viz.overlay_mask(viz.to_uint8(image), mask[: -(-h // stride), : -(-w // stride)])
        scores = t_head.logits[kt][0].float().sigmoid().amax(-1)
        top = scores.topk(min(10, len(scores))).indices
        picture = viz.draw_boxes(picture, cxcywh_to_pixel_xyxy(t_head.boxes[kt][0, top].float(), sizes[0]), (0, 200, 0))
        picture = viz.draw_boxes(picture, targets[0]["boxes"], (255, 255, 255))
        return {"fd_mask": picture}

    def _assignment(
        self,
        student: DetOutputs,
        t_head: SetHead,
        targets: list[dict[str, Tensor]],
        sizes: Tensor,
        t_assignments: dict[int, list[Assignment]],
    ) -> dict[str, Tensor]:
        """The teacher's queries through the student's decoder, supervised with the teacher's assignment."""
        queries = t_head.query_embed.detach()
        if self.query_projection is not None:
            queries = self.query_projection(queries)
        group = self.student.decode(student.head.memory, queries)
        gt = normalize_targets(targets, student.image_sizes)
        normalizer = num_boxes(gt, sizes.device)
        sums = [0.0, 0.0, 0.0]
        for ks, kt in self.pairs:
            layer = set_losses(group["logits"][ks], group["boxes"][ks], gt, t_assignments[kt], sizes, normalizer)
            sums = [a + b for a, b in zip(sums, layer)]
        return {"kd_ad_cls": sums[0], "kd_ad_bbox": sums[1], "kd_ad_giou": sums[2]}
