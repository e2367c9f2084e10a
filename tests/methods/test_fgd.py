"""FGD: attention, focal masks and the four terms on hand-made maps, checked against direct computations."""

from __future__ import annotations

import pytest
import torch

from detkd.distillation import build_distillers
from detkd.errors import ConfigError
from detkd.methods.fgd import ONE_STAGE_WEIGHTS, TWO_STAGE_WEIGHTS, attention, focal_masks
from tests.conftest import make_batch, tiny


def test_attention_sums_to_the_cell_and_channel_counts_and_follows_activity():
    x = torch.zeros(1, 3, 2, 2)
    x[0, 1, 0, 1] = 5.0  # one active cell, one active channel
    spatial, channel = attention(x, 0.5)
    assert spatial.sum().item() == pytest.approx(4.0) and channel.sum().item() == pytest.approx(3.0)
    assert spatial[0].argmax().item() == 1 and channel[0].argmax().item() == 1
    # By hand: mean over channels |x| is 5/3 at the active cell, 0 elsewhere; softmax at temperature 0.5.
    e = torch.tensor([0.0, 10.0 / 3, 0.0, 0.0]).exp()
    assert torch.allclose(spatial.flatten(), 4 * e / e.sum(), atol=1e-5)


def test_focal_masks_by_hand():
    # Level 4x4 of a 16x16 batch (stride 4); box x 0-5, y 4-8 px -> cells x 0..ceil(1.25)=2, y 1..2: 3 wide, 2 high.
    boxes = [torch.tensor([[0.0, 4.0, 5.0, 8.0]]), torch.zeros(0, 4)]
    fg, bg = focal_masks(boxes, (4, 4), (16, 16), [(16, 16), (16, 16)])
    expected = torch.zeros(4, 4)
    expected[1:3, 0:3] = 1 / 6
    assert torch.allclose(fg[0], expected)
    assert torch.allclose(bg[0], (expected == 0).float() / 10) and torch.allclose(bg[1], torch.full((4, 4), 1 / 16))
    # Overlaps keep the larger value (the smaller box).
    fg2, _ = focal_masks([torch.tensor([[0.0, 0.0, 12.0, 12.0], [0.0, 0.0, 4.0, 4.0]])], (4, 4), (16, 16), [(16, 16)])
    assert fg2[0, 0, 0].item() == pytest.approx(1 / 4) and fg2[0, 2, 2].item() == pytest.approx(1 / 16)
    # The released code: x range on the rows, boxes scaled by the image's own size (here 8x16 in a 16x16 batch).
    rel, _ = focal_masks(boxes[:1], (4, 4), (16, 16), [(8, 16)], geometry="released")
    expected = torch.zeros(4, 4)
    expected[0:3, 2:5] = 1 / ((4 + 1 - 2) * 3)  # y: 4/8*4=2 .. 8/8*4=4 -> cells 2..4 (clipped at 3), 3 x 3 area
    assert torch.allclose(rel[0], expected)


def test_terms_match_a_direct_computation_and_train_the_student():
    images, targets = make_batch(n=2, size=64, empty_last=False)
    for name, levels, weights in (
        ("frcnn_r18", ["p2", "p3", "p4", "p5"], TWO_STAGE_WEIGHTS),
        ("retinanet_r18", ["p3", "p4", "p5", "p6", "p7"], ONE_STAGE_WEIGHTS),
    ):
        student, teacher = tiny(name, 3), tiny(name.replace("r18", "r50"), 3)
        fgd = build_distillers(["fgd"], {"fgd": {"term_weights": {"kd_bg": 1.0}}}, student, teacher)["fgd"]
        assert list(fgd.levels) == levels
        assert fgd.cfg.term_weights == {**weights, "kd_bg": 1.0}  # a partial override keeps the other defaults
        teacher.eval().requires_grad_(False)
        batch, tg = student.preprocess(images, targets)
        s_out = student(batch, tg)
        with torch.no_grad():
            t_out = teacher(batch, None)
        terms = fgd(s_out, t_out, tg, 0)
        # Direct: the first level's foreground term, written out cell by cell for image 0.
        level = levels[0]
        s, t = s_out.features[level].detach(), t_out.features[level]
        sp, ch = attention(t, 0.5)
        fg, _ = focal_masks([x["boxes"] for x in tg], tuple(t.shape[-2:]), s_out.batch_shape, s_out.image_sizes)
        direct = sum(
            float(fg[i, y, x] * sp[i, y, x] * ch[i, c] * (s[i, c, y, x] - t[i, c, y, x]) ** 2)
            for i in range(2)
            for c in range(s.shape[1])
            for y, x in fg[i].nonzero().tolist()
        )
        one_level = build_distillers(["fgd"], {"fgd": {"levels": [level]}}, student, teacher)["fgd"]
        assert one_level(s_out, t_out, tg, 0)["kd_fg"].item() == pytest.approx(direct / 2, rel=1e-4)
        # At initialisation the global blocks add zero: kd_global is the summed squared error / N.
        sse = sum(float((s_out.features[lv].detach() - t_out.features[lv]).pow(2).sum()) for lv in levels) / 2
        assert terms["kd_global"].item() == pytest.approx(sse, rel=1e-4)
        sum(terms.values()).backward()
        assert all(v.item() > 0 for v in terms.values())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    with pytest.raises(ConfigError, match="temperature"):
        build_distillers(["fgd"], {"fgd": {"temperature": 0}}, tiny("frcnn_r18", 3), tiny("frcnn_r50", 3))
