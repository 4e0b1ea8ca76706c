"""Run the process under jemalloc, keeping freed pages for reuse: faster XLA:CPU steps.

XLA:CPU asks ``malloc`` for each executable's temporary buffer on every call:
gigabytes for a large UNet training step (5-7 GB for the 35.7M DDPM model at
batch 32 on this project's CPU machine). glibc serves requests that large with
fresh ``mmap`` pages and unmaps them on ``free``, so every step faults in, and
the kernel zeroes, each 4 KiB page it touches again (6.3 M page faults in a
14-step run, BENCHMARKS.md). jemalloc with its decay turned off
(``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``) keeps freed pages mapped
and hands them out again: the faults go away, and the process's resident size
stays at its peak instead of shrinking after it.

The allocator must be chosen when the process starts (``LD_PRELOAD``), so
:func:`relaunch_under_jemalloc` re-executes the current command with it, once,
where jemalloc is installed (Debian/Ubuntu: ``apt-get install libjemalloc2``),
JAX will run on the CPU, and jemalloc is not ``malloc`` already; otherwise it
returns and the process carries on with the system allocator. The relaunched
process takes the jemalloc settings out of its environment again, so that the
processes it starts choose for themselves. ``train.py`` and the benchmark
scripts call it before anything else (``--nojemalloc`` / ``--allocator system``
to opt out).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import sys
from collections.abc import Mapping, Sequence

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Set in the relaunched process's environment ("<library>|<1 if MALLOC_CONF was
# added>"), so that it does not relaunch again; taken out once jemalloc runs.
RELAUNCHED_ENV_VAR = "DIFFUSION_JAX_JEMALLOC"


def find_jemalloc() -> str | None:
    """The jemalloc shared library as the dynamic linker finds it (``libjemalloc.so.2``), or None."""
    return ctypes.util.find_library("jemalloc")


def jemalloc_loaded() -> bool:
    """Whether jemalloc is this process's ``malloc`` (its ``mallctl`` is in the global symbol table).

    A library that loads a private copy of jemalloc (``RTLD_LOCAL``) does not count.
    """
    try:
        return hasattr(ctypes.CDLL(None), "mallctl")
    except (OSError, TypeError):  # TypeError: no CDLL(None) (Windows)
        return False


def jemalloc_decay_settings() -> str | None:
    """jemalloc's decay options as it runs with them (``"dirty_decay_ms:-1,muzzy_decay_ms:-1"``), or None.

    Read from jemalloc itself (``mallctl``), since the relaunched process no
    longer has ``MALLOC_CONF`` in its environment.
    """
    if not jemalloc_loaded():
        return None
    mallctl = ctypes.CDLL(None).mallctl
    values = []
    for name in ("dirty_decay_ms", "muzzy_decay_ms"):
        value, size = ctypes.c_ssize_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
        if mallctl(f"opt.{name}".encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)):
            return None
        values.append(f"{name}:{value.value}")
    return ",".join(values)


# Distributions whose presence means JAX may run on a GPU or TPU instead of the CPU.
_ACCELERATOR_DISTRIBUTIONS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu", "jaxlib-cuda")


def jax_runs_on_cpu(environ: Mapping[str, str] | None = None) -> bool:
    """Whether JAX will pick the CPU backend, decided without starting one.

    True when ``JAX_PLATFORMS`` names ``cpu`` first, or is unset and no GPU/TPU
    support for JAX (``jax-cuda*``, ``jax-rocm*``, ``libtpu`` distributions) is installed.
    """
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return not any(n.lower().startswith(_ACCELERATOR_DISTRIBUTIONS) for n in names)


def jemalloc_environ(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """``environ`` with ``library`` preloaded before anything already in ``LD_PRELOAD``.

    ``MALLOC_CONF`` is :data:`JEMALLOC_CONF` unless the caller's environment sets
    its own (theirs wins); :data:`RELAUNCHED_ENV_VAR` marks the relaunch and
    records what was added, for :func:`restored_environ`.
    """
    env = dict(environ)
    preload = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = f"{library} {preload}".strip() if preload else library
    added_conf = "MALLOC_CONF" not in env
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[RELAUNCHED_ENV_VAR] = f"{library}|{int(added_conf)}"
    return env


def restored_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without what :func:`jemalloc_environ` added (the inverse, given its marker)."""
    env = dict(environ)
    library, _, added_conf = env.pop(RELAUNCHED_ENV_VAR, "").partition("|")
    preload = env.get("LD_PRELOAD", "").split()
    if library and preload and preload[0] == library:
        preload = preload[1:]
        if preload:
            env["LD_PRELOAD"] = " ".join(preload)
        else:
            env.pop("LD_PRELOAD", None)
    if added_conf == "1":
        env.pop("MALLOC_CONF", None)
    return env


def relaunch_under_jemalloc(argv: Sequence[str] | None = None) -> None:
    """Re-executes this process's command under jemalloc (see the module docstring), or returns.

    Returns without relaunching when: not on Linux, JAX will not run on the
    CPU (:func:`jax_runs_on_cpu`), jemalloc is already ``malloc``, this
    process is itself a relaunch, ``LD_PRELOAD`` is already set (the user
    chose what to preload: another allocator, a malloc debugger), the program
    came from stdin (``python -``: read already, it cannot run again), or no
    jemalloc library is installed. In a relaunched process it first takes the
    jemalloc settings back out of ``os.environ`` (jemalloc has read them, or
    failed to load), so child processes do not inherit them. Otherwise it
    does not return: ``os.execve`` replaces the process
    (same PID, same arguments, same environment plus ``LD_PRELOAD``,
    ``MALLOC_CONF`` and :data:`RELAUNCHED_ENV_VAR`). Call it before any work
    that should not run twice.

    Args:
      argv: the command line to run again, the interpreter's included (default:
        ``sys.orig_argv``, exactly what started this process).
    """
    if os.environ.get(RELAUNCHED_ENV_VAR):
        # Where the preload failed the marker stays, so that nothing loops; LD_PRELOAD goes
        # either way (each child process would report the failed preload again).
        names = ("LD_PRELOAD", "MALLOC_CONF") + ((RELAUNCHED_ENV_VAR,) if jemalloc_loaded() else ())
        clean = restored_environ(os.environ)
        for name in names:
            if name in clean:
                os.environ[name] = clean[name]
            else:
                os.environ.pop(name, None)
        return
    if not sys.platform.startswith("linux") or jemalloc_loaded() or not jax_runs_on_cpu():
        return
    if os.environ.get("LD_PRELOAD", "").strip():
        return
    if argv is None and sys.argv[:1] in ([""], ["-"]):  # a program from stdin or interactive
        return
    library = find_jemalloc()
    if library is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, argv, jemalloc_environ(os.environ, library))
