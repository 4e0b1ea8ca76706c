#!/usr/bin/env bash
# The GPU benchmark suite of BENCHMARKS.md (H100 / H200), in as many calls as it takes.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [PART]
#
# OUT_DIR defaults to $OUT, else ./benchmark_results. PART is `all` (the
# default), `core` (what the two GPU targets need, first), `rest` (all but
# core), `train`, `sample`, `peers`, or a comma-separated list of command
# labels (`DRY_RUN=1` lists them, each as a `# label` line over its command).
#
# Environment:
#   PYTHON        the interpreter (default: `python`, else `python3`)
#   WHEELS        a folder of wheels to install first (pip --no-index --no-deps,
#                 into a folder put on PYTHONPATH): the peers' packages on a
#                 machine without internet, made by benchmarks/peers/gpu_wheels.sh
#   RUN_TIMEOUT   seconds allowed per command (for a peer comparison: per run
#                 inside it, compare.py --timeout); default none
#   SUITE_BUDGET  seconds for this whole call (default none): a command starts
#                 only while 60 s or more are left and is stopped when none are;
#                 the labels not run or cut off by it go to OUT_DIR/gpu_suite.todo
#                 (one line, comma-separated), to give as the PART of the next call
#   JAX_COMPILATION_CACHE_DIR  JAX's persistent compilation cache (default a
#                 folder under $TMPDIR or /tmp): a program compiled by one
#                 command is loaded by the later ones (compare.py's runs of ours
#                 repeat train.b128.bf16's and sample.ddpm1000.bf16's), and by
#                 the next call on the same machine; off for sample.compile_scaling
#   ALLOW_CPU=1   go on where JAX's backend is not a GPU (otherwise the suite
#                 stops at once: it would measure the CPU for the whole call)
#   DRY_RUN=1     print each command (shell-quoted, one per line, under its
#                 `# label` line), run nothing
#
# Writes one JSON line per measurement to OUT_DIR/gpu_suite.jsonl (progress and
# errors to OUT_DIR/gpu_suite.log), then prints the summary table of each
# peer comparison. Every run is independent: one that fails is logged and
# the suite goes on. Each training configuration runs in its own process, so
# that its record's process-wide peak memory (`peak_mem_bytes`) is its own.
#
# What it runs (each command is also one you can run by hand):
#   1. diffusion_jax training, ddpm_cifar10: batch 128 and 256, bf16 and fp32;
#      bf16 with 4 steps per dispatch and with cuDNN attention; adm_64 bf16;
#      tiny; a profile of the bf16 step (profile_step.py: time by kind of operation).
#      -> the "DDPM CIFAR-10 at >= 40% bf16 MFU" target (field "mfu").
#   2. diffusion_jax sampling, ddpm_cifar10, 256 images: 1000-step ancestral
#      DDPM, 100- and 50-step DDIM, 20-step DPM-Solver++; compile time at 10 and
#      1000 steps. -> the "256 samples, 1000 ancestral steps in < 8 s" target
#      (field "wall_s" of the ddpm record).
#   3. The PyTorch peers (only where torch finds CUDA and both peers import):
#      diffusers and lucidrains, eager and torch.compile, bf16 autocast, through
#      compare.py so ours and theirs alternate (A B A B).
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
# carry the folder (it is git-ignored: name it in the device tool's `carry`),
# and give WHEELS=.whl here.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
OUT_DIR="${1:-${OUT:-$ROOT/benchmark_results}}"
PART="${2:-all}"
T="$HERE/train_throughput.py"
S="$HERE/sample_throughput.py"
C="$HERE/compare.py"

