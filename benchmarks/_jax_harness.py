"""Devices, peaks, memory and versions shared by diffusion_jax's benchmark scripts.

The JAX counterpart of `peers/_torch_harness.py`: the one place that decides
how our scripts describe the machine, which peak FLOP/s an MFU is taken
against, and where a peak-memory figure comes from, so that
`train_throughput.py` and `sample_throughput.py` report them alike.

XLA reads `XLA_FLAGS` once, when the first backend starts. `configure_xla`
must therefore run before anything touches a device (importing jax is fine).
"""

from __future__ import annotations

import functools
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_report.py
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repo root: diffusion_jax

import _report  # noqa: E402

# Dense peak FLOP/s from NVIDIA's H100/H200 datasheets (SXM unless named; half
# the "with sparsity" figures), by the arithmetic that runs: bf16 and TF32 on
# the tensor cores, fp32 on the CUDA cores. The H200 has the H100's compute and
# more, faster memory. (device_kind substring, arithmetic) -> FLOP/s.
GPU_PEAK_FLOPS = {
    ("H100 PCIe", "bfloat16"): 756e12,
    ("H100 PCIe", "tf32"): 378e12,
    ("H100 PCIe", "float32"): 51e12,
    ("H100 NVL", "bfloat16"): 835e12,
    ("H100 NVL", "tf32"): 418e12,
    ("H100 NVL", "float32"): 60e12,
    ("H100", "bfloat16"): 989e12,
    ("H100", "tf32"): 495e12,
    ("H100", "float32"): 67e12,
    ("H200", "bfloat16"): 989e12,
    ("H200", "tf32"): 495e12,
    ("H200", "float32"): 67e12,
}
# Values of `jax_default_matmul_precision` that keep float32 convolutions and
# matmuls in float32 on a GPU; any other (None, the default, included) lets XLA
# run them as TF32 on the tensor cores of Ampere and later GPUs (JAX's "Matmul
# precision" page: by default "float32 dot products may be computed with
# reduced-precision arithmetic internally ... TF32 on recent GPUs").
FULL_FLOAT32_PRECISIONS = ("highest", "float32", "F32_F32_F32")
# CPU: FLOPs per cycle per core of the widest FMA the CPU has, taking two FMA
# ports (Intel Xeon Scalable, AMD Zen 4+): AVX-512 = 2 ports x 16 fp32 lanes x
# 2 (multiply + add); AVX2 = 2 x 8 x 2. bfloat16 gets the same fp32 vector
# peak: XLA's CPU code does bf16 arithmetic in fp32 vector registers.
CPU_FP32_FLOPS_PER_CYCLE = {"avx512f": 64, "avx2": 32}


def configure_xla(*, cpu_devices: int | None = None, extra_flags: str = "") -> str:
    """Adds benchmark XLA flags to `XLA_FLAGS`; returns the resulting value.

    Args:
      cpu_devices: run the CPU backend as this many devices
        (`--xla_force_host_platform_device_count`), each a data-parallel shard.
      extra_flags: more flags, space-separated, appended as given.

    Flags set after a backend started are silently ignored; the scripts
    check afterwards that the device count came out as asked.
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    if cpu_devices is not None:
        if cpu_devices < 1:
            raise ValueError(f"cpu_devices must be >= 1, got {cpu_devices}")
        flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={cpu_devices}")
    flags += extra_flags.split()
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return os.environ["XLA_FLAGS"]


def default_cpu_devices(batches) -> int | None:
    """The CPU device count train.py would use: one per core, as many as divide every batch.

    None when `XLA_FLAGS` already sets `--xla_force_host_platform_device_count`
    (that setting is kept). Only the CPU backend is affected.
    """
    if "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    from diffusion_jax import parallel

    return parallel.cpu_devices_for(math.gcd(*batches), parallel.usable_cpu_cores())


def add_device_args(parser) -> None:
    """`--cpu-devices`, `--xla-flags` and `--cpu-convolutions`, the device options our scripts take."""
    from diffusion_jax import xla_cpu

    parser.add_argument("--cpu-devices", type=_positive_int, default=None,
                        help="split the CPU into this many XLA devices (data parallel; default: as "
                             "train.py, one per core, as many as divide the batch)")
    parser.add_argument("--xla-flags", default="", help="extra XLA flags, space-separated")
    parser.add_argument("--cpu-convolutions", choices=xla_cpu.LIBRARIES, default="auto",
                        help="the library XLA:CPU runs convolutions with (default: as train.py, "
                             "eigen for workloads of >= 128 channels; diffusion_jax/xla_cpu.py)")
    _report.add_allocator_arg(parser)


def _positive_int(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def start_devices(requested_cpu_devices: int | None, batches, extra_flags: str = "", *,
                  cpu_convolutions: str, ch: int):
    """Configures XLA, then starts JAX's backend; returns ``jax.devices()``.

    Args:
      requested_cpu_devices: `--cpu-devices` as given (None: `default_cpu_devices`).
      batches: the CPU batches of the run, for the default device count.
      extra_flags: `--xla-flags` (a convolution library set there wins).
      cpu_convolutions: `--cpu-convolutions`, resolved for a UNet of base width
        `ch` as train.py does (`diffusion_jax.xla_cpu.choose`).
      ch: the workload's `UNetConfig.ch`.

    Raises:
      RuntimeError: a count was asked for but the CPU backend came up with
        another (a backend had started before the flags were set).
    """
    cpu_devices = requested_cpu_devices
    if cpu_devices is None:
        cpu_devices = default_cpu_devices(batches)
    configure_xla(cpu_devices=cpu_devices, extra_flags=extra_flags)
    from diffusion_jax import xla_cpu

    xla_cpu.request(xla_cpu.choose(cpu_convolutions, ch))
    import jax

    devices = jax.devices()
    if requested_cpu_devices is not None and devices[0].platform == "cpu" and len(devices) != requested_cpu_devices:
        raise RuntimeError(f"asked for {requested_cpu_devices} CPU devices, JAX has {len(devices)}: "
                           "was a backend started before configure_xla?")
    return devices


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_ghz() -> float | None:
    """The clock /proc/cpuinfo reports now ("cpu MHz" of the first core), in GHz, or None
    (on this kind of virtual machine, a fixed figure)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1]) / 1000.0
    except (OSError, ValueError):
        pass
    return None


