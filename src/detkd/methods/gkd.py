"""Distilling Object Detectors with Global Knowledge (Tang et al., ECCV 2022, arXiv 2210.09022).

Local knowledge (features and soft labels of single instances) is noisy when teacher and student see an object
differently. GKD describes every instance against a few **prototypes**, instances shared by both feature spaces,
and trusts an instance's local knowledge in proportion to how alike the two spaces explain it.

- **Prototype Generation Module (PGM)**, in :meth:`GKD.on_epoch_start`: per class and FPN level, the ground-truth
  boxes of a fixed random sample of training images are average-pooled on the student's and the teacher's maps
  (eval mode, no gradient). A density filter keeps the instances lying in dense regions of *both* spaces, and a
  **joint matching pursuit** picks ``num_prototypes`` of them with one shared index, so that the same instances
  form a basis of both spaces (the coefficients of the two spaces are tied by ``alpha``). The teacher's pooled
  vectors are computed once and cached; the student's are recomputed every ``regen_every`` epochs.
- **Robust Distilling Module (RDM)**, in :meth:`GKD.forward`: each instance (the student's positive RoIs for
  Faster R-CNN) gets, on every level, the weight ``r = 1 - |max_k cos(f_s, P_s[c, k]) - max_k cos(f_t, P_t[c, k])|``
  over the prototypes of its class ``c`` (detached). ``r`` weights:

  - decoupled feature imitation through a 3x3 adapter (``kd_feat_fg``, ``kd_feat_bg``): each instance is painted
    with its ``r`` on the one level its size maps to; ``fg = sum M ||s'-t||^2 / (2 C sum M)`` and
    ``bg = sum 1[M=0] ||s'-t||^2 / (2 C sum 1[M=0])``, averaged over levels (bg weight 4 in ``term_weights``);
  - soft labels (``kd_cls``): ``mean_i r_i T^2 KL(p_t || p_s)`` on the student's positive RoIs, the teacher's box
    head running on the student's RoIs (region proposal sharing);
  - optionally the **global** prototype-relation loss (``kd_global``): the cosines of every instance to every
    prototype of the level, in each space, times ``r``, matched with a smooth L1 loss (weight 5).

  The feature and global terms are attenuated by ``a_e = 1 - e/E`` (epoch ``e`` of ``E``). This is the method's
  ``schedule`` (linear decay counted in epochs) with ``kd_cls`` exempt, since the official code does not
  attenuate the soft labels.

**RetinaNet / one-stage students.** The official one-stage strategy takes the positive anchors as the instances
(their boxes, the class of their ground truth): ``r`` per anchor, the mask painted with the anchors' boxes, and
the soft labels on the positive anchors' class logits, weighted by the anchor's ``r`` (a softmax KL over the
sigmoid logits, averaged over classes). Here ``one_stage_instances="gt"`` (default) uses the ground-truth boxes
as the instances; ``"anchors"`` uses the positive anchors as the official code. In both cases the soft labels
are the dense **sigmoid** logits at the positive anchors with a per-class Bernoulli KL, each anchor weighted by
the ``r`` of its instance (its ground truth, or itself). The positives are the detector's own: RetinaNet's IoU
matching, FCOS's centre sampling (``DenseHead.matched_idxs``).

Options (what the official code does, what the paper intends):

- ``global_loss``: False (default) is the released code, whose config computes ``r`` but never the global loss;
  True adds the prototype-relation loss the paper describes (official weight ``pair_wise_factor = 5``).
- ``num_prototypes`` K (10), ``alpha`` (10), ``density_width`` (0.1), ``density_quantile`` (0.4): the official
  PGM settings. Selection runs in fp32 (the official code uses fp16: its prototype lists differ from fp32 ones on
  near ties) and in chunks of ``chunk`` candidates, so memory is ``O(chunk * N)`` for ``N`` instances of a class.
- ``strict_density_cut``: False (default) keeps candidates whose density is ``>=`` the quantile in both spaces;
  True uses the official ``>``, which leaves no candidate (hence no prototype for the class) when densities tie.
- ``max_images_per_class`` (32; official 800), ``max_images`` (64 in all; None = no cap), ``max_instances_per_class``
  (256; None = no cap), ``min_box`` (4 px; official 30): scaled for a 2-core CPU and 128-px digits. Images are drawn
  class by class in turn (seed ``seed``, official 1) until every class has ``max_images_per_class`` images or
  ``max_images`` are drawn, so one regeneration costs one student pass over at most ``max_images`` images whatever
  the dataset size. The official code samples, per class, up to 800 images holding a box of that class and pools
  every such box (so a class may have more than 800 instances), all in fp32 here: the official sample is
  ``max_images_per_class: 800, max_images: null, max_instances_per_class: null`` (see
  ``configs/official/gkd_frcnn.yaml``). The official 30 px on 800-1333 px images is about 4 px at 128 px, which keeps
  all but degenerate digits.
- ``regen_every`` (1 = every epoch, as the official code; 0 = never: no prototypes and ``r = 1``, which is
  plain decoupled distillation).
- ``finest_scale`` (56): an instance of size ``s = sqrt((w+1)(h+1))`` goes to level
  ``clamp(floor(log2(s / 56)), 0, L-1)`` of the distilled levels, finest first (mmdet's and torchvision's RoI
  level rule). On 128-px digits every object maps to the finest level.
- ``temperature`` (2), ``kl_class_mean`` (True: the KL is averaged over the classes as in the official code, a
  ``1/(C+1)`` scale; False sums it as ``kd`` does).
- ``levels``, ``kernel`` (3): the adapted levels and adapter kernel. The adapter starts as the identity when the
  channels match (the official one keeps PyTorch's default init, its intended 1e-4 init being a no-op).
- ``chunk`` (1024): rows and candidates processed at once by the PGM; ``crop_size`` (20): side of the instance
  crops kept for the prototype picture (:meth:`GKD.visualize`, one grid per level: a row per class, each prototype
  framed and followed by its nearest sampled instances).

Cost: a regeneration is one eval-mode feature pass of the student over the sample (on CPU about a fifth of a
training step per image), so it takes about ``0.2 * max_images / len(train set)`` of an epoch; the first one also
runs the teacher, about three times as long. Stats: ``r_<level>`` (mean ``r`` of the batch's instances on each
level), ``r_cls`` (mean soft-label weight), ``instances``, ``positives``, ``fg_coverage``, and from the last
regeneration ``pgm_time_s`` (wall time), ``pgm_images``, ``pgm_instances``, ``protos_<level>``; the prototypes per
class and level are logged at each regeneration.

Deviations, each for a reason: before the first PGM (or for a class without prototypes) ``r = 1``, i.e. the
instance is trusted as in plain decoupled distillation. ``r`` is clamped to [0, 1]: a negative weight would push
the student away from the teacher. Overlapping instances keep the larger ``r`` in the mask (the official code
lets the later box overwrite). Candidates pass the density filter at ``>=`` the quantile unless
``strict_density_cut`` (the official ``>`` leaves no candidate when densities tie), and a prototype picked twice
by the matching pursuit is kept once. The soft-label ``r`` of a RoI is its box's ``r`` at its level (the official
code re-pools the RoIAlign features at the same level). Instance features are exact box averages of the cells the
box touches, computed from integral images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.data.sampling import class_balanced_images, item_annotations
from detkd.errors import ConfigError
from detkd.methods.base import Distiller, MethodConfig, RunContext, ScheduleConfig
from detkd.methods.connectors import build_connectors
from detkd.methods.losses import bernoulli_kl, box_masks, check_logit_pair, softmax_kl
from detkd.models.outputs import DenseHead, Detector, DetOutputs, TwoStageHead

log = logging.getLogger("detkd")


@dataclass
class GKDConfig(MethodConfig):
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(decay="linear", decay_unit="epoch", exempt=["kd_cls"])
    )
    term_weights: dict[str, float] = field(
        default_factory=lambda: {"kd_feat_fg": 1.0, "kd_feat_bg": 4.0, "kd_cls": 1.0, "kd_global": 5.0}
    )
    global_loss: bool = False
    levels: list[str] | None = None
    kernel: int = 3
    temperature: float = 2.0
    kl_class_mean: bool = True
    finest_scale: float = 56.0
    one_stage_instances: Literal["gt", "anchors"] = "gt"
    num_prototypes: int = 10
    alpha: float = 10.0
    density_width: float = 0.1
    density_quantile: float = 0.4
    min_box: float = 4.0
    max_images_per_class: int = 32
    max_images: int | None = 64
    max_instances_per_class: int | None = 256
    strict_density_cut: bool = False
    regen_every: int = 1
    seed: int = 1
    chunk: int = 1024
    crop_size: int = 20


# ---------------------------------------------------------------------------------------------------------------
# Pure tensor pieces.


def box_means(feat: Tensor, boxes: list[Tensor], stride: float) -> Tensor:
    """Average of ``feat`` over the cells each box touches, ``[N, C]`` for the boxes of all images in order.

    A box ``(x1, y1, x2, y2)`` covers rows ``floor(y1/s) .. floor(y2/s)`` and the matching columns, clamped to the
    map and to at least one cell, so degenerate or out-of-map boxes still give a finite vector.

    Args:
        feat: ``[B, C, H, W]``.
        boxes: per image ``[N_i, 4]`` xyxy in input pixels.
        stride: input pixels per cell.
    """
    b, c, h, w = feat.shape
    n = sum(len(x) for x in boxes)
    if n == 0:
        return feat.new_zeros(0, c, dtype=torch.float32)
    feat = feat.float()
    # Centring keeps the running sums small, so fp32 integral images stay exact enough on large maps.
    centre = feat.mean((2, 3), keepdim=True)  # [B, C, 1, 1]
    integral = F.pad((feat - centre).cumsum(2).cumsum(3), (1, 0, 1, 0))  # [B, C, H+1, W+1]
    image = torch.cat([torch.full((len(x),), i, dtype=torch.long, device=feat.device) for i, x in enumerate(boxes)])
    cells = torch.cat([x.float() for x in boxes]).to(feat.device).nan_to_num(0.0).div(stride).floor().long()
    x0 = cells[:, 0].clamp(0, w - 1)
    y0 = cells[:, 1].clamp(0, h - 1)
    x1 = torch.maximum(cells[:, 2] + 1, x0 + 1).clamp(max=w)
    y1 = torch.maximum(cells[:, 3] + 1, y0 + 1).clamp(max=h)
    total = integral[image, :, y1, x1] - integral[image, :, y0, x1] - integral[image, :, y1, x0]
    total = total + integral[image, :, y0, x0]  # [N, C]
    area = ((y1 - y0) * (x1 - x0)).float()
    return total / area[:, None] + centre[image, :, 0, 0]


def assign_levels(boxes: Tensor, finest_scale: float, num_levels: int) -> Tensor:
    """Level index ``[N]`` of each box: ``clamp(floor(log2(sqrt((w+1)(h+1)) / finest_scale)), 0, L-1)``."""
    wh = (boxes[:, 2:] - boxes[:, :2]).float().nan_to_num(0.0).clamp(min=0) + 1
    scale = wh.prod(1).sqrt()
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


def density(x: Tensor, width: float, chunk: int = 1024) -> Tensor:
    """``dens(i) = sum_j exp(-((1 - x_i . x_j) / width)^2)`` for unit rows ``x`` ``[N, C]``, computed by row chunks."""
    out = [torch.exp(-(((1 - x[i : i + chunk] @ x.T) / width) ** 2)).sum(1) for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else x.new_zeros(0)


def joint_matching_pursuit(
    a: Tensor, b: Tensor, candidates: Tensor, num_atoms: int, alpha: float, chunk: int = 1024
) -> list[int]:
    """Pick ``num_atoms`` instances whose vectors explain both spaces at once (one shared index per atom).

    Residuals start at ``A`` and ``B`` (all instances). Each round, every candidate ``k`` gets the coefficients
    minimising ``E_k = ||R_a - w_a a_k^T||^2 + ||R_b - w_b b_k^T||^2 + alpha ||w_a - w_b||^2`` in closed form,
    ``w_a = (alpha (u_a + u_b) + u_a) / (1 + 2 alpha)`` with ``u_a = R_a a_k`` (and the same for ``b``); the
    candidate of least energy is picked and removed from both residuals. For unit atoms,
    ``E_k = const + sum_j (w_a^2 - 2 w_a u_a + w_b^2 - 2 w_b u_b + alpha (w_a - w_b)^2)``, so no ``[K, C, N]``
    tensor is built; candidates are scored ``chunk`` at a time.

    Args:
        a: ``[N, Ca]`` unit student vectors.
        b: ``[N, Cb]`` unit teacher vectors.
        candidates: indices allowed as atoms.
        num_atoms: rounds (an atom may be picked again).
        alpha: how strongly the two spaces' coefficients are tied.
        chunk: candidates scored at once.

    Returns:
        The picked indices, in order.
    """
    if len(candidates) == 0 or len(a) == 0:
        return []
    res_a, res_b = a.clone(), b.clone()
    picks = []
    for _ in range(num_atoms):
        best = (float("inf"), -1, None, None)
        for start in range(0, len(candidates), chunk):
            cand = candidates[start : start + chunk]
            u_a = a[cand] @ res_a.T  # [G, N]
            u_b = b[cand] @ res_b.T
            shared = alpha * (u_a + u_b)
            w_a = (shared + u_a) / (1 + 2 * alpha)
            w_b = (shared + u_b) / (1 + 2 * alpha)
            energy = (w_a * (w_a - 2 * u_a) + w_b * (w_b - 2 * u_b) + alpha * (w_a - w_b) ** 2).sum(1)  # [G]
            value, i = energy.min(0)
            if float(value) < best[0]:
                best = (float(value), int(cand[i]), w_a[i], w_b[i])
        _, k, w_a, w_b = best
        res_a -= w_a[:, None] * a[k]
        res_b -= w_b[:, None] * b[k]
        picks.append(k)
    return picks


def select_prototypes(
    s_vecs: Tensor,
    t_vecs: Tensor,
    num: int,
    alpha: float,
    width: float = 0.1,
    quantile: float = 0.4,
    chunk: int = 1024,
    strict: bool = False,
) -> Tensor:
    """Prototype indices (unique, in pick order) among the instances of one class at one level.

    Args:
        s_vecs: ``[N, Cs]`` pooled student vectors (any scale; normalised here, in fp32).
        t_vecs: ``[N, Ct]`` pooled teacher vectors of the same instances.
        num: matching-pursuit rounds K.
        alpha: coefficient tie.
        width: density kernel width.
        quantile: candidates have a density at least this quantile in both spaces.
        chunk: rows / candidates processed at once.
        strict: candidates must exceed the quantile (the official ``>``) instead of reaching it.
    """
    n = len(s_vecs)
    if n == 0 or num <= 0:
        return torch.zeros(0, dtype=torch.long, device=s_vecs.device)
    a, b = F.normalize(s_vecs.float(), dim=1), F.normalize(t_vecs.float(), dim=1)
    dens_a, dens_b = density(a, width, chunk), density(b, width, chunk)
    k = min(int(quantile * n), n - 1)
    # ">=" keeps at least 60% of each space, so the intersection is never empty (">" is empty on ties).
    cut_a, cut_b = dens_a.sort().values[k], dens_b.sort().values[k]
    keep = (dens_a > cut_a) & (dens_b > cut_b) if strict else (dens_a >= cut_a) & (dens_b >= cut_b)
    picks = joint_matching_pursuit(a, b, keep.nonzero()[:, 0], num, alpha, chunk)
    return torch.tensor(list(dict.fromkeys(picks)), dtype=torch.long, device=s_vecs.device)


def class_max_cos(vecs: Tensor, protos: Tensor, proto_labels: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Largest cosine of each vector to the prototypes of its own class: ``([N], has_prototype [N])``."""
    if len(protos) == 0 or len(vecs) == 0:
        zeros = vecs.new_zeros(len(vecs), dtype=torch.float32)
        return zeros, torch.zeros(len(vecs), dtype=torch.bool, device=vecs.device)
    cos = F.normalize(vecs.float(), dim=1) @ F.normalize(protos.float(), dim=1).T  # [N, P]
    same = labels[:, None] == proto_labels[None, :]
    has = same.any(1)
    best = cos.masked_fill(~same, -2.0).amax(1)
    return torch.where(has, best, torch.zeros_like(best)), has


