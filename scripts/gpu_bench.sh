#!/usr/bin/env bash
# The `gpu` benchmark suite on a machine with an NVIDIA GPU, without network: from the repository root,
#
#   scripts/gpu_bench.sh [WHEELS_DIR [BENCH_ARGS...]]     # e.g. scripts/gpu_bench.sh "" --seeds 1
#
# Needs Python with torch (CUDA build) and torchvision; every other package the bench imports (pyyaml, rich,
# faster-coco-eval, scipy, matplotlib) is used when installed and otherwise installed from WHEELS_DIR with
# `pip --no-index` (scripts/gpu_wheels.sh makes that folder where there is network). detkd runs from src/.
# Runs `detkd bench --suite gpu` with $GPU_BENCH_JOBS runs at a time (default 8) into $GPU_BENCH_OUT (default
# gpu_bench/), stopped after $GPU_BENCH_LIMIT seconds (default 540); a stopped suite resumes from its finished and
# checkpointed runs when the script runs again. BENCH_ARGS go to `detkd bench` as they are. The report is
# gpu_bench/gpu/BENCHMARKS.md; the exit status is the bench's (124 when the time limit stopped it).
set -euo pipefail

PYTHON=${PYTHON:-python3}
WHEELS=${1:-}
shift $(($# > 0 ? 1 : 0))
OUT=${GPU_BENCH_OUT:-gpu_bench}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY

declare -A NEEDED=(
  [yaml]=pyyaml [rich]=rich [faster_coco_eval]=faster-coco-eval [scipy]=scipy [matplotlib]=matplotlib
  [PIL]=pillow [numpy]=numpy
)
source "$(dirname "$0")/gpu_deps.sh"

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
status=0
timeout --signal=TERM --kill-after=60 "${GPU_BENCH_LIMIT:-540}" "$PYTHON" -m detkd.cli bench --suite gpu \
  --jobs "${GPU_BENCH_JOBS:-8}" --out "$OUT" "$@" 2>&1 | tee -a "$OUT/bench.log" || status=${PIPESTATUS[0]}
exit "$status"
