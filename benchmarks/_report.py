"""JSON-lines reporting shared by every benchmark script (ours and the peers').

Each measurement is one JSON object on one line of stdout, so that
`benchmarks/compare.py` (or `jq`) can collect them from any implementation's
script. Human-readable progress goes to stderr. This module imports nothing
beyond the standard library: it is loaded by the JAX scripts and by the
PyTorch peer scripts alike.

Fields every record carries (`REQUIRED_FIELDS`):
  impl        "diffusion_jax", "diffusers", "lucidrains", ...
  task        "train" or "sample"
  workload    "tiny", "ddpm_cifar10", "adm_64"
  device      from `device_description`
  batch       images per step (train) or per sampling run (sample)
  dtype       "float32", "bfloat16", ...
  img_per_s   median over repeats of images per second
Usual extra fields: img_per_s_spread ([min, max] over repeats),
median_s_per_step, repeats, steps, compile_s, params, versions, sampler,
num_steps, notes, allocator.

Every script, ours and the peers', runs under the same host allocator:
jemalloc, keeping freed pages, where it is installed (`run_script`,
`--allocator system` to opt out), as `train.py` does.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, TextIO

REQUIRED_FIELDS = ("impl", "task", "workload", "device", "batch", "dtype", "img_per_s")


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or platform's best guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def usable_cpu_count() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_description(accelerator: str | None = None, *, threads: int | None = None) -> str:
    """One line naming the hardware a measurement ran on.

    Args:
      accelerator: the accelerator's name (e.g. `torch.cuda.get_device_name()`
        or `jax.devices()[0].device_kind`); None for a CPU run.
      threads: intra-op threads the framework uses on CPU; defaults to the
        number of usable CPUs.

    Returns:
      The accelerator's name as given, or "cpu: <model name>, <n> threads".
    """
    if accelerator:
        return accelerator
    if threads is None:
        threads = usable_cpu_count()
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return f"cpu: {cpu_model_name()}, {threads} thread{'s' if threads != 1 else ''}"


def process_peak_rss() -> tuple[int, str]:
    """The process's maximum resident set size so far, in bytes, and a sentence saying so:
    the peak memory a CPU run reports (ours and the peers' alike)."""
    import resource

    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
            "process max RSS (ru_maxrss), since the process started")


def median_and_spread(values: Sequence[float]) -> tuple[float, list[float]]:
    """Median and [min, max] of repeated measurements.

    With the handful of repeats a benchmark can afford, min and max say more
    honestly how noisy the machine was than an interquartile range would.

    Raises:
      ValueError: if `values` is empty or holds a non-finite number.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("median_and_spread needs at least one value")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"median_and_spread got non-finite values: {bad}")
    return statistics.median(values), [min(values), max(values)]


def emit(record: Mapping[str, Any], *, file: TextIO | None = None) -> None:
    """Prints `record` as one JSON line (stdout by default) and flushes.

    Raises:
      ValueError: if a field of `REQUIRED_FIELDS` is missing, before printing.
    """
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"benchmark record lacks required fields {missing}: {dict(record)}")
    out = sys.stdout if file is None else file
    out.write(json.dumps(dict(record), sort_keys=False) + "\n")
    out.flush()


def parse_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The benchmark records among `lines`: JSON objects with `REQUIRED_FIELDS`.

    Other lines (library chatter, warnings, progress) are skipped, so a
    script's whole stdout can be passed in.
    """
    records = []
    for line in lines:
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and all(k in obj for k in REQUIRED_FIELDS):
            records.append(obj)
    return records


@functools.lru_cache(maxsize=None)
def _allocator_module():
    """`diffusion_jax/allocator.py` (standard library only), loaded by path so that the
    PyTorch scripts do not import the diffusion_jax package (and JAX) with it."""
    path = Path(__file__).resolve().parents[1] / "diffusion_jax" / "allocator.py"
    spec = importlib.util.spec_from_file_location("_diffusion_jax_allocator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_allocator_arg(parser: argparse.ArgumentParser) -> None:
    """`--allocator`, read by `run_script` before the script's own parsing."""
    parser.add_argument("--allocator", choices=("jemalloc", "system"), default="jemalloc",
                        help="jemalloc (default, as train.py: run as a script, it re-runs itself under "
                             "jemalloc, keeping freed pages, where libjemalloc2 is installed; "
                             "diffusion_jax/allocator.py) or the system malloc")


def run_script(main: Callable[[], Any]) -> None:
    """A script's entry point: re-run under jemalloc unless `--allocator system`, then exit with `main()`.

    The re-run (`diffusion_jax.allocator.relaunch_under_jemalloc`) happens here
    and not in `main`, so that calling `main(argv)` from Python never replaces
    the calling process.
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_allocator_arg(parser)
    known, _ = parser.parse_known_args()
    if known.allocator == "jemalloc":
        _allocator_module().relaunch_under_jemalloc()
    sys.exit(main())


def allocator_name() -> str:
    """"jemalloc (its decay settings)" if this process runs under jemalloc, else "system"."""
    module = _allocator_module()
    if not module.jemalloc_loaded():
        return "system"
    settings = module.jemalloc_decay_settings()
    return f"jemalloc ({settings})" if settings else "jemalloc"
