"""configs/official/: each paper's recipe loads, keeps its official settings, and runs a step on tiny data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from detkd.config import Config, load_config
from detkd.data import build_dataset, make_digits
from detkd.engine.checkpoint import save_student
from detkd.engine.launch import run
from detkd.models import build_detector

OFFICIAL = Path(__file__).resolve().parents[1] / "configs" / "official"
RECIPES = {
    "tar_frcnn.yaml": "frcnn_r18",
    "gkd_frcnn.yaml": "frcnn_r18",
    "ida_frcnn.yaml": "frcnn_r18",
    "lgd_retinanet.yaml": None,
    "detrdistill_deformable_detr.yaml": "deformable_detr_r18",
}
TINY = [
    "model.preset=slim",
    "model.min_size=64",
    "model.max_size=64",
    "model.train_sizes=[48,64]",  # the recipes' multi-scale training, at tiny sizes
    "model.train_max_size=null",
    "model.backbone_weights=none",
    "data.batch_size=2",
    "data.val_max_images=1",
    "train.iters=1",
    "train.device=cpu",
    "train.progress=false",
    "train.tensorboard=false",
    "train.ckpt_every=0",
    "distill.check_teacher=0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("official_data")
    make_digits(root, train=8, val=2, size=64)
    return root


@pytest.fixture(scope="module")
def teachers(data, tmp_path_factory):
    """Untrained teachers of each kind the recipes need (their quality does not matter here)."""
    classes = list(build_dataset(str(data), "train", "auto", None).classes)
    folder = tmp_path_factory.mktemp("teachers")
    out = {}
    for name in ("frcnn_r18", "deformable_detr_r18"):
        out[name] = folder / f"{name}.pt"
        save_student(out[name], build_detector(name, len(classes), min_size=64, max_size=64), classes)
    return out


def test_every_seed_method_has_an_official_recipe():
    assert {p.name for p in OFFICIAL.glob("*.yaml")} == set(RECIPES)
    for path in OFFICIAL.glob("*.yaml"):
        header = path.read_text().split("\nmodel:")[0]
        assert "Follows" in header and "Still different" in header, path.name
        cfg = load_config(path)
        assert cfg.train.amp == "off", path.name  # every official recipe trains in fp32
        assert cfg.optim.decay_norm_bias, path.name  # mmdetection and detectron2 decay every parameter
        assert cfg.train.iters >= 10000 and cfg.optim.warmup_iters > 0, path.name


def test_official_values():
    ida = load_config(OFFICIAL / "ida_frcnn.yaml")
    assert ida.model.binary_grad_scale == 50.0 and ida.model.task_loss_weight == 5.0
    assert ida.model.train_sizes == [400, 600, 900] and ida.model.train_max_size == 1500
    lgd = load_config(OFFICIAL / "lgd_retinanet.yaml")
    assert lgd.optim.clip_grad_value == 1.0 and lgd.optim.clip_grad_norm is None
    assert lgd.distill.options["lgd"]["freeze_backbone_iters"] == 20000
    assert lgd.model.train_sizes == list(range(640, 801, 32)) and lgd.model.min_size == 800
    detr = load_config(OFFICIAL / "detrdistill_deformable_detr.yaml")
    assert detr.optim.lr_mult == {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}
    assert detr.data.random_crop is not None and detr.optim.warmup_iters == 500
    assert detr.model.train_sizes == list(range(480, 801, 32)) and detr.model.max_size == 1333
    gkd = load_config(OFFICIAL / "gkd_frcnn.yaml")
    assert gkd.distill.options["gkd"]["max_images_per_class"] == 800
    assert gkd.distill.options["gkd"]["strict_density_cut"] is True


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_official_recipe_runs_a_step_on_tiny_data(recipe, data, teachers, tmp_path):
    cfg = load_config(OFFICIAL / recipe)
    overrides = [*TINY, f"data.root={data}"]
    if cfg.model.name.endswith("_r50"):
        overrides.append(f"model.name={cfg.model.name[: -len('_r50')]}_r18")
    teacher = RECIPES[recipe]
    if teacher is not None:
        overrides.append(f"distill.teacher={teachers[teacher]}")
    if recipe == "gkd_frcnn.yaml":
        overrides.append("distill.options.gkd.min_box=4")  # 30 px is official, and larger than the tiny digits
    cfg = load_config(OFFICIAL / recipe, overrides, base=Config())
    summary = run(cfg, tmp_path / "run")
    assert summary["iters"] == 1 and summary["nonfinite_steps"] == 0
    assert math.isfinite(summary["metrics"]["AP"])