def peak_flops_per_s(device, dtype: str) -> tuple[float | None, str]:
    """The peak FLOP/s an MFU is taken against, and a sentence saying which peak.

    GPU: the datasheet figure for the arithmetic `dtype` runs on
    (`GPU_PEAK_FLOPS`): bfloat16 on the tensor cores; float32 as TF32 on the
    tensor cores at JAX's default matmul precision, on the CUDA cores where
    `jax_default_matmul_precision` asks for full float32
    (`FULL_FLOAT32_PRECISIONS`). CPU: an estimate, cores x the reported clock x fp32
    FLOPs/cycle of the widest FMA (`CPU_FP32_FLOPS_PER_CYCLE`), for either
    dtype. None where unknown.
    """
    if device.platform == "cpu":
        flags = cpu_flags()
        per_cycle = next((v for k, v in CPU_FP32_FLOPS_PER_CYCLE.items() if k in flags), None)
        ghz = cpu_ghz()
        cores = _report.usable_cpu_count()
        if per_cycle is None or ghz is None:
            return None, "cpu: unknown vector width or clock"
        isa = next(k for k in CPU_FP32_FLOPS_PER_CYCLE if k in flags)
        return (cores * ghz * 1e9 * per_cycle,
                f"cpu estimate: {cores} cores x {ghz:.2f} GHz x {per_cycle} fp32 FLOP/cycle ({isa}, 2 FMA ports)")
    import jax

    kind = device.device_kind
    arithmetic, why = dtype, ""
    if dtype == "float32":
        precision = jax.config.jax_default_matmul_precision
        if precision not in FULL_FLOAT32_PRECISIONS:
            arithmetic = "tf32"
            why = f" (float32 at matmul precision {precision or 'default'} runs as TF32)"
    for (name, dt), value in GPU_PEAK_FLOPS.items():  # "H100 PCIe" and "NVL" are listed before "H100"
        if name in kind and dt == arithmetic:
            return value, f"{name} datasheet dense {dt}: {value / 1e12:.0f} TFLOP/s{why}"
    return None, f"no peak known for {kind!r} {dtype}"


def check_batches_divide(batches, devices) -> None:
    """Exits with one line, before anything compiles, if a batch of the sweep does not
    split evenly over the devices (the CPU's count comes from --cpu-devices)."""
    bad = [b for b in batches if b % len(devices)]
    if bad:
        sys.exit(f"error: --batch {' '.join(map(str, bad))} is not divisible by the {len(devices)} devices "
                 "(on CPU set by --cpu-devices)")


def mesh_peak_flops_per_s(devices, dtype: str) -> tuple[float | None, str]:
    """`peak_flops_per_s` of the whole mesh, whose img/s an MFU divides: a GPU's peak
    times the device count; the CPU's as it is (it already covers every core, however
    many XLA devices the cores are split into)."""
    peak, source = peak_flops_per_s(devices[0], dtype)
    if peak and devices[0].platform != "cpu" and len(devices) > 1:
        return peak * len(devices), f"{len(devices)} devices x {source}"
    return peak, source


