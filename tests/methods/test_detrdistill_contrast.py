"""DETRDistill's query-contrast term runs in the official direction (teacher rows, student columns)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from detkd.distillation import build_distillers
from tests.conftest import tiny


def official_contrast(proj_s, proj_t, s_rows, t_rows, temperature):
    """Written out from the official head: logits = T S^T / tau, cross-entropy with the diagonal as positives."""
    s = F.normalize(proj_s.net(s_rows), dim=1)
    t = F.normalize(proj_t.net(t_rows), dim=1)
    logits = t @ s.T / temperature
    return -(logits.diagonal() - logits.logsumexp(1)).mean()


@pytest.mark.parametrize("direction", ["teacher_to_student", "student_to_teacher"])
def test_contrast_direction(direction):
    student, teacher = tiny("deformable_detr_r18"), tiny("deformable_detr_r18")
    options = {"detrdistill": {"contrast_direction": direction}}
    distiller = build_distillers(["detrdistill"], options, student, teacher)["detrdistill"]
    distiller.eval()  # BatchNorm of the projection heads on its running statistics: a fixed function
    g = torch.Generator().manual_seed(0)
    dim = student.transformer.dim
    s_emb = torch.randn(1, 1, 5, dim, generator=g)  # [layers, images, queries, dim]
    t_emb = torch.randn(1, 1, 5, dim, generator=g)
    matching = {(0, 0): [(torch.tensor([0, 1, 2, 3]), torch.tensor([3, 1, 0, 4]))]}
    with torch.no_grad():
        loss = distiller._contrast(SimpleNamespace(embeddings=s_emb), SimpleNamespace(embeddings=t_emb), matching)
        s_rows, t_rows = s_emb[0, 0, :4], t_emb[0, 0, [3, 1, 0, 4]]
        official = official_contrast(
            distiller.contrast_student, distiller.contrast_teacher, s_rows, t_rows, distiller.cfg.contrast_temperature
        )
    if direction == "teacher_to_student":
        assert float(loss) == pytest.approx(float(official), rel=1e-5)
    else:
        assert float(loss) != pytest.approx(float(official), rel=1e-3)
