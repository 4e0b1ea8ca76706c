#!/usr/bin/env bash
# Install the PyTorch peers used by benchmarks/peers/*_bench.py.
#
# Benchmark-only: the diffusion_jax library never needs torch. Installs into
# whatever `python` (or $PYTHON) is active, so use a virtual environment if you
# do not want torch in your main one.
#
#   bash benchmarks/peers/install.sh          # CPU torch unless nvidia-smi is found
#   bash benchmarks/peers/install.sh --cpu    # force the CPU build of torch
#   bash benchmarks/peers/install.sh --gpu    # CUDA torch + torchvision from PyPI
#
# Order matters on CPU-only machines: the CPU torch goes in FIRST, then
# everything else is installed with torch pinned to the installed build, and
# the two peers go in with --no-deps. Otherwise pip resolves
# denoising-diffusion-pytorch -> torchvision -> a multi-GB CUDA torch.
#
# torchvision on CPU: PyPI only has CUDA builds of torchvision for Linux, and
# their _C extension links libtorch_cuda, so `import torchvision` fails outright
# against a CPU torch (torchvision registers fake kernels for its C++ ops at
# import time). When a local CPU torch wheel is used (no PyTorch index), no
# torchvision is installed and lucidrains_bench.py substitutes a stub module for
# the two names denoising_diffusion_pytorch imports from it at module level
# (`transforms`, `utils`); only its Trainer/Dataset use them, never the
# Unet/GaussianDiffusion being timed. Elsewhere the matching CPU torchvision is
# taken from the PyTorch CPU index.
#
# Environment overrides: PYTHON, TORCH_VERSION, TORCHVISION_VERSION,
# TORCH_CPU_INDEX_URL, TORCH_WHEEL_DIR.
set -euo pipefail

PYTHON="${PYTHON:-python}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"   # the release paired with torch 2.13
TORCH_CPU_INDEX_URL="${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

mode=auto
case "${1:-}" in
  --cpu) mode=cpu ;;
  --gpu) mode=gpu ;;
  "") ;;
  *) echo "usage: $0 [--cpu|--gpu]" >&2; exit 2 ;;
esac
if [[ "$mode" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=gpu; else mode=cpu; fi
fi
echo "[install] mode=$mode python=$("$PYTHON" -c 'import sys; print(sys.executable)')"

pip_install() { "$PYTHON" -m pip install --disable-pip-version-check "$@"; }

installed_torch() {
  "$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || true
}

# 1. torch (and torchvision where a matching one exists).
if [[ "$mode" == cpu ]]; then
  current="$(installed_torch)"
  if [[ "$current" == "${TORCH_VERSION}+cpu" ]]; then
    echo "[install] keeping torch $current"
  else
    shopt -s nullglob
    local_wheels=("$TORCH_WHEEL_DIR"/torch-"${TORCH_VERSION}"+cpu-*.whl)
    shopt -u nullglob
    if (( ${#local_wheels[@]} > 0 )); then
      echo "[install] CPU torch from $TORCH_WHEEL_DIR"
      pip_install --find-links "$TORCH_WHEEL_DIR" "torch==${TORCH_VERSION}+cpu"
    else
      echo "[install] CPU torch from $TORCH_CPU_INDEX_URL"
      pip_install --index-url "$TORCH_CPU_INDEX_URL" \
        "torch==${TORCH_VERSION}+cpu" "torchvision==${TORCHVISION_VERSION}+cpu"
    fi
  fi
  "$PYTHON" -c 'import torch, sys; sys.exit("[install] ERROR: a CUDA torch is installed; uninstall it or use --gpu" if torch.version.cuda else 0)'
else
  pip_install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
fi

# 2. The peers' runtime needs, never allowed to move torch.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$(installed_torch)" > "$constraints"
pip_install -c "$constraints" -r "$HERE/requirements.txt"

# 3. The peers themselves, without their declared deps (torchvision, pytorch-fid).
pip_install --no-deps -r "$HERE/requirements-nodeps.txt"

# 4. Check that both peers import the way the benchmark scripts import them.
"$PYTHON" -c 'import torch, diffusers; print(f"[install] torch {torch.__version__} (cuda {torch.version.cuda}), diffusers {diffusers.__version__}")'
(cd "$HERE" && "$PYTHON" -c 'import lucidrains_bench as lb; _, how = lb.import_denoising_diffusion_pytorch(); print(f"[install] denoising_diffusion_pytorch {lb.ddp_version()} (torchvision: {how})")')
