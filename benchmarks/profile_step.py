"""Where a training step's (or a sampler run's) time goes, from a `jax.profiler` trace.

Compiles the same call `train_throughput.py` (or `sample_throughput.py`)
times, runs it `--warmup` times, then traces `--calls` calls with
`jax.profiler.trace` and adds up the time of every HLO instruction the
trace shows executing:

- `by_category`: convolution, matmul, layout copy/transpose, reduction,
  elementwise, pad, collective (across devices: with several devices this
  includes waiting for the slowest), other (`categorize`: from the compiled
  HLO, a fusion by the most expensive kind of instruction inside it), and on
  XLA:CPU `async`: the pool threads' running time outside every instruction's
  event (`untraced_pool_seconds`). XLA:CPU runs some instructions (large dots, some copies) as tasks in
  its thread pool; their event covers only the dispatch, so their work lands
  here; `async_top` names them, with their times from dispatch to completion
  (which include the wait in the pool's queue: a small dot queued behind large
  ones shows seconds);
- `by_phase`: forward (the network), backward (the network's transpose),
  rest (loss, optimizer, EMA, sampler arithmetic), unattributed (no
  `op_name` metadata), from each instruction's metadata;
- `top_operations`: the `--top` costliest JAX operations, each instruction's
  `op_name` with the layers' scopes taken out (`operation`), so that, say,
  every GroupNorm's backward multiply adds up to one line;
- `top`: the `--top` costliest instructions with their category and the JAX
  operation they came from.

Times are per call, in seconds, summed over the threads and devices that ran
the instructions (so on a 2-core CPU up to about twice the wall time); `wall_s` is the traced calls' wall time per call,
`wall_s_untraced` that of as many calls just before, untraced. On XLA:CPU the
per-instruction events need `--xla_cpu_enable_xprof_traceme=true`, which this
script adds to `XLA_FLAGS`. On a GPU the instruction events are the `XLA Ops`
lines of the device planes (not yet run on one here: no GPU was lent).
`--trace-dir` keeps the trace for TensorBoard or Perfetto, with the compiled
HLO beside it (`compiled_hlo.txt`: the instructions' names are its names). One
JSON line per run goes to stdout (`kind`: "profile"; not a throughput record).

  python benchmarks/profile_step.py --workload ddpm_cifar10 --task train --batch 32
  python benchmarks/profile_step.py --workload tiny --task sample --sampler ddim --num-steps 50 --batch 64
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Container, Iterable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _jax_harness as harness  # noqa: E402  (puts the repo root on sys.path)
import _report  # noqa: E402
import sample_throughput  # noqa: E402
import workloads  # noqa: E402

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"
CATEGORIES = ("convolution", "matmul", "copy/transpose", "reduction", "elementwise", "pad", "collective",
              "other")
_COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "all-reduce-start", "all-reduce-done", "all-gather-start", "all-gather-done",
                "collective-permute-start", "collective-permute-done"}
# Instructions that only contain other instructions' events (a while loop's
# event spans its body's) or take no time of their own.
_CONTAINERS = {"while", "conditional", "call", "async-start", "async-done", "async-update"}
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
_LAYOUT = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "concatenate",
           "dynamic-slice", "dynamic-update-slice", "copy-start", "copy-done"} | _FREE
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _opcode(rest: str) -> str:
    """The opcode from what follows `name = ` in an HLO line: `<shape> <opcode>(...)`."""
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                rest = rest[i + 1:]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    match = re.match(r"\s*([\w\-]+)\(", rest)
    return match.group(1) if match else "?"


_INDEX_ELEMENTS = 8  # integer results this small inside a fusion are index arithmetic, not work


def _is_index_arithmetic(rest: str) -> bool:
    """Whether an instruction (what follows `name = `) makes an integer or boolean result of at most
    `_INDEX_ELEMENTS` elements (`s32[]`, `pred[1]`): a dynamic slice's clamped start, say."""
    match = re.match(r"([a-z]\w*)\[([\d,]*)\]", rest)
    if match is None or not match.group(1).startswith(("s", "u", "pred")):
        return False
    count = 1
    for dim in filter(None, match.group(2).split(",")):
        count *= int(dim)
    return count <= _INDEX_ELEMENTS


