#!/usr/bin/env bash
# The CUDA check: run from the repository root on a machine with an NVIDIA GPU, without network.
#
#   scripts/gpu_check.sh [WHEELS_DIR]
#
# Needs Python with torch (CUDA build) and torchvision installed. Every other package detkd and its tests import
# (pytest, pyyaml, rich, faster-coco-eval, scipy; onnx, onnxscript and onnxruntime for the export test) is used
# from the installed packages when present and otherwise installed from WHEELS_DIR with `pip --no-index` (make
# that folder where there is network with scripts/gpu_wheels.sh). detkd itself runs from src/ (PYTHONPATH), so
# nothing is built. Then tests/test_cuda.py (marker `cuda`) runs:
#   - `detkd train` and `detkd distill` on CUDA for every detector family with train.amp off, bf16 and fp16;
#   - a one-process NCCL process group around a run (DDP wrapper and NCCL collectives);
#   - a CUDA-trained checkpoint loaded on CPU (same weights and outputs), resumed on CPU, then on CUDA again;
#   - ONNX export (checked with onnxruntime) of the CUDA-trained student (skipped without onnxruntime).
# The pytest log and a JUnit report go to gpu_check/ (or $GPU_CHECK_OUT); the exit status is pytest's.
set -euo pipefail

PYTHON=${PYTHON:-python3}
WHEELS=${1:-}
OUT=${GPU_CHECK_OUT:-gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

"$PYTHON" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}, NCCL {torch.distributed.is_nccl_available()}")
EOF

# module to import -> package to install
declare -A NEEDED=(
  [pytest]=pytest [yaml]=pyyaml [rich]=rich [faster_coco_eval]=faster-coco-eval [scipy]=scipy
  [onnx]=onnx [onnxscript]=onnxscript [onnxruntime]=onnxruntime [PIL]=pillow [numpy]=numpy
)
source "$(dirname "$0")/gpu_deps.sh"

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m pytest tests/test_cuda.py -m cuda -v -rs -p no:cacheprovider \
  --junitxml "$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
exit "${PIPESTATUS[0]}"
