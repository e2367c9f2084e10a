#!/usr/bin/env bash
# Download (where there is network) the wheels scripts/gpu_check.sh and scripts/gpu_bench.sh may need on a GPU machine without network.
#
#   scripts/gpu_wheels.sh DIR [PYTHON_VERSION]      # e.g. scripts/gpu_wheels.sh wheels 3.11
#
# torch and torchvision are not downloaded (the GPU machine has its own CUDA build). Wheels are for manylinux
# x86_64 and the given Python version (default: this Python's). When the transfer has a size limit, delete from
# DIR what the GPU machine already has (numpy and pillow come with torch; scipy often does) or the onnx* wheels
# and their dependencies (the export test then skips); `du -sh DIR` is printed at the end.
set -euo pipefail
DIR=${1:?usage: scripts/gpu_wheels.sh DIR [PYTHON_VERSION]}
PYVER=${2:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
mkdir -p "$DIR"
python3 -m pip download --dest "$DIR" --only-binary :all: --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --python-version "$PYVER" \
  pytest pyyaml rich faster-coco-eval
for optional in scipy matplotlib onnx onnxscript onnxruntime; do
  python3 -m pip download --dest "$DIR" --only-binary :all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --python-version "$PYVER" "$optional" \
    || echo "could not download $optional"
done
du -sh "$DIR"
