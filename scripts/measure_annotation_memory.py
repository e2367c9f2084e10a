"""Peak memory of reading a COCO-sized annotation file, and of DataLoader workers iterating over its records.

    python scripts/measure_annotation_memory.py --dir /tmp/coco100k --images 100000 --json result.json

Builds (once) a synthetic COCO split ``train`` with ``--images`` images (empty image files: nothing is decoded)
and ``--boxes`` annotations per image, then, in a fresh Python process:

1. ``load``: ``detkd.data.build_dataset`` of the split; reports the process's peak resident set size
   (``VmHWM`` in ``/proc/self/status``) after importing detkd and after loading, and the seconds taken; a first
   read of a large file parses it in a child process, whose own peak is reported apart (``ru_maxrss`` of the
   finished children; 0 when none ran);
2. ``workers``: a DataLoader with ``--workers`` worker processes that together read every record's boxes,
   labels and ignore flags twice (as GKD's sampler and the training loop do) and run a full garbage collection;
   each worker reports how much memory it had to make its own (``Private_Clean + Private_Dirty`` of
   ``/proc/self/smaps_rollup`` at the end minus at the start): pages it copied from the parent on access.

Run it once with the annotation cache absent (``--fresh``: the first process on a machine) and once with it present
(every later process: other ``torchrun`` ranks, the next run). Linux only. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def make_annotations(root: Path, images: int, boxes: int) -> Path:
    """A COCO split of ``images`` images of 640x480 with ``boxes`` boxes each over 80 categories."""
    ann = root / "annotations" / "instances_train.json"
    if ann.is_file():
        return ann
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        (root / "train" / f"{i:012d}.jpg").touch()
    imgs = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(images)]
    anns = []
    for i in range(images):
        for k in range(boxes):
            x, y = (37 * i + 11 * k) % 600, (53 * i + 7 * k) % 440
            w, h = 10 + (i + k) % 30, 10 + (3 * i + k) % 30
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": 1 + (i + k) % 80,
                    "bbox": [x + 0.5, y + 0.25, w, h],
                    "area": float(w * h),
                    "iscrowd": int((i + k) % 97 == 0),
                    "segmentation": [[x, y, x + w, y, x + w, y + h]],
                }
            )
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in range(1, 81)]
    tmp = ann.with_suffix(".tmp")
    tmp.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    tmp.rename(ann)
    return ann


def _status(field: str) -> float:
    """A ``/proc/self/status`` field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _private_mb() -> float:
    total = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total / 1024


def _measure(root: Path, workers: int) -> dict:
    """Runs in a fresh process: load, then iterate the workers."""
    import torch

    from detkd.data import build_dataset

    imported = _status("VmHWM")
    start = time.perf_counter()
    dataset = build_dataset(root, "train", "coco")
    seconds = time.perf_counter() - start
    loaded = _status("VmHWM")
    parse_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux; no DataLoader yet
    n = len(dataset)

    class Records(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            before = _private_mb()
            total = 0.0
            for _ in range(2):
                for i in range(info.id, n, info.num_workers):
                    record = dataset.records[i]
                    total += float(record.boxes[~record.ignore].sum()) + int(record.labels.sum())
            gc.collect()
            yield {"private_growth_mb": _private_mb() - before, "vmhwm_mb": _status("VmHWM"), "checksum": total}

    loader = torch.utils.data.DataLoader(Records(), batch_size=None, num_workers=workers)
    per_worker = list(loader)
    return {
        "images": n,
        "load_s": round(seconds, 1),
        "peak_after_import_mb": round(imported, 1),
        "peak_after_load_mb": round(loaded, 1),
        "load_peak_increase_mb": round(loaded - imported, 1),
        "parse_child_peak_mb": round(parse_child, 1),
        "workers": workers,
        "worker_private_growth_mb": [round(w["private_growth_mb"], 1) for w in per_worker],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="folder of the synthetic dataset (made if missing)")
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--boxes", type=int, default=7, help="annotations per image (COCO train 2017: 7.3)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--fresh", action="store_true", help="remove the annotation cache first (a cold first read)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    root = Path(args.dir)
    if args.child:
        print(json.dumps(_measure(root, args.workers)))
        return 0
    ann = make_annotations(root, args.images, args.boxes)
    if args.fresh:
        shutil.rmtree(ann.parent / ".detkd_cache", ignore_errors=True)
    cmd = [sys.executable, __file__, "--dir", str(root), "--workers", str(args.workers), "--child"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["annotation_file_mb"] = round(ann.stat().st_size / 2**20, 1)
    result["cache"] = "cold" if args.fresh else "warm"
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
