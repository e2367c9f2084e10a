"""Distilling Object Detectors with Task Adaptive Regularization (Sun et al., arXiv 2006.13108; "TADF").

The teacher's knowledge is borrowed only where the student is weak, in three places, and the whole
distillation penalty fades out over training:

- **region proposal sharing**: the student's sampled RoIs also go through the teacher's box head (no grad), so
  every RoI has a matched (teacher, student) pair of outputs (``DetOutputs.on_student_rois``);
- ``kd_feat``, **feature imitation under a Gaussian mask**: on every FPN level both detectors have,
  ``M_l(x, y) = max_k exp(-[(x+0.5-x_k)^2 / (2 sx_k^2) + (y+0.5-y_k)^2 / (2 sy_k^2)])`` with the box centre
  ``(x_k, y_k)`` and ``sx_k = beta * w_k``, ``sy_k = beta * h_k``, all in cells of that level (cell centres at
  ``x + 0.5``); not truncated outside the box, the max over overlapping boxes. Then
  ``L_feat = sum_l sum_xy M_l * ||A_l(S_l) - T_l||^2 / (2 * sum_l sum_xy M_l)``, one normalisation over all
  levels and images, through an adapter ``A_l`` per level (a 3x3 conv, identity-initialised when channels match);
- ``kd_cls``, **classification-head distillation** on the positive shared RoIs:
  ``tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau))`` over the C+1 logits, averaged over positives;
- ``kd_reg``, **regression-head distillation where the teacher is better**: for each positive RoI, both heads'
  class-specific deltas for the GT class are decoded (the student's detached) with the student's box coder; the
  RoI is *gated in* when ``IoU(teacher box, GT) > IoU(student box, GT)`` (``gate: student``) or
  ``> IoU(RoI, GT)`` (``gate: proposal``), and ``L_reg = sum_gated SmoothL1(d_S, d_T) / max(1, |Pos|)`` pulls
  the student's deltas toward the teacher's. The detector's own GT box loss stays on for every positive;
- **distillation decay** ``r(t) = 1 - t / T`` (t from 0) on all three terms, through the method's default
  ``schedule`` (``decay: linear``); ``schedule.exempt: [kd_feat]`` etc. leaves terms out of it.

One-stage students (RetinaNet, FCOS) have no RoIs: TAR gives them ``kd_feat`` (as above) and ``kd_cls`` as a
dense-logit term, the sigmoid analogue used by ``kd`` (per-class Bernoulli KL at ``tau`` over every anchor,
divided by the teacher's soft count of objects); there is no ``kd_reg`` and no RoI gate for them.

**Reconstructions.** The paper's full text was not available to this implementation; only its abstract and
secondary sources were (later papers describing TADF's Gaussian mask and decay). Every choice marked [R] below is a
reconstruction, not read from the paper, and is an option whose default is the most plausible reading:

- ``beta`` = 0.25 [R]: sigma per axis as a fraction of the box size (the mask is e^-2 at a box edge);
- ``levels`` = every level both detectors have [R]; ``kernel`` = 3, the adapter's conv kernel [R];
- ``temperature`` = 1 [R] (tau of ``kd_cls``);
- ``gate`` = ``student`` [R] (the alternative reading, ``proposal``, is from a secondary source);
- ``reg_beta`` = 1/9 [R]: SmoothL1's beta in ``kd_reg``, the same as torchvision's Fast R-CNN box loss, so
  the term has the task box loss's scale per RoI;
- the decay's unit, ``schedule.decay_unit`` = ``epoch`` [R]: the only description of TAR's decay (a later paper
  that adopted it) writes ``r(t) = 1 - (t-1)/t_max`` with t the epoch, so the factor is constant within an
  epoch, 1 in the first and ``1/E`` in the last of E epochs. ``r(t) = 1 - t/T`` with t counted from 0 is the same
  formula. A run shorter than one epoch therefore does not decay; ``schedule.decay_unit=iter`` decays per
  iteration (to ~0 at the end). The decay covering all three terms is also [R];
- term weights ``lambda_f = lambda_c = lambda_r = 1`` [R] (``term_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.errors import BuildError, ConfigError
from detkd.methods.base import Distiller, MethodConfig, ScheduleConfig
from detkd.methods.connectors import build_connectors
from detkd.methods.losses import bernoulli_kl, check_logit_pair, dense_soft_count, softmax_kl
from detkd.models.outputs import DenseHead, Detector, DetOutputs, RoIHeadDetector, TwoStageHead

MIN_SIGMA = 1e-3  # cells; keeps zero-size boxes from dividing by zero (their mask is then ~0 off the centre)


@dataclass
class TARSchedule(ScheduleConfig):
    """TAR's schedule: linear decay per epoch by default. A subclass (not just a default value) so that an
    override of one field, e.g. ``distill.options.tar.schedule.exempt=[kd_feat]``, keeps the other defaults."""

    decay: Literal["none", "linear", "step"] = "linear"
    decay_unit: Literal["iter", "epoch"] = "epoch"


@dataclass
class TARConfig(MethodConfig):
    schedule: TARSchedule = field(default_factory=TARSchedule)
    beta: float = 0.25
    temperature: float = 1.0
    gate: Literal["student", "proposal"] = "student"
    reg_beta: float = 1.0 / 9.0
    levels: list[str] | None = None
    kernel: int = 3


def gaussian_masks(boxes: list[Tensor], shape: tuple[int, int], stride: float, beta: float) -> Tensor:
    """TAR's Gaussian masks on one level, ``[B, H, W]``.

    ``M(x, y) = max_k exp(-[(x+0.5-cx_k)^2 / (2 (beta w_k)^2) + (y+0.5-cy_k)^2 / (2 (beta h_k)^2)])`` with box
    centre and size in cells (pixels / ``stride``); 0 for an image without boxes.

    Args:
        boxes: per image ``[N, 4]`` xyxy in input pixels.
        shape: ``(H, W)`` of the level.
        stride: input pixels per cell.
        beta: sigma as a fraction of the box's width / height.
    """
    h, w = shape
    device = boxes[0].device if boxes else torch.device("cpu")
    out = torch.zeros(len(boxes), h, w, device=device)
    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
    for i, b in enumerate(boxes):
        if len(b) == 0:
            continue
        b = b.float().to(device) / stride
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        sx = (beta * (b[:, 2] - b[:, 0])).clamp(min=MIN_SIGMA)
        sy = (beta * (b[:, 3] - b[:, 1])).clamp(min=MIN_SIGMA)
        ex = (xs[None, :] - cx[:, None]).pow(2) / (2 * sx[:, None].pow(2))  # [N, W]
        ey = (ys[None, :] - cy[:, None]).pow(2) / (2 * sy[:, None].pow(2))  # [N, H]
        out[i] = torch.exp(-(ey[:, :, None] + ex[:, None, :])).amax(0)
    return out


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching rows of two ``[N, 4]`` xyxy box sets, ``[N]``."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


def regression_gate(
    t_boxes: Tensor, s_boxes: Tensor, rois: Tensor, gt: Tensor, gate: str = "student"
) -> tuple[Tensor, Tensor]:
    """TAR's regression gate: ``(gated [N] bool, teacher IoU [N])``.

    A RoI is gated in when the teacher's decoded box is strictly closer to its GT (higher IoU) than the
    student's decoded box (``gate="student"``) or than the RoI itself (``gate="proposal"``).
    """
    t_iou = pairwise_iou(t_boxes.float(), gt.float())
    ref = s_boxes if gate == "student" else rois
    return t_iou > pairwise_iou(ref.float(), gt.float()), t_iou


class TAR(Distiller):
    name = "tar"
    summary = (
        "task-adaptive: Gaussian-masked features, soft labels and teacher-gated box regression on shared RoIs, "
        "decaying over training (Sun et al. 2020)"
    )
    Config = TARConfig
    benchmark_goal = True
    paper_gap_closed = 1.05

    def __init__(self, cfg: TARConfig, student: Detector, teacher: Detector | None):
        super().__init__(cfg, student, teacher)
        if cfg.beta <= 0:
            raise ConfigError(f"distill.options.tar.beta must be positive, got {cfg.beta}")
        if cfg.temperature <= 0:
            raise ConfigError(f"distill.options.tar.temperature must be positive, got {cfg.temperature}")
        if cfg.reg_beta < 0:
            raise ConfigError(f"distill.options.tar.reg_beta must be >= 0, got {cfg.reg_beta}")
        check_logit_pair(student, teacher, "tar")
        self.connectors = build_connectors(student.feature_info, teacher.feature_info, cfg.levels, cfg.kernel)
        if isinstance(student, RoIHeadDetector):
            s_w, t_w = student.box_coder_weights, teacher.box_coder_weights
            if s_w != t_w:
                raise BuildError(
                    f"tar: the teacher's box deltas are encoded with weights {t_w}, the student's with {s_w}; "
                    "regression distillation needs the same encoding"
                )

    def needs_teacher_head(self) -> bool:
        return self.student.head_type is DenseHead

    def needs_shared_rois(self) -> bool:
        return self.student.head_type is TwoStageHead

    # ----------------------------------------------------------------------------------------------- terms

    def feature_term(self, student: DetOutputs, teacher: DetOutputs, targets: list[dict[str, Tensor]]) -> Tensor:
        boxes = [t["boxes"] for t in targets]
        total = student.features[next(iter(self.connectors))].new_zeros((), dtype=torch.float32)
        mask_sum = total.new_zeros(())
        coverage = []
        for level, connector in self.connectors.items():
            t_feat = teacher.features[level]
            s_feat = connector(student.features[level], t_feat.shape[-2:])
            mask = gaussian_masks(boxes, tuple(t_feat.shape[-2:]), connector.teacher_spec.stride, self.cfg.beta)
            mask = mask.to(t_feat.device)
            total = total + ((s_feat.float() - t_feat.float()).pow(2) * mask[:, None]).sum()
            mask_sum = mask_sum + mask.sum()
            coverage.append(float(mask.mean()))
        self.stats["mask_sum"] = float(mask_sum)
        self.stats["mask_coverage"] = sum(coverage) / len(coverage)
        # A weighted mean over cells: 0 (with a graph) when no image of the batch has a box.
        return total / (2 * mask_sum.clamp(min=1e-12))

    def roi_gate(self, student: DetOutputs, teacher: DetOutputs) -> dict[str, Tensor]:
        """Positive shared RoIs with both heads' GT-class deltas, decoded boxes and the gate."""
        head, shared = student.head, teacher.on_student_rois
        s_logits, s_deltas = head.roi_logits, head.roi_deltas
        labels = torch.cat(head.roi_labels)
        pos = torch.where(labels > 0)[0]
        cls = labels[pos]
        rois = torch.cat(head.rois)[pos]
        gt = torch.cat(head.roi_matched_gt)[pos]
        s_d = s_deltas.reshape(len(labels), -1, 4)[pos, cls]
        t_d = shared.deltas.reshape(len(labels), -1, 4)[pos, cls].to(s_d.dtype)
        with torch.no_grad():
            t_boxes = self.student.decode_boxes(t_d.float(), rois.float())
            s_boxes = self.student.decode_boxes(s_d.detach().float(), rois.float())
            gated, t_iou = regression_gate(t_boxes, s_boxes, rois, gt, self.cfg.gate)
        return dict(
            pos=pos, s_logits=s_logits[pos], t_logits=shared.logits[pos], s_deltas=s_d, t_deltas=t_d,
            rois=rois, gt=gt, t_boxes=t_boxes, s_boxes=s_boxes, gated=gated, t_iou=t_iou,
        )  # fmt: skip

    def forward(
        self, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]], step: int
    ) -> dict[str, Tensor]:
        terms = {"kd_feat": self.feature_term(student, teacher, targets)}
        tau = self.cfg.temperature
        head = student.head
        if isinstance(head, DenseHead):
            s_logits, t_logits = head.cls_logits, teacher.head.cls_logits
            norm = dense_soft_count(t_logits)
            self.stats["teacher_objects"] = float(norm)
            terms["kd_cls"] = bernoulli_kl(s_logits, t_logits, tau).sum() / norm
            return terms

        r = self.roi_gate(student, teacher)
        n_pos = len(r["pos"])
        self.stats["positive_rois"] = float(n_pos)
        zero = head.roi_logits.sum() * 0.0
        if n_pos == 0:
            self.stats["gate_pass"] = 0.0
            terms["kd_cls"] = zero
            terms["kd_reg"] = zero + head.roi_deltas.sum() * 0.0
            return terms
        terms["kd_cls"] = softmax_kl(r["s_logits"], r["t_logits"], tau).mean()
        gated = r["gated"]
        reg = F.smooth_l1_loss(
            r["s_deltas"].float(), r["t_deltas"].float(), reduction="none", beta=self.cfg.reg_beta
        ).sum(-1)
        terms["kd_reg"] = (reg * gated.float()).sum() / max(1, n_pos)
        self.stats["gate_pass"] = float(gated.float().mean())
        self.stats["teacher_iou"] = float(r["t_iou"].mean())
        return terms

    # -------------------------------------------------------------------------------------------- pictures

    def visualize(
        self, image: Tensor, student: DetOutputs, teacher: DetOutputs | None, targets: list[dict[str, Tensor]]
    ) -> dict[str, Any]:
        """``gaussian_mask``: the mask of the finest distilled level (red, its cells visible) over the first image,
        with its GT boxes (white); ``gated_rois``: that image's positive shared RoIs, green where the regression
        gate passes (the teacher's box, drawn thin in yellow, is closer to the GT), red where it does not, over the
        GT in thick white (two-stage students only). Enlarged so the short side is at least 384 pixels."""
        from detkd.viz import draw_boxes, overlay_mask, to_uint8, upscale

        base = to_uint8(image)
        factor = max(1, -(-384 // max(1, min(base.shape[:2]))))
        boxes = targets[0]["boxes"].detach().float().cpu()
        level = min(self.connectors, key=lambda lv: self.connectors[lv].teacher_spec.stride)
        spec = self.connectors[level].teacher_spec
        shape = tuple((teacher.features[level] if teacher is not None else student.features[level]).shape[-2:])
        mask = gaussian_masks([boxes], shape, spec.stride, self.cfg.beta)[0]
        mask = mask[: -(-image.shape[-2] // spec.stride), : -(-image.shape[-1] // spec.stride)]
        pic = upscale(overlay_mask(base, mask, color=(255, 0, 0), alpha=0.7), factor)
        out = {"gaussian_mask": draw_boxes(pic, boxes * factor, color=(255, 255, 255), width=2)}

        head = student.head
        if isinstance(head, TwoStageHead) and head.rois is not None and teacher is not None:
            r = self.roi_gate(student, teacher)
            first = r["pos"] < len(head.rois[0])
            gated = r["gated"][first].cpu()
            rois = r["rois"][first].detach().float().cpu()
            # GT first, so that the positive RoIs (torchvision adds the GT boxes themselves) stay visible on top.
            pic = draw_boxes(upscale(base, factor), boxes * factor, color=(255, 255, 255), width=3)
            pic = draw_boxes(pic, rois[~gated] * factor, color=(230, 25, 75), width=2)
            pic = draw_boxes(pic, rois[gated] * factor, color=(60, 180, 75), width=2)
            out["gated_rois"] = draw_boxes(pic, r["t_boxes"][first][gated].cpu() * factor, color=(255, 225, 25))
        return out
