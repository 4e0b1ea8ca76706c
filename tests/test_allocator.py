"""Tests for diffusion_jax.allocator: when and how the process is re-run under jemalloc."""

import os
import subprocess
import sys

import pytest

from diffusion_jax import allocator


def test_jemalloc_environ_preloads_first_and_keeps_the_callers_settings():
    env = allocator.jemalloc_environ({"PATH": "/bin"}, "libjemalloc.so.2")
    assert env["LD_PRELOAD"] == "libjemalloc.so.2"
    assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert env[allocator.RELAUNCHED_ENV_VAR] == "1" and env["PATH"] == "/bin"

    theirs = {"LD_PRELOAD": " libfoo.so ", "MALLOC_CONF": "narenas:1"}
    env = allocator.jemalloc_environ(theirs, "/x/libjemalloc.so.2")
    assert env["LD_PRELOAD"] == "/x/libjemalloc.so.2 libfoo.so"
    assert env["MALLOC_CONF"] == "narenas:1"  # the caller's configuration wins
    assert theirs == {"LD_PRELOAD": " libfoo.so ", "MALLOC_CONF": "narenas:1"}  # not modified


def test_jemalloc_loaded_reads_the_memory_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n")
    assert not allocator.jemalloc_loaded(str(maps))
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.jemalloc_loaded(str(maps))
    assert not allocator.jemalloc_loaded(str(tmp_path / "missing"))


@pytest.fixture
def execve_calls(monkeypatch):
    """Records os.execve instead of replacing the test process."""
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.delenv(allocator.RELAUNCHED_ENV_VAR, raising=False)
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "libjemalloc.so.2")
    monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: False)
    return calls


def test_relaunch_runs_the_same_command_with_jemalloc_preloaded(execve_calls):
    allocator.relaunch_under_jemalloc(["python", "train.py", "--workdir=w"])
    [(executable, argv, env)] = execve_calls
    assert executable == sys.executable and argv == ["python", "train.py", "--workdir=w"]
    assert env["LD_PRELOAD"].split()[0] == "libjemalloc.so.2" and env[allocator.RELAUNCHED_ENV_VAR] == "1"


@pytest.mark.parametrize("case", ["relaunched", "loaded", "not_installed", "not_linux"])
def test_relaunch_does_nothing_where_it_should_not(case, execve_calls, monkeypatch):
    if case == "relaunched":
        monkeypatch.setenv(allocator.RELAUNCHED_ENV_VAR, "1")
    elif case == "loaded":
        monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: True)
    elif case == "not_installed":
        monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    else:
        monkeypatch.setattr(allocator.sys, "platform", "darwin")
    allocator.relaunch_under_jemalloc(["python", "x.py"])
    assert execve_calls == []


@pytest.mark.skipif(allocator.find_jemalloc() is None, reason="jemalloc is not installed (libjemalloc2)")
def test_a_relaunched_process_runs_once_under_jemalloc():
    code = ("import os; from diffusion_jax import allocator; print('start', flush=True); "
            "allocator.relaunch_under_jemalloc(); "
            "print(allocator.jemalloc_loaded(), os.environ['MALLOC_CONF'])")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", allocator.RELAUNCHED_ENV_VAR)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # The code before the relaunch ran twice (once in each process image), the rest once.
    assert out.stdout.split("\n") == ["start", "start", "True dirty_decay_ms:-1,muzzy_decay_ms:-1", ""]
