"""Run the process under jemalloc, keeping freed pages for reuse: faster XLA:CPU steps.

XLA:CPU asks ``malloc`` for each executable's temporary buffer on every call:
gigabytes for a large UNet training step (6-7 GB for the 35.7M DDPM model at
batch 32). glibc serves requests that large with fresh ``mmap`` pages and
unmaps them on ``free``, so every step faults in, and the kernel zeroes, each
4 KiB page it touches again (6.3 M page faults in 14 steps, BENCHMARKS.md).
jemalloc with its decay turned off (``MALLOC_CONF=dirty_decay_ms:-1,
muzzy_decay_ms:-1``) keeps freed pages mapped and hands them out again, so
the resident size stays at the step's peak and the faults go away.

The allocator must be chosen when the process starts (``LD_PRELOAD``), so
:func:`relaunch_under_jemalloc` re-executes the current command with it, once,
where jemalloc is installed (Debian/Ubuntu: ``apt-get install libjemalloc2``)
and not loaded already; otherwise it returns and the process carries on with
the system allocator. ``train.py`` and the benchmark scripts call it first
thing (``--jemalloc=false`` / ``--allocator system`` to opt out).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping, Sequence

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Set in the relaunched process's environment, so that it never relaunches again.
RELAUNCHED_ENV_VAR = "DIFFUSION_JAX_JEMALLOC"


def find_jemalloc() -> str | None:
    """The jemalloc shared library as the dynamic linker finds it (``libjemalloc.so.2``), or None."""
    return ctypes.util.find_library("jemalloc")


def jemalloc_loaded(maps_path: str = "/proc/self/maps") -> bool:
    """Whether a jemalloc library is mapped into this process (False where ``/proc`` is missing)."""
    try:
        with open(maps_path, encoding="utf-8", errors="replace") as f:
            return any("libjemalloc" in line for line in f)
    except OSError:
        return False


def jemalloc_environ(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """``environ`` with ``library`` preloaded before anything already in ``LD_PRELOAD``.

    ``MALLOC_CONF`` is :data:`JEMALLOC_CONF` unless the caller's environment sets
    its own (theirs wins); :data:`RELAUNCHED_ENV_VAR` marks the relaunch.
    """
    env = dict(environ)
    preload = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = f"{library} {preload}".strip() if preload else library
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[RELAUNCHED_ENV_VAR] = "1"
    return env


def relaunch_under_jemalloc(argv: Sequence[str] | None = None) -> None:
    """Re-executes this process's command under jemalloc (see the module docstring), or returns.

    Returns without doing anything when: not on Linux, jemalloc is already
    loaded, this process is itself a relaunch, or no jemalloc library is
    installed. Otherwise it does not return: ``os.execve`` replaces the process
    (same PID, same arguments, same environment plus ``LD_PRELOAD``,
    ``MALLOC_CONF`` and :data:`RELAUNCHED_ENV_VAR`). Call it before any work
    that should not run twice.

    Args:
      argv: the command line to run again, the interpreter's included (default:
        ``sys.orig_argv``, exactly what started this process).
    """
    if not sys.platform.startswith("linux") or os.environ.get(RELAUNCHED_ENV_VAR) or jemalloc_loaded():
        return
    library = find_jemalloc()
    if library is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, argv, jemalloc_environ(os.environ, library))
