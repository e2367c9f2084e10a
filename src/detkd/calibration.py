"""Automatic loss scales for distillation terms (``distill.calibrate=auto``).

Distillation terms differ in size by orders of magnitude (a feature MSE summed over channels, a KL divergence over
classes, an L1 on boxes), and their size depends on the pair and the data. A paper's weights are tuned for its
pair; on another pair a term can swamp the detection loss or vanish beside it. Calibration measures instead:

1. **Measure** (the first ``iters`` training steps): every calibrated term is computed and logged (``raw.*``) but
   applied with weight 0, so the student trains on its detection loss alone and the measurements do not depend on
   the weights being chosen. Per step the detection loss ``D`` (the sum of the student's own losses) and each raw,
   unweighted term ``R_k`` are recorded; steps where a value is not finite are left out of that value's mean.
2. **Choose** (once, at the end of step ``iters``): with ``n`` the number of calibrated terms whose mean is
   positive, term ``k`` gets the factor ``c_k = (share / n) * mean(D) / mean(R_k)``. So at calibration time the
   calibrated terms together are ``share`` times the detection loss, each an equal part of it.
3. **Keep**: the factors never change afterwards; they are stored in the training checkpoint (``--resume``
   restores them and never measures again), logged once (one line per term), written to ``log.jsonl`` as
   ``calib.<method>.<term>`` and to ``final.json``.

Why the sum of the terms, split evenly: the distillation signal as a whole stays a fixed fraction of the detection
loss however many terms a method (or a ``gkd+fitnet`` combination) has, so adding a method does not silently
multiply the pressure; without knowledge of the pair no term is presumed more important than another. Why a mean
over steps: the first batches' losses are noisy (random RoI sampling, few objects per image), so one batch could
be off by a large factor; a mean over ``iters`` steps is robust and still cheap.

The factor multiplies the user's weights: a term's weight at step ``t`` is
``c_k * distill.weights[method] * term_weights[term] * schedule(t)`` (the schedule unless the term is exempt), so
``term_weights`` and ``distill.weights`` keep their meaning as relative emphasis on top of the calibrated scale.
Terms named in ``exclude`` (``method.term``) are not calibrated: they are applied with factor 1 from the first
step. A method's own training losses (``Distiller.own_losses``, e.g. LGD's ``loss_teacher_det``, the detection loss
of its label-guided teacher) are no distillation terms and are never calibrated. A term never seen, or with mean 0,
during the measurement keeps factor 1.

Multi-process runs: each rank measures its own batches; the sums and counts are added over ranks (``all_reduce``)
before the factors are computed, so every rank computes the same factors from the same numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from detkd.errors import CheckpointError, ConfigError

log = logging.getLogger("detkd")

TASK = "detection"  # the key under which the detection loss is measured


class LossCalibration:
    """Measures distillation terms against the detection loss, then fixes one factor per term.

    Args:
        iters: steps to measure before the factors are chosen (>= 1).
        share: the calibrated terms' total size as a fraction of the detection loss (> 0).
        exclude: ``method.term`` keys left uncalibrated (factor 1 from the start).
    """

    def __init__(self, iters: int, share: float, exclude: Iterable[str] = ()):
        if iters < 1:
            raise ConfigError(f"distill.calibrate_iters must be >= 1, got {iters}")
        if not share > 0:
            raise ConfigError(f"distill.calibrate_share must be > 0, got {share}")
        self.iters = iters
        self.share = share
        self.exclude = set(exclude)
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.factors: dict[str, float] | None = None  # None while measuring

    @property
    def done(self) -> bool:
        return self.factors is not None

    def factor(self, key: str) -> float:
        """The factor of term ``key`` (``method.term``): 0 while measuring, then the chosen one."""
        if key in self.exclude:
            return 1.0
        if self.factors is None:
            return 0.0
        return self.factors.get(key, 1.0)

    def observe(self, step: int, task: Tensor, terms: Mapping[str, Tensor]) -> dict[str, float]:
        """Record one training step; after step ``iters - 1`` choose the factors.

        A collective in multi-process runs (at the step that chooses): every rank calls it at every step.

        Args:
            step: the step index (0-based).
            task: the detection loss of this step (a scalar).
            terms: the raw, unweighted distillation terms, ``method.term`` -> scalar.

        Returns:
            ``calib.<key>`` -> the factor applied at this step, for logging; empty while measuring (the step that
            chooses the factors included, since its terms were applied with weight 0).
        """
        if self.factors is not None:
            return {f"calib.{key}": value for key, value in self.factors.items()}
        self._add(TASK, float(task.detach()))
        for key, value in terms.items():
            if key not in self.exclude:
                self._add(key, float(value.detach()))
        if step >= self.iters - 1:
            self._choose(task.device)
        return {}

    def _add(self, key: str, value: float) -> None:
        self.sums.setdefault(key, 0.0)
        self.counts.setdefault(key, 0)
        if math.isfinite(value):
            self.sums[key] += value
            self.counts[key] += 1

    def _choose(self, device: torch.device) -> None:
        keys = sorted(self.sums)
        sums, counts = self.sums, self.counts
        if dist.is_available() and dist.is_initialized():
            # Ranks may have seen different terms (a term absent from a rank's batches): agree on the keys first.
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, keys)
            keys = sorted({k for rank_keys in every for k in rank_keys})
            packed = torch.tensor(
                [[sums.get(k, 0.0), float(counts.get(k, 0))] for k in keys], dtype=torch.float64, device=device
            )
            dist.all_reduce(packed)
            sums = {k: float(packed[i, 0]) for i, k in enumerate(keys)}
            counts = {k: int(packed[i, 1]) for i, k in enumerate(keys)}
        self.sums, self.counts = sums, counts  # what the factors are computed from, identical on every rank
        means = {k: sums[k] / counts[k] for k in keys if counts.get(k, 0) > 0}
        task = means.pop(TASK, 0.0)
        usable = {k: m for k, m in means.items() if m > 0}
        self.factors = {}
        if task <= 0 or not usable:
            log.warning("distill.calibrate: nothing to calibrate against (detection loss %.4g); factors stay 1", task)
            self.factors = {k: 1.0 for k in keys if k != TASK}
            return
        part = self.share / len(usable)
        for key in (k for k in keys if k != TASK):
            if key in usable:
                self.factors[key] = part * task / usable[key]
                log.info(
                    "distill.calibrate: %s mean %.4g over %d steps -> weight %.4g (%.3g of the detection loss %.4g)",
                    key,
                    usable[key],
                    counts[key],
                    self.factors[key],
                    part,
                    task,
                )
            else:
                self.factors[key] = 1.0
                log.warning("distill.calibrate: %s was never positive while measuring; its weight stays 1", key)

    def summary(self) -> dict[str, Any]:
        """What was measured and chosen (JSON-able), for ``final.json``."""
        means = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts.get(k)}
        return {"iters": self.iters, "share": self.share, "means": means, "factors": self.factors}

    def state_dict(self) -> dict[str, Any]:
        """Plain values (loadable with ``weights_only=True``)."""
        return {
            "iters": self.iters,
            "share": self.share,
            "sums": dict(self.sums),
            "counts": dict(self.counts),
            "factors": None if self.factors is None else dict(self.factors),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("iters") != self.iters or state.get("share") != self.share:
            raise CheckpointError(
                f"the checkpoint was calibrated with calibrate_iters={state.get('iters')}, "
                f"calibrate_share={state.get('share')}; this run has {self.iters}, {self.share}"
            )
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.counts = {str(k): int(v) for k, v in state["counts"].items()}
        factors = state["factors"]
        self.factors = None if factors is None else {str(k): float(v) for k, v in factors.items()}