def robust_weights(
    s_vecs: Tensor, t_vecs: Tensor, s_protos: Tensor, t_protos: Tensor, proto_labels: Tensor, labels: Tensor
) -> Tensor:
    """RDM weight ``r = 1 - |max cos(f_s, P_s[c]) - max cos(f_t, P_t[c])|`` per instance ``[N]``, clamped to
    [0, 1], detached; 1 for an instance whose class has no prototype."""
    with torch.no_grad():
        s_best, has = class_max_cos(s_vecs, s_protos, proto_labels, labels)
        t_best, _ = class_max_cos(t_vecs, t_protos, proto_labels, labels)
        r = (1 - (s_best - t_best).abs()).clamp(0, 1)
        return torch.where(has, r, torch.ones_like(r))


def decoupled_feature_loss(s_feat: Tensor, t_feat: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Foreground and background imitation with a weighted mask ``[B, H, W]`` (values in [0, 1]).

    ``fg = sum M ||s - t||^2 / max(1, 2 C sum M)``, ``bg = sum 1[M = 0] ||s - t||^2 / max(1, 2 C sum 1[M = 0])``:
    the mask repeated over the ``C`` channels, as the official code normalises it.
    """
    channels = s_feat.shape[1]
    diff2 = (s_feat.float() - t_feat.float()).pow(2).sum(1)  # [B, H, W]
    mask = mask.float()
    background = (mask <= 0).float()
    fg = (diff2 * mask).sum() / (2 * channels * mask.sum()).clamp(min=1.0)
    bg = (diff2 * background).sum() / (2 * channels * background.sum()).clamp(min=1.0)
    return fg, bg


def prototype_relation_loss(s_vecs: Tensor, t_vecs: Tensor, s_protos: Tensor, t_protos: Tensor, r: Tensor) -> Tensor:
    """Global knowledge: ``SmoothL1(r * cos(f_s, P_s), r * cos(f_t, P_t))`` over every instance and every prototype
    of the level (all classes), averaged."""
    if len(s_vecs) == 0 or len(s_protos) == 0:
        return s_vecs.sum() * 0.0
    d_s = F.normalize(s_vecs.float(), dim=1) @ F.normalize(s_protos.float(), dim=1).T  # [N, P]
    d_t = F.normalize(t_vecs.float(), dim=1) @ F.normalize(t_protos.float(), dim=1).T
    return F.smooth_l1_loss(d_s * r[:, None], d_t * r[:, None])


# ---------------------------------------------------------------------------------------------------------------
# The method.


@dataclass
class LevelPrototypes:
    """Prototypes of one level, all classes concatenated.

    Attributes:
        student: ``[P, Cs]`` raw (unnormalised) pooled student vectors.
        teacher: ``[P, Ct]`` the same instances' teacher vectors.
        labels: ``[P]`` class of each prototype.
        instances: ``[P]`` index of each prototype in the PGM's instance sample.
        nearest: ``[P, n]`` the sample instances of the same class closest to each prototype (student space),
            for pictures; -1 pads.
    """

    student: Tensor
    teacher: Tensor
    labels: Tensor
    instances: Tensor
    nearest: Tensor


@dataclass
class InstanceSample:
    """The PGM's fixed sample: which boxes of which training images, and what they show.

    Attributes:
        images: dataset indices of the sampled images.
        boxes: per sampled image, indices of its sampled boxes in the item's target.
        labels: ``[N]`` class of every sampled instance, in image order.
        key: identifies the dataset the sample was drawn from.
    """

    images: list[int]
    boxes: list[list[int]]
    labels: Tensor
    key: tuple[int, int]


class GKD(Distiller):
    name = "gkd"
    summary = "prototype-weighted decoupled feature and soft-label KD, optional global loss (Tang et al. ECCV 2022)"
    Config = GKDConfig
    benchmark_goal = True
    paper_gap_closed = 1.57

    def __init__(self, cfg: GKDConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        if cfg.num_prototypes < 1 or cfg.alpha < 0 or cfg.chunk < 1:
            raise ConfigError("distill.options.gkd: num_prototypes and chunk must be >= 1 and alpha >= 0")
        self.connectors = build_connectors(student.feature_info, teacher.feature_info, cfg.levels, cfg.kernel)
        check_logit_pair(student, teacher, "gkd")
        self.prototypes: dict[str, LevelPrototypes] = {}
        self._sample: InstanceSample | None = None
        self._teacher_vecs: dict[str, Tensor] | None = None
        self._crops: np.ndarray | None = None  # [N, S, S, 3] uint8, one per sampled instance
        self._class_names: list[str] = []
        self._pgm_stats: dict[str, float] = {}

    # -- Prototype Generation Module -----------------------------------------------------------------------------

    def needs_teacher_head(self) -> bool:
        return self.student.head_type is DenseHead  # dense soft labels; two-stage ones come from the shared RoIs

    def needs_shared_rois(self) -> bool:
        return self.student.head_type is TwoStageHead

    def on_epoch_start(self, epoch: int, context: RunContext | None) -> None:
        every = self.cfg.regen_every
        if every <= 0 or context is None or context.dataset is None:
            return
        if self.prototypes and epoch % every != 0:
            return
        self.regenerate(context, epoch)

    def regenerate(self, context: RunContext, epoch: int = 0) -> None:
        """Run the PGM: pool the sampled instances on both networks, select prototypes per class and level."""
        start = time.perf_counter()
        dataset = context.dataset
        key = (id(dataset), len(dataset))
        if self._sample is None or self._sample.key != key:
            self._sample = self._draw_sample(dataset, key)
            self._teacher_vecs = None
            self._class_names = list(getattr(dataset, "classes", []))
        sample = self._sample
        with_teacher = self._teacher_vecs is None
        if len(sample.labels) == 0:
            log.warning("gkd: no training box of at least %.0f px: no prototypes, r = 1", self.cfg.min_box)
            self.prototypes = {}
            return
        s_vecs, t_vecs, crops = self._pool_sample(sample, context, with_teacher)
        if with_teacher:
            self._teacher_vecs, self._crops = t_vecs, crops
        t_vecs = self._teacher_vecs
        self.prototypes = {}
        for level in self.connectors:
            self.prototypes[level] = self._select_level(s_vecs[level], t_vecs[level], sample.labels)
        elapsed = time.perf_counter() - start
        self._pgm_stats = {
            "pgm_time_s": elapsed,
            "pgm_images": float(len(sample.images)),
            "pgm_instances": float(len(sample.labels)),
            **{f"protos_{lv}": float(len(p.labels)) for lv, p in self.prototypes.items()},
        }
        counts = self.prototype_counts()
        table = "; ".join(
            f"{self._class_name(c)}: {'/'.join(str(counts[lv].get(c, 0)) for lv in counts)}"
            for c in sorted({c for per in counts.values() for c in per})
        )
        log.info(
            "gkd: prototypes for epoch %d in %.2f s (%d images, %d instances, teacher %s); per class (%s): %s",
            epoch,
            elapsed,
            len(sample.images),
            len(sample.labels),
            "pooled" if with_teacher else "cached",
            "/".join(counts),
            table,
        )

    def prototype_counts(self) -> dict[str, dict[int, int]]:
        """Prototypes per class on each level: ``{level: {class: count}}``."""
        out = {}
        for level, protos in self.prototypes.items():
            labels, counts = protos.labels.unique(return_counts=True)
            out[level] = {int(c): int(n) for c, n in zip(labels, counts)}
        return out

    def _class_name(self, label: int) -> str:
        return self._class_names[label - 1] if 0 < label <= len(self._class_names) else str(label)

    def _draw_sample(self, dataset: Any, key: tuple[int, int]) -> InstanceSample:
        """Images drawn class by class in turn (fixed seed), and their boxes of at least ``min_box`` px."""
        cfg = self.cfg
        per_image: list[tuple[np.ndarray, np.ndarray]] = []  # (labels, box indices) of the qualifying boxes
        for i in range(len(dataset)):
            boxes, labels = item_annotations(dataset, i)
            ok = ((boxes[:, 2] - boxes[:, 0]) >= cfg.min_box) & ((boxes[:, 3] - boxes[:, 1]) >= cfg.min_box)
            per_image.append((labels[ok], np.nonzero(ok)[0]))
        rng = np.random.default_rng(cfg.seed)
        images = class_balanced_images(
            [labels for labels, _ in per_image], cfg.max_images, cfg.max_images_per_class, rng
        )
        # Cap the instances of each class, keeping a random subset.
        owners = [(i, j, int(c)) for i in images for c, j in zip(*per_image[i])]
        keep = np.ones(len(owners), dtype=bool)
        labels_all = np.array([o[2] for o in owners], dtype=np.int64)
        for c in np.unique(labels_all):
            idx = np.nonzero(labels_all == c)[0]
            if cfg.max_instances_per_class is not None and len(idx) > cfg.max_instances_per_class:
                keep[rng.choice(idx, len(idx) - cfg.max_instances_per_class, replace=False)] = False
        kept = [o for o, k in zip(owners, keep) if k]
        boxes_of = {i: [] for i in images}
        for i, j, _ in kept:
            boxes_of[i].append(int(j))
        images = [i for i in images if boxes_of[i]]
        labels = torch.tensor([c for _, _, c in kept], dtype=torch.long)
        return InstanceSample(images, [boxes_of[i] for i in images], labels, key)

    @torch.no_grad()
    def _pool_sample(
        self, sample: InstanceSample, context: RunContext, with_teacher: bool
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, np.ndarray | None]:
        """Pooled vectors ``level -> [N, C]`` of the sample on the student (and teacher), image batch by batch."""
        student, teacher = self.student, self.teacher
        device = context.device
        s_out: dict[str, list[Tensor]] = {lv: [] for lv in self.connectors}
        t_out: dict[str, list[Tensor]] = {lv: [] for lv in self.connectors}
        crops: list[np.ndarray] = []
        box_indices = iter(sample.boxes)
        # Restore each module's own mode afterwards: a caller may keep some parts (BatchNorm) in eval mode.
        modes = [(m, m.training) for m in student.modules()]
        student.eval()
        try:
            for items in context.batches(sample.images):
                images, targets = [], []
                for (image, target), box_idx in zip(items, box_indices):
                    idx = torch.tensor(box_idx, dtype=torch.long)
                    boxes = target["boxes"].reshape(-1, 4)[idx].float()
                    images.append(image.to(device))
                    targets.append({"boxes": boxes.to(device), "labels": target["labels"][idx].to(device)})
                    if with_teacher:
                        crops.extend(self._crop(image, boxes))
                batch, resized = student.preprocess(images, targets)
                boxes = [t["boxes"] for t in resized]
                s_feats = student.extract(batch)
                t_feats = teacher.extract(batch) if with_teacher else None
                for level, conn in self.connectors.items():
                    s_out[level].append(box_means(s_feats[level], boxes, conn.student_spec.stride))
                    if t_feats is not None:
                        t_out[level].append(box_means(t_feats[level], boxes, conn.teacher_spec.stride))
        finally:
            for module, mode in modes:
                module.training = mode
        s_vecs = {lv: torch.cat(v) for lv, v in s_out.items()}
        t_vecs = {lv: torch.cat(v) for lv, v in t_out.items()} if with_teacher else None
        return s_vecs, t_vecs, (np.stack(crops) if with_teacher else None)

    def _crop(self, image: Tensor, boxes: Tensor) -> list[np.ndarray]:
        """Small ``S x S x 3`` uint8 crops of the boxes of one image (``[3, H, W]`` in [0, 1])."""
        size = self.cfg.crop_size
        h, w = image.shape[-2:]
        out = []
        for x0, y0, x1, y1 in boxes.tolist():
            x0, y0 = min(max(int(x0), 0), w - 1), min(max(int(y0), 0), h - 1)
            x1, y1 = max(min(int(np.ceil(x1)), w), x0 + 1), max(min(int(np.ceil(y1)), h), y0 + 1)
            patch = image[:, y0:y1, x0:x1].float()[None]
            patch = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False)[0]
            out.append((patch.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
        return out

    def _select_level(self, s_vecs: Tensor, t_vecs: Tensor, labels: Tensor, neighbours: int = 3) -> LevelPrototypes:
        cfg = self.cfg
        labels = labels.to(s_vecs.device)
        chosen, nearest = [], []
        for c in labels.unique().tolist():
            members = (labels == c).nonzero()[:, 0]
            picks = members[
                select_prototypes(
                    s_vecs[members],
                    t_vecs[members],
                    cfg.num_prototypes,
                    cfg.alpha,
                    cfg.density_width,
                    cfg.density_quantile,
                    cfg.chunk,
                    cfg.strict_density_cut,
                )
            ]
            # Nearest other members of the class, for the picture (student space).
            sim = F.normalize(s_vecs[picks], dim=1) @ F.normalize(s_vecs[members], dim=1).T  # [K, N_c]
            sim[members[None, :] == picks[:, None]] = -3.0
            k = min(neighbours, len(members) - 1)
            near = torch.full((len(picks), neighbours), -1, dtype=torch.long, device=s_vecs.device)
            if k > 0:
                near[:, :k] = members[sim.topk(k, dim=1).indices]
            chosen.append(picks)
            nearest.append(near)
        picks = torch.cat(chosen)
        return LevelPrototypes(s_vecs[picks], t_vecs[picks], labels[picks], picks, torch.cat(nearest))

    # -- Robust Distilling Module --------------------------------------------------------------------------------

    def _instances(
        self, student: DetOutputs, targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], Tensor | None, Tensor | None]:
        """Instances (boxes and classes per image) and, for soft labels, which positive logits belong to which
        instance: two-stage positives are the instances themselves; one-stage positives are anchors
        (returned as per-image keep masks concatenated ``[B*A]`` and their instance indices)."""
        head = student.head
        if isinstance(head, TwoStageHead):
            pos = [lab > 0 for lab in head.roi_labels]
            boxes = [r[p] for r, p in zip(head.rois, pos)]
            labels = [lab[p] for lab, p in zip(head.roi_labels, pos)]
            return boxes, labels, None, None
        positives = [m >= 0 for m in head.matched_idxs]
        owner, boxes, labels, offset = [], [], [], 0
        for anchors, m, p, t in zip(head.anchors, head.matched_idxs, positives, targets):
            if self.cfg.one_stage_instances == "gt":
                boxes.append(t["boxes"])
                labels.append(t["labels"])
                owner.append(offset + m[p])
                offset += len(t["boxes"])
            else:
                boxes.append(anchors[p])
                labels.append(t["labels"][m[p]])
                owner.append(offset + torch.arange(int(p.sum()), device=m.device))
                offset += int(p.sum())
        return boxes, labels, torch.cat(positives), torch.cat(owner)

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        boxes, labels, positive, owner = self._instances(student, targets)
        all_boxes, all_labels = torch.cat(boxes), torch.cat(labels)  # [N, 4], [N]
        counts = [len(b) for b in boxes]
        home = assign_levels(all_boxes, cfg.finest_scale, len(self.connectors))  # [N] the level each instance paints
        r_home = torch.ones(len(all_boxes), device=all_boxes.device)  # r of each instance on its own level
        fg, bg, glob, coverage = [], [], [], []
        for index, (level, connector) in enumerate(self.connectors.items()):
            s_raw, t_feat = student.features[level], teacher.features[level]
            s_vecs = box_means(s_raw if cfg.global_loss else s_raw.detach(), boxes, connector.student_spec.stride)
            t_vecs = box_means(t_feat, boxes, connector.teacher_spec.stride)
            protos = self.prototypes.get(level)
            if protos is not None:
                r = robust_weights(s_vecs, t_vecs, protos.student, protos.teacher, protos.labels, all_labels)
            else:
                r = torch.ones(len(all_boxes), device=t_feat.device)
            if len(r):
                self.stats[f"r_{level}"] = float(r.mean())
            here = home == index
            r_home = torch.where(here, r, r_home)
            mask = box_masks(
                [b[h] for b, h in zip(boxes, here.split(counts))],
                tuple(t_feat.shape[-2:]),
                connector.teacher_spec.stride,
                [v[h] for v, h in zip(r.split(counts), here.split(counts))],
            )  # [B, H, W]
            s_feat = connector(s_raw, t_feat.shape[-2:])
            level_fg, level_bg = decoupled_feature_loss(s_feat, t_feat, mask)
            fg.append(level_fg)
            bg.append(level_bg)
            coverage.append(float((mask > 0).float().mean()))
            if cfg.global_loss:
                if protos is None:
                    glob.append(s_vecs.sum() * 0.0)
                else:
                    glob.append(prototype_relation_loss(s_vecs, t_vecs, protos.student, protos.teacher, r))
        terms = {"kd_feat_fg": torch.stack(fg).mean(), "kd_feat_bg": torch.stack(bg).mean()}
        if cfg.global_loss:
            terms["kd_global"] = torch.stack(glob).mean()
        terms["kd_cls"] = self._soft_labels(student, teacher, r_home, positive, owner)
        self.stats["instances"] = float(len(all_boxes))
        self.stats["fg_coverage"] = sum(coverage) / len(coverage)
        self.stats.update(self._pgm_stats)
        return terms

    def _soft_labels(
        self, student: DetOutputs, teacher: DetOutputs, r: Tensor, positive: Tensor | None, owner: Tensor | None
    ) -> Tensor:
        """``mean_i r_i KL_i`` over the positive RoIs (two-stage) or positive anchors (one-stage)."""
        cfg = self.cfg
        head = student.head
        if isinstance(head, TwoStageHead):
            all_logits = head.roi_logits
            keep = torch.cat(head.roi_labels) > 0
            s_logits, t_logits = all_logits[keep], teacher.on_student_rois.logits[keep]
            kl = softmax_kl(s_logits, t_logits, cfg.temperature)
            weights = r
        else:
            all_logits = head.cls_logits
            s_logits = all_logits.flatten(0, 1)[positive]  # [P, K]
            t_logits = teacher.head.cls_logits.flatten(0, 1)[positive]
            kl = bernoulli_kl(s_logits, t_logits, cfg.temperature)
            weights = r[owner] if len(owner) else r[:0]
        self.stats["positives"] = float(len(s_logits))
        if len(s_logits) == 0:
            return all_logits.sum() * 0.0
        if cfg.kl_class_mean:
            kl = kl / s_logits.shape[-1]
        self.stats["r_cls"] = float(weights.mean())
        return (weights.to(kl.device) * kl).mean()

    # -- Pictures -----------------------------------------------------------------------------------------------

    def visualize(
        self, image: Tensor, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]]
    ) -> dict[str, Any]:
        """Per level, one row per class: each prototype's crop (framed) followed by its nearest instances."""
        from detkd.viz import PALETTE, draw_boxes, tile, upscale

        if not self.prototypes or self._crops is None:
            return {}
        size = self.cfg.crop_size * 2
        blank = np.full((size, size, 3), 255, np.uint8)
        out = {}
        for level, protos in self.prototypes.items():
            rows = []
            for c in protos.labels.unique().tolist():
                cells = []
                which = (protos.labels == c).nonzero()[:, 0].tolist()
                for k in which:
                    crop = upscale(self._crops[int(protos.instances[k])], 2)
                    name = [self._class_name(c)] if k == which[0] else None
                    cells.append(draw_boxes(crop, [[0, 0, size - 1, size - 1]], PALETTE[0], labels=name, width=2))
                    for j in protos.nearest[k].tolist():
                        cells.append(upscale(self._crops[j], 2) if j >= 0 else blank)
                rows.append(tile(cells, columns=len(cells), pad=1))
            out[f"prototypes_{level}"] = tile(rows, columns=1, pad=4)
        return out
