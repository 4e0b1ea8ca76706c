#!/usr/bin/env bash
# The whole GPU benchmark suite of BENCHMARKS.md in one call (H100 / H200).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [all|train|sample|peers]
#
# OUT_DIR defaults to $OUT, else ./benchmark_results. The parts can be run
# one per call where a call is time-limited (each takes a few minutes on an
# H100; `all` runs the three in turn).
#
# Environment:
#   PYTHON       the interpreter (default: `python`, else `python3`)
#   WHEELS       a folder of wheels to install first (pip --no-index --no-deps,
#                into a folder put on PYTHONPATH): the peers' packages on a
#                machine without internet, made by benchmarks/peers/gpu_wheels.sh
#   RUN_TIMEOUT  seconds allowed per command (default: none), so that one slow
#                compile cannot use up a time-limited call
#   DRY_RUN=1    print each command (shell-quoted, one per line), run nothing
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
# Dependencies. Our scripts need only jax with its GPU plugin, flax, optax,
# chex and numpy: they use synthetic data, never import tensorflow-datasets,
# grain, ml-collections or orbax, and import diffusion_jax from this checkout
# (nothing to install). A machine with none of those and no internet needs
# their wheels carried in (`pip download "jax[cuda13]" flax optax chex`).
# The peers need a CUDA torch (with torchvision) and diffusers,
# denoising-diffusion-pytorch and ema-pytorch: `bash benchmarks/peers/install.sh
# --gpu` where pip reaches an index; where it does not (an image with torch but
# no internet), make the three's wheels where pip works,
#     bash benchmarks/peers/gpu_wheels.sh .whl
# and give WHEELS=.whl here. Without a CUDA torch the peer runs are skipped.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
OUT_DIR="${1:-${OUT:-$ROOT/benchmark_results}}"
PART="${2:-all}"
case "$PART" in all|train|sample|peers) ;; *) echo "usage: $0 [OUT_DIR] [all|train|sample|peers]" >&2; exit 2 ;; esac
RUN_TIMEOUT="${RUN_TIMEOUT:-}"
if [[ -n "$RUN_TIMEOUT" && ! "$RUN_TIMEOUT" =~ ^[1-9][0-9]*$ ]]; then
  echo "RUN_TIMEOUT must be a whole number of seconds, got '$RUN_TIMEOUT'" >&2; exit 2
fi
DRY_RUN="${DRY_RUN:-}"
if [[ -n "${WHEELS:-}" ]] && ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "WHEELS=$WHEELS holds no .whl files" >&2; exit 2
fi
cd "$ROOT"

if [[ -n "$DRY_RUN" ]]; then
  run() { printf '%q ' "$@"; echo; }
  run_compare() { printf '%q ' "$@"; echo; }
else
  mkdir -p "$OUT_DIR"
  JSONL="$OUT_DIR/gpu_suite.jsonl"
  LOG="$OUT_DIR/gpu_suite.log"
  TIMEOUT=()
  [[ -n "$RUN_TIMEOUT" ]] && TIMEOUT=(timeout --kill-after=10 "$RUN_TIMEOUT")

  run() {  # run CMD...: its JSON lines to $JSONL, stderr to $LOG
    echo "=== $(date +%T) $*" | tee -a "$LOG" >&2
    "${TIMEOUT[@]}" "$@" 2>>"$LOG" | tee -a "$JSONL" | cut -c1-240
    local rc=${PIPESTATUS[0]}
    (( rc == 0 )) || echo "=== exit status $rc$( (( rc == 124 )) && echo " (over RUN_TIMEOUT)"): $*" | tee -a "$LOG" >&2
  }

  run_compare() {  # compare.py appends its records to $JSONL itself; its table goes to the log
    echo "=== $(date +%T) $*" | tee -a "$LOG" >&2
    "${TIMEOUT[@]}" "$@" --jsonl "$JSONL" 2>>"$LOG" | tee -a "$LOG"
  }

  # Carried wheels (the peers' packages where pip cannot reach an index).
  if [[ -n "${WHEELS:-}" ]]; then
    SITE="${TMPDIR:-/tmp}/diffusion_jax_suite_site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl 2>&1 | tee -a "$LOG" || true
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi

  {
    echo "=== machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$PYTHON" -c 'import jax, jaxlib, flax; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__); print(jax.devices())'
  } 2>&1 | tee -a "$LOG"
fi

want() { [[ "$PART" == all || "$PART" == "$1" ]]; }

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
elif [[ -n "$DRY_RUN" ]] || "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  C="$HERE/compare.py"
  run_compare "$PYTHON" "$C" --workload ddpm_cifar10 --task train --batch 128 --dtype bfloat16 --rounds 2 --repeats 5 --steps 20
  run_compare "$PYTHON" "$C" --workload ddpm_cifar10 --task train --batch 128 --dtype bfloat16 --rounds 2 --repeats 5 --steps 20 --peer-compile
  run_compare "$PYTHON" "$C" --workload ddpm_cifar10 --task sample --batch 256 --sampler ddpm --num-steps 1000 --dtype bfloat16 --rounds 1
  run_compare "$PYTHON" "$C" --workload ddpm_cifar10 --task sample --batch 256 --sampler ddim --num-steps 50 --dtype bfloat16 --rounds 2
else
  echo "=== torch with CUDA not importable: peer comparisons skipped (see benchmarks/peers/install.sh --gpu, or WHEELS above)" | tee -a "$LOG"
fi

[[ -n "$DRY_RUN" ]] || echo "=== done: $(cat "$JSONL" 2>/dev/null | grep -c .) records in $JSONL" | tee -a "$LOG"
