"""diffusion_jax.xla_cpu: the choice of XLA:CPU's convolution library."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from diffusion_jax import allocator, parallel, xla_cpu

REPO = Path(__file__).resolve().parents[1]
EIGEN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"
OTHER = "--xla_cpu_enable_fast_math=false"  # a real flag: XLA aborts on unknown ones


@pytest.fixture
def cpu_jaxlib_0_10(monkeypatch):
    monkeypatch.setattr(allocator, "jax_runs_on_cpu", lambda environ=None: True)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 10))


@pytest.mark.parametrize("ch,want", [(128, "eigen"), (192, "eigen"), (127, "ynnpack"), (32, "ynnpack")])
def test_auto_takes_eigen_from_128_channels(cpu_jaxlib_0_10, ch, want):
    assert xla_cpu.choose("auto", ch) == want


def test_auto_keeps_xlas_default_off_the_cpu_and_on_unchecked_jaxlib(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.setattr(allocator, "jax_runs_on_cpu", lambda environ=None: False)
    assert xla_cpu.choose("auto", 256) == "ynnpack"
    monkeypatch.setattr(allocator, "jax_runs_on_cpu", lambda environ=None: True)
    assert xla_cpu.choose("auto", 256) == "eigen"
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 99))
    assert xla_cpu.choose("auto", 256) == "ynnpack"


def test_an_explicit_library_is_kept_whatever_the_width(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 99))
    assert xla_cpu.choose("eigen", 32) == "eigen"
    assert xla_cpu.choose("ynnpack", 512) == "ynnpack"


def test_bad_choices_name_what_is_wrong():
    with pytest.raises(ValueError, match="'onednn'"):
        xla_cpu.choose("onednn", 128)
    for bad in (0, -3, 1.5, True, "128"):
        with pytest.raises(ValueError, match="ch must be an int"):
            xla_cpu.choose("auto", bad)
    with pytest.raises(ValueError, match="'auto'"):
        xla_cpu.request("auto")  # resolve with choose() first


def test_request_sets_the_flag_once_and_keeps_the_users(monkeypatch):
    monkeypatch.setattr(parallel, "backend_started", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.setenv("XLA_FLAGS", OTHER)
    assert xla_cpu.request("ynnpack") is False  # XLA's default: nothing to set
    assert os.environ["XLA_FLAGS"] == OTHER
    assert xla_cpu.request("eigen") is True
    assert os.environ["XLA_FLAGS"] == f"{OTHER} {EIGEN_FLAG}"
    assert xla_cpu.request("eigen") is False  # already set: not added twice
    assert os.environ["XLA_FLAGS"] == f"{OTHER} {EIGEN_FLAG}"
    users = f"{OTHER} --xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution,reduce"
    monkeypatch.setenv("XLA_FLAGS", users)
    assert xla_cpu.request("eigen") is False
    assert os.environ["XLA_FLAGS"] == users


def test_request_on_an_unchecked_jaxlib_warns(monkeypatch, caplog):
    monkeypatch.setattr(parallel, "backend_started", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 99))
    monkeypatch.setenv("XLA_FLAGS", "")
    with caplog.at_level(logging.WARNING, logger="diffusion_jax.xla_cpu"):
        assert xla_cpu.request("eigen") is True
    assert "0.99" in caplog.text and "not checked" in caplog.text
    assert os.environ["XLA_FLAGS"] == EIGEN_FLAG


def test_a_late_request_raises_and_leaves_the_flags(monkeypatch):
    jax.devices()  # this test process's backend has started: the flag would be ignored
    monkeypatch.setenv("XLA_FLAGS", OTHER)
    with pytest.raises(RuntimeError, match="already started"):
        xla_cpu.request("eigen")
    assert os.environ["XLA_FLAGS"] == OTHER


@pytest.mark.parametrize("flags,want", [
    ("", True),
    (OTHER, True),
    (EIGEN_FLAG, False),
    ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce", False),
    ("--xla_cpu_experimental_ynn_fusion_type=", False),  # YNNPACK off altogether
    ("--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution,reduce", True),
    (f"{EIGEN_FLAG} --xla_cpu_experimental_ynn_fusion_type=individual_convolution", True),  # the last wins
    (f"--xla_cpu_experimental_ynn_fusion_type=individual_convolution {EIGEN_FLAG}", False),
    ('--xla_cpu_experimental_ynn_fusion_type="individual_dot,reduce"', False),  # quoted
    ("--xla_cpu_experimental_ynn_fusion_types=individual_dot", True),  # another name
])
def test_convolutions_on_ynnpack_reads_the_flags(flags, want):
    assert xla_cpu.convolutions_on_ynnpack(flags) is want


# What XLA makes of the flag, in fresh processes: a convolution, a matmul and a
# reduction, compiled; which ops end up in YNNPACK fusions; the convolution's
# values against float64 numpy.
_PROBE = r"""
import json, re, sys
import numpy as np
from diffusion_jax import xla_cpu
if sys.argv[1] != "default":
    xla_cpu.request(sys.argv[1])
