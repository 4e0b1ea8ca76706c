"""Side-by-side throughput of diffusion_jax and its PyTorch peers on one workload.

Runs each implementation's benchmark script as a subprocess, alternating
implementations round by round (A B A B ...) so that slow drift of the machine
(thermal state, other load) hits every implementation alike, collects the JSON
records they print (see `_report.py`), and prints a table with each
implementation's images/s (median over rounds) and ours divided by each peer's.

  python benchmarks/compare.py --workload tiny --task train --rounds 2
  python benchmarks/compare.py --workload tiny --task sample --sampler ddim --num-steps 50 --batch 64
  python benchmarks/compare.py --workload ddpm_cifar10 --task train --impls ours,diffusers --peer-compile

Implementations (`--impls`):
  ours        benchmarks/train_throughput.py / benchmarks/sample_throughput.py (impl "diffusion_jax")
  diffusers   benchmarks/peers/diffusers_bench.py
  lucidrains  benchmarks/peers/lucidrains_bench.py
A missing script or a failing run is reported and skipped; the others still run.
`--jsonl PATH` appends every record collected to PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import _report

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# benchmarks/workloads.py's names, read without importing it (it imports the library and JAX).
WORKLOAD_NAMES = ("adm_64", "ddpm_cifar10", "tiny")


@dataclasses.dataclass(frozen=True)
class Impl:
    """How to run one implementation's benchmark script."""

    key: str  # name used in --impls
    record_impl: str  # the "impl" field its records carry
    train_script: Path
    sample_script: Path
    is_peer: bool  # peers take --task and --compile; ours has one script per task

    def script(self, task: str) -> Path:
        return self.train_script if task == "train" else self.sample_script


