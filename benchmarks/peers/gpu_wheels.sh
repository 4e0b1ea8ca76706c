#!/usr/bin/env bash
# Downloads the peers' wheels for a GPU machine that has a CUDA torch but no
# internet (e.g. an image with torch, torchvision, accelerate, einops, scipy,
# huggingface-hub and safetensors, and without the peers themselves).
#
#   bash benchmarks/peers/gpu_wheels.sh [DIR]     # DIR defaults to .whl
#
# Run it where pip reaches PyPI; carry DIR to the GPU machine and give it to
# the suite there: `WHEELS=DIR bash benchmarks/gpu_suite.sh ...`, which
# installs them with `pip --no-index --no-deps` into a folder on PYTHONPATH.
# The three are pure-Python wheels; the versions are the ones measured on the
# CPU machine (requirements-nodeps.txt for the peers, ema-pytorch 0.8.3).
# Their other runtime needs (requirements.txt) must already be on the GPU
# machine; nothing here fetches torch.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${1:-.whl}"
PYTHON="${PYTHON:-python3}"
EMA_PYTORCH_VERSION="${EMA_PYTORCH_VERSION:-0.8.3}"

mapfile -t peers < <(grep -E '^[A-Za-z]' "$HERE/requirements-nodeps.txt")
mkdir -p "$DIR"
"$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform any \
  -d "$DIR" "${peers[@]}" "ema-pytorch==${EMA_PYTORCH_VERSION}"
ls -l "$DIR"
