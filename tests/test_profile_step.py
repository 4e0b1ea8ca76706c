"""benchmarks/profile_step.py: HLO parsing, categories, event pairing, and a real trace."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import profile_step  # noqa: E402

# A hand-written module in the form `compiled.as_text()` prints: one fusion of
# each kind, a while loop whose body holds a dot, a tuple-shaped instruction.
HLO = textwrap.dedent("""\
    HloModule jit_f, entry_computation_layout={(f32[4,4]{1,0})->f32[4,4]{1,0}}

    %fused_conv (param_0: f32[1,4,4,2], param_1: f32[3,3,2,2]) -> f32[1,4,4,2] {
      %param_0 = f32[1,4,4,2]{3,2,1,0} parameter(0)
      %param_1 = f32[3,3,2,2]{3,2,1,0} parameter(1)
      %convolution.1 = f32[1,4,4,2]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
      %constant.1 = f32[] constant(1)
      %broadcast.1 = f32[1,4,4,2]{3,2,1,0} broadcast(%constant.1), dimensions={}
      ROOT %add.1 = f32[1,4,4,2]{3,2,1,0} add(%convolution.1, %broadcast.1)
    }

    %inner_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
      %p0 = f32[4,4]{1,0} parameter(0)
      %p1 = f32[4,4]{1,0} parameter(1)
      ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
    }

    %fused_nested (param_0.1: f32[4,4]) -> f32[4,4] {
      %param_0.1 = f32[4,4]{1,0} parameter(0)
      ROOT %fusion.inner = f32[4,4]{1,0} fusion(%param_0.1, %param_0.1), kind=kCustom, calls=%inner_dot
    }

    %fused_transpose (param_0.2: f32[4,4]) -> f32[4,4] {
      %param_0.2 = f32[4,4]{1,0} parameter(0)
      %transpose.1 = f32[4,4]{0,1} transpose(%param_0.2), dimensions={1,0}
      ROOT %copy.1 = f32[4,4]{1,0} copy(%transpose.1)
    }

    %fused_reduce (param_0.3: f32[4,4]) -> f32[4] {
      %param_0.3 = f32[4,4]{1,0} parameter(0)
      %multiply.1 = f32[4,4]{1,0} multiply(%param_0.3, %param_0.3)
      %constant.2 = f32[] constant(0)
      ROOT %reduce.1 = f32[4]{0} reduce(%multiply.1, %constant.2), dimensions={1}, to_apply=%add_computation
    }

    %add_computation (a: f32[], b: f32[]) -> f32[] {
      %a = f32[] parameter(0)
      %b = f32[] parameter(1)
      ROOT %add.2 = f32[] add(%a, %b)
    }

    %fused_pad (param_0.4: f32[4,4]) -> f32[6,6] {
      %param_0.4 = f32[4,4]{1,0} parameter(0)
      %constant.3 = f32[] constant(0)
      ROOT %pad.1 = f32[6,6]{1,0} pad(%param_0.4, %constant.3), padding=1_1x1_1
    }

    %fused_window (param_0.6: f32[4,6], param_1.6: s32[]) -> f32[4,4] {
      %param_0.6 = f32[4,6]{1,0} parameter(0)
      %param_1.6 = s32[] parameter(1)
      %constant.6 = s32[] constant(0)
      %constant.7 = s32[] constant(2)
      %clamp.1 = s32[] clamp(%constant.6, %param_1.6, %constant.7)
      %sign.1 = s32[1]{0} sign(%param_1.6)
      %add.3 = s32[] add(%clamp.1, %constant.6)
      %dynamic-slice.1 = f32[4,4]{1,0} dynamic-slice(%param_0.6, %constant.6, %add.3), dynamic_slice_sizes={4,4}
      ROOT %bitcast.1 = f32[4,4]{1,0} bitcast(%dynamic-slice.1)
    }

    %fused_elementwise (param_0.5: f32[4,4]) -> f32[4,4] {
      %param_0.5 = f32[4,4]{1,0} parameter(0)
      %logistic.1 = f32[4,4]{1,0} logistic(%param_0.5)
      ROOT %multiply.2 = f32[4,4]{1,0} multiply(%param_0.5, %logistic.1)
    }

    %body (state: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
      %state = (s32[], f32[4,4]{1,0}) parameter(0)
      %i = s32[] get-tuple-element(%state), index=0
      %m = f32[4,4]{1,0} get-tuple-element(%state), index=1
      %dot.2 = f32[4,4]{1,0} dot(%m, %m), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/while/body/dot_general"}
      ROOT %tuple.1 = (s32[], f32[4,4]{1,0}) tuple(%i, %dot.2)
    }

    %cond (state.1: (s32[], f32[4,4])) -> pred[] {
      %state.1 = (s32[], f32[4,4]{1,0}) parameter(0)
      ROOT %constant.4 = pred[] constant(false)
    }

    ENTRY %main.1 (Arg_0.1: f32[4,4]) -> f32[4,4] {
      %Arg_0.1 = f32[4,4]{1,0} parameter(0)
      %conv_fusion = f32[1,4,4,2]{3,2,1,0} fusion(%Arg_0.1, %Arg_0.1), kind=kOutput, calls=%fused_conv, metadata={op_name="jit(train_step)/jvp(UNet)/conv_in/conv_general_dilated"}
      %dot_fusion = f32[4,4]{1,0} fusion(%Arg_0.1), kind=kCustom, calls=%fused_nested, metadata={op_name="jit(train_step)/transpose(jvp(UNet))/mid/attn/dot_general"}
      %transpose_fusion = f32[4,4]{1,0} fusion(%Arg_0.1), kind=kLoop, calls=%fused_transpose
      %reduce_fusion = f32[4]{0} fusion(%Arg_0.1), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(train_step)/jvp(UNet)/norm/reduce_sum"}
      %pad_fusion = f32[6,6]{1,0} fusion(%Arg_0.1), kind=kLoop, calls=%fused_pad
      %silu_fusion = f32[4,4]{1,0} fusion(%Arg_0.1), kind=kLoop, calls=%fused_elementwise, metadata={op_name="jit(train_step)/adam/mul"}
      %copy.2 = f32[4,4]{0,1} copy(%Arg_0.1)
      %window_fusion = f32[4,4]{1,0} fusion(%Arg_0.1, %constant.5), kind=kLoop, calls=%fused_window
      %cudnn-conv.1 = (f32[1,4,4,2]{3,2,1,0}, u8[0]{0}) custom-call(%Arg_0.1, %Arg_0.1), custom_call_target="__cudnn$convForward"
      %cublas-gemm.1 = (f32[4,4]{1,0}, s8[16]{0}) custom-call(%Arg_0.1, %Arg_0.1), custom_call_target="__cublas$lt$matmul"
      %custom-call.3 = f32[4,4]{1,0} custom-call(%Arg_0.1), custom_call_target="SomethingElse"
      %all-reduce.1 = f32[4,4]{1,0} all-reduce(%Arg_0.1), replica_groups={}, to_apply=%add_computation
      %tuple.2 = (s32[], f32[4,4]{1,0}) tuple(%constant.5, %Arg_0.1)
      %while.1 = (s32[], f32[4,4]{1,0}) while(%tuple.2), condition=%cond, body=%body
      ROOT %get-tuple-element.1 = f32[4,4]{1,0} get-tuple-element(%while.1), index=1
    }
    """)

EXPECTED_CATEGORIES = {
    "conv_fusion": "convolution",  # a convolution fused with its bias add
    "dot_fusion": "matmul",  # the dot sits in a fusion nested inside the fusion
    "transpose_fusion": "copy/transpose",
    "reduce_fusion": "reduction",
    "pad_fusion": "pad",
    "silu_fusion": "elementwise",
    "copy.2": "copy/transpose",
    "all-reduce.1": "collective",
    "dot.2": "matmul",  # inside the while loop's body
    "window_fusion": "copy/transpose",  # a shifted window: its scalar index arithmetic is no work
    "cudnn-conv.1": "convolution",  # a GPU's convolutions and matmuls are custom calls
    "cublas-gemm.1": "matmul",
    "custom-call.3": "other",
}


def test_parse_hlo_reads_opcodes_computations_and_metadata():
    instructions = profile_step.parse_hlo(HLO)
    assert instructions["conv_fusion"]["opcode"] == "fusion"
    assert instructions["conv_fusion"]["calls"] == ["fused_conv"]
    assert instructions["convolution.1"]["computation"] == "fused_conv"
    assert instructions["tuple.1"]["opcode"] == "tuple"  # a tuple-shaped result
    assert instructions["while.1"]["opcode"] == "while"
    assert set(instructions["while.1"]["calls"]) == {"cond", "body"}
    assert instructions["dot.2"]["computation"] == "body"
    assert instructions["dot.2"]["op_name"] == "jit(f)/while/body/dot_general"
    assert instructions["transpose_fusion"]["op_name"] == ""


@pytest.mark.parametrize("name,category", sorted(EXPECTED_CATEGORIES.items()))
def test_categorize_by_what_a_fusion_contains(name, category):
    assert profile_step.categorize(name, profile_step.parse_hlo(HLO)) == category


@pytest.mark.parametrize("op_name,want", [
    ("jit(train_step)/shard_map/jvp(UNet)/down_0_block_0/conv1/conv_general_dilated", "forward"),
    ("jit(train_step)/shard_map/transpose(jvp(UNet))/up_1/conv1/transpose(jvp())/conv_general_dilated",
     "backward"),
    ("jit(train_step)/shard_map/adam/mul", "rest"),
    ("jit(sample)/while/body/UNet/mid/attn/dot_general", "forward"),  # a sampler's network call
    ("", "unattributed"),
])
def test_phase_from_op_name(op_name, want):
    assert profile_step.phase(op_name) == want


@pytest.mark.parametrize("op_name,want", [
    # Like operations of different layers add up: the indexed scopes go.
    ("jit(train_step)/shard_map/transpose(jvp(UNet))/up_1_block_0/norm1/mul", "transpose(jvp(UNet))/norm1/mul"),
    ("jit(train_step)/shard_map/transpose(jvp(UNet))/down_0_block_1/norm1/mul", "transpose(jvp(UNet))/norm1/mul"),
    ("jit(train_step)/shard_map/jvp(UNet)/Dropout_0/jit(_bernoulli)/add", "jvp(UNet)/jit(_bernoulli)/add"),
    ("jit(per_device)/shard_map/while/body/UNet/mid_attn/qkv/dot_general", "while/body/UNet/mid_attn/qkv/dot_general"),
    ("jit(f)/exp", "exp"),
    ("", "(none)"),
])
def test_operation_takes_the_layer_scopes_out(op_name, want):
    assert profile_step.operation(op_name) == want


def _event(name, start_ns, duration_ns, stats=()):
    return SimpleNamespace(name=name, start_ns=start_ns, duration_ns=duration_ns, stats=list(stats))


def _profile(*planes):
    return SimpleNamespace(planes=[
        SimpleNamespace(name=plane_name, lines=[SimpleNamespace(name=n, events=ev) for n, ev in lines])
        for plane_name, lines in planes])


def test_op_events_pair_completion_markers_first_in_first_out():
    # Two devices start the same asynchronous dot at 0 and 10 ns; completions
    # arrive at 100 and 150 ns (on the other thread). A synchronous copy has its
    # marker right after its event. The python line does not count.
    profile = _profile(
        ("/host:CPU", [
            ("tf_XLAEigen/1", [_event("dot.2", 0, 5), _event("end: dot.2", 150, 0),
                               _event("copy.2", 200, 30), _event("end: copy.2", 231, 0)]),
            ("tf_XLAEigen/2", [_event("dot.2", 10, 4), _event("end: dot.2", 100, 0)]),
            ("python", [_event("silu_fusion", 0, 1000)]),
        ]),
        ("/host:metadata", [("x", [_event("silu_fusion", 0, 99)])]),
    )
    got = sorted(profile_step.op_events(profile))
    # First in, first out: the dot started at 0 ends at 100, the one at 10 at 150.
    assert got == sorted([("dot.2", 5e-9, 100e-9), ("dot.2", 4e-9, 140e-9), ("copy.2", 30e-9, 31e-9)])


def test_op_events_on_a_gpu_come_from_the_device_planes_xla_ops_lines():
    # With device planes, the host's threads (which only launch) and the
    # kernels' stream lines are left out: each instruction counts once.
    profile = _profile(
        ("/host:CPU", [("tf_XLAEigen/1", [_event("silu_fusion", 0, 500)])]),
        ("/device:GPU:0", [("XLA Ops", [_event("silu_fusion", 0, 40)]),
                           ("Stream #7", [_event("silu_fusion", 0, 40)])]),
    )
    assert list(profile_step.op_events(profile)) == [("silu_fusion", 40e-9, 40e-9)]
    assert profile_step.untraced_pool_seconds(profile, {"silu_fusion"}) is None


def test_op_events_on_a_gpu_without_xla_ops_lines_name_kernels_by_their_instruction():
    # The trace as the profiler writes it on a GPU: no events on an "XLA Ops" line, the
    # kernels on the streams' lines, each naming its instruction in its stats (a stat
    # "hlo_op", or XLA:GPU's annotation "...:#hlo_op=NAME,hlo_module=...#"). Two kernels
    # of one instruction both count; a memcpy, which no instruction names, keeps its name
    # (summarize leaves it out).
    annotation = "jit_train_step:#hlo_module=jit_train_step,program_id=3#::conv_fusion:#hlo_op=conv_fusion#"
    profile = _profile(
        ("/host:CPU", [("tf_XLAEigen/1", [_event("silu_fusion", 0, 500)])]),
        ("/device:GPU:0", [
            ("XLA Ops", []),
            ("Stream #7(Compute)", [
                _event("sm90_xmma_fprop_implicit_gemm", 0, 30_000, [("kernel_annotation", annotation)]),
                _event("sm90_xmma_fprop_splitk_reduce", 30_000, 5_000, [("kernel_annotation", annotation)]),
                _event("loop_multiply_fusion", 40_000, 7_000, [("correlation_id", 12), ("hlo_op", "silu_fusion")]),
            ]),
            ("Stream #9(MemcpyD2D)", [_event("MemcpyD2D", 50_000, 3_000, [("memcpy_details", "kind_dst:device")])]),
        ]),
    )
    assert sorted(profile_step.op_events(profile)) == sorted([
        ("conv_fusion", 30e-6, 30e-6), ("conv_fusion", 5e-6, 5e-6), ("silu_fusion", 7e-6, 7e-6),
        ("MemcpyD2D", 3e-6, 3e-6)])
    summary = profile_step.summarize(profile_step.op_events(profile), HLO, calls=1, top=5)
    assert summary["op_s"] == pytest.approx(42e-6)
    assert summary["by_category"]["convolution"] == pytest.approx(35e-6)


def test_untraced_pool_seconds_is_pool_running_time_outside_instructions():
    start, stop = "ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion"
    profile = _profile(("/host:CPU", [
        # Running 0-50 and 80-100 ns, of which 5 ns in an instruction's event;
        # the while loop's event spans its body's and is not in `instructions`.
        ("tf_XLAEigen/1", [_event(start, 0, 0), _event("while.1", 0, 40), _event("dot.2", 1, 5),
                           _event(stop, 50, 0), _event(start, 80, 0), _event(stop, 100, 0)]),
        ("tf_XLAEigen/2", [_event(start, 10, 0), _event("copy.2", 12, 8), _event("end: copy.2", 20, 0),
                           _event(stop, 40, 0)]),
        # A launching thread's region is mostly waiting: left out.
        ("tf_XLAPjRtCpuClient/3", [_event(start, 0, 0), _event(stop, 1000, 0)]),
        # A region still open when the trace stops counts neither its time nor its instructions.
        ("tf_XLAEigen/4", [_event(stop, 0, 0), _event("dot.2", 2, 3), _event(start, 5, 0),
                           _event("%copy.2", 6, 10)]),
    ]))
    got = profile_step.untraced_pool_seconds(profile, {"dot.2", "copy.2"})
    assert got == pytest.approx(((50 + 20) - 5 + (30 - 8)) * 1e-9)
    assert profile_step.untraced_pool_seconds(_profile(("/host:CPU", [("tf_XLAEigen/1", [])])), set()) is None


def test_untraced_pool_seconds_gives_up_when_instructions_run_on_the_launching_thread():
    # A sampler's loop runs its instructions on the launching thread, and the pool
    # helps with them: its untraced time is not separate work then.
    start, stop = "ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion"
    pool = ("tf_XLAEigen/1", [_event(start, 0, 0), _event("dot.2", 1, 100), _event(stop, 200, 0)])
    launcher = [_event("copy.2", 0, 9)]  # under a tenth of the pool's 100 ns: still counted
    got = profile_step.untraced_pool_seconds(
        _profile(("/host:CPU", [pool, ("tf_XLAPjRtCpuClient/3", launcher)])), {"dot.2", "copy.2"})
    assert got == pytest.approx(100e-9)
    launcher = [_event("copy.2", 0, 11)]
    assert profile_step.untraced_pool_seconds(
        _profile(("/host:CPU", [pool, ("tf_XLAPjRtCpuClient/3", launcher)])), {"dot.2", "copy.2"}) is None


def test_summarize_per_call_by_category_phase_and_async():
    events = [
        ("conv_fusion", 4.0, 4.0), ("conv_fusion", 2.0, 2.0),  # two calls
        ("%dot_fusion", 1.0, 1.0),
        ("dot.2", 0.5, 3.0),  # asynchronous: completes 3 s after its start
        ("while.1", 50.0, 50.0),  # a container: its event spans its body's
        ("ThunkExecutor::Execute", 9.0, 9.0),  # the runtime's own
        ("%silu_fusion = f32[4,4]{1,0} fusion(%Arg_0.1)", 1.0, 1.0),  # as a GPU's XLA Ops line names it
        ("transpose_fusion", 0.5, 0.5),
    ]
    got = profile_step.summarize(events, HLO, calls=2, top=2, async_s=3.0)
    assert got["op_s"] == pytest.approx((4 + 2 + 1 + 0.5 + 1 + 0.5) / 2)
    assert got["by_category"]["convolution"] == pytest.approx(3.0)
    assert got["by_category"]["matmul"] == pytest.approx((1 + 0.5) / 2)
    assert got["by_category"]["elementwise"] == pytest.approx(0.5)
    assert got["by_category"]["copy/transpose"] == pytest.approx(0.25)
    assert got["by_category"]["async"] == pytest.approx(1.5)
    assert got["by_phase"] == pytest.approx({"forward": 3.0, "backward": 0.5, "rest": 0.5 + 0.25,
                                             "unattributed": 0.25})
    assert [t["name"] for t in got["top"]] == ["conv_fusion", "dot_fusion"]
    assert got["top_operations"] == [["convolution: jvp(UNet)/conv_in/conv_general_dilated", 3.0],
                                     ["matmul: transpose(jvp(UNet))/mid/attn/dot_general", 0.5]]
    assert got["async_top"] == [{"name": "dot.2", "s": 1.5, "category": "matmul",
                                 "op_name": "jit(f)/while/body/dot_general"}]


def test_profile_step_rejects_bad_flags(tmp_path):
    for argv in (["--workload", "tiny", "--calls", "0"], ["--workload", "tiny", "--batch", "0"],
                 ["--workload", "nope"], ["--workload", "tiny", "--trace-dir", str(tmp_path / "f")],
                 ["--workload", "tiny", "--num-steps", "10"],  # a sampler flag for a training step
                 ["--workload", "tiny", "--task", "sample", "--conv-weight-grad", "taps"],
                 ["--workload", "tiny", "--task", "sample", "--num-steps", "1001"]):
        if "--trace-dir" in argv:
            (tmp_path / "f").write_text("kept")
        with pytest.raises(SystemExit):
            profile_step.parse_args(argv)
    assert (tmp_path / "f").read_text() == "kept"


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LD_PRELOAD", "MALLOC_CONF")}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def test_a_real_trace_puts_a_large_matmul_above_an_elementwise_op(tmp_path):
    # An independent check of the event collection and the categories on a real
    # XLA:CPU trace: a 1024^3 matmul (2 GFLOP) against an exp of 64x64 values.
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(BENCH_DIR)!r})
        import json, jax, jax.numpy as jnp, profile_step
        f = jax.jit(lambda a, b, c: (a @ b, jnp.exp(c)))
        a = jnp.ones((1024, 1024)); c = jnp.ones((64, 64))
        compiled = f.lower(a, a, c).compile()
        jax.block_until_ready(compiled(a, a, c))
        with jax.profiler.trace({str(tmp_path)!r}):
            jax.block_until_ready(compiled(a, a, c))
        import pathlib
        trace = sorted(pathlib.Path({str(tmp_path)!r}).rglob("*.xplane.pb"))[-1]
        profile = jax.profiler.ProfileData.from_file(str(trace))
        names = set(profile_step.parse_hlo(compiled.as_text()))
        print(json.dumps(profile_step.summarize(profile_step.op_events(profile), compiled.as_text(), 1, 5,
                                                profile_step.untraced_pool_seconds(profile, names))))
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=_clean_env(XLA_FLAGS=profile_step.TRACEME_FLAG))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    matmul = got["by_category"]["matmul"] + got["by_category"].get("async", 0)
    assert matmul > 0 and matmul > 5 * got["by_category"]["elementwise"], got


def test_profile_step_runs_a_training_step_and_names_its_instructions(tmp_path):
    trace_dir = tmp_path / "trace"
    out = subprocess.run(
        [sys.executable, str(BENCH_DIR / "profile_step.py"), "--workload", "tiny", "--batch", "2",
         "--calls", "1", "--warmup", "1", "--top", "5", "--cpu-devices", "1", "--allocator", "system",
         "--trace-dir", str(trace_dir)],
        capture_output=True, text=True, timeout=600, env=_clean_env())
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert (record["kind"], record["task"], record["workload"], record["batch"]) == ("profile", "train", "tiny", 2)
    assert "img_per_s" not in record  # not a throughput record
    # The UNet is convolutions: they take time forward and backward.
    assert record["by_category"]["convolution"] > 0
    assert record["by_phase"]["forward"] > 0 and record["by_phase"]["backward"] > 0
    # One device on this machine's threads: the instructions' time fits in the
    # traced wall time on every thread (no double counting of a loop and its
    # body), and fills a fair part of an untraced step (the events were found;
    # the traced wall time also holds the profiler's own start and stop).
    busy = record["op_s"] + record["by_category"].get("async", 0)
    assert 0.2 * record["wall_s_untraced"] < busy <= os.cpu_count() * record["wall_s"] * 1.05
    hlo = (trace_dir / "compiled_hlo.txt").read_text()
    assert len(record["top"]) == 5
    for entry in record["top"]:
        assert f"%{entry['name']} = " in hlo
