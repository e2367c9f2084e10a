"""The CUDA path: training and distillation of every detector family with AMP off, bf16 and fp16, a one-process
NCCL DDP run, checkpoints moved between CUDA and CPU, and ONNX export of a CUDA-trained student.

Marked ``cuda`` and skipped where no GPU is visible; ``scripts/gpu_check.sh`` runs them on a GPU machine. Each run is
a few steps of a small detector on a few images of random pixels: the point is that every code path runs on the GPU
and gives finite numbers, not what it learns.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh there)"),
]

FAMILIES = ["frcnn", "retinanet", "fcos", "conditional_detr", "deformable_detr", "deformable_detr_refine"]
AMP = ["off", "bf16", "fp16"]
# A method that fits each family: feature imitation for the CNN detectors, DETRDistill for the DETRs.
METHOD = {"frcnn": "tar", "retinanet": "fitnet", "fcos": "fitnet"}
ITERS = 3
FAST = ["--no-progress", "model.min_size=64", "model.max_size=64", "model.fpn_channels=32", "data.batch_size=2"]
FAST += ["train.tensorboard=false", "distill.check_teacher=0", "train.log_every=1", "optim.warmup_iters=0"]
# Random-pixel data has no detkd.yaml: without this the standard preset would fetch ImageNet weights (no network).
FAST += ["model.backbone_weights=none"]


def _write_split(root: Path, split: str, images: int, seed: int) -> None:
    """COCO layout, random pixels, two or three boxes per image over 3 classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    imgs, anns = [], []
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
        imgs.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        for _ in range(2 + i % 2):
            x, y = rng.integers(0, 40, 2).tolist()
            w, h = rng.integers(12, 24, 2).tolist()
            anns.append(
                {"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, 4)), "bbox": [x, y, w, h]}
            )
    cats = [{"id": c, "name": name} for c, name in enumerate(["a", "b", "c"], start=1)]
    data = {"images": imgs, "annotations": anns, "categories": cats}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda_data")
    _write_split(root, "train", 4, 0)
    _write_split(root, "val", 2, 1)
    return root


def _cli(*argv: str) -> None:
    from detkd.cli import main

    assert main(list(argv)) == 0


def _finite_losses(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows, "no log lines"
    for row in rows:
        for key, value in row.items():
            if key.startswith("loss") and isinstance(value, float):
                assert value == value and abs(value) != float("inf"), (key, row)


def _train(data: Path, out: Path, family: str, amp: str, *extra: str) -> dict:
    _cli("train", "--model", f"{family}_r18", "--data", str(data), "--out", str(out), "--iters", str(ITERS),
         "--device", "cuda", f"train.amp={amp}", *FAST, *extra)  # fmt: skip
    final = json.loads((out / "final.json").read_text())
    assert final["machine"]["device"].startswith("cuda") and final["iters"] == ITERS
    _finite_losses(out)
    return final


@pytest.fixture(scope="module")
def teachers(data, tmp_path_factory) -> dict[str, Path]:
    """One CUDA-trained run per family (AMP off); its student.pt is the teacher of the distillation tests."""
    root = tmp_path_factory.mktemp("cuda_teachers")
    runs = {}
    for family in FAMILIES:
        _train(data, root / family, family, "off")
        runs[family] = root / family
    return runs


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("family", FAMILIES)
def test_train_on_cuda(data, tmp_path, family, amp):
    final = _train(data, tmp_path / "run", family, amp)
    assert final["peak_memory_mb"] > 0


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("family", FAMILIES)
def test_distill_on_cuda(data, teachers, tmp_path, family, amp):
    out = tmp_path / "run"
    method = METHOD.get(family, "detrdistill")
    _cli("distill", "--method", method, "--teacher", str(teachers[family] / "student.pt"), "--student",
         f"{family}_r18", "--data", str(data), "--out", str(out), "--iters", str(ITERS), "--device", "cuda",
         f"train.amp={amp}", *FAST)  # fmt: skip
    final = json.loads((out / "final.json").read_text())
    assert final["machine"]["device"].startswith("cuda")
    assert final["kd_active"] and any(final["kd_active"].values()), final["kd_active"]
    _finite_losses(out)


def test_checkpoint_round_trip_cuda_cpu(data, teachers, tmp_path):
    """A CUDA-trained checkpoint loads on CPU with the same outputs, resumes on CPU, and comes back to CUDA."""
    from detkd.config import DataConfig
    from detkd.data import build_dataset, build_transforms
    from detkd.engine.checkpoint import load_detector

    run = teachers["frcnn"]
    image = build_dataset(data, "val", "coco", build_transforms(DataConfig(), False))[0][0]
    gpu, _ = load_detector(run / "last.pt", "cuda")
    cpu, _ = load_detector(run / "last.pt", "cpu")
    gpu.eval()
    cpu.eval()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides
    try:
        with torch.no_grad():
            (a,) = gpu.predict([image.cuda()])
            (b,) = cpu.predict([image])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    top_a, top_b = a["scores"].cpu().sort(descending=True)[0], b["scores"].sort(descending=True)[0]
    n = min(len(top_a), len(top_b), 10)
    assert torch.allclose(top_a[:n], top_b[:n], atol=1e-3), (top_a[:n], top_b[:n])
    for name, tensor in gpu.state_dict().items():
        assert torch.equal(tensor.cpu(), cpu.state_dict()[name]), name

    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    _cli("train", "--out", str(moved), "--resume", "--iters", str(ITERS + 1), "--device", "cpu", "--no-progress")
    assert json.loads((moved / "final.json").read_text())["iters"] == ITERS + 1
    _cli("train", "--out", str(moved), "--resume", "--iters", str(ITERS + 2), "--device", "cuda", "--no-progress")
    final = json.loads((moved / "final.json").read_text())
    assert final["iters"] == ITERS + 2 and final["machine"]["device"].startswith("cuda")


def test_export_of_a_cuda_trained_student(data, teachers, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = tmp_path / "student.onnx"
    _cli("export", str(teachers["frcnn"] / "last.pt"), "--onnx", str(onnx), "--data", str(data))
    assert onnx.stat().st_size > 0


NCCL_CHILD = """
import os, sys
import torch, torch.distributed as dist
dist.init_process_group("nccl", rank=0, world_size=1)
torch.cuda.set_device(0)
from torch.nn.parallel import DistributedDataParallel as DDP
real_init = DDP.__init__
def traced(self, *args, **kwargs):
    print("DDP wrapped the trainable module", file=sys.stderr)
    real_init(self, *args, **kwargs)
DDP.__init__ = traced
from detkd.cli import main
code = main(sys.argv[1:])
dist.destroy_process_group()
sys.exit(code)
"""


def test_one_process_nccl_ddp(data, tmp_path):
    """The DDP wrapper, NCCL collectives (loss averaging, gathers of the logger and KD check) in one process."""
    if not torch.distributed.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    out = tmp_path / "run"
    argv = ["train", "--model", "retinanet_r18", "--data", str(data), "--out", str(out), "--iters", str(ITERS),
            "--device", "cuda:0", "train.amp=bf16", *FAST]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", NCCL_CHILD, *argv], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["iters"] == ITERS and final["machine"]["device"] == "cuda:0"
    assert "DDP wrapped the trainable module" in proc.stderr, proc.stderr[-3000:]
    _finite_losses(out)


def test_bench_timing_on_cuda(data, teachers):
    """The bench's timing phase runs on the GPU, as the suite's runs do, and says so: detectors, then a pair with a
    method row (student step, teacher forward, distillation step, latency)."""
    from detkd.bench.timing import time_detectors, time_pair

    overrides = ["model.min_size=64", "model.max_size=64", "model.fpn_channels=32", "data.batch_size=2"]
    overrides += ["model.backbone_weights=none"]
    speed = time_detectors(data, ["frcnn_r18"], overrides, steps=2)
    assert speed["device"] == torch.cuda.get_device_name(0)
    assert speed["detectors"]["frcnn_r18"]["step_s"] > 0
    student = teachers["frcnn"] / "student.pt"
    pair = time_pair(data, student, student, ["tar"], overrides, steps=2)
    assert pair["device"] == torch.cuda.get_device_name(0)
    assert pair["teacher_forward_s"] > 0 and pair["rows"]["tar"]["step_s"] > 0
    assert pair["rows"]["tar"]["nonfinite_steps"] == 0
