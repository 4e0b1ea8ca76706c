"""Workloads, flags and timing loops shared by the PyTorch peer benchmarks.

The only module of the peer benchmarks that decides how time is measured, so
diffusers and denoising-diffusion-pytorch are timed the same way:

* train: `warmup` untimed steps (the first one compiles under
  `--compile`; its wall time is reported as `compile_s`), then `repeats`
  windows of `steps` optimizer steps each. One window's images / seconds is one
  throughput sample; the record gives the median and [min, max] over windows.
* sample: the network is warmed up (and compiled) on a few timesteps, then each
  of `repeats` full sampler runs of `num_steps` network evaluations is one
  throughput sample (batch / wall seconds).

Timing brackets call `torch.cuda.synchronize()` on GPU. CPU runs use float32;
GPU runs use bfloat16 autocast (weights and optimizer state stay float32),
which is how a PyTorch user trains in mixed precision.

Data is a fixed synthetic batch already on the device: we measure the model,
loss, optimizer and sampler, not an input pipeline.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_report.py
import _report  # noqa: E402

# The peers draw a tqdm bar per sampler run; tqdm reads this once, when it is
# first imported, which `import torch` already does.
os.environ.setdefault("TQDM_DISABLE", "1")
import torch  # noqa: E402

LEARNING_RATE = 2e-4
SAMPLERS = ("ddpm", "ddim", "dpmpp")
DEFAULT_NUM_STEPS = {"ddpm": 1000, "ddim": 50, "dpmpp": 20}
# Environment variables that change CPU threading; recorded when set.
THREADING_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark architecture, described the way our UNetConfig is.

    `attn_resolutions` are feature-map sizes (in pixels) at which self-attention
    runs; `num_head_channels` None means one head over all channels (DDPM),
    otherwise heads = channels // num_head_channels (ADM). `family` picks the
    timestep-embedding and padding conventions of the paper the workload copies.
    """

    name: str
    image_size: int
    channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    num_head_channels: int | None
    scale_shift_norm: bool
    resblock_updown: bool
    family: str  # "ddpm" (Ho et al. 2020) or "adm" (Dhariwal & Nichol 2021)
    batch_cpu: int
    batch_gpu: int
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def level_resolutions(self) -> list[int]:
        """Feature-map size at each UNet level, outermost first."""
        return [self.image_size // 2**i for i in range(len(self.ch_mult))]

    def level_channels(self) -> list[int]:
        return [self.ch * m for m in self.ch_mult]


WORKLOADS: dict[str, Workload] = {
    "tiny": Workload(
        name="tiny", image_size=16, channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(8,), dropout=0.0, num_head_channels=None, scale_shift_norm=False,
        resblock_updown=False, family="ddpm", batch_cpu=32, batch_gpu=32,
    ),
    "ddpm_cifar10": Workload(
        name="ddpm_cifar10", image_size=32, channels=3, ch=128, ch_mult=(1, 2, 2, 2),
        num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, num_head_channels=None,
        scale_shift_norm=False, resblock_updown=False, family="ddpm", batch_cpu=32, batch_gpu=128,
    ),
    "adm_64": Workload(
        name="adm_64", image_size=64, channels=3, ch=128, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
        attn_resolutions=(32, 16, 8), dropout=0.1, num_head_channels=64, scale_shift_norm=True,
        resblock_updown=True, family="adm", batch_cpu=16, batch_gpu=64,
    ),
}


def parse_args(impl: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Flags shared by both peer scripts; validates them before any model is built."""
    p = argparse.ArgumentParser(
        description=f"Throughput of {impl} on one diffusion_jax benchmark workload. "
        "Prints one JSON line per measurement on stdout.")
    p.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    p.add_argument("--task", required=True, choices=("train", "sample"))
    p.add_argument("--batch", type=int, default=None,
                   help="images per step / per sampling run (default: the workload's CPU or GPU batch)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (train) or sampler runs (sample)")
    p.add_argument("--steps", type=int, default=None,
                   help="train only: optimizer steps per timed window (default 5)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps (train) or network calls (sample) before timing")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (mode default)")
    p.add_argument("--compile-cache", choices=("fresh", "default"), default="fresh",
                   help="fresh: compile into an empty inductor cache, so compile_s is a first-time "
                        "compile; default: reuse the user's cache (compile_s then depends on past runs)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                   help="sample only: ddpm = ancestral (Ho et al. 2020), ddim (Song et al. 2021, eta 0), "
                        "dpmpp = DPM-Solver++(2M) (Lu et al. 2022)")
    p.add_argument("--num-steps", type=int, default=None,
                   help="sample only: sampler steps (default: ddpm 1000, ddim 50, dpmpp 20)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype; bfloat16 means autocast (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    _report.add_allocator_arg(p)
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False (is this the CPU build of torch?)")
    workload = WORKLOADS[args.workload]
    if args.batch is None:
        args.batch = workload.batch_gpu if args.device == "cuda" else workload.batch_cpu
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error(f"--warmup must be >= 1 (the first step compiles and is never timed), got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.task == "train":
        args.steps = 5 if args.steps is None else args.steps
        if args.steps < 1:
            p.error(f"--steps must be >= 1, got {args.steps}")
        if args.num_steps is not None:
            p.error("--num-steps is for --task sample; use --steps for timed training steps")
    else:
        if args.steps is not None:
            p.error("--steps is for --task train; a sampling run is timed whole, see --num-steps")
        if args.num_steps is None:
            args.num_steps = DEFAULT_NUM_STEPS[args.sampler]
        if not 1 <= args.num_steps <= workload.timesteps:
            p.error(f"--num-steps must be in [1, {workload.timesteps}], got {args.num_steps}")
    args.workload_spec = workload
    return args


def setup_torch(args: argparse.Namespace) -> torch.device:
    """Seeds, threads, matmul precision and compile cache; returns the device to run on."""
    if args.compile and args.compile_cache == "fresh":
        # Inductor reads this when it first compiles; a warm cache turns a
        # minute-long compile into seconds and would make compile_s meaningless.
        cache = tempfile.mkdtemp(prefix="peer_bench_inductor_")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        # TF32 for any float32 matmul left outside autocast, as users enable it.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return torch.device(args.device)


def autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when --dtype bfloat16, else a no-op context."""
    if args.dtype == "bfloat16":
        return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def maybe_compile(module: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    return torch.compile(module) if args.compile else module


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def time_train(step: Callable[[], Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Times `step` (one full optimizer step) as described in the module docstring."""
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    synchronize(device)

    seconds_per_step = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for r in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        seconds_per_step.append((time.perf_counter() - t0) / args.steps)
        print(f"[{r + 1}/{args.repeats}] {seconds_per_step[-1]:.4f} s/step", file=sys.stderr)
    fields = _throughput_fields(seconds_per_step, args.batch, first_step_s, args)
    fields["cpu_share"] = _cpu_share(cpu0, wall0, device)
    return fields


def time_sample(sample_run: Callable[[], Any], warm_network: Callable[[], Any],
                args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Times whole sampler runs; `warm_network()` makes one untimed network call."""
    t0 = time.perf_counter()
    warm_network()
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        warm_network()
    synchronize(device)

    seconds_per_run = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for r in range(args.repeats):
        t0 = time.perf_counter()
        sample_run()
        synchronize(device)
        seconds_per_run.append(time.perf_counter() - t0)
        print(f"[{r + 1}/{args.repeats}] {seconds_per_run[-1]:.3f} s/run", file=sys.stderr)
    fields = _throughput_fields(seconds_per_run, args.batch, first_step_s, args)
    fields["cpu_share"] = _cpu_share(cpu0, wall0, device)
    # One sampler "step" is one network evaluation plus the solver update.
    fields["median_s_per_step"] = fields.pop("median_s_per_step") / args.num_steps
    fields["median_s_per_run"] = fields["median_s_per_step"] * args.num_steps
    return fields


def _cpu_share(cpu0: float, wall0: float, device: torch.device) -> float | None:
    """CPU seconds this process got per wall second per torch thread, over the timed part.

    Near 1.0 on an otherwise idle CPU run; well below it means other processes
    took the cores and the throughput is understated. None on GPU, where the
    host mostly waits by design.
    """
    if device.type != "cpu":
        return None
    wall = time.perf_counter() - wall0
    return round((time.process_time() - cpu0) / (wall * torch.get_num_threads()), 3)


def _throughput_fields(seconds: list[float], batch: int, first_step_s: float,
                       args: argparse.Namespace) -> dict[str, Any]:
    img_per_s, spread = _report.median_and_spread([batch / s for s in seconds])
    median_s, _ = _report.median_and_spread(seconds)
    fields = {
        "img_per_s": round(img_per_s, 4),
        "img_per_s_spread": [round(v, 4) for v in spread],
        "median_s_per_step": median_s,
        "first_step_s": round(first_step_s, 3),
    }
    if args.compile:
        # Wall time of the first call, which traces and compiles (forward and,
        # for training, backward) and then runs it once.
        fields["compile_s"] = round(first_step_s, 3)
    return fields


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The process's peak memory so far and where it comes from, as our records give it:
    on a GPU the most torch's caching allocator had handed to tensors at once (as JAX's
    `peak_bytes_in_use` counts its allocator's), on the CPU the maximum resident set size."""
    if device.type == "cuda":
        return (int(torch.cuda.max_memory_allocated(device)),
                "torch.cuda.max_memory_allocated(), since the process started")
    return _report.process_peak_rss()


def record(impl: str, args: argparse.Namespace, device: torch.device, *, params: int,
           versions: dict[str, str], timing: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The JSON record for one measurement (see benchmarks/_report.py)."""
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    rec: dict[str, Any] = {
        "impl": impl,
        "task": args.task,
        "workload": args.workload,
        "device": _report.device_description(accelerator, threads=torch.get_num_threads()),
        "batch": args.batch,
        "dtype": args.dtype if args.dtype == "float32" else f"{args.dtype} (autocast)",
        "compiled": bool(args.compile),
        **({"compile_cache": args.compile_cache} if args.compile else {}),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "allocator": _report.allocator_name(),
    }
    if args.task == "sample":
        rec["sampler"] = args.sampler
        rec["num_steps"] = args.num_steps
    rec.update(timing)
    rec["median_s_per_step"] = round(rec["median_s_per_step"], 6)
    if "median_s_per_run" in rec:
        rec["median_s_per_run"] = round(rec["median_s_per_run"], 4)
    rec["peak_mem_bytes"], rec["peak_mem_source"] = peak_memory(device)
    rec.update({
        "repeats": args.repeats,
        "steps": args.steps if args.task == "train" else None,
        "params": params,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, **versions},
        "notes": notes,
    })
    env = {k: os.environ[k] for k in THREADING_ENV if k in os.environ}
    if env:
        rec["env"] = env
    if rec["steps"] is None:
        del rec["steps"]
    return rec


def emit(rec: dict[str, Any]) -> None:
    _report.emit(rec)