# --- The commands, labelled, in the order they run ---------------------------------
LABELS=()
declare -A COMMAND
add() { local label=$1; shift; LABELS+=("$label"); COMMAND[$label]="$(printf '%q ' "$@")"; }
TRAIN=(--workload ddpm_cifar10 --repeats 5 --steps 20 --warmup 3)
# 1. Training, one configuration per process.
add train.b128.bf16 "$PYTHON" "$T" "${TRAIN[@]}" --batch 128 --dtype bfloat16
add train.b256.bf16 "$PYTHON" "$T" "${TRAIN[@]}" --batch 256 --dtype bfloat16
add train.b128.fp32 "$PYTHON" "$T" "${TRAIN[@]}" --batch 128 --dtype float32
add train.b256.fp32 "$PYTHON" "$T" "${TRAIN[@]}" --batch 256 --dtype float32
add train.b128.bf16.spd4 "$PYTHON" "$T" "${TRAIN[@]}" --batch 128 --dtype bfloat16 --steps-per-dispatch 4
add train.b256.bf16.spd4 "$PYTHON" "$T" "${TRAIN[@]}" --batch 256 --dtype bfloat16 --steps-per-dispatch 4
add train.b128.bf16.cudnn "$PYTHON" "$T" "${TRAIN[@]}" --batch 128 --dtype bfloat16 --attention-impl cudnn
add train.adm64.b64.bf16 "$PYTHON" "$T" --workload adm_64 --batch 64 --dtype bfloat16 --repeats 5 --steps 10 --warmup 3
add train.tiny "$PYTHON" "$T" --workload tiny --batch 32 256 --dtype bfloat16 float32 --repeats 5 --steps 50 --warmup 3
# Where the bf16 step's time goes (a "kind": "profile" line, no img/s; the trace stays in /tmp).
add train.profile "$PYTHON" "$HERE/profile_step.py" --workload ddpm_cifar10 --task train --batch 128 --dtype bfloat16 --calls 5 --top 25
# 2. Sampling, 256 images.
SAMPLE=(--workload ddpm_cifar10 --batch 256 --repeats 3)
add sample.ddpm1000.bf16 "$PYTHON" "$S" "${SAMPLE[@]}" --sampler ddpm --num-steps 1000 --dtype bfloat16
add sample.ddpm1000.fp32 "$PYTHON" "$S" "${SAMPLE[@]}" --sampler ddpm --num-steps 1000 --dtype float32
add sample.ddim100.bf16 "$PYTHON" "$S" "${SAMPLE[@]}" --sampler ddim --num-steps 100 --dtype bfloat16
add sample.ddim50.bf16 "$PYTHON" "$S" "${SAMPLE[@]}" --sampler ddim --num-steps 50 --dtype bfloat16
add sample.dpmpp20.bf16 "$PYTHON" "$S" "${SAMPLE[@]}" --sampler dpm_solver++ --num-steps 20 --dtype bfloat16
add sample.compile_scaling "$PYTHON" "$S" --workload ddpm_cifar10 --batch 256 --sampler ddpm --dtype bfloat16 --compile-scaling
# 3. The peers, alternating with ours (compare.py appends every record to the JSONL itself).
PEER=(--workload ddpm_cifar10 --dtype bfloat16)
add peers.train "$PYTHON" "$C" "${PEER[@]}" --task train --batch 128 --rounds 2 --repeats 5 --steps 20
add peers.sample.ddpm1000 "$PYTHON" "$C" "${PEER[@]}" --task sample --batch 256 --sampler ddpm --num-steps 1000 --rounds 1
add peers.train.compile "$PYTHON" "$C" "${PEER[@]}" --task train --batch 128 --rounds 2 --repeats 5 --steps 20 --peer-compile
add peers.sample.ddim50 "$PYTHON" "$C" "${PEER[@]}" --task sample --batch 256 --sampler ddim --num-steps 50 --rounds 2
# What the two targets need: bf16 training (MFU) and 1000-step sampling, each against the peers.
CORE=" train.b128.bf16 train.b256.bf16 sample.ddpm1000.bf16 peers.train peers.sample.ddpm1000 "

