"""Tests for benchmarks/: the scripts run and report, the workloads match the peers', and
the speed changes they led to keep the math.

No timing is asserted: throughput depends on the machine and its load. The
scripts are run in-process on a still smaller "smoke" workload (added to the
workload table for the test) so that each finishes in seconds on 8 simulated
CPU devices.
"""

import dataclasses
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import _report  # noqa: E402
import sample_throughput  # noqa: E402
import train_throughput  # noqa: E402
import workloads  # noqa: E402

from diffusion_jax import allocator  # noqa: E402
from diffusion_jax.models import UNet, UNetConfig  # noqa: E402
from diffusion_jax.models.unet import conv_weight_grad_by_taps  # noqa: E402

# One level (plus the middle block's attention): compiles in seconds.
SMOKE = workloads.Workload(
    name="smoke", image_size=8, channels=1,
    unet=UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.1),
    batch_cpu=8, batch_gpu=8, timesteps=100)


@pytest.fixture
def smoke_workload(monkeypatch):
    monkeypatch.setitem(workloads.WORKLOADS, "smoke", SMOKE)
    return SMOKE


def _records(main, argv):
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    lines = out.getvalue().splitlines()
    records = _report.parse_records(lines)
    assert len(records) == len(lines), f"every stdout line must be a record: {lines}"
    return records


# --- the scripts run and report what the issue asks for --------------------------------


TRAIN_FIELDS = ("impl", "task", "workload", "device", "batch", "dtype", "img_per_s", "img_per_s_spread",
                "median_s_per_step", "compile_s", "flops_per_img", "mfu", "peak_mem_bytes", "versions", "allocator")


def test_train_throughput_reports_one_record_per_measurement(smoke_workload):
    n = jax.device_count()
    recs = _records(train_throughput.main, [
        "--workload", "smoke", "--batch", str(n), "--repeats", "2", "--steps", "2", "--warmup", "1",
        "--steps-per-dispatch", "2"])
    assert len(recs) == 1
    for r in recs:
        for field in TRAIN_FIELDS:
            assert field in r, field
        assert (r["impl"], r["task"], r["workload"], r["batch"]) == ("diffusion_jax", "train", "smoke", n)
        assert r["img_per_s"] > 0 and r["img_per_s_spread"][0] <= r["img_per_s"] <= r["img_per_s_spread"][1]
        assert r["num_devices"] == n and r["steps_per_dispatch"] == 2
        assert r["params"] == sum(x.size for x in jax.tree.leaves(_param_shapes(SMOKE)))
        # Forward + backward of a UNet costs at least 2 x 2 x (its multiply-adds); a
        # lower bound from the convolutions alone: conv_in (1 -> 32 channels at 8x8).
        assert r["flops_per_img"] > 3 * 2 * (8 * 8 * 9 * 1 * 32)
        assert r["mfu"] is None or 0 < r["mfu"] < 1
        assert r["peak_mem_bytes"] > 0
        # The float32 state (donated: params, EMA, Adam's two moments), plus the activations
        # kept for the backward pass, at least the UNet's input and first feature map.
        assert r["program_peak_mem_bytes"] >= 4 * 4 * r["params"] + 4 * 8 * 8 * 32  # one image per device
        assert r["allocator"] == "system" or r["allocator"].startswith("jemalloc (dirty_decay_ms:")
        if jax.default_backend() == "cpu":  # "auto" keeps YNNPACK for a UNet 32 channels wide
            assert r["cpu_convolutions"] == "ynnpack"


@pytest.mark.parametrize("argv,relaunches", [
    (["--workload", "tiny"], True), (["--workload", "tiny", "--allocator", "system"], False),
    (["--allocator=jemalloc"], True), (["--allocator=system", "--batch", "8"], False),
])
def test_scripts_rerun_under_jemalloc_unless_told_not_to(argv, relaunches, monkeypatch):
    calls = []
    monkeypatch.setattr(_report._allocator_module(), "relaunch_under_jemalloc", lambda: calls.append("relaunch"))
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        _report.run_script(lambda: calls.append("main") or 3)
    assert exit_info.value.code == 3
    assert calls == (["relaunch", "main"] if relaunches else ["main"])


@pytest.mark.parametrize("script", ["train_throughput.py", "sample_throughput.py", "cpu_kernels.py",
                                    "profile_step.py", "peers/diffusers_bench.py", "peers/lucidrains_bench.py"])
