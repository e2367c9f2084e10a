"""IDa-Det: Information Discrepancy-aware Distillation for 1-bit Detectors (Xu et al., ECCV 2022, arXiv 2210.03477).

A real-valued teacher and a 1-bit student differ most in *some* regions; IDa-Det distils only those. The
candidate regions are both models' confident RPN proposals (score above a threshold, NMS at IoU 0.1, teacher's
and student's sets concatenated: one teacher/student feature pair per box). On every FPN level each pair is cropped
from both networks' maps, each channel is turned into a spatial distribution (softmax over the region at
temperature ``T``, which removes the scale gap between real and binary features), and the pair's *information
discrepancy* is measured. Per image, the fraction ``gamma`` of boxes with the largest discrepancy is kept (the
paper's inner-level problem, solved by sorting), and the student's map, through a per-level 3x3 adapter, is pulled
towards the teacher's on the kept regions with an *entropy* loss: the negative log-likelihood of a Gaussian with a
learnt variance, plus an l2 term,

    L_l = sum_M d^2 * (1 + 1/sigma^2) / |M| + log_weight * log(sigma^2) * numel / |M|,   d = t - adapt(s),

and ``kd_feat`` is the mean of ``L_l`` over levels (the code's ``hint_neck_w = 0.5`` is the default term weight).
The 1-bit weights' reconstruction loss (the paper's ``mu * L_R``) lives in the binary layers' backward, see
``detkd.models.binary``.

Options (the paper and the official code differ; both are available):

- ``discrepancy``: ``code`` (default, the official code) scores a pair by ``sum_c |d_t,c - d_s,c|`` with
  ``d_c = mean^2 / var`` of the channel's softmax (an inverse-variance heuristic); ``mahalanobis`` is the
  paper's ``sum_c (R_t,c - R_s,c)^T Sigma_c^-1 (R_t,c - R_s,c)``, reconstructed with an isotropic per-channel
  covariance pooled from the pair: ``sum_c mean_xy (z_t - z_s)^2 / ((var z_t + var z_s) / 2)`` on the softmaxes
  rescaled to mean 1 (``z = N * R``), which lies in ``[0, 4C]``.
- ``covariance``: ``shared_sigma`` (default, the code) is one learnable ``sigma`` shared by all levels, on the
  map cells of the kept regions; ``per_pair`` follows the paper's ``Cov(R_s, R_t)^-1``: the loss is taken on each
  kept pair's ``patch x patch`` crops with the variance of each pair and channel estimated as ``|Cov(s', t)|``
  over the crop (detached, floored at ``cov_floor`` times its batch mean); the ``log Cov`` term is then a constant
  and is left out, so the term is zero when the features match.
- ``geometry``: ``box`` (default: the paper's intent) crops and masks each box where it is; ``band``
  reproduces the official code's mask *geometry*: coordinates normalised by the unpadded image but scaled by the
  padded map, x and y swapped, and two full-width bands of rows marked per kept box (patches of 1 cell or less
  score 0). It does not reproduce the official *selection* exactly: see the deviations below.
- ``log_norm``: ``numel`` (default, the code) scales the ``log sigma^2`` term by ``numel / |M|``; ``masked``
  gives it one unit per masked element (the plain Gaussian NLL).
- ``adapter_init``: ``identity`` (default, detkd's connectors: the student is compared as it is) or ``code``
  (``N(0, 1).fmod(2) * 1e-4`` weights, as the official code).
- ``temperature`` (1, the code), ``gamma`` (0.6), ``score_thresh`` (0.85), ``nms_iou`` (0.1), ``sigma_init``
  (1; the code's 1.000001), ``learn_sigma``, ``log_weight`` (1e-3), ``levels``, ``patch``.
- ``min_keep`` (default 2; the code has 0): each model contributes at least its ``min_keep`` best proposals per
  image even below ``score_thresh``. A student trained from scratch (and any early-training model) has no proposal
  above 0.85 for a long time, and the code then distils nothing; ``min_keep: 0`` restores that behaviour.

Deviations: the per-box discrepancy is computed on ``patch x patch`` RoIAlign crops (``aligned=True``, one call per
level for the whole batch) instead of the code's exact integer slices, which vectorises the code's Python loop over
boxes and gives every box a patch on every level; the code drops (scores 0) boxes whose slice is at most one cell,
which on small inputs is most boxes on the coarse levels. Scoring fixed ``patch x patch`` crops also drops two
box-shape effects of the code, so which boxes are kept differs from the official selection, ``geometry=band``
included: the code's softmax runs over the box's own ``N = ph * pw`` cells (``d_c = 1 / (N^2 var_c)`` depends on
the box size), and its normaliser ``sum / ph * pw`` is, by Python's precedence, ``sum * pw / ph``, a factor that
favours wide boxes over tall ones; detkd divides every box by the same ``patch^2``. A level whose mask is empty
contributes 0 (the code still adds its ``log sigma^2 * numel`` term, which then pushes sigma towards 0). ``sigma``
is a scalar, so detkd's optimiser gives it no weight decay (the code decays it with the rest) unless
``optim.decay_norm_bias`` is set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from detkd.errors import ConfigError
from detkd.methods.base import Distiller, MethodConfig
from detkd.methods.connectors import build_connectors
from detkd.methods.losses import box_masks
from detkd.models.outputs import Detector, DetOutputs, TwoStageHead
from detkd.models.roi_align import roi_align

log = logging.getLogger("detkd")

WARN_AFTER = 200  # steps without any proposal above the threshold before a warning


@dataclass
class IDaConfig(MethodConfig):
    term_weights: dict[str, float] = field(default_factory=lambda: {"kd_feat": 0.5})
    score_thresh: float = 0.85
    nms_iou: float = 0.1
    min_keep: int = 2
    gamma: float = 0.6
    temperature: float = 1.0
    discrepancy: Literal["code", "mahalanobis"] = "code"
    covariance: Literal["shared_sigma", "per_pair"] = "shared_sigma"
    geometry: Literal["box", "band"] = "box"
    patch: int = 7
    sigma_init: float = 1.0
    learn_sigma: bool = True
    log_weight: float = 1e-3
    log_norm: Literal["numel", "masked"] = "numel"
    cov_floor: float = 0.1
    adapter_init: Literal["identity", "code"] = "identity"
    levels: list[str] | None = None


def candidate_boxes(
    boxes: Tensor, scores: Tensor, score_thresh: float, nms_iou: float, min_keep: int = 0
) -> tuple[Tensor, int]:
    """One model's candidate regions in one image: proposals above ``score_thresh`` after NMS at ``nms_iou``,
    topped up to ``min_keep`` with the next best NMS survivors.

    Greedy NMS visits boxes by decreasing score, so NMS over all proposals followed by the threshold keeps exactly
    the boxes that thresholding first and NMS after would.

    Returns:
        ``[K, 4]`` boxes (by decreasing score) and how many of them passed the threshold.
    """
    if len(boxes) == 0:
        return boxes.new_zeros(0, 4), 0
    keep = nms(boxes.float(), scores.float(), nms_iou)
    passed = int((scores[keep] > score_thresh).sum())
    return boxes[keep[: max(passed, min(min_keep, len(keep)))]], passed


def spatial_softmax(patches: Tensor, temperature: float = 1.0) -> Tensor:
    """``[N, C, P]`` -> softmax over the ``P`` positions of each channel (the paper's channel-wise transform)."""
    return F.softmax(patches.float() / temperature, dim=-1)


def code_discrepancy(t_patches: Tensor, s_patches: Tensor, temperature: float = 1.0) -> Tensor:
    """The official code's measure, ``[N]``: ``sum_c |d_t,c - d_s,c| / P`` with ``d_c = mean^2 / var`` (unbiased)
    of each channel's spatial softmax.

    Args:
        t_patches: teacher crops ``[N, C, P]``.
        s_patches: student crops ``[N, C, P]``.
        temperature: softmax temperature.
    """
    n = t_patches.shape[-1]

    def inverse_spread(p: Tensor) -> Tensor:
        # mean is exactly 1/P; var is 0 only for a perfectly flat channel.
        return p.mean(-1).pow(2) / p.var(-1).clamp(min=1e-20)

    dt = inverse_spread(spatial_softmax(t_patches, temperature))
    ds = inverse_spread(spatial_softmax(s_patches, temperature))
    return (dt - ds).abs().sum(-1) / n


def mahalanobis_discrepancy(t_patches: Tensor, s_patches: Tensor, temperature: float = 1.0) -> Tensor:
    """The paper's Mahalanobis discrepancy with an isotropic per-channel covariance pooled from the pair, ``[N]``.

    On ``z = P * softmax`` (mean 1): ``sum_c mean_P (z_t - z_s)^2 / ((var z_t + var z_s) / 2)``; each channel adds
    at most 4 (0 when the distributions are equal).
    """
    n = t_patches.shape[-1]
    zt = spatial_softmax(t_patches, temperature) * n
    zs = spatial_softmax(s_patches, temperature) * n
    pooled = (zt.var(-1, unbiased=False) + zs.var(-1, unbiased=False)) / 2
    return ((zt - zs).pow(2).mean(-1) / pooled.clamp(min=1e-12)).sum(-1)


def keep_count(n: int, gamma: float) -> int:
    """How many of ``n`` regions are kept: ``round(gamma * n)``, as the code does."""
    return int(round(gamma * n))


def select_top(scores: list[Tensor], gamma: float) -> list[Tensor]:
    """Per image, the indices of the ``round(gamma * n)`` largest scores (by decreasing score)."""
    return [s.topk(keep_count(len(s), gamma)).indices for s in scores]


def band_cells(boxes: Tensor, image_size: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """The official code's (transposed) region of each box in cells, ``[N, 4]`` as ``(col1, row1, col2, row2)``.

    The code reads ``img_shape[1]`` (the width) as the height: rows come from x, normalised by the unpadded width
    and scaled by the padded map's height; columns from y, by the unpadded height and the map's width; rounded.
    """
    h_img, w_img = image_size
    rows, cols = shape
    r1 = (boxes[:, 0] / w_img * rows).round()
    r2 = (boxes[:, 2] / w_img * rows).round()
    c1 = (boxes[:, 1] / h_img * cols).round()
    c2 = (boxes[:, 3] / h_img * cols).round()
    return torch.stack([c1, r1, c2, r2], 1)


def band_mask(cells: list[Tensor], shape: tuple[int, int]) -> Tensor:
    """The code's mask ``[B, H, W]``: for each cell box ``(c1, r1, c2, r2)``, rows ``r1:r2`` and rows ``c1:c2``,
    full width (the code writes ``mask[b, x1:x2] = 1`` and ``mask[b, y1:y2] = 1``)."""
    h, w = shape
    device = cells[0].device if cells else torch.device("cpu")
    rows = torch.arange(h, device=device, dtype=torch.float32)[None]  # [1, H]
    out = torch.zeros(len(cells), h, w, device=device)
    for i, c in enumerate(cells):
        if len(c) == 0:
            continue
        c = c.float()
        band = ((rows >= c[:, 1, None]) & (rows < c[:, 3, None])) | ((rows >= c[:, 0, None]) & (rows < c[:, 2, None]))
        out[i] = band.any(0).float()[:, None].expand(h, w)
    return out


def crop(feature: Tensor, cells: list[Tensor], patch: int) -> Tensor:
    """RoIAlign crops ``[N, C, patch * patch]`` of boxes given in cell units (cell ``i`` spans ``[i, i + 1)``)."""
    rois = [c.to(feature.device, torch.float32) for c in cells]
    out = roi_align(feature.float(), rois, patch, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return out.flatten(2)


def entropy_loss(
    t_feat: Tensor, s_feat: Tensor, mask: Tensor, sigma: Tensor, log_weight: float = 1e-3, log_norm: str = "numel"
) -> Tensor:
    """The code's entropy loss on one level; 0 when the mask is empty.

    ``sum M d^2 (1 + sigma^-2) / |M| + log_weight * log(sigma^2) * k``, with ``d = t - s``, ``|M|`` the masked
    elements (cells x channels) and ``k = numel(t) / |M|`` (``log_norm="numel"``, the code) or 1 (``"masked"``).

    Args:
        t_feat: teacher map ``[B, C, H, W]``.
        s_feat: adapted student map ``[B, C, H, W]``.
        mask: ``[B, H, W]`` in {0, 1}.
        sigma: scalar standard deviation.
        log_weight: weight of the ``log sigma^2`` term.
        log_norm: ``numel`` or ``masked``.
    """
    diff2 = (t_feat.float() - s_feat.float()).pow(2)
    count = mask.float().sum() * t_feat.shape[1]
    if float(count) == 0:
        return diff2.sum() * 0.0
    var = sigma.float().pow(2)
    data = (diff2 * mask.float()[:, None]).sum() / count * (1 + 1 / var)
    scale = t_feat.numel() / count if log_norm == "numel" else 1.0
    return data + log_weight * torch.log(var) * scale


def pair_entropy_loss(t_patches: Tensor, s_patches: Tensor, cov_floor: float = 0.1) -> Tensor:
    """The paper's per-pair form on crops ``[N, C, P]``: ``mean d^2 (1 + 1/Cov)``, 0 when ``N == 0``.

    ``Cov`` of each pair and channel is ``|E[s t] - E[s] E[t]|`` over the crop, detached and floored at
    ``cov_floor`` times its mean over the batch (a constant ``log Cov`` adds no gradient and is left out).
    """
    if t_patches.shape[0] == 0:
        return s_patches.sum() * 0.0
    t, s = t_patches.float(), s_patches.float()
    with torch.no_grad():
        cov = ((s * t).mean(-1) - s.mean(-1) * t.mean(-1)).abs()  # [N, C]
        cov = cov.clamp(min=float(cov.mean()) * cov_floor + 1e-12)
    return ((t - s).pow(2) * (1 + 1 / cov[..., None])).mean()


@dataclass
class LevelSelection:
    """What IDa-Det keeps on one level: per image the kept indices into the candidates, their cell boxes, the mask."""

    indices: list[Tensor]
    cells: list[Tensor]  # per image, the kept boxes in cells (col1, row1, col2, row2)
    mask: Tensor  # [B, H, W]


def select_regions(
    t_feat: Tensor,
    s_feat: Tensor,
    boxes: list[Tensor],
    stride: int,
    gamma: float,
    discrepancy: str = "code",
    temperature: float = 1.0,
    patch: int = 7,
    geometry: str = "box",
    image_sizes: list[tuple[int, int]] | None = None,
) -> LevelSelection:
    """IDa-Det's inner level on one map: score every candidate pair, keep the top ``gamma`` per image, build a mask.

    Args:
        t_feat: teacher map ``[B, C, H, W]``.
        s_feat: student map ``[B, C, H, W]`` (detached; same channels as the teacher's).
        boxes: per image candidate boxes ``[n, 4]`` in input pixels.
        stride: input pixels per cell.
        gamma: kept fraction.
        discrepancy: ``code`` or ``mahalanobis``.
        temperature: softmax temperature.
        patch: RoIAlign crop size.
        geometry: ``box`` or ``band`` (the official code's mask; needs ``image_sizes``).
        image_sizes: ``(h, w)`` of each image inside the padded batch.
    """
    shape = tuple(t_feat.shape[-2:])
    boxes = [b.detach().float() for b in boxes]
    if geometry == "band":
        cells = [band_cells(b, image_sizes[i], shape) for i, b in enumerate(boxes)]
    else:
        cells = [b / stride for b in boxes]
    counts = [len(c) for c in cells]
    measure = code_discrepancy if discrepancy == "code" else mahalanobis_discrepancy
    with torch.no_grad():
        if sum(counts):
            scores = measure(crop(t_feat, cells, patch), crop(s_feat, cells, patch), temperature)
        else:
            scores = t_feat.new_zeros(0, dtype=torch.float32)
        if geometry == "band":
            # The code scores 0 (without cropping) regions of at most one cell in either direction.
            all_cells = torch.cat(cells) if sum(counts) else t_feat.new_zeros(0, 4)
            tiny = ((all_cells[:, 2] - all_cells[:, 0]) <= 1) | ((all_cells[:, 3] - all_cells[:, 1]) <= 1)
            scores = torch.where(tiny, torch.zeros_like(scores), scores)
    indices = select_top(list(scores.split(counts)), gamma)
    kept_cells = [c[i] for c, i in zip(cells, indices)]
    if geometry == "band":
        mask = band_mask(kept_cells, shape)
    else:
        mask = box_masks([b[i] for b, i in zip(boxes, indices)], shape, stride)
    return LevelSelection(indices, kept_cells, mask.to(t_feat.device))


class IDa(Distiller):
    name = "ida"
    summary = "top-discrepancy teacher/student proposals, entropy feature loss; for 1-bit students (Xu et al. 2022)"
    Config = IDaConfig
    heads = (TwoStageHead,)
    benchmark_goal = True
    paper_gap_closed = 0.63

    def __init__(self, cfg: IDaConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        if not 0.0 <= cfg.gamma <= 1.0:
            raise ConfigError(f"distill.options.ida.gamma must be in [0, 1], got {cfg.gamma}")
        if cfg.temperature <= 0 or cfg.patch < 2:
            raise ConfigError("distill.options.ida: temperature must be > 0 and patch >= 2")
        self.connectors = build_connectors(student.feature_info, teacher.feature_info, cfg.levels, kernel=3)
        if cfg.adapter_init == "code":
            for connector in self.connectors.values():
                conv = connector.net[0]
                with torch.no_grad():
                    conv.weight.copy_(torch.randn_like(conv.weight).fmod(2) * 1e-4)
                    bound = 1 / (conv.weight[0].numel() ** 0.5)  # PyTorch's default bias init, as the code keeps
                    conv.bias.uniform_(-bound, bound)
        if cfg.covariance == "shared_sigma":
            sigma = torch.tensor(float(cfg.sigma_init))
            if cfg.learn_sigma:
                self.sigma = nn.Parameter(sigma)
            else:
                self.register_buffer("sigma", sigma)
        self._steps_without_confident = 0

    def needs_teacher_head(self) -> bool:
        return True  # the teacher's RPN proposals are candidates too

    def candidates(self, student: DetOutputs, teacher: DetOutputs) -> tuple[list[Tensor], list[int], list[int]]:
        """Per image the concatenated ``[teacher; student]`` candidate boxes, the number from the teacher, and the
        number of boxes below the threshold kept by ``min_keep``."""
        cfg = self.cfg
        boxes, from_teacher, topped_up = [], [], []
        for t_box, t_score, s_box, s_score in zip(
            teacher.head.proposals,
            teacher.head.proposal_scores,
            student.head.proposals,
            student.head.proposal_scores,
        ):
            t_kept, t_passed = candidate_boxes(t_box, t_score, cfg.score_thresh, cfg.nms_iou, cfg.min_keep)
            s_kept, s_passed = candidate_boxes(s_box, s_score, cfg.score_thresh, cfg.nms_iou, cfg.min_keep)
            boxes.append(torch.cat([t_kept, s_kept.to(t_kept.device)]).detach())
            from_teacher.append(len(t_kept))
            topped_up.append(len(t_kept) - t_passed + len(s_kept) - s_passed)
        return boxes, from_teacher, topped_up

    def select(self, student: DetOutputs, teacher: DetOutputs, boxes: list[Tensor]) -> dict[str, LevelSelection]:
        """Each level's kept regions (no gradient)."""
        cfg = self.cfg
        out = {}
        for level, connector in self.connectors.items():
            t_feat = teacher.features[level].detach()
            s_feat = student.features[level].detach()
            if s_feat.shape[1] != t_feat.shape[1]:
                # Channels differ (heterogeneous pair): compare through the adapter.
                with torch.no_grad():
                    s_feat = connector(s_feat, t_feat.shape[-2:])
            elif s_feat.shape[-2:] != t_feat.shape[-2:]:
                s_feat = F.interpolate(s_feat, size=t_feat.shape[-2:], mode="bilinear", align_corners=False)
            out[level] = select_regions(
                t_feat,
                s_feat,
                boxes,
                connector.teacher_spec.stride,
                cfg.gamma,
                cfg.discrepancy,
                cfg.temperature,
                cfg.patch,
                cfg.geometry,
                student.image_sizes,
            )
        return out

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        boxes, from_teacher, topped_up = self.candidates(student, teacher)
        selections = self.select(student, teacher, boxes)
        images = max(1, len(boxes))
        losses = []
        for level, connector in self.connectors.items():
            t_feat = teacher.features[level]
            s_feat = connector(student.features[level], t_feat.shape[-2:])
            chosen = selections[level]
            if cfg.covariance == "shared_sigma":
                losses.append(entropy_loss(t_feat, s_feat, chosen.mask, self.sigma, cfg.log_weight, cfg.log_norm))
            elif sum(len(c) for c in chosen.cells) == 0:
                losses.append(s_feat.float().sum() * 0.0)
            else:
                t_crops = crop(t_feat.detach(), chosen.cells, cfg.patch)
                losses.append(pair_entropy_loss(t_crops, crop(s_feat, chosen.cells, cfg.patch), cfg.cov_floor))
            self.stats[f"selected_{level}"] = sum(len(i) for i in chosen.indices) / images
            self.stats[f"coverage_{level}"] = float(chosen.mask.float().mean()) if chosen.mask.numel() else 0.0
        n_teacher = sum(from_teacher)
        n_all = sum(len(b) for b in boxes)
        self.stats["candidates_teacher"] = n_teacher / images
        self.stats["candidates_student"] = (n_all - n_teacher) / images
        self.stats["below_thresh"] = sum(topped_up) / images
        if cfg.covariance == "shared_sigma":
            self.stats["sigma"] = float(self.sigma.detach())
        self._watch_threshold(n_all - sum(topped_up))
        return {"kd_feat": torch.stack(losses).mean()}

    def _watch_threshold(self, confident: int) -> None:
        self._steps_without_confident = 0 if confident else self._steps_without_confident + 1
        if self._steps_without_confident == WARN_AFTER:
            log.warning(
                "ida: no proposal of teacher or student scored above score_thresh=%.2f for %d steps; %s",
                self.cfg.score_thresh,
                WARN_AFTER,
                "only the min_keep best proposals are distilled"
                if self.cfg.min_keep
                else "nothing is distilled (set distill.options.ida.min_keep > 0 or lower score_thresh)",
            )

    def visualize(
        self, image: Tensor, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]]
    ) -> dict[str, Any]:
        """Per level, the first image with its kd mask (red) and kept boxes (green: teacher's, blue: student's)."""
        from detkd.viz import draw_boxes, overlay_mask, tile, to_uint8, upscale

        with torch.no_grad():
            boxes, from_teacher, _ = self.candidates(student, teacher)
            selections = self.select(student, teacher, boxes)
        base = to_uint8(image)
        factor = max(1, 256 // max(base.shape[:2]))
        base = upscale(base, factor)
        panels = []
        for chosen in selections.values():
            panel = overlay_mask(base, chosen.mask[0], alpha=0.35)
            idx = chosen.indices[0]
            kept = boxes[0][idx] * factor
            is_teacher = idx < from_teacher[0]
            panel = draw_boxes(panel, kept[is_teacher], color=(0, 200, 0))
            panel = draw_boxes(panel, kept[~is_teacher], color=(0, 90, 255))
            panels.append(panel)
        return {"ida_selection": tile(panels, columns=len(panels))}
