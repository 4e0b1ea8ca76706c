"""GFLOP/s of the kernels a UNet training step is made of, XLA against PyTorch, on this machine.

The ceiling behind the training and sampling figures: a DDPM UNet step is
mostly 3x3 convolutions (forward, input gradient, kernel gradient) and a few
matmuls, so the speed of those kernels bounds the step's images/s. For
representative convolution shapes of the `ddpm_cifar10` workload at its CPU
batch (or `--shapes tiny`: `tiny`'s map sizes and widths at the sampler's
batch of 64) this script times,
in XLA (jitted `lax.conv_general_dilated` and its VJPs) and, where torch is
installed, in PyTorch (`nn.Conv2d`, oneDNN):

* `fwd`: the convolution;
* `dx`, `dw`: XLA's input and kernel gradients, each alone; `dw_taps`: the
  kernel gradient by kernel taps (`diffusion_jax.models.unet.conv_weight_grad_by_taps`,
  what the UNet uses on CPU for large maps);
* `fwd_bwd`: PyTorch's forward + backward (input and kernel gradient), as
  3 x the convolution's FLOPs over the time;
* `dot`: a 4096^3 matmul, the machine's practical matmul peak;
* `upsample ...` (XLA only): the UNet's upsampling layer (2x nearest, then a
  3x3 convolution) written out (`*_repeat`) and as the UNet computes it on the
  small map (`*_fused`, `diffusion_jax.models.unet.upsample_conv3x3`), forward
  and forward + both gradients (`train_*`), as the written-out convolution's
  FLOPs over the time;
* `attention ...` (XLA only): an attention layer's `q`, `k`, `v` projections
  and its two products (after its GroupNorm, before `proj_out`), forward
  (`*_fwd`) and forward + backward (`*_train`), as the UNet computes them
  (`ours_*`: `_DenseParts`, three matmuls, then `attention`) and as it did
  before change 13 (`jax_*`: one `[N, 3C]` matmul split into `q`, `k`, `v`,
  then `jax.nn.dot_product_attention`, its XLA implementation), as their
  FLOPs over the time;
* `norm ...`: GroupNorm (32 groups) + SiLU on the UNet's norm inputs, forward
  (`*_fwd`) and forward + backward (`*_train`), ours
  (`diffusion_jax.models.unet.group_norm`, `gn_*`), `flax.linen.GroupNorm`
  differentiated by JAX (`flax_*`) and PyTorch's `group_norm` (`torch_*`),
  in G elements of the input per second (the record's `gelem_per_s`).

Each figure is FLOPs (2 x multiply-adds), or for the norms elements, over the
median seconds of `--repeats` calls after one warm-up call. One JSON line per
implementation on stdout (`task: "kernels"`, `gflops`: kernel -> GFLOP/s,
`gelem_per_s`: norm -> G elements/s); not the images/s record
of the other scripts, so `compare.py` does not read it.

    python benchmarks/cpu_kernels.py                        # float32, ddpm_cifar10 shapes
    python benchmarks/cpu_kernels.py --dtype bfloat16
    python benchmarks/cpu_kernels.py --shapes tiny
    python benchmarks/cpu_kernels.py --cpu-devices 2 --no-torch   # XLA as training runs: a device per core
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Any, Callable

import numpy as np

import _jax_harness as harness
import _report
from _report import usable_cpu_count

# (batch, size, c_in, c_out) of the 3x3 stride-1 convolutions.
SHAPES = {
    "ddpm_cifar10": [(32, 32, 128, 128), (32, 32, 256, 128), (32, 16, 256, 256), (32, 8, 256, 256),
                     (32, 4, 256, 256)],
    "tiny": [(64, 16, 32, 32), (64, 16, 64, 32), (64, 16, 32, 64), (64, 8, 64, 64)],
}
# (batch, size before upsampling, c_in, c_out) of the upsampling layers' convolutions.
UPSAMPLE_SHAPES = {
    "ddpm_cifar10": [(32, 16, 256, 256), (32, 8, 256, 256), (32, 4, 256, 256)],
    "tiny": [(64, 8, 64, 64)],
}

# (batch, size, channels, heads) of the attention layers.
ATTENTION_SHAPES = {
    # DDPM's one head at the training batch and at the DDIM-20 sampler's; 4 heads of 64 (ADM's width).
    "ddpm_cifar10": [(32, 16, 256, 1), (16, 16, 256, 1), (32, 16, 256, 4)],
    "tiny": [(64, 8, 64, 1)],
}

# (batch, size, channels) of GroupNorm + SiLU inputs: a block's first norm at
# each level (on the way up the input is the concatenation with a skip).
NORM_SHAPES = {
    "ddpm_cifar10": [(32, 32, 128), (32, 32, 384), (32, 16, 256), (32, 8, 512)],
    "tiny": [(64, 16, 32), (64, 16, 96), (64, 8, 128)],
}


def gflops(flops: float, seconds: float) -> float:
    return float(f"{flops / seconds / 1e9:.4g}")


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (compiles, for XLA)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def data_parallel(fn, replicated: tuple[bool, ...], devices):
    """`fn` jitted and split over the batch axis across `devices` (a `shard_map`,
    as training runs the step; plain `jit` for one device). `replicated[i]`:
    argument i (a kernel) goes whole to every device. Outputs stay per device,
    concatenated along axis 0 (a kernel gradient is not summed: only the kernel
    is timed)."""
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from diffusion_jax import parallel

    if len(devices) == 1:
        return jax.jit(fn)

    def per_device(*args):
        # Replicated kernels become per-device values, as training's parameters
        # do (`parallel.vary_over_data`): their gradients stay per device.
        return fn(*(parallel.vary_over_data(a) if r else a for a, r in zip(args, replicated)))

    mesh = Mesh(np.array(devices), (parallel.DATA_AXIS,))
    in_specs = tuple(P() if r else P(parallel.DATA_AXIS) for r in replicated)
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=P(parallel.DATA_AXIS)))


def put(a, devices, *, replicated: bool = False):
    """`a` on `devices` as `data_parallel` takes it: split along axis 0, or whole on each."""
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from diffusion_jax import parallel

    if len(devices) == 1:
        return jax.device_put(a, devices[0])
    mesh = Mesh(np.array(devices), (parallel.DATA_AXIS,))
    return jax.device_put(a, NamedSharding(mesh, P() if replicated else P(parallel.DATA_AXIS)))


def xla_kernels(shapes_name: str, dtype: str, repeats: int, devices) -> dict[str, dict[str, float]]:
    import jax
    import jax.numpy as jnp

    from diffusion_jax.models.unet import conv_weight_grad_by_taps

    dt = jnp.dtype(dtype)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fwd = data_parallel(conv, (False, True), devices)
    dx = data_parallel(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0], (False, True, False), devices)
    dw = data_parallel(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0], (False, True, False), devices)
    dw_taps = data_parallel(lambda x, g: conv_weight_grad_by_taps(x, g, (3, 3), (1, 1), ((1, 1), (1, 1))),
                            (False, False), devices)
    out = {}
    for b, s, ci, co in SHAPES[shapes_name]:
        x = put(jax.random.normal(jax.random.key(0), (b, s, s, ci), dt), devices)
        w = put((jax.random.normal(jax.random.key(1), (3, 3, ci, co)) * 0.05).astype(dt), devices, replicated=True)
        g = put(jax.random.normal(jax.random.key(2), (b, s, s, co), dt), devices)
        flops = 2 * b * s * s * 9 * ci * co
        calls = {"fwd": lambda: fwd(x, w), "dx": lambda: dx(x, w, g), "dw": lambda: dw(x, w, g),
                 "dw_taps": lambda: dw_taps(x, g)}
        out[_name(b, s, ci, co)] = {
            k: gflops(flops, median_seconds(lambda f=f: jax.block_until_ready(f()), repeats))
            for k, f in calls.items()}
    out.update(upsample_kernels(UPSAMPLE_SHAPES[shapes_name], dt, repeats, devices))
    out.update(attention_kernels(ATTENTION_SHAPES[shapes_name], dt, repeats, devices))
    a = jax.random.normal(jax.random.key(3), (4096, 4096), dt)
    rows, whole = put(a, devices), put(a, devices, replicated=True)
    matmul = data_parallel(jnp.dot, (False, True), devices)  # rows split over the devices
    out["dot_4096"] = {"dot": gflops(2 * 4096**3,
                                     median_seconds(lambda: jax.block_until_ready(matmul(rows, whole)), repeats))}
    return out


def upsample_kernels(shapes, dt, repeats: int, devices) -> dict[str, dict[str, float]]:
    """A 2x nearest upsampling + 3x3 convolution, written out (`repeat`, then XLA's
    convolution, its kernel gradient by taps where the UNet would use them) and
    as the UNet computes it (`fused`: `upsample_conv3x3` on the small map).

    GFLOP/s are the written-out convolution's FLOPs over the time, so the two
    compare as speeds of the same layer; `train` is forward + both gradients.
    """
    import jax
    import jax.numpy as jnp

    from diffusion_jax.models.unet import _conv_general_dilated_taps_where_faster, upsample_conv3x3

    def repeat(x, w):
        u = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv_general_dilated_taps_where_faster(u, w, (1, 1), "SAME",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def train(f):
        return data_parallel(lambda x, w, g: jax.vjp(f, x, w)[1](g), (False, True, False), devices)

    out = {}
    for b, s, ci, co in shapes:
        x = put(jax.random.normal(jax.random.key(0), (b, s, s, ci), dt), devices)
        w = put((jax.random.normal(jax.random.key(1), (3, 3, ci, co)) * 0.05).astype(dt), devices, replicated=True)
        g = put(jax.random.normal(jax.random.key(2), (b, 2 * s, 2 * s, co), dt), devices)
        flops = 2 * b * (2 * s) ** 2 * 9 * ci * co
        calls = {"fwd_repeat": (data_parallel(repeat, (False, True), devices), (x, w)),
                 "fwd_fused": (data_parallel(upsample_conv3x3, (False, True), devices), (x, w)),
                 "train_repeat": (train(repeat), (x, w, g)), "train_fused": (train(upsample_conv3x3), (x, w, g))}
        out[f"upsample {_name(b, s, ci, co)}"] = {
            k: gflops(flops * (3 if k.startswith("train") else 1),
                      median_seconds(lambda f=f, a=a: jax.block_until_ready(f(*a)), repeats))
            for k, (f, a) in calls.items()}
    return out


def attention_kernels(shapes, dt, repeats: int, devices) -> dict[str, dict[str, float]]:
    """The projections to `q`, `k`, `v` and the attention products of one attention layer.

    `ours`: the UNet's (`_DenseParts`, then `attention`); `jax`: one `nn.Dense`
    of width 3C split three ways, then `jax.nn.dot_product_attention` (XLA).
    GFLOP/s are `2 N C 3C` (projections) plus `2 x 2 B T^2 C` (the products)
    over the time; `train` (forward + the gradients of the input, kernel and
    bias) counts 3x that.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from diffusion_jax.models.unet import _DenseParts, attention

    def ours(x, params):
        c = x.shape[-1]
        return _DenseParts((c, c, c), dt).apply(params, x.reshape(-1, c)), attention

    def jax_form(x, params):
        c = x.shape[-1]
        qkv = nn.Dense(3 * c, dtype=dt).apply(params, x.reshape(-1, c))
        return jnp.split(qkv, 3, axis=-1), functools.partial(jax.nn.dot_product_attention, implementation="xla")

    def layer(form, heads: int):
        def apply(x, kernel, bias):
            b, s, _, c = x.shape
            qkv, attend = form(x, {"params": {"kernel": kernel, "bias": bias}})
            return attend(*(a.reshape(b, s * s, heads, c // heads) for a in qkv))
        return apply

    out = {}
    for b, s, c, heads in shapes:
        x = put(jax.random.normal(jax.random.key(0), (b, s, s, c), dt), devices)
        kernel = put(jax.random.normal(jax.random.key(1), (c, 3 * c)) / np.sqrt(c), devices, replicated=True)
        bias = put(jnp.zeros((3 * c,)), devices, replicated=True)
        g = put(jax.random.normal(jax.random.key(2), (b, s * s, heads, c // heads), dt), devices)
        t = s * s
        flops = 2 * b * t * c * 3 * c + 2 * 2 * b * t * t * c
        calls = {}
        for impl, form in (("ours", ours), ("jax", jax_form)):
            f = layer(form, heads)
            calls[f"{impl}_fwd"] = (data_parallel(f, (False, True, True), devices), (x, kernel, bias))
            calls[f"{impl}_train"] = (data_parallel(lambda x, w, bb, g, f=f: jax.vjp(f, x, w, bb)[1](g),
                                                    (False, True, True, False), devices), (x, kernel, bias, g))
        out[f"attention b{b} {s}x{s} {c}, {heads} head{'s' if heads > 1 else ''}"] = {
            k: gflops(flops * (3 if k.endswith("train") else 1),
                      median_seconds(lambda f=f, a=a: jax.block_until_ready(f(*a)), repeats))
            for k, (f, a) in calls.items()}
    return out


def elements_per_second(elements: int, seconds: float) -> float:
    return float(f"{elements / seconds / 1e9:.4g}")


def norm_kernels(shapes_name: str, dtype: str, repeats: int, devices) -> dict[str, dict[str, float]]:
    """GroupNorm(32) + SiLU forward and forward + backward: ours and flax's, G elements/s."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from diffusion_jax.models.unet import group_norm

    def ours(x, scale, bias):
        return jax.nn.silu(group_norm(x, scale, bias, 32, 1e-6).astype(x.dtype))  # as the UNet casts it

    def flax_gn(x, scale, bias):
        y = nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=x.dtype).apply(
            {"params": {"scale": scale, "bias": bias}}, x)
        return jax.nn.silu(y)

    def train(f):
        return data_parallel(lambda x, s, b, g: jax.vjp(f, x, s, b)[1](g), (False, True, True, False), devices)

    dt = jnp.dtype(dtype)
    out = {}
    for b, s, c in NORM_SHAPES[shapes_name]:
        x = put(jax.random.normal(jax.random.key(0), (b, s, s, c), dt) * 2 + 1, devices)
        scale = put(jnp.linspace(0.5, 1.5, c), devices, replicated=True)
        bias = put(jnp.linspace(-1, 1, c), devices, replicated=True)
        g = put(jax.random.normal(jax.random.key(2), (b, s, s, c), dt), devices)
        calls = {"gn_fwd": (data_parallel(ours, (False, True, True), devices), (x, scale, bias)),
                 "gn_train": (train(ours), (x, scale, bias, g)),
                 "flax_fwd": (data_parallel(flax_gn, (False, True, True), devices), (x, scale, bias)),
                 "flax_train": (train(flax_gn), (x, scale, bias, g))}
        out[f"norm {_name(b, s, c, c)}"] = {
            k: elements_per_second(b * s * s * c,
                                   median_seconds(lambda f=f, a=a: jax.block_until_ready(f(*a)), repeats))
            for k, (f, a) in calls.items()}
    return out


def torch_kernels(shapes, dtype: str, repeats: int, threads: int) -> dict[str, dict[str, float]] | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out = {}
    for b, s, ci, co in shapes:
        conv = torch.nn.Conv2d(ci, co, 3, padding=1, bias=False).to(dt)
        x = torch.randn(b, ci, s, s, dtype=dt, requires_grad=True)
        g = torch.randn(b, co, s, s, dtype=dt)
        flops = 2 * b * s * s * 9 * ci * co

        def fwd():
            with torch.no_grad():
                conv(x)

        def fwd_bwd():
            conv(x).backward(g)

        out[_name(b, s, ci, co)] = {"fwd": gflops(flops, median_seconds(fwd, repeats)),
                                    "fwd_bwd": gflops(3 * flops, median_seconds(fwd_bwd, repeats))}
    a = torch.randn(4096, 4096, dtype=dt)
    out["dot_4096"] = {"dot": gflops(2 * 4096**3, median_seconds(lambda: a @ a, repeats))}
    return out


def torch_norm_kernels(shapes_name: str, dtype: str, repeats: int, threads: int) -> dict[str, dict[str, float]]:
    """`norm_kernels` in PyTorch (`nn.GroupNorm` + SiLU, NCHW)."""
    import torch

    torch.set_num_threads(threads)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out = {}
    for b, s, c in NORM_SHAPES[shapes_name]:
        x = torch.randn(b, c, s, s, dtype=dt, requires_grad=True)
        gn = torch.nn.GroupNorm(32, c, eps=1e-6).to(dt)
        g = torch.randn(b, c, s, s, dtype=dt)

        def fwd():
            with torch.no_grad():
                torch.nn.functional.silu(gn(x))

        def train():  # the gradients alone: no accumulation into .grad between calls
            torch.autograd.grad(torch.nn.functional.silu(gn(x)), (x, gn.weight, gn.bias), g)

        out[f"norm {_name(b, s, c, c)}"] = {
            "torch_fwd": elements_per_second(b * s * s * c, median_seconds(fwd, repeats)),
            "torch_train": elements_per_second(b * s * s * c, median_seconds(train, repeats))}
    return out


def _print(record: dict[str, Any]) -> None:
    # Not _report.emit: these are kernel records, not images/s measurements.
    print(json.dumps(record), flush=True)


def _name(b, s, ci, co) -> str:
    return f"b{b} {s}x{s} {ci}->{co}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="ddpm_cifar10")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-devices", type=harness._positive_int, default=None,
                   help="split the CPU into this many XLA devices and every XLA kernel over them "
                        "along the batch, as training runs (default: one device, all cores); "
                        "where JAX already runs with more devices, the first N are used")
    p.add_argument("--xla-flags", default="", help="extra XLA flags, space-separated")
    p.add_argument("--no-torch", action="store_true", help="time XLA only")
    _report.add_allocator_arg(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    shapes = SHAPES[args.shapes]
    batches = [b for b, *_ in shapes + UPSAMPLE_SHAPES[args.shapes] + ATTENTION_SHAPES[args.shapes]
               + NORM_SHAPES[args.shapes]] + [4096]
    if args.cpu_devices is not None and any(b % args.cpu_devices for b in batches):
        p.error(f"--cpu-devices must divide every batch {sorted(set(batches))}, got {args.cpu_devices}")
    harness.configure_xla(cpu_devices=args.cpu_devices, extra_flags=args.xla_flags)
    import jax

    devices = jax.devices()
    if devices[0].platform != "cpu":
        p.error(f"this script measures CPU kernels; the default backend is {devices[0].platform}")
    wanted = args.cpu_devices or 1
    if len(devices) < wanted:
        raise RuntimeError(f"asked for {wanted} CPU devices, JAX has {len(devices)}: "
                           "was a backend started before configure_xla?")
    devices = devices[:wanted]
    common = {"task": "kernels", "shapes": args.shapes, "dtype": args.dtype, "unit": "GFLOP/s",
              "norm_unit": "G elements/s",
              **harness.common_fields(devices), "versions": harness.versions()}
    _print({"impl": "xla", **common, "gflops": xla_kernels(args.shapes, args.dtype, args.repeats, devices),
            "gelem_per_s": norm_kernels(args.shapes, args.dtype, args.repeats, devices)})
    if not args.no_torch:
        found = torch_kernels(shapes, args.dtype, args.repeats, threads=usable_cpu_count())
        if found is None:
            print("torch is not installed: XLA only", file=sys.stderr)
        else:
            import torch

            _print({"impl": "torch", **common, "gflops": found,
                    "gelem_per_s": torch_norm_kernels(args.shapes, args.dtype, args.repeats,
                                                      threads=usable_cpu_count()),
                  "versions": {**common["versions"], "torch": torch.__version__}})
    return 0


if __name__ == "__main__":
    _report.run_script(main)