def test_every_benchmark_script_starts_through_run_script(script):
    # The allocator choice (--allocator) is made by _report.run_script, before main.
    text = (BENCH_DIR / script).read_text()
    main_block = text[text.index('if __name__ == "__main__":'):]
    assert "_report.run_script(main)" in main_block and "--allocator" in _help_of(script, text)


def _help_of(script, text):
    # The flag is defined through _report.add_allocator_arg in the script or its harness.
    harness_file = "peers/_torch_harness.py" if script.startswith("peers/") else "_jax_harness.py"
    return text + (BENCH_DIR / harness_file).read_text() + (BENCH_DIR / "_report.py").read_text()


@pytest.mark.skipif(allocator.find_jemalloc() is None, reason="jemalloc is not installed (libjemalloc2)")
@pytest.mark.parametrize("argv,want", [([], "jemalloc (dirty_decay_ms:-1,muzzy_decay_ms:-1)"),
                                       (["--allocator", "system"], "system")])
def test_run_script_reruns_under_jemalloc_and_the_record_says_so(argv, want):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _report; "
            "_report.run_script(lambda: print(_report.allocator_name()) or 0)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MALLOC_CONF", allocator.RELAUNCHED_ENV_VAR)}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code, str(BENCH_DIR), *argv], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want


def test_train_throughput_sweeps_batches_and_dtypes():
    args = train_throughput.parse_args(["--workload", "tiny", "--batch", "8", "16", "--batch", "32",
                                        "--dtype", "float32", "bfloat16"])
    assert args.batch == [8, 16, 32] and args.dtype == ["float32", "bfloat16"]


def test_train_throughput_rejects_bad_flags():
    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--workload", "tiny", "--steps", "3", "--steps-per-dispatch", "2"])
    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--workload", "nope"])
    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--workload", "tiny", "--batch", "0"])
    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--workload", "tiny", "--cpu-convolutions", "onednn"])
    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--workload", "tiny", "--microbatches", "0"])
    with pytest.raises(SystemExit, match=r"--microbatches 3 does not divide each device's share of --batch 16"):
        train_throughput.main(["--workload", "tiny", "--batch", "16", "--microbatches", "3"])
    assert train_throughput.parse_args(["--workload", "tiny"]).cpu_convolutions == "auto"


def test_sample_throughput_reports_and_compile_scaling(smoke_workload):
    n = jax.device_count()
    (r,) = _records(sample_throughput.main, [
        "--workload", "smoke", "--batch", str(n), "--sampler", "dpmpp", "--num-steps", "3",
        "--repeats", "1", "--warmup", "0"])
    for field in ("impl", "task", "workload", "device", "batch", "dtype", "img_per_s", "img_per_s_spread",
                  "sampler", "num_steps", "wall_s", "compile_s", "versions"):
        assert field in r, field
    assert (r["task"], r["sampler"], r["num_steps"]) == ("sample", "dpm_solver++", 3)
    assert r["wall_s"] > 0 and r["img_per_s"] == pytest.approx(n / r["wall_s"], rel=1e-3)
    # The replicated float32 parameters at least, and the [batch/n, 8, 8, 1] state.
    assert r["program_peak_mem_bytes"] >= 4 * r["params"]

    recs = _records(sample_throughput.main, ["--workload", "smoke", "--batch", str(n), "--compile-scaling"])
    assert [x["num_steps"] for x in recs] == [10, 100]  # 1000 is capped by the smoke schedule's T
    assert all(x["compile_s"] > 0 and x["img_per_s"] is None for x in recs)


def test_scripts_choose_the_cpu_convolutions_by_the_workloads_width(monkeypatch):
    # The scripts pass their workload's width to xla_cpu.choose, as train.py does:
    # "auto" asks for Eigen at 128 channels (on a checked jaxlib), YNNPACK at 32.
    from diffusion_jax import xla_cpu

    asked = []
    monkeypatch.setattr(xla_cpu, "request", asked.append)  # this process's backend has started
    monkeypatch.setattr(xla_cpu.allocator, "jax_runs_on_cpu", lambda environ=None: True)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: xla_cpu.CHECKED_JAXLIB[0])
    wide = dataclasses.replace(SMOKE, unet=dataclasses.replace(SMOKE.unet, ch=128))
    n = jax.device_count()
    cases = ((wide, [], "eigen"), (SMOKE, [], "ynnpack"), (wide, ["--cpu-convolutions", "ynnpack"], "ynnpack"))
    for workload, flags, want in cases:
        monkeypatch.setitem(workloads.WORKLOADS, "smoke", workload)
        asked.clear()
        _records(sample_throughput.main, ["--workload", "smoke", "--batch", str(n), "--sampler", "ddim",
                                          "--num-steps", "2", "--repeats", "1", "--warmup", "0", *flags])
        assert asked == [want]


