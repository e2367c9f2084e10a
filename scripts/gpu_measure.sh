#!/usr/bin/env bash
# Where a training step of the `gpu` suite goes on a GPU machine, without network: from the repository root,
#
#   scripts/gpu_measure.sh [WHEELS_DIR]
#
# Draws a small digits set at the gpu suite's 256 px, then trains each of $GPU_MEASURE_MODELS (default
# "frcnn_r18 retinanet_r18") for $GPU_MEASURE_ITERS steps (default 60) at the suite's settings, first one run
# alone, then $GPU_MEASURE_JOBS runs at once (default 8, as scripts/gpu_bench.sh runs them), one CPU thread each.
# Every run's log.jsonl has step_time and data_time (the part of the step spent waiting for the batch);
# $GPU_MEASURE_OUT/summary.md (default gpu_measure/) gives their medians per model and per number of runs at once.
# Whether eight runs at once are faster than one after another, and how much of a step is the input pipeline, is
# what sizes the gpu suite (docs/benchmark-regime.md, "The gpu suite"). GPU_MEASURE_DEVICE=cpu (with a few steps)
# checks the script itself on a machine without a GPU. Other packages come from WHEELS_DIR as for gpu_bench.sh.
set -euo pipefail

PYTHON=${PYTHON:-python3}
WHEELS=${1:-}
OUT=${GPU_MEASURE_OUT:-gpu_measure}
DEVICE=${GPU_MEASURE_DEVICE:-cuda}
JOBS=${GPU_MEASURE_JOBS:-8}
ITERS=${GPU_MEASURE_ITERS:-60}
MODELS=${GPU_MEASURE_MODELS:-frcnn_r18 retinanet_r18}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

declare -A NEEDED=([yaml]=pyyaml [rich]=rich [faster_coco_eval]=faster-coco-eval [scipy]=scipy [PIL]=pillow)
source "$(dirname "$0")/gpu_deps.sh"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

DATA="$OUT/digits"
[[ -f "$DATA/detkd.yaml" ]] || "$PYTHON" -c \
  "from detkd.data import make_digits; make_digits('$DATA', train=200, val=16, size=256, difficulty='hard', seed=1)"

# The gpu suite's settings (GPU in src/detkd/bench/suites.py), one CPU thread per run.
run() {  # model, folder
  mkdir -p "$(dirname "$2")"
  OMP_NUM_THREADS=1 "$PYTHON" -m detkd.cli train --model "$1" --data "$DATA" --out "$2" --iters "$ITERS" --threads 1 \
    --device "$DEVICE" --no-progress --overwrite model.min_size=256 model.max_size=256 data.batch_size=16 \
    train.tensorboard=false train.log_every=10 >"$2.log" 2>&1
}
for model in $MODELS; do
  run "$model" "$OUT/runs/$model/alone"
  for ((i = 0; i < JOBS; i++)); do run "$model" "$OUT/runs/$model/together$i" & done
  wait
done

"$PYTHON" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
lines = ["| model | runs at once | step_time s (median) | data_time s (median) | data share |"]
lines.append("|---|---:|---:|---:|---:|")


def rows(run):  # the log lines after the first (warm-up)
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][1:]


for model in sorted(p for p in (out / "runs").iterdir() if p.is_dir()):
    together = [p for p in model.iterdir() if p.is_dir() and p.name.startswith("together")]
    for count, runs in ((1, [model / "alone"]), (len(together), together)):
        logged = [row for run in runs for row in rows(run)]
        step = statistics.median(r["step_time"] for r in logged)
        data = statistics.median(r["data_time"] for r in logged)
        lines.append(f"| {model.name} | {count} | {step:.3f} | {data:.3f} | {data / step:.0%} |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