def _custom_call_kind(target: str) -> str:
    lowered = target.lower()
    if "conv" in lowered:
        return "convolution"
    if any(word in lowered for word in ("gemm", "matmul", "cublas", "dot")):
        return "dot"
    return "custom-call"


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
    """Instruction name -> {opcode, computation, calls, op_name, index} for every instruction of an
    HLO module's text. A custom call's opcode is its kind: `convolution` or `dot` where its
    target says so (cuDNN's convolutions, cuBLAS's and oneDNN's matmuls), else `custom-call`."""
    instructions: dict[str, dict[str, Any]] = {}
    computation = None
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if match and computation is not None:
            name, rest = match.groups()
            calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            opcode = _opcode(rest)
            if opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]*)"', rest)
                opcode = _custom_call_kind(target.group(1) if target else "")
            instructions[name] = {"opcode": opcode, "computation": computation, "calls": calls,
                                  "op_name": op_name.group(1) if op_name else "",
                                  "index": _is_index_arithmetic(rest)}
            continue
        header = _HEADER.match(line)
        if header and "=" not in line.split("{")[0].split("(")[0]:
            computation = header.group(1)
    return instructions


def _opcodes_inside(name: str, instructions: Mapping[str, Mapping[str, Any]],
                    by_computation: Mapping[str, list[str]], seen: set[str]) -> set[str]:
    """The opcodes of the instructions a fusion (or nested fusion) computes on arrays.

    Index arithmetic (`_is_index_arithmetic`: small integer results, a
    dynamic slice's clamped start) is left out: it is no work per element.
    """
    found: set[str] = set()
    for computation in instructions[name]["calls"]:
        if computation in seen:
            continue
        seen.add(computation)
        for inner in by_computation.get(computation, ()):
            if not instructions[inner]["index"]:
                found.add(instructions[inner]["opcode"])
            found |= _opcodes_inside(inner, instructions, by_computation, seen)
    return found


def categorize(name: str, instructions: Mapping[str, Mapping[str, Any]],
               by_computation: Mapping[str, list[str]] | None = None) -> str:
    """The category (one of `CATEGORIES`) of an HLO instruction, a fusion by what it contains.

    Convolution before matmul before reduction before pad before elementwise:
    a fusion of a convolution with its bias add is a convolution; one of a
    transpose and nothing that computes is a layout copy.
    """
    if by_computation is None:
        by_computation = _by_computation(instructions)
    opcode = instructions[name]["opcode"]
    if opcode in _COLLECTIVES:
        return "collective"
    ops = {opcode} | (_opcodes_inside(name, instructions, by_computation, set()) if opcode == "fusion" else set())
    ops.discard("fusion")
    if "convolution" in ops:
        return "convolution"
    if "dot" in ops:
        return "matmul"
    if ops & {"reduce", "reduce-window"}:
        return "reduction"
    if "pad" in ops and ops <= _LAYOUT | {"pad"}:
        return "pad"
    if ops and ops <= _LAYOUT:
        return "copy/transpose"
    if opcode == "fusion" or ops - _LAYOUT:
        return "elementwise" if opcode not in {"custom-call", "sort", "rng", "rng-bit-generator"} else "other"
    return "other"