# --- The settings, all checked before anything runs ----------------------------------
usage() { echo "usage: $0 [OUT_DIR] [all|core|rest|train|sample|peers|LABEL,LABEL...]" >&2; exit 2; }
SELECTED=()
case "$PART" in
  all) SELECTED=("${LABELS[@]}") ;;
  core|rest)
    for label in "${LABELS[@]}"; do
      in_core=0; [[ "$CORE" == *" $label "* ]] && in_core=1
      if [[ ( "$PART" == core && $in_core == 1 ) || ( "$PART" == rest && $in_core == 0 ) ]]; then SELECTED+=("$label"); fi
    done ;;
  train|sample|peers)
    for label in "${LABELS[@]}"; do [[ "$label" == "$PART".* ]] && SELECTED+=("$label"); done ;;
  *)
    IFS=',' read -r -a asked <<< "$PART"
    for label in "${asked[@]}"; do
      [[ -n "$label" ]] || continue
      [[ -n "${COMMAND[$label]+set}" ]] || { echo "unknown label '$label' (DRY_RUN=1 lists them)" >&2; usage; }
      SELECTED+=("$label")
    done
    (( ${#SELECTED[@]} )) || usage ;;
esac
RUN_TIMEOUT="${RUN_TIMEOUT:-}"
if [[ -n "$RUN_TIMEOUT" && ! "$RUN_TIMEOUT" =~ ^[1-9][0-9]*$ ]]; then
  echo "RUN_TIMEOUT must be a whole number of seconds, got '$RUN_TIMEOUT'" >&2; exit 2
fi
SUITE_BUDGET="${SUITE_BUDGET:-}"
if [[ -n "$SUITE_BUDGET" && ! "$SUITE_BUDGET" =~ ^[1-9][0-9]*$ ]]; then
  echo "SUITE_BUDGET must be a whole number of seconds, got '$SUITE_BUDGET'" >&2; exit 2
fi
MIN_START="${SUITE_MIN_START:-60}"  # seconds of SUITE_BUDGET a command needs left to start
DRY_RUN="${DRY_RUN:-}"
if [[ -n "${WHEELS:-}" ]] && ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "WHEELS=$WHEELS holds no .whl files" >&2; exit 2
fi
cd "$ROOT"

if [[ -n "$DRY_RUN" ]]; then
  for label in "${SELECTED[@]}"; do echo "# $label"; echo "${COMMAND[$label]}"; done
  exit 0
fi

# --- The machine ----------------------------------------------------------------------
mkdir -p "$OUT_DIR"
JSONL="$OUT_DIR/gpu_suite.jsonl"
LOG="$OUT_DIR/gpu_suite.log"
TODO="$OUT_DIR/gpu_suite.todo"
rm -f "$TODO"
log() { echo "=== $*" | tee -a "$LOG" >&2; }

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
if [[ -z "${ALLOW_CPU:-}" ]] && ! "$PYTHON" -c 'import sys, jax; sys.exit(0 if jax.default_backend() == "gpu" else 1)' 2>>"$LOG"; then
  log "JAX's backend is not a GPU (its CUDA plugin missing?): stopping before measuring the CPU; ALLOW_CPU=1 goes on"
  exit 3
fi
PEERS_OK=1
for label in "${SELECTED[@]}"; do
  if [[ "$label" == peers.* ]]; then
    # Only torch and its CUDA device: a peer that does not import (diffusers without a recent
    # huggingface-hub, denoising_diffusion_pytorch without torchvision, which lucidrains_bench.py
    # stubs) is skipped by compare.py alone, with its error, and the other peer still runs.
    if ! why="$("$PYTHON" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() else "torch finds no CUDA device")' 2>&1)"; then
      PEERS_OK=0
      log "peer comparisons skipped: ${why##*$'\n'} (benchmarks/peers/install.sh --gpu, or WHEELS above)"
    fi
    break
  fi
done

# --- Running ---------------------------------------------------------------------------
# The budget counts from the start of the call ($SECONDS is the script's age), so that the
# wheels, the machine check and the peers' import check above come out of it too.
START=0
# One compile per program per call: later processes of the call (compare.py's runs of ours
# repeat train.b128.bf16 and sample.ddpm1000.bf16) load it from JAX's persistent cache.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/diffusion_jax_suite_jax_cache}"
NOT_DONE=()
for label in "${SELECTED[@]}"; do
  if [[ "$label" == peers.* && $PEERS_OK == 0 ]]; then continue; fi
  limit="$RUN_TIMEOUT" by_budget=0
  if [[ -n "$SUITE_BUDGET" ]]; then
    left=$(( SUITE_BUDGET - (SECONDS - START) ))
    if (( left < MIN_START )); then NOT_DONE+=("$label"); continue; fi
    if [[ "$label" == peers.* || -z "$limit" ]] || (( left < limit )); then limit=$left by_budget=1; fi
  elif [[ "$label" == peers.* ]]; then
    limit=""  # compare.py bounds each of its runs with --timeout
  fi
  cmd="${COMMAND[$label]}"
  if [[ "$label" == peers.* ]]; then
    [[ -n "$RUN_TIMEOUT" ]] && cmd+=" --timeout $RUN_TIMEOUT"
    cmd+=" --jsonl $(printf '%q' "$JSONL")"
  fi
  TIMEOUT=()
  [[ -n "$limit" ]] && TIMEOUT=(timeout --kill-after=10 "$limit")
  # compile_scaling times compiles: a cached executable would make it time a cache read.
  [[ "$label" == sample.compile_scaling ]] && TIMEOUT=(env JAX_ENABLE_COMPILATION_CACHE=false "${TIMEOUT[@]}")
  log "$(date +%T) [$label] $cmd"
  if [[ "$label" == peers.* ]]; then  # its records go to the JSONL by --jsonl; its table to the log
    eval "${TIMEOUT[*]} $cmd" 2>>"$LOG" | tee -a "$LOG"
  else
    eval "${TIMEOUT[*]} $cmd" 2>>"$LOG" | tee -a "$JSONL" | cut -c1-240
  fi
  rc=${PIPESTATUS[0]}
  if (( rc == 124 || rc == 137 )) && (( by_budget )); then
    NOT_DONE+=("$label")
    log "[$label] stopped at the end of SUITE_BUDGET; its records so far are kept"
  elif (( rc != 0 )); then
    log "[$label] exit status $rc$( (( rc == 124 )) && echo " (over RUN_TIMEOUT)"): $cmd"
  fi
done

if (( ${#NOT_DONE[@]} )); then
  (IFS=','; echo "${NOT_DONE[*]}") > "$TODO"
  log "not run within SUITE_BUDGET: $(cat "$TODO") (in $TODO: give it as the part of the next call)"
fi
records=$(grep -c . "$JSONL" 2>/dev/null)
log "done: ${records:-0} records in $JSONL"
