"""Training throughput of diffusion_jax: images/s, compile time, FLOPs, MFU, memory.

Times the library's real training step (`diffusion_jax.training.step.
make_train_step`: per-example keys, uniform t, q_sample, the UNet, the simple
loss of Ho et al. 2020 eq. 14, gradients, global-norm clipping, Adam, the EMA
and the non-finite guard), mapped over a mesh of all devices with
`parallel.data_parallel`, the state donated, on a fixed synthetic batch already
on the devices (we measure the step, not an input pipeline).

For each (batch, dtype) of the sweep:
  1. lower and compile the step (`compile_s`);
  2. FLOPs per image from XLA's cost analysis of the step (forward, backward
     and optimizer; `flops_per_img`, see `model_flops_per_image`), and MFU =
     flops_per_img x img/s / the device's peak (`peak_flops_source` says which);
  3. `--warmup` untimed calls, then `--repeats` windows of `--steps` steps,
     each window timed around `block_until_ready`; img/s is the median over
     windows, `img_per_s_spread` the [min, max];
  4. memory: `program_peak_mem_bytes`, what one call of the compiled step
     needs per device (XLA's buffer plan), and `peak_mem_bytes`, the process's
     peak so far (`peak_mem_source` says from where; in a sweep it covers the
     measurements before, so run one per process for that figure).
One JSON line per measurement goes to stdout (benchmarks/_report.py).

`--steps-per-dispatch K` runs K training steps per call, a `lax.scan` over a
stack of K batches inside the jitted function (`training.step.make_multi_step`,
as train.py's `config.steps_per_dispatch`), so Python dispatches 1/K as often
(on XLA:CPU much slower instead: BENCHMARKS.md). `--cpu-devices N` splits the
CPU into N XLA devices (data parallel; by default one per core, as many as
divide every batch, as train.py does); `--xla-flags` adds XLA flags for
experiments.

  python benchmarks/train_throughput.py --workload tiny
  python benchmarks/train_throughput.py --workload ddpm_cifar10 --batch 32 --dtype float32 bfloat16
  python benchmarks/train_throughput.py --workload ddpm_cifar10 --batch 128 --dtype bfloat16 \
      --steps 20 --steps-per-dispatch 4
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _jax_harness as harness  # noqa: E402  (puts the repo root on sys.path)
import _report  # noqa: E402
import workloads  # noqa: E402

DTYPES = ("float32", "bfloat16")
EMA_DECAY = 0.9999  # Ho et al. 2020 App. B


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, choices=sorted(workloads.WORKLOADS))
    p.add_argument("--batch", type=int, nargs="+", action="extend", default=None,
                   help="global batch size(s) to sweep (default: the workload's CPU or GPU batch)")
    p.add_argument("--dtype", nargs="+", action="extend", choices=DTYPES, default=None,
                   help="compute dtype(s) to sweep; parameters and optimizer state stay float32 "
                        "(default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per measurement")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed window")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed calls after compiling")
    p.add_argument("--steps-per-dispatch", type=int, default=1,
                   help="training steps per jitted call (lax.scan over K stacked batches)")
    p.add_argument("--microbatches", type=int, default=1,
                   help="gradient accumulation: each device's batch in this many micro-batches "
                        "(train.py's config.num_microbatches): the activations of one at a time")
    p.add_argument("--attention-impl", choices=("xla", "cudnn"), default=None,
                   help="attention through jax.nn.dot_product_attention with this implementation "
                        "(default: the UNet's own attention, UNetConfig.attention_impl=None)")
    p.add_argument("--conv-weight-grad", choices=("auto", "xla", "taps"), default=None,
                   help="UNetConfig.conv_weight_grad: how 3x3 kernel gradients are computed "
                        "(default: the workload's, auto)")
    harness.add_device_args(p)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("repeats", "steps", "warmup", "steps_per_dispatch", "microbatches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch is not None and any(b < 1 for b in args.batch):
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.steps % args.steps_per_dispatch:
        p.error(f"--steps ({args.steps}) must be a multiple of --steps-per-dispatch "
                f"({args.steps_per_dispatch}): a timed window is a whole number of calls")
    return args


def build_step(workload: workloads.Workload, dtype: str, steps_per_dispatch: int,
               attention_impl: str | None, mesh, *, conv_weight_grad: str | None = None,
               microbatches: int = 1):
    """The jitted, data-parallel training call and the objects it needs.

    Returns:
      ``(call, tx)``: ``call(state, batch, key) -> (state, metrics)``
      runs ``steps_per_dispatch`` training steps, each over ``microbatches``
      micro-batches per device; with K > 1 the batch leaves have a leading
      axis of K.
    """
    from jax.sharding import PartitionSpec as P

    import diffusion_jax as dj
    from diffusion_jax import parallel
    from diffusion_jax.models import UNet
    from diffusion_jax.training.state import OptimConfig, make_optimizer
    from diffusion_jax.training.step import LossConfig, make_multi_step, make_train_step

    unet_config = workload.unet_config(dtype, attention_impl)
    if conv_weight_grad is not None:
        unet_config = dataclasses.replace(unet_config, conv_weight_grad=conv_weight_grad)
    model = UNet(unet_config)
    schedule = dj.make_schedule("linear", workload.timesteps, beta_start=workload.beta_start,
                                beta_end=workload.beta_end)
    tx, lr_schedule = make_optimizer(OptimConfig(learning_rate=workloads.LEARNING_RATE))
    step = make_train_step(model, schedule, tx, lr_schedule, ema_decay=EMA_DECAY, loss_config=LossConfig(),
                           num_microbatches=microbatches)

    # K steps in one call as train.py runs them (config.steps_per_dispatch): a scan
    # whose carry is the state; its metrics come back per step.
    stacked = steps_per_dispatch > 1
    per_device = make_multi_step(step, steps_per_dispatch) if stacked else step
    call = parallel.data_parallel(per_device, mesh,
                                  in_specs=(P(), parallel.batch_sharding(mesh, stacked=stacked).spec, P()),
                                  out_specs=(P(), P()), donate_argnums=(0,))
    return call, tx


def init_state(tx, workload: workloads.Workload, mesh, seed: int):
    """A fresh TrainState (UNet init, EMA, Adam moments), replicated on the mesh; and the parameter count."""
    import jax

    from diffusion_jax import parallel
    from diffusion_jax.training.state import create_train_state

    params, num_params = harness.initial_params(workload, seed)
    state = create_train_state(jax.tree.map(jax.numpy.asarray, params), tx)
    return parallel.replicate(jax.device_get(state), mesh), num_params


def synthetic_batch(workload: workloads.Workload, batch: int, steps_per_dispatch: int, mesh, seed: int):
    """Images uniform in [-1, 1] and zero labels, split over the mesh's data axis."""
    import jax
    import numpy as np

    from diffusion_jax import parallel

    lead = () if steps_per_dispatch == 1 else (steps_per_dispatch,)
    rng = np.random.default_rng(seed)
    host = {"image": rng.uniform(-1, 1, lead + (batch, *workload.image_shape)).astype(np.float32),
            "label": np.zeros(lead + (batch,), np.int32)}
    return jax.device_put(host, parallel.batch_sharding(mesh, stacked=bool(lead)))