import jax, jax.numpy as jnp
from jax import lax

def f(x, w, m):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y, jnp.sum(y, axis=(1, 2)), (y.reshape(-1, 64) @ m) * 3.0 + 1.0

rng = np.random.default_rng(0)
x, w, m = (rng.standard_normal(s).astype(np.float32) for s in ((2, 8, 8, 64), (3, 3, 64, 64), (64, 64)))
compiled = jax.jit(f).lower(x, w, m).compile()
entry = compiled.as_text().split("ENTRY", 1)[1]
ops = [re.search(r"(?:^|\s)([a-z][a-z0-9_-]*)\(", line.split(" = ", 1)[1]).group(1)
       + (" ynn" if "__ynn_fusion" in line else "") for line in entry.splitlines()[1:] if " = " in line]
y = np.asarray(compiled(x, w, m)[0])
xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
ref = sum(np.einsum("bhwc,cd->bhwd", xp[:, i:i + 8, j:j + 8], w[i, j].astype(np.float64))
          for i in range(3) for j in range(3))
print(json.dumps({"ops": sorted(ops), "hlo": entry, "err": float(np.max(np.abs(y - ref)) / np.max(np.abs(ref))),
                  "on_ynnpack": xla_cpu.convolutions_on_ynnpack()}))
"""


def _probe(arg: str, xla_flags: str = "") -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _PROBE, arg], check=False, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eigen_moves_only_the_convolutions_off_ynnpack():
    default, eigen = _probe("default"), _probe("eigen")
    # By default YNNPACK runs the convolution: no plain convolution op is left.
    assert "convolution" not in default["ops"] and default["on_ynnpack"]
    # With "eigen" the convolution is XLA's own op; the matmul and the
    # reduction stay in YNNPACK fusions, as many as before less the convolution's.
    assert "convolution" in eigen["ops"] and not eigen["on_ynnpack"]
    assert eigen["ops"].count("fusion ynn") == default["ops"].count("fusion ynn") - 1 >= 2
    for run in (default, eigen):  # the same convolution either way, to float32 rounding (576-term sums)
        assert run["err"] < 1e-5


@pytest.mark.skipif(xla_cpu._jaxlib_version() not in xla_cpu.CHECKED_JAXLIB,
                    reason="XLA:CPU's default fusion set is checked on the jaxlib versions in CHECKED_JAXLIB")
def test_the_checked_default_set_is_xlas_default():
    # CHECKED_JAXLIB's claim: the default is individual_dot,individual_convolution,reduce,
    # so that EIGEN_FUSION_TYPES changes nothing but the convolutions.
    explicit = _probe("default", "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution,reduce")
    assert explicit["hlo"] == _probe("default")["hlo"]