IMPLS = {
    "ours": Impl("ours", "diffusion_jax", BENCH_DIR / "train_throughput.py",
                 BENCH_DIR / "sample_throughput.py", is_peer=False),
    "diffusers": Impl("diffusers", "diffusers", BENCH_DIR / "peers" / "diffusers_bench.py",
                      BENCH_DIR / "peers" / "diffusers_bench.py", is_peer=True),
    "lucidrains": Impl("lucidrains", "lucidrains", BENCH_DIR / "peers" / "lucidrains_bench.py",
                       BENCH_DIR / "peers" / "lucidrains_bench.py", is_peer=True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, choices=WORKLOAD_NAMES)
    p.add_argument("--task", required=True, choices=("train", "sample"))
    p.add_argument("--rounds", type=int, default=2, help="times each implementation is run, alternating")
    p.add_argument("--impls", default="ours,diffusers,lucidrains",
                   help=f"comma-separated, from {','.join(IMPLS)}; 'ours' is the reference of the ratios")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed windows (train) or sampler runs (sample) per run (passed through)")
    p.add_argument("--steps", type=int, default=None, help="train: steps per timed window (passed through)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="compute dtype, passed through")
    p.add_argument("--sampler", default=None, choices=("ddpm", "ddim", "dpmpp", "dpm_solver++"),
                   help="sample: ddpm, ddim or dpmpp (= dpm_solver++; passed through)")
    p.add_argument("--num-steps", type=int, default=None, help="sample: sampler steps (passed through)")
    p.add_argument("--peer-compile", action="store_true", help="run the PyTorch peers under torch.compile")
    p.add_argument("--allocator", choices=("jemalloc", "system"), default=None,
                   help="host allocator for every implementation alike (passed through; the scripts' "
                        "default is jemalloc where installed)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per run")
    p.add_argument("--jsonl", type=Path, default=None, help="append every collected record to this file")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = [k for k in args.impls if k not in IMPLS]
    if unknown or not args.impls:
        p.error(f"--impls: unknown {unknown or 'none given'}; choose from {sorted(IMPLS)}")
    if len(set(args.impls)) != len(args.impls):
        p.error(f"--impls lists an implementation twice: {args.impls}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    for name in ("batch", "repeats", "steps", "num_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.task == "train" and (args.sampler or args.num_steps):
        p.error("--sampler/--num-steps are for --task sample")
    if args.task == "sample" and args.steps:
        p.error("--steps is for --task train; use --num-steps for sampler steps")
    if args.timeout is not None and not args.timeout > 0:
        p.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.sampler == "dpm_solver++":
        args.sampler = "dpmpp"  # the spelling every script takes
    return args


def command(impl: Impl, args: argparse.Namespace) -> list[str]:
    """The command line that runs `impl` with the flags it accepts."""
    cmd = [sys.executable, str(impl.script(args.task)), "--workload", args.workload]
    if impl.is_peer:
        cmd += ["--task", args.task]
    opt = {"--batch": args.batch, "--allocator": args.allocator}
    if args.task == "train":
        opt.update({"--repeats": args.repeats, "--steps": args.steps, "--dtype": args.dtype})
    else:
        opt.update({"--sampler": args.sampler, "--num-steps": args.num_steps,
                    "--repeats": args.repeats, "--dtype": args.dtype})
    for flag, value in opt.items():
        if value is not None:
            cmd += [flag, str(value)]
    if impl.is_peer and args.peer_compile:
        cmd.append("--compile")
    return cmd


def run_once(impl: Impl, args: argparse.Namespace) -> tuple[list[dict], str | None]:
    """Runs `impl` once; returns its matching records and an error message or None."""
    script = impl.script(args.task)
    if not script.exists():
        return [], f"{script.relative_to(REPO_ROOT)} does not exist"
    cmd = command(impl, args)
    print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {args.timeout} s"
    if proc.returncode != 0:
        tail = "\n    ".join(proc.stderr.strip().splitlines()[-6:])
        return [], f"exit status {proc.returncode}:\n    {tail}"
    records = [r for r in _report.parse_records(proc.stdout.splitlines())
               if r["workload"] == args.workload and r["task"] == args.task]
    if not records:
        return [], "printed no benchmark record for this workload and task on stdout"
    return records, None


def summary_rows(records: dict[str, list[dict]], impls: list[str]) -> list[dict]:
    """One row per implementation: median img/s over rounds and the ratio ours / it."""
    rows = []
    for key in impls:
        recs = records.get(key, [])
        if not recs:
            rows.append({"key": key, "img_per_s": None})
            continue
        rates = [r["img_per_s"] for r in recs]
        last = recs[-1]
        rows.append({
            "key": key,
            "impl": last["impl"],
            "img_per_s": statistics.median(rates),
            "rounds": rates,
            "batch": last["batch"],
            "dtype": last["dtype"],
            "compiled": last.get("compiled"),
            "params": last.get("params"),
            "device": last["device"],
            "allocator": last.get("allocator"),
            # Each run's process-wide peak (device memory on a GPU, max RSS on a CPU): the largest.
            "peak_mem_bytes": max((r["peak_mem_bytes"] for r in recs if r.get("peak_mem_bytes")), default=None),
        })
    ours = next((r["img_per_s"] for r in rows if r["key"] == "ours" and r["img_per_s"]), None)
    for r in rows:
        r["ours_over_it"] = ours / r["img_per_s"] if ours and r["img_per_s"] else None
    return rows


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    what = f"{args.task}" + (f", sampler {args.sampler or 'default'}, {args.num_steps or 'default'} steps"
                             if args.task == "sample" else "")
    lines = [f"workload {args.workload} ({what}), {args.rounds} round(s), alternating"]
    devices = sorted({r["device"] for r in rows if r["img_per_s"]})
    if devices:
        lines.append("device: " + " | ".join(devices))
    allocators = sorted({r["allocator"] or "not recorded" for r in rows if r["img_per_s"]})
    if allocators:
        lines.append("allocator: " + " | ".join(allocators))
    header = f"{'impl':<14} {'batch':>5} {'dtype':<20} {'compiled':<8} {'params':>12} " \
             f"{'img/s':>10} {'per round':<24} {'peak GiB':>8} {'ours / impl':>11}"
    lines += [header, "-" * len(header)]
    for r in rows:
        if r["img_per_s"] is None:
            lines.append(f"{IMPLS[r['key']].record_impl:<14} {'':>5} {'':<20} {'':<8} {'':>12} "
                         f"{'n/a':>10} {'(no result)':<24} {'':>8} {'n/a':>11}")
            continue
        compiled = {True: "yes", False: "no", None: "-"}[r["compiled"]]
        params = f"{r['params']:,}" if isinstance(r["params"], int) else "-"
        per_round = ", ".join(f"{v:.3g}" for v in r["rounds"])
        ratio = f"{r['ours_over_it']:.2f}x" if r["ours_over_it"] else "n/a"
        peak = f"{r['peak_mem_bytes'] / 2**30:.2f}" if r["peak_mem_bytes"] else "-"
        lines.append(f"{r['impl']:<14} {r['batch']:>5} {r['dtype']:<20} {compiled:<8} {params:>12} "
                     f"{r['img_per_s']:>10.3f} {per_round:<24} {peak:>8} {ratio:>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    impls = [IMPLS[k] for k in args.impls]
    if args.dry_run:
        for impl in impls:
            print(shlex.join(command(impl, args)))
        return 0

    records: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    for rnd in range(args.rounds):
        for impl in impls:
            if impl.key in errors and not records.get(impl.key):
                continue  # it already failed once; don't pay for it every round
            print(f"[round {rnd + 1}/{args.rounds}] {impl.key}", file=sys.stderr, flush=True)
            recs, err = run_once(impl, args)
            if err:
                errors[impl.key] = err
                print(f"  {impl.key}: skipped: {err}", file=sys.stderr, flush=True)
                continue
            records.setdefault(impl.key, []).extend(recs)
            if args.jsonl:
                with args.jsonl.open("a", encoding="utf-8") as f:
                    for rec in recs:
                        f.write(json.dumps(rec) + "\n")

    rows = summary_rows(records, args.impls)
    print(format_table(rows, args))
    for key, err in errors.items():
        print(f"note: {key}: {err}")
    if "ours" in args.impls and not records.get("ours"):
        print("note: no diffusion_jax result, so no ratios")
    batches = {r["batch"] for r in rows if r["img_per_s"]}
    if len(batches) > 1:
        print(f"warning: implementations ran at different batch sizes {sorted(batches)}; pass --batch")
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