def _by_computation(instructions: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = collections.defaultdict(list)
    for name, info in instructions.items():
        grouped[info["computation"]].append(name)
    return grouped


def phase(op_name: str) -> str:
    """forward / backward / rest / unattributed, from an instruction's `op_name` metadata.

    Autodiff's backward pass shows as `transpose(jvp(...))` in the op_name;
    the network's forward pass as the UNet's module scope; instructions that
    XLA's passes made without carrying metadata over are unattributed.
    """
    if not op_name:
        return "unattributed"
    if "transpose(" in op_name:
        return "backward"
    if "UNet" in op_name:
        return "forward"
    return "rest"


def _op_lines(profile):
    """(plane, its lines where XLA records instructions): the `XLA Ops` lines of the device
    planes where there are any (a GPU or TPU), else the XLA:CPU threads' lines of the host
    plane (all but the Python thread).

    A device plane without events on an `XLA Ops` line (a GPU trace as the
    profiler writes it, before TensorBoard's tools derive that line from the
    kernels' annotations) gives its `Stream #...` lines, whose kernel events
    `op_events` names by the instruction in their stats.
    """
    has_devices = any(plane.name.startswith("/device:") for plane in profile.planes)
    for plane in profile.planes:
        on_device = plane.name.startswith("/device:")
        if on_device != has_devices or not (on_device or plane.name.startswith("/host:CPU")):
            continue
        if not on_device:
            yield plane, [line for line in plane.lines if line.name != "python"]
            continue
        xla_ops = [line for line in plane.lines if line.name == "XLA Ops"]
        if any(True for line in xla_ops for _ in line.events):
            yield plane, xla_ops
        else:
            yield plane, [line for line in plane.lines if line.name.startswith(_STREAM_LINE)]


_STREAM_LINE = "Stream #"
_HLO_OP = re.compile(r"hlo_op=([^,#\s]+)")


def _event_instruction(event, line_name: str) -> str:
    """The name `summarize` looks an event up by: on a GPU stream's line, the instruction the
    kernel ran (a stat `hlo_op`, or `hlo_op=NAME` in the kernel's annotation, as XLA:GPU
    annotates its launches), else the event's own name (a memcpy's, say: not an instruction)."""
    if line_name.startswith(_STREAM_LINE):
        for key, value in event.stats:
            if key == "hlo_op" and value:
                return str(value)
            if isinstance(value, str) and (found := _HLO_OP.search(value)):
                return found.group(1)
    return event.name


_INDEXED_SCOPE = re.compile(r"^[A-Za-z]\w*_\d+(_\w+)?$")  # down_1_block_0, Dropout_0, up_2_upsample


def operation(op_name: str) -> str:
    """An instruction's JAX operation with the layers' scopes taken out, to add up like operations.

    `jit(train_step)/shard_map/transpose(jvp(UNet))/up_1_block_0/norm1/mul`
    -> `transpose(jvp(UNet))/norm1/mul`: the outer `jit(...)` and `shard_map`
    go, and every scope named with an index (`up_1_block_0`, `Dropout_0`);
    a scope without one (`mid_attn`) stays, so it adds up on its own line.
    """
    parts = op_name.split("/")
    if parts and parts[0].startswith("jit("):
        parts = parts[1:]
    if parts and parts[0] == "shard_map":
        parts = parts[1:]
    return "/".join(part for part in parts if not _INDEXED_SCOPE.match(part)) or "(none)"


def _instruction_name(event_name: str) -> str:
    """"%fusion.3" or "%fusion.3 = f32[...] fusion(...)" (a device plane's form) -> "fusion.3"."""
    return event_name.lstrip("%").split(" ", 1)[0]


def op_events(profile) -> Iterable[tuple[str, float, float]]:
    """(event name, seconds, seconds to its `end: NAME` marker) of every event on the op lines.

    XLA:CPU runs some instructions asynchronously (large dots, some copies) as
    tasks in its thread pool: their event covers only the dispatch, and an
    `end: NAME` event marks completion. The third number is the time from the
    start to that marker (markers pair with starts first in, first out, which
    keeps the sum exact when two devices run the same instruction at once, as
    long as an instruction's runs are all marked or none are, as in the
    XLA:CPU traces seen here), or the event's own duration where there is
    none; it includes the tasks' wait in the pool's queue, so it bounds their
    work from above.
    """
    for _, lines in _op_lines(profile):
        events = sorted((event.start_ns, event.duration_ns, _event_instruction(event, line.name))
                        for line in lines for event in line.events)
        starts: list[list] = []
        pending: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        for start_ns, duration_ns, name in events:
            if name.startswith("end: "):
                waiting = pending.get(name[len("end: "):])
                if waiting:
                    begun = starts[waiting.popleft()]
                    begun[2] = max(begun[2], start_ns - begun[0])
                continue
            pending[name].append(len(starts))
            starts.append([start_ns, duration_ns, duration_ns, name])
        for _, duration_ns, to_end_ns, name in starts:
            yield name, duration_ns / 1e9, to_end_ns / 1e9


def untraced_pool_seconds(profile, instructions: Container[str]) -> float | None:
    """Seconds XLA:CPU's pool threads ran outside every instruction's event, summed over threads.

    The pool (lines named `...XLAEigen...`) marks when a thread starts and
    stops working (`ThreadpoolListener::StartRegion` / `StopRegion`). Running
    time there outside the events of `instructions` (names; leave containers
    such as while loops out, their events span their bodies') is the work of
    the instructions XLA:CPU runs as pool tasks, or the runtime's. None where
    the trace has no such markers (a GPU's, say), and None where more than
    a tenth of the instructions' time runs on other threads (a sampler's loop
    runs on the launching thread): the pool's untraced time is then also its
    share of those instructions' work, which this cannot tell apart.
    """
    running_ns, traced_ns, elsewhere_ns, found = 0, 0, 0, False
    for _, lines in _op_lines(profile):
        for line in lines:
            if "XLAEigen" not in line.name:
                elsewhere_ns += sum(event.duration_ns for event in line.events
                                    if _instruction_name(event.name) in instructions)
                continue
            started, inside = None, 0
            for event in sorted(line.events, key=lambda e: e.start_ns):
                if event.name == "ThreadpoolListener::StartRegion":
                    started, inside, found = event.start_ns, 0, True
                elif event.name == "ThreadpoolListener::StopRegion" and started is not None:
                    # Only whole regions count, with the instructions inside them.
                    running_ns += event.start_ns - started
                    traced_ns += inside
                    started = None
                elif started is not None and _instruction_name(event.name) in instructions:
                    inside += event.duration_ns
    if not found or elsewhere_ns > 0.1 * traced_ns:
        return None
    return max(0, running_ns - traced_ns) / 1e9


def summarize(events: Iterable[tuple[str, float, float]], hlo_text: str, calls: int, top: int,
              async_s: float | None = None) -> dict[str, Any]:
    """Per-call time by category, by phase, and the `top` costliest instructions.

    Only events named after an instruction of the compiled module count
    (the rest are the runtime's own), and not containers (a while loop's event
    spans its body's instructions'). `async_s` (`untraced_pool_seconds` over
    the trace) becomes the category `async`: the work of the instructions
    XLA:CPU runs as pool tasks, listed in `async_top` with their
    start-to-completion times.
    """
    instructions = parse_hlo(hlo_text)
    by_computation = _by_computation(instructions)
    per_instruction: collections.Counter[str] = collections.Counter()
    to_completion: collections.Counter[str] = collections.Counter()
    for name, seconds, to_end in events:
        name = _instruction_name(name)
        info = instructions.get(name)
        if info is None or info["opcode"] in _CONTAINERS:
            continue
        per_instruction[name] += seconds / calls
        if to_end > seconds:
            to_completion[name] += to_end / calls
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    by_phase = {"forward": 0.0, "backward": 0.0, "rest": 0.0, "unattributed": 0.0}
    by_operation: collections.Counter[str] = collections.Counter()
    categories = {}
    for name, seconds in per_instruction.items():
        categories[name] = categorize(name, instructions, by_computation)
        by_category[categories[name]] += seconds
        by_phase[phase(instructions[name]["op_name"])] += seconds
        by_operation[f"{categories[name]}: {operation(instructions[name]['op_name'])}"] += seconds
    if async_s is not None:
        by_category["async"] = async_s / calls

    def listing(counter):
        return [{"name": name, "s": round(seconds, 6), "category": categories[name],
                 "op_name": instructions[name]["op_name"]}
                for name, seconds in counter.most_common(top)]

    return {
        "op_s": round(sum(per_instruction.values()), 6),
        "by_category": {k: round(v, 6) for k, v in by_category.items()},
        "by_phase": {k: round(v, 6) for k, v in by_phase.items()},
        "top_operations": [[key, round(seconds, 6)] for key, seconds in by_operation.most_common(top)],
        "top": listing(per_instruction),
        "async_top": listing(to_completion),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, choices=sorted(workloads.WORKLOADS))
    p.add_argument("--task", choices=("train", "sample"), default="train")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch (default: the workload's CPU batch; on a GPU its GPU batch for "
                        "training, 256 for sampling)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--sampler", choices=sorted(sample_throughput.SAMPLER_ALIASES), default=None,
                   help="--task sample: the sampler (as sample_throughput.py; default ddim)")
    p.add_argument("--num-steps", type=int, default=None, help="--task sample: sampling steps (default 20)")
    p.add_argument("--calls", type=int, default=2, help="traced calls (steps or sampler runs)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before the trace")
    p.add_argument("--top", type=int, default=15, help="how many of the costliest instructions to list")
    p.add_argument("--conv-weight-grad", choices=("auto", "xla", "taps"), default=None,
                   help="--task train: UNetConfig.conv_weight_grad (default: the workload's)")
    p.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temporary folder)")
    harness.add_device_args(p)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.task == "train" and (args.sampler is not None or args.num_steps is not None):
        p.error("--sampler and --num-steps apply to --task sample")
    if args.task == "sample" and args.conv_weight_grad is not None:
        p.error("--conv-weight-grad applies to --task train (a sampler takes no gradients)")
    args.sampler = sample_throughput.SAMPLER_ALIASES[args.sampler or "ddim"]
    args.num_steps = 20 if args.num_steps is None else args.num_steps
    timesteps = workloads.get_workload(args.workload).timesteps
    if not 1 <= args.num_steps <= timesteps:
        p.error(f"--num-steps must be in [1, {timesteps}], got {args.num_steps}")
    for name in ("calls", "warmup", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.trace_dir is not None:
        # Made now, so that a folder that cannot be written fails before any compiling.
        try:
            Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            p.error(f"--trace-dir {args.trace_dir}: {err}")
        if not os.access(args.trace_dir, os.W_OK):
            p.error(f"--trace-dir {args.trace_dir} is not writable")
    return args


def _build(args, workload, batch: int, dtype: str, mesh):
    """The compiled call and its arguments: `(compiled, call_args, refeed)`; `refeed(out, call_args)`
    gives the next call's arguments (the training state is donated and comes back)."""
    import jax

    from diffusion_jax import parallel

    key = jax.device_put(jax.random.key(args.seed), parallel.replicated_sharding(mesh))
    if args.task == "train":
        import train_throughput as tt

        call, tx = tt.build_step(workload, dtype, 1, None, mesh, conv_weight_grad=args.conv_weight_grad)
        state, _ = tt.init_state(tx, workload, mesh, args.seed)
        data = tt.synthetic_batch(workload, batch, 1, mesh, args.seed)
        call_args = (state, data, key)
        return call.lower(*call_args).compile(), call_args, lambda out, a: (out[0], *a[1:])
    devices = mesh.devices.size
    call = sample_throughput.build_sampler(workload, dtype, None, args.sampler, args.num_steps, batch // devices, mesh)
    params, _ = harness.initial_params(workload, args.seed)
    call_args = (parallel.replicate(params, mesh), key)
    return call.lower(*call_args).compile(), call_args, lambda out, a: a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = workloads.get_workload(args.workload)
    batch = args.batch or workload.batch_cpu
    devices = harness.start_devices(args.cpu_devices, [batch], f"{TRACEME_FLAG} {args.xla_flags}",
                                    cpu_convolutions=args.cpu_convolutions, ch=workload.unet.ch)
    import jax

    from diffusion_jax import parallel

    on_gpu = devices[0].platform != "cpu"
    if args.batch is None and on_gpu:
        batch = workload.batch_gpu if args.task == "train" else 256
    if batch % len(devices):
        raise SystemExit(f"--batch {batch} is not divisible by the {len(devices)} devices")
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    mesh = parallel.make_mesh()
    compiled, call_args, refeed = _build(args, workload, batch, dtype, mesh)
    for _ in range(args.warmup):
        call_args = refeed(jax.block_until_ready(compiled(*call_args)), call_args)

    t0 = time.perf_counter()
    for _ in range(args.calls):
        call_args = refeed(jax.block_until_ready(compiled(*call_args)), call_args)
    wall_untraced = (time.perf_counter() - t0) / args.calls

    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="diffusion_jax_profile_")
    hlo_text = compiled.as_text()
    Path(trace_dir).mkdir(parents=True, exist_ok=True)
    (Path(trace_dir) / "compiled_hlo.txt").write_text(hlo_text)
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(args.calls):
            call_args = refeed(jax.block_until_ready(compiled(*call_args)), call_args)
    wall = (time.perf_counter() - t0) / args.calls
    traces = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {trace_dir}")
    profile = jax.profiler.ProfileData.from_file(str(traces[-1]))
    counted = {name for name, info in parse_hlo(hlo_text).items() if info["opcode"] not in _CONTAINERS}
    summary = summarize(op_events(profile), hlo_text, args.calls, args.top,
                        untraced_pool_seconds(profile, counted))
    record = {
        "impl": "diffusion_jax",
        "task": args.task,
        "workload": workload.name,
        "batch": batch,
        "dtype": dtype,
        **harness.common_fields(devices),
        "kind": "profile",
        "wall_s": round(wall, 6),
        "wall_s_untraced": round(wall_untraced, 6),
        **summary,
        "calls": args.calls,
        "sampler": args.sampler if args.task == "sample" else None,
        "num_steps": args.num_steps if args.task == "sample" else None,
        "trace_dir": trace_dir,
        "versions": harness.versions(),
        "notes": ["the throughput scripts measure speed; wall times here are of --calls calls",
                  "op times summed over threads and devices"],
    }
    if record["op_s"] < 0.1 * wall:
        print(f"profile_step.py: the trace's instructions add up to {record['op_s']:.4f} s of a "
              f"{wall:.4f} s call: this trace's layout is not one this script reads (its lines: "
              f"{sorted({line.name for plane in profile.planes for line in plane.lines})[:20]}); "
              f"the breakdown below is incomplete", file=sys.stderr, flush=True)
    # Not a throughput record (no img_per_s), so `_report.parse_records` passes over it.
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    _report.run_script(main)