def device_name(devices) -> str:
    """One line naming the hardware: the accelerator kind (x count) or the CPU model."""
    d = devices[0]
    if d.platform == "cpu":
        desc = _report.device_description(None)
        return desc if len(devices) == 1 else f"{desc}, as {len(devices)} XLA devices"
    return d.device_kind if len(devices) == 1 else f"{len(devices)} x {d.device_kind}"


def peak_memory_bytes(devices) -> tuple[int | None, str]:
    """The largest peak memory over `devices` since the process started, and where it comes from.

    Accelerators report `peak_bytes_in_use` in `memory_stats()`; the CPU
    backend reports nothing, so the process's maximum resident set size is
    given instead (which also counts the Python interpreter and XLA's compiler).
    Neither can be reset: in a sweep, a measurement's figure covers the ones
    before it in the same process (`program_peak_bytes` is per program).
    """
    peaks = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), ("device.memory_stats()['peak_bytes_in_use'], max over devices, "
                            "since the process started")
    return _report.process_peak_rss()


def program_peak_bytes(compiled) -> int | None:
    """Device memory one call of `compiled` needs, per device: XLA's buffer plan
    (`memory_analysis()`: arguments + outputs + temporaries, an output that reuses a
    donated argument counted once), the same on every backend and for every
    measurement of a sweep. None where the backend does not report it.

    Not `peak_memory_in_bytes`: XLA:CPU (jaxlib 0.10) fills it with about the
    arguments alone (572 MB for ddpm_cifar10's step at batch 32, whose
    temporaries are another 1.17 GB per device)."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):  # some backends do not implement it
        return None
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def flops_of(lowered_or_compiled) -> float | None:
    """Total FLOPs XLA's cost analysis counts for one call, or None.

    A backend reached through the PJRT C API (the CUDA and ROCm plugins) has
    no cost analysis before compiling: `Lowered.cost_analysis()` gives None
    there (jax's `MeshComputation.cost_analysis` raises "not implemented on
    platform 'gpu'", jax 0.10 and 0.11). A lowered program's module is then
    analysed by the CPU client, which runs the same `HloCostAnalysis` over the
    same unoptimized module: the count the CPU gives, on any device.

    Note: the count is per device program (SPMD), and XLA counts the body of a
    while loop (a `lax.scan`) once, not once per iteration.
    """
    try:
        cost = lowered_or_compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        cost = None
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per device program
        cost = cost[0] if cost else None
    if (not cost or "flops" not in cost) and hasattr(lowered_or_compiled, "compiler_ir"):
        try:
            from jax._src import xla_bridge
            from jax._src.lib import _jax

            module = lowered_or_compiled.compiler_ir("hlo").as_hlo_module()
            cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
        except Exception:  # the private API moved, or no CPU backend (JAX_PLATFORMS)
            cost = None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


@functools.lru_cache(maxsize=8)
def initial_params(workload, seed: int):
    """The workload's UNet parameters from `init` (float32, on the host), and their count.

    Cached: a sweep over batch sizes and dtypes initialises once (parameters
    are float32 whatever the compute dtype).
    """
    import jax
    import jax.numpy as jnp

    from diffusion_jax.models import UNet

    model = UNet(workload.unet_config("float32"))
    x = jnp.zeros((1, *workload.image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    params = jax.device_get(jax.jit(lambda k: model.init(k, x, t, train=False)["params"])(jax.random.key(seed)))
    return params, sum(int(a.size) for a in jax.tree.leaves(params))


def versions() -> dict[str, str]:
    import flax
    import jax
    import jaxlib
    import optax

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__}


class CpuShare:
    """CPU seconds this process got per wall second per usable core, over a stretch.

    Near 1.0 when the run had the CPU to itself; well below, other processes
    took the cores and throughput is understated. (The peers report the same.)
    """

    def __init__(self):
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def value(self) -> float:
        wall = time.perf_counter() - self.wall0
        return round((time.process_time() - self.cpu0) / (wall * _report.usable_cpu_count()), 3)


def common_fields(devices) -> dict[str, Any]:
    """Record fields describing the machine and its state: device, load, XLA flags (and on CPU
    the convolution library they choose)."""
    import jax

    from diffusion_jax import xla_cpu

    return {
        "device": device_name(devices),
        "num_devices": len(devices),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "allocator": _report.allocator_name(),
        # JAX's persistent compilation cache (gpu_suite.sh sets one): where it is on,
        # a compile_s may be the time to load a program an earlier run compiled.
        "compilation_cache": (jax.config.jax_compilation_cache_dir or None)
        if jax.config.jax_enable_compilation_cache else None,
    } | ({"cpu_convolutions": "ynnpack" if xla_cpu.convolutions_on_ynnpack() else "eigen"}
         if devices[0].platform == "cpu" else {})