def test_sample_throughput_rejects_bad_flags():
    with pytest.raises(SystemExit):
        sample_throughput.parse_args(["--workload", "tiny", "--num-steps", "1001"])
    with pytest.raises(SystemExit):
        sample_throughput.parse_args(["--workload", "tiny", "--compile-scaling", "--num-steps", "10"])


def test_steps_per_dispatch_equals_single_steps(smoke_workload):
    """K steps in one scanned call give the same state as K calls of one step."""
    from diffusion_jax import parallel

    mesh = parallel.make_mesh()
    n = jax.device_count()
    single, tx = train_throughput.build_step(SMOKE, "float32", 1, None, mesh)
    double, _ = train_throughput.build_step(SMOKE, "float32", 2, None, mesh)
    key = jax.device_put(jax.random.key(3), parallel.replicated_sharding(mesh))
    batches = train_throughput.synthetic_batch(SMOKE, n, 2, mesh, seed=0)
    state, _ = train_throughput.init_state(tx, SMOKE, mesh, seed=0)

    s_one = state
    for k in range(2):
        s_one, _ = single(s_one, jax.tree.map(lambda b, k=k: b[k], batches), key)
    state, _ = train_throughput.init_state(tx, SMOKE, mesh, seed=0)  # the first was donated
    s_two, _ = double(state, batches, key)
    assert int(s_two.step) == int(s_one.step) == 2
    for a, b in zip(jax.tree.leaves(s_one.params), jax.tree.leaves(s_two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# --- the workloads are the peers' ------------------------------------------------------


def _param_shapes(w):
    x = jax.ShapeDtypeStruct((1, *w.image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(lambda k, x, t: UNet(w.unet).init(k, x, t, train=False),
                          jax.random.key(0), x, t)["params"]


class _Gpu:
    platform = "gpu"

    def __init__(self, device_kind):
        self.device_kind = device_kind


# NVIDIA's datasheets list tensor-core figures "with sparsity": the dense peak is half.
@pytest.mark.parametrize("kind, dtype, precision, tflops, says", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", None, 1979 / 2, "bfloat16"),
    # float32 at JAX's default precision runs as TF32 on the tensor cores (989 with sparsity) ...
    ("NVIDIA H100 80GB HBM3", "float32", None, 989 / 2, "tf32"),
    ("NVIDIA H100 80GB HBM3", "float32", "tensorfloat32", 989 / 2, "tf32"),
    # ... and on the CUDA cores when full float32 is asked for.
    ("NVIDIA H100 80GB HBM3", "float32", "highest", 67, "float32"),
    ("NVIDIA H100 80GB HBM3", "float32", "F32_F32_F32", 67, "float32"),
    ("NVIDIA H100 PCIe", "bfloat16", None, 1513 / 2, "bfloat16"),
    ("NVIDIA H100 PCIe", "float32", None, 756 / 2, "tf32"),
    ("NVIDIA H100 PCIe", "float32", "float32", 51, "float32"),
    ("NVIDIA H100 NVL", "bfloat16", None, 1671 / 2, "bfloat16"),
    ("NVIDIA H100 NVL", "float32", None, 835 / 2, "tf32"),
    ("NVIDIA H100 NVL", "float32", "highest", 60, "float32"),
    ("NVIDIA H200", "bfloat16", None, 1979 / 2, "bfloat16"),
    ("NVIDIA H200", "float32", None, 989 / 2, "tf32"),
])
def test_gpu_peak_is_the_datasheet_figure_of_the_arithmetic_that_runs(kind, dtype, precision, tflops, says):
    import _jax_harness as harness

    with jax.default_matmul_precision(precision):
        peak, source = harness.peak_flops_per_s(_Gpu(kind), dtype)
    assert peak == pytest.approx(tflops * 1e12, rel=2e-3)
    assert f"dense {says}:" in source


def test_an_mfu_divides_by_the_peak_of_every_gpu_of_the_mesh():
    """img/s is the whole mesh's: 8 H100s peak at 8 x 989 TFLOP/s in bf16."""
    import _jax_harness as harness

    one, _ = harness.peak_flops_per_s(_Gpu("NVIDIA H100 80GB HBM3"), "bfloat16")
    peak, source = harness.mesh_peak_flops_per_s([_Gpu("NVIDIA H100 80GB HBM3")] * 8, "bfloat16")
    assert peak == pytest.approx(8 * 1979e12 / 2, rel=2e-3) and source.startswith("8 devices x ")
    assert harness.mesh_peak_flops_per_s([_Gpu("NVIDIA H100 80GB HBM3")], "bfloat16")[0] == one
    # The CPU's peak counts its cores, whatever number of XLA devices they are split into.
    cpus = jax.devices("cpu")
    assert harness.mesh_peak_flops_per_s(cpus, "float32") == harness.peak_flops_per_s(cpus[0], "float32")


def test_xla_counts_the_convolution_taps_inside_the_image_only():
    """The FLOP convention BENCHMARKS.md's MFU rests on: a 3x3 SAME convolution on 16x16
    counts 2 x 46^2 x C_in x C_out (46 = 16 + 15 + 15 taps in bounds per axis), not 2 x 48^2 x ..."""
    import _jax_harness as harness

    x = jax.ShapeDtypeStruct((1, 16, 16, 8), np.float32)
    w = jax.ShapeDtypeStruct((3, 3, 8, 4), np.float32)
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                            dimension_numbers=("NHWC", "HWIO", "NHWC")))
    assert harness.flops_of(conv.lower(x, w)) == 2 * 46**2 * 8 * 4


def test_flops_are_counted_where_the_backend_has_no_cost_analysis_before_compiling(monkeypatch):
    """A GPU plugin (PJRT C API) answers `Lowered.cost_analysis()` with None: the lowered
    module is then counted by the CPU client. A [4, 8] x [8, 3] product is 2 x 4 x 8 x 3."""
    import _jax_harness as harness

    matmul = jax.jit(jnp.matmul).lower(jax.ShapeDtypeStruct((4, 8), np.float32),
                                       jax.ShapeDtypeStruct((8, 3), np.float32))
    assert harness.flops_of(matmul) == 2 * 4 * 8 * 3
    monkeypatch.setattr(type(matmul), "cost_analysis", lambda self: None)
    assert matmul.cost_analysis() is None
    assert harness.flops_of(matmul) == 2 * 4 * 8 * 3

    def not_implemented(self):
        raise NotImplementedError("Lowered.cost_analysis not implemented on platform 'gpu'")
    monkeypatch.setattr(type(matmul), "cost_analysis", not_implemented)
    assert harness.flops_of(matmul) == 2 * 4 * 8 * 3


def test_a_batch_that_does_not_split_over_the_devices_stops_the_sweep_first():
    import _jax_harness as harness

    harness.check_batches_divide([8, 16], [object()] * 8)
    with pytest.raises(SystemExit, match=r"--batch 12 is not divisible by the 8 devices"):
        harness.check_batches_divide([16, 12], [object()] * 8)


def test_program_memory_is_the_compiled_buffers():
    """Arguments + outputs + temporaries of one call: 1 MiB in and 1 MiB out for a float32 [512, 512]
    doubled (the output is not the donated argument here)."""
    import _jax_harness as harness

    compiled = jax.jit(lambda x: 2 * x).lower(jax.numpy.ones((512, 512))).compile()
    assert harness.program_peak_bytes(compiled) >= 2 * 512 * 512 * 4
    assert harness.program_peak_bytes(compiled) < 3 * 512 * 512 * 4
    donated = jax.jit(lambda x: 2 * x, donate_argnums=0).lower(jax.numpy.ones((512, 512))).compile()
    assert harness.program_peak_bytes(donated) < 2 * 512 * 512 * 4  # the output reuses the input
    # A product sorted: the [512, 512] product is materialized beside the input for the sort
    # (XLA:CPU's peak_memory_in_bytes leaves such temporaries out). Not a product of two
    # computed operands: jaxlib 0.11's XLA:CPU fuses exp(x) @ sin(x) without a temporary.
    sorted_product = jax.jit(lambda x: jax.numpy.sort(x @ x, axis=0).sum())
    assert harness.program_peak_bytes(sorted_product.lower(jax.numpy.ones((512, 512))).compile()) >= (
        2 * 512 * 512 * 4)


def test_gpu_peak_of_an_unknown_gpu_is_unknown():
    import _jax_harness as harness

    assert harness.peak_flops_per_s(_Gpu("NVIDIA A100-SXM4-80GB"), "bfloat16")[0] is None


def test_ddpm_cifar10_workload_is_the_35_7m_model():
    w = workloads.get_workload("ddpm_cifar10")
    assert sum(x.size for x in jax.tree.leaves(_param_shapes(w))) == 35_746_307  # Ho et al. 2020, App. B
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.get_workload("cifar")


def test_workloads_match_the_peers_table():
    pytest.importorskip("torch")
    sys.path.insert(0, str(BENCH_DIR / "peers"))
    import _torch_harness

    assert set(_torch_harness.WORKLOADS) == set(workloads.WORKLOADS)
    for name, theirs in _torch_harness.WORKLOADS.items():
        ours = workloads.WORKLOADS[name]
        u = ours.unet
        assert (ours.image_size, ours.channels, ours.batch_cpu, ours.batch_gpu) == \
            (theirs.image_size, theirs.channels, theirs.batch_cpu, theirs.batch_gpu)
        assert (ours.timesteps, ours.beta_start, ours.beta_end) == \
            (theirs.timesteps, theirs.beta_start, theirs.beta_end)
        assert (u.ch, u.ch_mult, u.num_res_blocks, u.attn_resolutions, u.dropout, u.num_head_channels,
                u.scale_shift_norm, u.resblock_updown) == \
            (theirs.ch, theirs.ch_mult, theirs.num_res_blocks, theirs.attn_resolutions, theirs.dropout,
             theirs.num_head_channels, theirs.scale_shift_norm, theirs.resblock_updown)
        assert u.num_heads == 1  # DDPM: one head over all channels when num_head_channels is None


def test_tiny_workload_has_the_parameter_count_of_diffusers_unet2dmodel():
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(BENCH_DIR / "peers"))
    import _torch_harness
    import diffusers_bench

    w = workloads.get_workload("tiny")
    theirs = diffusers_bench.build_unet(_torch_harness.WORKLOADS["tiny"])
    assert sum(x.size for x in jax.tree.leaves(_param_shapes(w))) == _torch_harness.count_params(theirs)


