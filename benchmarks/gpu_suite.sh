#!/usr/bin/env bash
# The whole GPU benchmark suite of BENCHMARKS.md in one call (H100 / H200).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [all|train|sample|peers]
#
# OUT_DIR defaults to $OUT, else ./benchmark_results. The parts can be run
# one per call where a call is time-limited (each takes a few minutes on an
# H100; `all` runs the three in turn).
#
# Writes one JSON line per measurement to OUT_DIR/gpu_suite.jsonl (progress and
# errors to OUT_DIR/gpu_suite.log), then prints the summary table of each
# peer comparison. Every run is independent: one that fails is logged and
# the suite goes on.
#
# What it runs (each line below is also a command you can run by hand):
#   1. diffusion_jax training, ddpm_cifar10: batch 128 and 256, bf16 and fp32;
#      bf16 again with 4 steps per dispatch and with cuDNN attention; adm_64 bf16;
#      a profile of the bf16 step (profile_step.py: time by kind of operation).
#      -> the "DDPM CIFAR-10 at >= 40% bf16 MFU" target (field "mfu").
#   2. diffusion_jax sampling, ddpm_cifar10, 256 images: 1000-step ancestral
#      DDPM, 100- and 50-step DDIM, 20-step DPM-Solver++; compile time at 10 and
#      1000 steps. -> the "256 samples, 1000 ancestral steps in < 8 s" target
#      (field "wall_s" of the ddpm record).
#   3. The PyTorch peers (only if `import torch` finds CUDA): diffusers and
#      lucidrains, eager and torch.compile, bf16 autocast, through compare.py
#      so ours and theirs alternate (A B A B).
#
# Dependencies. Our scripts need only jax[cuda], flax, optax, chex and numpy:
# they use synthetic data and never import tensorflow-datasets, grain,
# ml-collections or orbax. A GPU machine without internet therefore needs
# wheels carried in, e.g. built here with
#     pip download -d wheels "jax[cuda12]" flax optax chex
# and installed there with
#     pip install --no-index --find-links wheels "jax[cuda12]" flax optax chex && pip install --no-deps -e .
# (`pip install -e .` would also want tensorflow-datasets, grain and
# ml-collections from pyproject.toml; --no-deps skips them, and nothing here
# imports them.) The peers need a CUDA torch and their own wheels: see
# benchmarks/peers/install.sh --gpu; without torch the peer runs are skipped.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PYTHON="${PYTHON:-python}"
OUT_DIR="${1:-${OUT:-$ROOT/benchmark_results}}"
PART="${2:-all}"
case "$PART" in all|train|sample|peers) ;; *) echo "usage: $0 [OUT_DIR] [all|train|sample|peers]" >&2; exit 2 ;; esac
mkdir -p "$OUT_DIR"
JSONL="$OUT_DIR/gpu_suite.jsonl"
LOG="$OUT_DIR/gpu_suite.log"
cd "$ROOT"

run() {  # run CMD...: its JSON lines to $JSONL, stderr to $LOG
  echo "=== $(date +%T) $*" | tee -a "$LOG" >&2
  "$@" 2>>"$LOG" | tee -a "$JSONL" | cut -c1-240
  local rc=${PIPESTATUS[0]}
  (( rc == 0 )) || echo "=== exit status $rc: $*" | tee -a "$LOG" >&2
}

run_compare() {  # compare.py appends its records to $JSONL itself; its table goes to the log
  echo "=== $(date +%T) $*" | tee -a "$LOG" >&2
  "$@" --jsonl "$JSONL" 2>>"$LOG" | tee -a "$LOG"
}

want() { [[ "$PART" == all || "$PART" == "$1" ]]; }

{
  echo "=== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PYTHON" -c 'import jax, jaxlib, flax; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__); print(jax.devices())'
} 2>&1 | tee -a "$LOG"

T="$HERE/train_throughput.py"
S="$HERE/sample_throughput.py"

# 1. Training.
if want train; then
run "$PYTHON" "$T" --workload ddpm_cifar10 --batch 128 256 --dtype bfloat16 float32 --repeats 5 --steps 20 --warmup 3
run "$PYTHON" "$T" --workload ddpm_cifar10 --batch 128 256 --dtype bfloat16 --repeats 5 --steps 20 --warmup 2 --steps-per-dispatch 4
run "$PYTHON" "$T" --workload ddpm_cifar10 --batch 128 --dtype bfloat16 --repeats 5 --steps 20 --warmup 3 --attention-impl cudnn
run "$PYTHON" "$T" --workload adm_64 --batch 64 --dtype bfloat16 --repeats 5 --steps 10 --warmup 3
run "$PYTHON" "$T" --workload tiny --batch 32 256 --dtype bfloat16 float32 --repeats 5 --steps 50 --warmup 3
# Where the bf16 step's time goes (a "kind": "profile" line, no img/s; the trace stays in /tmp).
run "$PYTHON" "$HERE/profile_step.py" --workload ddpm_cifar10 --task train --batch 128 --dtype bfloat16 --calls 5 --top 25
fi

# 2. Sampling, 256 images.
if want sample; then
run "$PYTHON" "$S" --workload ddpm_cifar10 --batch 256 --sampler ddpm --num-steps 1000 --dtype bfloat16 --repeats 3
run "$PYTHON" "$S" --workload ddpm_cifar10 --batch 256 --sampler ddpm --num-steps 1000 --dtype float32 --repeats 3
run "$PYTHON" "$S" --workload ddpm_cifar10 --batch 256 --sampler ddim --num-steps 100 --dtype bfloat16 --repeats 3
run "$PYTHON" "$S" --workload ddpm_cifar10 --batch 256 --sampler ddim --num-steps 50 --dtype bfloat16 --repeats 3
run "$PYTHON" "$S" --workload ddpm_cifar10 --batch 256 --sampler dpm_solver++ --num-steps 20 --dtype bfloat16 --repeats 3
run "$PYTHON" "$S" --workload ddpm_cifar10 --batch 256 --sampler ddpm --dtype bfloat16 --compile-scaling
fi

# 3. Peers, alternating with ours (compare.py appends every record to $JSONL).
if ! want peers; then
  :
elif "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  C="$HERE/compare.py"
  run_compare "$PYTHON" "$C" --workload ddpm_cifar10 --task train --batch 128 --dtype bfloat16 --rounds 2 --repeats 5 --steps 20
  run_compare "$PYTHON" "$C" --workload ddpm_cifar10 --task train --batch 128 --dtype bfloat16 --rounds 2 --repeats 5 --steps 20 --peer-compile
  run_compare "$PYTHON" "$C" --workload ddpm_cifar10 --task sample --batch 256 --sampler ddpm --num-steps 1000 --dtype bfloat16 --rounds 1
  run_compare "$PYTHON" "$C" --workload ddpm_cifar10 --task sample --batch 256 --sampler ddim --num-steps 50 --dtype bfloat16 --rounds 2
else
  echo "=== torch with CUDA not importable: peer comparisons skipped (see benchmarks/peers/install.sh --gpu)" | tee -a "$LOG"
fi

echo "=== done: $(grep -c . "$JSONL" 2>/dev/null || echo 0) records in $JSONL" | tee -a "$LOG"
