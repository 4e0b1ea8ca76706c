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
    assert env[allocator.RELAUNCHED_ENV_VAR] == "libjemalloc.so.2|1" and env["PATH"] == "/bin"

    theirs = {"LD_PRELOAD": " libfoo.so ", "MALLOC_CONF": "narenas:1"}
    env = allocator.jemalloc_environ(theirs, "/x/libjemalloc.so.2")
    assert env["LD_PRELOAD"] == "/x/libjemalloc.so.2 libfoo.so"
    assert env["MALLOC_CONF"] == "narenas:1"  # the caller's configuration wins
    assert theirs == {"LD_PRELOAD": " libfoo.so ", "MALLOC_CONF": "narenas:1"}  # not modified


@pytest.mark.parametrize("environ", [
    {}, {"LD_PRELOAD": "libfoo.so"}, {"MALLOC_CONF": "narenas:1"}, {"LD_PRELOAD": "a.so b.so", "MALLOC_CONF": "x:1"},
])
def test_restored_environ_undoes_jemalloc_environ(environ):
    environ = {"PATH": "/bin", **environ}
    assert allocator.restored_environ(allocator.jemalloc_environ(environ, "libjemalloc.so.2")) == environ


@pytest.mark.parametrize("platforms,plugins,want", [
    ("cpu", ["jax-cuda12-plugin"], True), ("cuda", [], False), ("tpu,cpu", [], False), (" CPU ", [], True),
    ("", [], True), ("", ["jax-cuda12-plugin"], False), ("", ["libtpu"], False), ("", ["jax_rocm60_plugin"], False),
])
def test_jax_runs_on_cpu_from_jax_platforms_and_installed_plugins(platforms, plugins, want, monkeypatch):
    class Dist:
        def __init__(self, name):
            self.metadata = {"Name": name}

    monkeypatch.setattr(allocator.importlib.metadata, "distributions",
                        lambda: [Dist(n) for n in ["numpy", "jax", "jaxlib", *plugins]])
    assert allocator.jax_runs_on_cpu({"JAX_PLATFORMS": platforms} if platforms else {}) is want


@pytest.fixture
def execve_calls(monkeypatch):
    """Records os.execve instead of replacing the test process."""
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.delenv(allocator.RELAUNCHED_ENV_VAR, raising=False)
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "libjemalloc.so.2")
    monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: False)
    monkeypatch.setattr(allocator, "jax_runs_on_cpu", lambda: True)
    return calls


def test_relaunch_runs_the_same_command_with_jemalloc_preloaded(execve_calls):
    allocator.relaunch_under_jemalloc(["python", "train.py", "--workdir=w"])
    [(executable, argv, env)] = execve_calls
    assert executable == sys.executable and argv == ["python", "train.py", "--workdir=w"]
    assert env["LD_PRELOAD"].split()[0] == "libjemalloc.so.2" and env[allocator.RELAUNCHED_ENV_VAR]


@pytest.mark.parametrize("case", ["relaunched", "loaded", "not_installed", "not_linux", "not_cpu",
                                  "user_preload", "stdin", "interactive"])
def test_relaunch_does_nothing_where_it_should_not(case, execve_calls, monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    argv = ["python", "x.py"]
    if case == "user_preload":  # another allocator, or a malloc debugger: the user's choice
        monkeypatch.setenv("LD_PRELOAD", "libc_malloc_debug.so.0")
    elif case in ("stdin", "interactive"):  # `python - < x.py` cannot read its program again
        monkeypatch.setattr(allocator.sys, "argv", ["-" if case == "stdin" else ""])
        argv = None
    elif case == "relaunched":
        monkeypatch.setenv(allocator.RELAUNCHED_ENV_VAR, "1")
    elif case == "loaded":
        monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: True)
    elif case == "not_installed":
        monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    elif case == "not_cpu":
        monkeypatch.setattr(allocator, "jax_runs_on_cpu", lambda: False)
    else:
        monkeypatch.setattr(allocator.sys, "platform", "darwin")
    allocator.relaunch_under_jemalloc(argv)
    assert execve_calls == []