def model_flops_per_image(workload, dtype, mesh, state, batch: int, key) -> float | None:
    """FLOPs of one training step per image, from XLA's cost analysis of the step.

    The step analysed is one step per call with XLA's own convolution weight
    gradient and the UNet's own attention, lowered but not compiled (cheap):
    its count is the model's (forward, backward, optimizer), whatever speed
    devices the measured program uses. XLA counts a loop body once, so neither
    the tap loop of `UNetConfig.conv_weight_grad` nor a `--steps-per-dispatch`
    scan could be counted from the measured program itself, and a fused cuDNN
    attention is a custom call, which it counts as no FLOPs. Per device, so /
    per-device batch.
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from diffusion_jax import parallel

    call, _ = build_step(workload, dtype, 1, None, mesh, conv_weight_grad="xla")
    sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))
    batch_spec = {"image": jax.ShapeDtypeStruct((batch, *workload.image_shape), np.float32, sharding=sharding),
                  "label": jax.ShapeDtypeStruct((batch,), np.int32, sharding=sharding)}
    flops = harness.flops_of(call.lower(state, batch_spec, key))
    return flops / (batch // mesh.size) if flops else None


def measure(args: argparse.Namespace, workload: workloads.Workload, batch: int, dtype: str,
            mesh) -> dict[str, Any]:
    """One measurement of the sweep; returns its JSON record."""
    import jax
    import numpy as np

    from diffusion_jax import parallel

    k = args.steps_per_dispatch
    devices = list(mesh.devices.flat)
    if batch % len(devices):
        raise ValueError(f"batch {batch} is not divisible by the {len(devices)} devices of the mesh")
    call, tx = build_step(workload, dtype, k, args.attention_impl, mesh,
                          conv_weight_grad=args.conv_weight_grad, microbatches=args.microbatches)
    state, num_params = init_state(tx, workload, mesh, args.seed)
    data = synthetic_batch(workload, batch, k, mesh, args.seed)
    key = jax.device_put(jax.random.key(args.seed), parallel.replicated_sharding(mesh))

    t0 = time.perf_counter()
    compiled = call.lower(state, data, key).compile()
    compile_s = time.perf_counter() - t0
    flops_per_img = model_flops_per_image(workload, dtype, mesh, state, batch, key)

    for _ in range(args.warmup):
        state, metrics = compiled(state, data, key)
    jax.block_until_ready(state)
    losses = jax.device_get(metrics["loss"])  # one per step of the call
    if not all(math.isfinite(x) for x in np.atleast_1d(losses)):
        raise FloatingPointError(f"the training loss is not finite after warm-up: {losses}")

    seconds_per_step = []
    share = harness.CpuShare()
    for r in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps // k):
            state, metrics = compiled(state, data, key)
        jax.block_until_ready(state)
        seconds_per_step.append((time.perf_counter() - t0) / args.steps)
        print(f"  [{r + 1}/{args.repeats}] {seconds_per_step[-1]:.4f} s/step, "
              f"{batch / seconds_per_step[-1]:.2f} img/s", file=sys.stderr, flush=True)
    cpu_share = share.value()

    img_per_s, spread = _report.median_and_spread([batch / s for s in seconds_per_step])
    median_s, _ = _report.median_and_spread(seconds_per_step)
    peak, peak_source = harness.mesh_peak_flops_per_s(devices, dtype)
    achieved = flops_per_img * img_per_s if flops_per_img else None
    mem, mem_source = harness.peak_memory_bytes(devices)
    return {
        "impl": "diffusion_jax",
        "task": "train",
        "workload": workload.name,
        "batch": batch,
        "dtype": dtype,
        **harness.common_fields(devices),
        "img_per_s": round(img_per_s, 4),
        "img_per_s_spread": [round(v, 4) for v in spread],
        "median_s_per_step": round(median_s, 6),
        "compile_s": round(compile_s, 3),
        "flops_per_img": flops_per_img,
        "achieved_flops_per_s": achieved,
        "mfu": round(achieved / peak, 5) if achieved and peak else None,
        "peak_flops_per_s": peak,
        "peak_flops_source": peak_source,
        "program_peak_mem_bytes": harness.program_peak_bytes(compiled),
        "peak_mem_bytes": mem,
        "peak_mem_source": mem_source,
        "params": num_params,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "steps_per_dispatch": k,
        "microbatches": args.microbatches,
        "attention_impl": args.attention_impl,
        "conv_weight_grad": args.conv_weight_grad or workload.unet.conv_weight_grad,
        "cpu_share": cpu_share if devices[0].platform == "cpu" else None,
        "versions": harness.versions(),
        "notes": ["real make_train_step: clip 1.0, Adam lr 2e-4, EMA 0.9999, non-finite guard",
                  "fixed synthetic batch on device", "state donated"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = workloads.get_workload(args.workload)
    devices = harness.start_devices(args.cpu_devices, args.batch or [workload.batch_cpu], args.xla_flags,
                                    cpu_convolutions=args.cpu_convolutions, ch=workload.unet.ch)
    from diffusion_jax import parallel

    on_gpu = devices[0].platform != "cpu"
    batches = args.batch or [workload.batch_gpu if on_gpu else workload.batch_cpu]
    dtypes = args.dtype or ["bfloat16" if on_gpu else "float32"]
    harness.check_batches_divide(batches, devices)
    bad = [b for b in batches if (b // len(devices)) % args.microbatches]
    if bad:
        sys.exit(f"error: --microbatches {args.microbatches} does not divide each device's share of --batch "
                 f"{' '.join(map(str, bad))} over {len(devices)} devices")
    mesh = parallel.make_mesh()
    for dtype in dtypes:
        for batch in batches:
            print(f"{workload.name}: batch {batch}, {dtype}, {len(devices)} device(s), "
                  f"{args.steps_per_dispatch} step(s)/call, {args.microbatches} micro-batch(es)/step",
                  file=sys.stderr, flush=True)
            _report.emit(measure(args, workload, batch, dtype, mesh))
    return 0


if __name__ == "__main__":
    _report.run_script(main)
