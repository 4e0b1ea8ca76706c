"""Sampling throughput of diffusion_jax: wall time and images/s of `dj.sample` with the UNet.

The whole sampler (`dj.sample`: one `lax.scan` over the steps, the UNet in
its body) is one jitted, data-parallel function (`parallel.data_parallel`,
the batch split over all devices, each device's noise from
`fold_in(key, device index)`). Parameters are the UNet's initial ones (a
trained model's EMA parameters take the same time); every workload samples
with the DDPM schedule of Ho et al. 2020 (T = 1000, linear betas), reverse
variance beta_t ("fixed_large") and x_0 clipped to [-1, 1], as the peers'
diffusers schedulers do.

Per measurement: compile time (`compile_s`), `--warmup` untimed runs, then
`--repeats` timed runs, each timed around `block_until_ready`; `wall_s` is the
median seconds per run, `img_per_s` = batch / seconds (median, with [min, max]).

`--compile-scaling` instead compiles the sampler at 10 and at 1000 steps and
reports both compile times (nothing is run, so `img_per_s` is null): the scan
traces the step once, so the two should be nearly equal.

  python benchmarks/sample_throughput.py --workload tiny --sampler ddim --num-steps 50 --batch 64
  python benchmarks/sample_throughput.py --workload ddpm_cifar10 --sampler ddpm --num-steps 1000 --batch 256
  python benchmarks/sample_throughput.py --workload ddpm_cifar10 --compile-scaling
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _jax_harness as harness  # noqa: E402  (puts the repo root on sys.path)
import _report  # noqa: E402
import workloads  # noqa: E402

# Our sampler names, and the peers' spelling of DPM-Solver++ (compare.py passes it through).
SAMPLER_ALIASES = {"ddpm": "ddpm", "ddim": "ddim", "dpm_solver++": "dpm_solver++", "dpmpp": "dpm_solver++"}
DEFAULT_NUM_STEPS = {"ddpm": 1000, "ddim": 50, "dpm_solver++": 20}
COMPILE_SCALING_STEPS = (10, 1000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, choices=sorted(workloads.WORKLOADS))
    p.add_argument("--batch", type=int, default=None,
                   help="images per sampling run (default: the workload's CPU batch; 256 on a GPU)")
    p.add_argument("--sampler", choices=sorted(SAMPLER_ALIASES), default="ddim",
                   help="ddpm = ancestral (Ho et al. 2020), ddim (Song et al. 2021, eta 0), "
                        "dpm_solver++ (alias dpmpp) = DPM-Solver++(2M) (Lu et al. 2022)")
    p.add_argument("--num-steps", type=int, default=None,
                   help="sampler steps (default: ddpm 1000, ddim 50, dpm_solver++ 20)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="UNet compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling runs")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    p.add_argument("--compile-scaling", action="store_true",
                   help=f"only compile, at {COMPILE_SCALING_STEPS[0]} and {COMPILE_SCALING_STEPS[1]} steps")
    p.add_argument("--attention-impl", choices=("xla", "cudnn"), default=None)
    harness.add_device_args(p)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.sampler = SAMPLER_ALIASES[args.sampler]
    workload = workloads.get_workload(args.workload)
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    if args.compile_scaling and args.num_steps is not None:
        p.error("--compile-scaling measures its own step counts; drop --num-steps")
    if args.num_steps is None:
        args.num_steps = DEFAULT_NUM_STEPS[args.sampler]
    if not 1 <= args.num_steps <= workload.timesteps:
        p.error(f"--num-steps must be in [1, {workload.timesteps}], got {args.num_steps}")
    return args


def build_sampler(workload: workloads.Workload, dtype: str, attention_impl: str | None, sampler: str,
                  num_steps: int, per_device_batch: int, mesh):
    """``sample(params, key) -> [batch, H, W, C]``, jitted and split over the mesh."""
    import jax
    from jax import lax
    from jax.sharding import PartitionSpec as P

    import diffusion_jax as dj
    from diffusion_jax import parallel
    from diffusion_jax.models import UNet

    model = UNet(workload.unet_config(dtype, attention_impl))
    schedule = dj.make_schedule("linear", workload.timesteps, beta_start=workload.beta_start,
                                beta_end=workload.beta_end)

    def per_device(params, key):
        key = jax.random.fold_in(key, lax.axis_index(parallel.DATA_AXIS))
        return dj.sample(lambda x, t: model.apply({"params": params}, x, t, train=False), schedule,
                         (per_device_batch, *workload.image_shape), key, sampler=sampler,
                         num_steps=num_steps, variance="fixed_large", clip_denoised=True)

    return parallel.data_parallel(per_device, mesh, in_specs=(P(), P()), out_specs=P(parallel.DATA_AXIS))


def base_record(args, workload, batch, dtype, num_steps, devices) -> dict[str, Any]:
    return {
        "impl": "diffusion_jax",
        "task": "sample",
        "workload": workload.name,
        "batch": batch,
        "dtype": dtype,
        **harness.common_fields(devices),
        "sampler": args.sampler,
        "num_steps": num_steps,
    }


def measure(args, workload, batch: int, dtype: str, num_steps: int, mesh, *, run: bool) -> dict[str, Any]:
    """Compiles (and, with `run`, times) the sampler; returns its JSON record."""
    import jax

    from diffusion_jax import parallel

    devices = list(mesh.devices.flat)
    if batch % len(devices):
        raise ValueError(f"batch {batch} is not divisible by the {len(devices)} devices of the mesh")
    sample = build_sampler(workload, dtype, args.attention_impl, args.sampler, num_steps,
                                  batch // len(devices), mesh)
    params, num_params = harness.initial_params(workload, args.seed)
    params = parallel.replicate(params, mesh)
    key = jax.device_put(jax.random.key(args.seed), parallel.replicated_sharding(mesh))

    t0 = time.perf_counter()
    compiled = sample.lower(params, key).compile()
    compile_s = time.perf_counter() - t0
    rec = base_record(args, workload, batch, dtype, num_steps, devices)
    rec.update({"compile_s": round(compile_s, 3), "params": num_params, "versions": harness.versions()})
    if not run:
        rec.update({"img_per_s": None, "wall_s": None,
                    "notes": ["compile only (--compile-scaling): nothing was run",
                              "after an untimed warm-up compile in the same process"]})
        return rec

    for i in range(args.warmup):
        out = compiled(params, jax.random.fold_in(key, 1000 + i))
    if args.warmup:
        jax.block_until_ready(out)
    seconds = []
    share = harness.CpuShare()
    for r in range(args.repeats):
        run_key = jax.random.fold_in(key, r)
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(params, run_key))
        seconds.append(time.perf_counter() - t0)
        print(f"  [{r + 1}/{args.repeats}] {seconds[-1]:.3f} s/run, {batch / seconds[-1]:.2f} img/s",
              file=sys.stderr, flush=True)
    cpu_share = share.value()
    final = jax.device_get(out)
    if not math.isfinite(float(abs(final).max())):
        raise FloatingPointError("the samples are not finite")

    img_per_s, spread = _report.median_and_spread([batch / s for s in seconds])
    wall_s, _ = _report.median_and_spread(seconds)
    mem, mem_source = harness.peak_memory_bytes(devices)
    rec.update({
        "img_per_s": round(img_per_s, 4),
        "img_per_s_spread": [round(v, 4) for v in spread],
        "wall_s": round(wall_s, 6),
        "median_s_per_step": round(wall_s / num_steps, 6),
        "program_peak_mem_bytes": harness.program_peak_bytes(compiled),
        "peak_mem_bytes": mem,
        "peak_mem_source": mem_source,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "attention_impl": args.attention_impl,
        "cpu_share": cpu_share if devices[0].platform == "cpu" else None,
        "notes": ["whole sampler jitted (one lax.scan)", "UNet initial parameters",
                  "variance fixed_large, x0 clipped"],
    })
    return rec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = workloads.get_workload(args.workload)
    devices = harness.start_devices(args.cpu_devices, [args.batch or workload.batch_cpu], args.xla_flags,
                                    cpu_convolutions=args.cpu_convolutions, ch=workload.unet.ch)
    from diffusion_jax import parallel

    on_gpu = devices[0].platform != "cpu"
    batch = args.batch or (256 if on_gpu else workload.batch_cpu)
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    harness.check_batches_divide([batch], devices)
    mesh = parallel.make_mesh()
    # (A schedule shorter than 1000 steps is sampled at its full length instead.)
    steps_list = (sorted({min(s, workload.timesteps) for s in COMPILE_SCALING_STEPS}) if args.compile_scaling
                  else [args.num_steps])
    if args.compile_scaling:
        # The first compile of a process pays once for setting XLA up (about a second): an untimed
        # one first, so that the step counts compare compile with compile.
        print("untimed warm-up compile", file=sys.stderr, flush=True)
        measure(args, workload, batch, dtype, steps_list[0], mesh, run=False)
    for num_steps in steps_list:
        print(f"{workload.name}: {args.sampler} {num_steps} steps, batch {batch}, {dtype}, "
              f"{len(devices)} device(s)", file=sys.stderr, flush=True)
        _report.emit(measure(args, workload, batch, dtype, num_steps, mesh, run=not args.compile_scaling))
    return 0


if __name__ == "__main__":
    _report.run_script(main)