def test_a_failed_preload_leaves_no_ld_preload_to_the_children(monkeypatch):
    """The marker stays (nothing relaunches again); LD_PRELOAD goes back to the user's."""
    env = allocator.jemalloc_environ({"LD_PRELOAD": "libfoo.so"}, "libjemalloc_missing.so.2")
    for name in ("LD_PRELOAD", "MALLOC_CONF", allocator.RELAUNCHED_ENV_VAR):
        monkeypatch.setenv(name, env[name]) if name in env else monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: False)
    allocator.relaunch_under_jemalloc()
    assert os.environ["LD_PRELOAD"] == "libfoo.so" and "MALLOC_CONF" not in os.environ
    assert os.environ[allocator.RELAUNCHED_ENV_VAR]


needs_jemalloc = pytest.mark.skipif(allocator.find_jemalloc() is None,
                                    reason="jemalloc is not installed (libjemalloc2)")


def _clean_env():
    drop = ("LD_PRELOAD", "MALLOC_CONF", "JAX_PLATFORMS", allocator.RELAUNCHED_ENV_VAR)
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(code, env):
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


@needs_jemalloc
def test_jemalloc_loaded_tells_the_preloaded_allocator_apart():
    code = "from diffusion_jax import allocator; print(allocator.jemalloc_loaded(), allocator.jemalloc_decay_settings())"
    assert _run(code, _clean_env())[0] == "False None"
    preloaded = {**_clean_env(), "LD_PRELOAD": allocator.find_jemalloc(), "MALLOC_CONF": "dirty_decay_ms:5"}
    assert _run(code, preloaded)[0] == "True dirty_decay_ms:5,muzzy_decay_ms:0"


@needs_jemalloc
def test_a_relaunched_process_runs_once_under_jemalloc_and_cleans_its_environment():
    code = ("import os; from diffusion_jax import allocator; print('start', flush=True); "
            "allocator.relaunch_under_jemalloc(); "
            "print(allocator.jemalloc_decay_settings(), "
            "[k for k in ('LD_PRELOAD', 'MALLOC_CONF', allocator.RELAUNCHED_ENV_VAR) if k in os.environ])")
    # The code before the relaunch ran twice (once in each process image), the
    # rest once, under jemalloc with decay off; the children it starts inherit
    # none of the settings.
    assert _run(code, {**_clean_env(), "JAX_PLATFORMS": "cpu"}) == [
        "start", "start", "dirty_decay_ms:-1,muzzy_decay_ms:-1 []", ""]
    # A job that will run on an accelerator is left alone.
    assert _run(code, {**_clean_env(), "JAX_PLATFORMS": "cuda"}) == ["start", "None []", ""]


@pytest.mark.parametrize("argv,want", [
    ([], True), (["--nojemalloc"], False), (["--jemalloc=false"], False), (["--nojemalloc", "--jemalloc"], True),
    (["-jemalloc=0"], False), (["--jemalloc=True"], True), (["--", "--nojemalloc"], True),
    (["--config=c.py", "--workdir=w"], True),
])
def test_train_py_reads_its_jemalloc_flag_before_parsing(argv, want):
    import train  # the repository root is on sys.path under pytest (rootdir)

    assert train._wants_jemalloc(["train.py", *argv]) is want


def test_train_py_reads_its_jemalloc_flag_from_a_flagfile_too(tmp_path):
    import train

    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--nojemalloc\n")
    assert train._wants_jemalloc(train._expanded(["train.py", f"--flagfile={flagfile}"])) is False
    # A flag file that cannot be read is left for absl's parse to report.
    assert train._expanded(["train.py", "--flagfile=/nonexistent/x"]) == ["train.py", "--flagfile=/nonexistent/x"]