# --- the speed change keeps the math: the convolution weight gradient by taps -----------


@pytest.mark.parametrize("stride,size,batch", [(1, 6, 2), (2, 6, 2), (2, 5, 2), (1, 5, 3), (2, 6, 1)])
def test_conv_weight_grad_by_taps_matches_the_convolution_vjp(stride, size, batch):
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    conv = lambda w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y, vjp = jax.vjp(conv, w)
    g = jax.random.normal(jax.random.key(2), y.shape)
    pads = jax.lax.padtype_to_pads((size, size), (3, 3), (stride, stride), "SAME")
    got = jax.jit(conv_weight_grad_by_taps, static_argnums=(2, 3, 4))(
        x, g, (3, 3), (stride, stride), tuple(map(tuple, pads)))
    np.testing.assert_allclose(got, vjp(g)[0], rtol=1e-5, atol=1e-5)


def test_conv_weight_grad_by_taps_in_bfloat16_accumulates_in_float32():
    # bf16 inputs, float32 products and sums: the result is float32 and as close to a
    # float64 reference as the bf16 rounding of the inputs alone allows.
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8)).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(1), (4, 6, 6, 5)).astype(jnp.bfloat16)
    got = conv_weight_grad_by_taps(x, g, (3, 3), (1, 1), ((1, 1), (1, 1)))
    assert got.dtype == jnp.float32
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    gd = np.asarray(g, np.float64)
    want = np.stack([np.stack([np.einsum("bpqc,bpqo->co", xp[:, i:i + 6, j:j + 6], gd) for j in range(3)])
                     for i in range(3)])
    # Sums of 144 exact bf16 x bf16 products in float32: float32 rounding only.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_conv_weight_grad_by_taps_by_hand():
    # 1 image, 2x2, one channel, stride 1, SAME: dw[i, j] = sum_pq xp[p + i, q + j] g[p, q].
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)
    g = jnp.array([1.0, 0.0, 0.0, 2.0]).reshape(1, 2, 2, 1)
    xp = np.pad(np.array([[1.0, 2.0], [3.0, 4.0]]), 1)
    want = np.array([[xp[i, j] * 1.0 + xp[i + 1, j + 1] * 2.0 for j in range(3)] for i in range(3)])
    got = conv_weight_grad_by_taps(x, g, (3, 3), (1, 1), ((1, 1), (1, 1)))
    np.testing.assert_allclose(got[:, :, 0, 0], want)
    assert want[1, 1] == 1.0 * 1.0 + 4.0 * 2.0  # the centre tap pairs x with g in place


