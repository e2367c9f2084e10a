"""Multi-process training on CPU (gloo): 2 ranks x batch 2 follow the loss trajectory of 1 rank x batch 4.

The comparison is meaningful because the run is set up so that the global batch is the same computation:

- the training sampler gives the two ranks the two halves of the one-rank batch, with the same augmentation seeds
  (an even number of images, so no rank pads);
- the student's BatchNorm is frozen (``backbone_weights`` = a file, the setting of any pretrained backbone), so
  no statistic depends on how the batch is split;
- RetinaNet's losses and FitNet's feature loss are means over images, so the mean of the ranks' losses (what
  the logger writes) is the loss of the global batch, and DDP's averaged gradient is its gradient.

What remains is float summation order: losses agree to ``RTOL`` (measured: about 1e-6 at step 1, 1e-5 by step 3).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from detkd.cli import main
from detkd.data import make_digits
from detkd.engine.checkpoint import read_checkpoint, save_student
from tests.conftest import tiny

WORLD = 2
ITERS = 3
RTOL = 1e-3
WRITE_EVENTS = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree", "os.symlink")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(data: Path, teacher: Path, backbone: Path, out: Path, batch: int) -> list[str]:
    return [
        "distill",
        "--method",
        "fitnet",
        "--teacher",
        str(teacher),
        "--student",
        "retinanet_r18",
        "--data",
        str(data),
        "--out",
        str(out),
        "--iters",
        str(ITERS),
        "--batch-size",
        str(batch),
        "--backbone-weights",
        str(backbone),
        "--no-progress",
        "model.min_size=64",
        "model.max_size=64",
        "model.fpn_channels=32",
        "optim.lr=0.01",
        "optim.warmup_iters=0",
        "optim.schedule=constant",
        "train.log_every=1",
        "train.ckpt_every=0",
        "train.tensorboard=false",
        "train.device=cpu",
        "data.val_max_images=2",
        "distill.check_teacher=0",
    ]


def _worker(rank: int, port: int, argv: list[str], out: str, audit_file: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)
    writes: list[str] = []
    if rank != 0:
        # Every file-system change this process makes under the run folder is recorded: there must be none.
        def audit(event: str, args: tuple) -> None:
            if event == "open":
                path, mode, flags = args
                writing = (mode is not None and any(c in mode for c in "wax+")) or (
                    mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                )
                if writing and str(path).startswith(out):
                    writes.append(f"open {path}")
            elif event in WRITE_EVENTS and args and str(args[0]).startswith(out):
                writes.append(f"{event} {args[0]}")

        sys.addaudithook(audit)
    code = main(argv)
    if rank != 0:
        Path(audit_file).write_text(json.dumps(writes))
    assert code == 0, f"rank {rank} exited with {code}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = root / "digits"
    make_digits(data, train=8, val=2, size=64)  # 8 images: 2 steps of 4 without padding either rank
    classes = [str(d) for d in range(10)]
    teacher = root / "teacher.pt"
    save_student(teacher, tiny("retinanet_r18", num_classes=10, fpn_channels=32), classes)
    backbone = root / "r18.pt"
    import torchvision

    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), backbone)
    return root, data, teacher, backbone


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_two_ranks_match_one_rank_and_only_rank0_writes(setup):
    root, data, teacher, backbone = setup
    out2, out1 = root / "ddp", root / "single"
    audit_file = root / "rank1_writes.json"
    argv = _args(data, teacher, backbone, out2, batch=2)
    mp.spawn(_worker, args=(_free_port(), argv, str(out2), str(audit_file)), nprocs=WORLD, join=True)
    assert main(_args(data, teacher, backbone, out1, batch=4)) == 0

    final2 = json.loads((out2 / "final.json").read_text())
    final1 = json.loads((out1 / "final.json").read_text())
    assert final2["machine"]["world_size"] == 2 and final1["machine"]["world_size"] == 1

    # Same loss trajectory, term by term.
    log2, log1 = _log(out2), _log(out1)
    assert [r["iter"] for r in log2] == [r["iter"] for r in log1] == list(range(1, ITERS + 1))
    terms = ["loss", "loss_cls", "loss_box", "fitnet.kd_feat"]
    for r2, r1 in zip(log2, log1):
        for key in terms:
            assert r2[key] == pytest.approx(r1[key], rel=RTOL), (r2["iter"], key, r2[key], r1[key])
    assert log1[-1]["loss"] != pytest.approx(log1[0]["loss"], rel=1e-3), "the trajectory should move"

    # Same final student.
    s2 = read_checkpoint(out2 / "student.pt")["model"]
    s1 = read_checkpoint(out1 / "student.pt")["model"]
    for key, value in s1.items():
        if value.is_floating_point():
            torch.testing.assert_close(s2[key], value, rtol=1e-3, atol=1e-4, msg=key)

    # The distillation term was non-zero on every rank.
    per_rank = final2["kd_per_rank"]
    assert len(per_rank) == WORLD
    assert all(sums["fitnet.kd_feat"] > 0 for sums in per_rank)
    assert final2["kd_active"] == {"fitnet.kd_feat": True}

    # Only rank 0 wrote: rank 1 touched nothing in the run folder, and every file has one writer's content.
    assert json.loads(audit_file.read_text()) == []
    assert sorted(p.name for p in out2.iterdir()) == sorted(p.name for p in out1.iterdir())
    assert len((out2 / "eval.jsonl").read_text().splitlines()) == 1
    assert not list(out2.glob(".*.tmp"))


def _noisy_predictions(dataset, indices):
    """Jittered ground truth plus false positives, a function of the image index alone (whichever rank asks)."""
    order = iter(indices)

    def predict(images):
        out = []
        for _ in images:
            i = next(order)
            g = torch.Generator().manual_seed(i)
            record = dataset.records[i]
            boxes = torch.from_numpy(record.boxes).reshape(-1, 4) + torch.randn(len(record.boxes), 4, generator=g)
            wrong = torch.rand(2, 2, generator=g) * 40
            boxes = torch.cat([boxes, torch.cat([wrong, wrong + 16], 1)])
            labels = torch.cat([torch.from_numpy(record.labels), torch.randint(1, 11, (2,), generator=g)])
            out.append({"boxes": boxes, "scores": torch.rand(len(boxes), generator=g), "labels": labels})
        return out

    return predict


def _eval_worker(rank: int, port: int, data: str, result_dir: str) -> None:
    import torch.distributed as dist

    from detkd.data import build_dataset
    from detkd.engine.evaluate import run_evaluation

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        dataset = build_dataset(data, "val")
        indices = range(rank, len(dataset), WORLD)  # the eval loader's share for this rank
        gathered: list = []
        metrics = run_evaluation(
            _noisy_predictions(dataset, indices),
            dataset,
            batch_size=2,
            progress=False,
            world_size=WORLD,
            predictions=gathered,
        )
        Path(result_dir, f"rank{rank}.json").write_text(
            json.dumps({"metrics": metrics, "gathered": [p["image_id"] for p in gathered]})
        )
    finally:
        dist.destroy_process_group()


def test_evaluation_shared_by_two_ranks_equals_one_rank(tmp_path):
    from detkd.data import build_dataset
    from detkd.engine.evaluate import run_evaluation

    data = tmp_path / "digits"
    make_digits(data, train=2, val=7, size=64)  # 7 images: the ranks get 4 and 3
    mp.spawn(_eval_worker, args=(_free_port(), str(data), str(tmp_path)), nprocs=WORLD, join=True)
    dataset = build_dataset(data, "val")
    single = run_evaluation(_noisy_predictions(dataset, range(len(dataset))), dataset, batch_size=2, progress=False)
    assert 0.1 < single["AP"] < 0.9 and single["num_images"] == 7
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    # Every rank gets the numbers rank 0 computed (compared as text: an undefined metric is NaN on both).
    assert json.dumps(rank0["metrics"]) == json.dumps(rank1["metrics"])
    assert rank0["gathered"] == dataset.image_ids() and rank1["gathered"] == []
    for key in ("AP", "AP50", "AP75", "num_images"):
        assert rank0["metrics"][key] == pytest.approx(single[key], abs=1e-9), key