def test_unet_gradient_is_the_same_with_either_weight_gradient():
    cfg = dataclasses.replace(SMOKE.unet, dropout=0.0)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([3, 70])
    params = UNet(cfg).init(jax.random.key(1), x, t, train=False)["params"]
    # Perturb so the zero-initialised output layers do not zero most gradients.
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)

    def grads(choice):
        model = UNet(dataclasses.replace(cfg, conv_weight_grad=choice))
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, train=False) ** 2)))(params)

    ref, taps = grads("xla"), grads("taps")
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(taps)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))) + 1e-7)


def test_unet_config_rejects_unknown_weight_gradient():
    with pytest.raises(ValueError, match="conv_weight_grad"):
        UNetConfig(conv_weight_grad="fast")


# --- the kernel ceiling script ---------------------------------------------------------


def test_cpu_kernels_times_every_kernel_of_every_shape(monkeypatch):
    import cpu_kernels

    monkeypatch.setitem(cpu_kernels.SHAPES, "tiny", [(2, 4, 8, 8), (1, 6, 4, 8)])
    monkeypatch.setitem(cpu_kernels.UPSAMPLE_SHAPES, "tiny", [(2, 3, 8, 4)])
    monkeypatch.setitem(cpu_kernels.ATTENTION_SHAPES, "tiny", [(2, 2, 8, 1), (1, 2, 8, 2)])
    monkeypatch.setitem(cpu_kernels.NORM_SHAPES, "tiny", [(2, 4, 64), (1, 2, 32)])
    monkeypatch.setattr(cpu_kernels, "torch_kernels", lambda *a, **k: None)
    out = io.StringIO()
    with redirect_stdout(out):
        assert cpu_kernels.main(["--shapes", "tiny", "--repeats", "1"]) == 0
    (rec,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rec["impl"] == "xla" and rec["task"] == "kernels" and rec["dtype"] == "float32"
    assert set(rec["gflops"]) == {"b2 4x4 8->8", "b1 6x6 4->8", "upsample b2 3x3 8->4", "dot_4096",
                                  "attention b2 2x2 8, 1 head", "attention b1 2x2 8, 2 heads"}
    for name, kernels in rec["gflops"].items():
        want = ({"dot"} if name == "dot_4096" else
                {"fwd_repeat", "fwd_fused", "train_repeat", "train_fused"} if name.startswith("upsample") else
                {"ours_fwd", "ours_train", "jax_fwd", "jax_train"} if name.startswith("attention") else
                {"fwd", "dx", "dw", "dw_taps"})
        assert set(kernels) == want, name
        assert all(np.isfinite(v) and v > 0 for v in kernels.values()), (name, kernels)
    assert set(rec["gelem_per_s"]) == {"norm b2 4x4 64->64", "norm b1 2x2 32->32"}
    for name, kernels in rec["gelem_per_s"].items():
        assert set(kernels) == {"gn_fwd", "gn_train", "flax_fwd", "flax_train"}, name
        assert all(np.isfinite(v) and v > 0 for v in kernels.values()), (name, kernels)
    # bfloat16 runs every kernel too (the norms' outputs take the input's dtype, as in the UNet).
    out = io.StringIO()
    with redirect_stdout(out):
        assert cpu_kernels.main(["--shapes", "tiny", "--repeats", "1", "--dtype", "bfloat16"]) == 0
    (rec,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rec["dtype"] == "bfloat16" and len(rec["gelem_per_s"]) == 2 and len(rec["gflops"]) == 6
    with pytest.raises(SystemExit):
        cpu_kernels.main(["--repeats", "0"])


def test_cpu_kernels_split_over_devices_as_training_does(monkeypatch):
    import cpu_kernels

    assert jax.device_count() >= 2  # the backend runs (8 devices); the script leaves it be
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # it sets the count here

    monkeypatch.setitem(cpu_kernels.SHAPES, "tiny", [(2, 4, 8, 8)])
    monkeypatch.setitem(cpu_kernels.UPSAMPLE_SHAPES, "tiny", [(2, 3, 8, 4)])
    monkeypatch.setitem(cpu_kernels.ATTENTION_SHAPES, "tiny", [(2, 2, 8, 1)])
    monkeypatch.setitem(cpu_kernels.NORM_SHAPES, "tiny", [(2, 2, 32)])
    monkeypatch.setattr(cpu_kernels, "torch_kernels", lambda *a, **k: None)
    out = io.StringIO()
    with redirect_stdout(out):
        assert cpu_kernels.main(["--shapes", "tiny", "--repeats", "1", "--cpu-devices", "2"]) == 0
    (rec,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rec["num_devices"] == 2 and set(rec["gflops"]) == {"b2 4x4 8->8", "upsample b2 3x3 8->4", "dot_4096",
                                                              "attention b2 2x2 8, 1 head"}
    assert set(rec["gelem_per_s"]) == {"norm b2 2x2 32->32"}
    # A batch the devices do not divide is refused before anything is timed.
    monkeypatch.setitem(cpu_kernels.SHAPES, "tiny", [(3, 4, 8, 8)])
    with pytest.raises(SystemExit):
        cpu_kernels.main(["--shapes", "tiny", "--cpu-devices", "2"])


def test_cpu_kernels_data_parallel_gives_each_device_its_share():
    import cpu_kernels

    devices = jax.devices()[:2]
    assert len(devices) == 2
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3))
    g = jax.random.normal(jax.random.key(1), (4, 5, 5, 2))
    taps = lambda x, g: conv_weight_grad_by_taps(x, g, (3, 3), (1, 1), ((1, 1), (1, 1)))  # noqa: E731
    split = cpu_kernels.data_parallel(taps, (False, False), devices)
    got = split(cpu_kernels.put(x, devices), cpu_kernels.put(g, devices))
    # Per device, the kernel gradient of its half of the batch, stacked along axis 0.
    want = np.concatenate([taps(x[:2], g[:2]), taps(x[2:], g[2:])])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert {d for d in got.sharding.device_set} == set(devices)


def test_auto_weight_gradient_mixes_taps_and_xla_by_shape_and_keeps_the_gradient():
    # 128 channels at 16x16 (batch 32: 8192 >= 4096 positions -> taps on CPU) and at
    # 8x8 (a map under 16x16 -> XLA's own): "auto" takes both paths in one network.
    cfg = UNetConfig(ch=128, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                     conv_weight_grad="auto")
    x = jax.random.normal(jax.random.key(0), (32, 16, 16, 1))
    t = jnp.arange(32) * 3
    params = UNet(cfg).init(jax.random.key(1), x[:1], t[:1], train=False)["params"]
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)

    def loss(choice):
        model = UNet(dataclasses.replace(cfg, conv_weight_grad=choice))
        return lambda p: jnp.sum(model.apply({"params": p}, x, t, train=False) ** 2)

    def convs(jaxpr, found, in_custom_vjp=False):
        """Counts 3x3 convolutions inside a custom VJP (the tap path) and outside it.

        (The 2x2 convolutions of the upsampling layers have their own custom VJP.)
        """
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated" and eqn.invars[1].aval.shape[:2] == (3, 3):
                found["taps" if in_custom_vjp else "xla"] += 1
            inside = in_custom_vjp or eqn.primitive.name.startswith("custom_vjp_call")
            for v in eqn.params.values():
                inner = getattr(v, "jaxpr", None)
                if inner is not None:
                    convs(getattr(inner, "jaxpr", inner), found, inside)
        return found

    def count(choice):
        return convs(jax.make_jaxpr(loss(choice))(params).jaxpr, {"taps": 0, "xla": 0})

    assert count("xla")["taps"] == 0 and count("taps")["xla"] == 0
    mixed = count("auto")
    if jax.default_backend() == "cpu":
        assert mixed["taps"] > 0 and mixed["xla"] > 0, mixed

    ref = jax.jit(jax.grad(loss("xla")))(params)
    auto = jax.jit(jax.grad(loss("auto")))(params)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(auto)):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(a))) + 1e-7)
