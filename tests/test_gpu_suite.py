"""Tests for benchmarks/gpu_suite.sh, the GPU measurement in one call, without a GPU.

The suite runs where device time is scarce, so a flag that a script no longer
accepts would cost a whole call. Here every command it would run is parsed by
the parser of the script it names (a dry run lists them), its settings are
checked before anything runs, and its plumbing (per-command timeout, carried
wheels on PYTHONPATH, records kept from a killed run) is run with a stand-in
interpreter that prints one record and then hangs.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
SUITE = BENCH_DIR / "gpu_suite.sh"
sys.path.insert(0, str(BENCH_DIR))

import compare
import profile_step
import sample_throughput
import train_throughput

OUR_PARSERS = {
    "train_throughput.py": train_throughput.parse_args,
    "sample_throughput.py": sample_throughput.parse_args,
    "profile_step.py": profile_step.parse_args,
}


def _suite(out_dir, part="all", **env):
    return subprocess.run(["bash", str(SUITE), str(out_dir), part], check=False, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def _dry_run_commands(tmp_path):
    out = tmp_path / "dry_run_out"
    proc = _suite(out, DRY_RUN="1", PYTHON="python-on-the-gpu-machine")
    assert proc.returncode == 0, proc.stderr
    assert not out.exists(), "a dry run must not create the output folder"
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if line.strip() and line[0] != "#"]
    assert commands and all(cmd[0] == "python-on-the-gpu-machine" for cmd in commands)
    return [(Path(cmd[1]).name, cmd[2:]) for cmd in commands]


def test_every_command_of_the_suite_parses(tmp_path):
    commands = _dry_run_commands(tmp_path)
    scripts = {name for name, _ in commands}
    assert scripts == set(OUR_PARSERS) | {"compare.py"}, scripts
    for name, argv in commands:
        if name == "compare.py":
            args = compare.parse_args(argv)
            assert "ours" in args.impls
            ours = compare.command(compare.IMPLS["ours"], args)
            OUR_PARSERS[Path(ours[1]).name](ours[2:])
        else:
            OUR_PARSERS[name](argv)


def test_the_suite_measures_the_two_gpu_targets(tmp_path):
    commands = _dry_run_commands(tmp_path)
    train = [train_throughput.parse_args(a) for n, a in commands if n == "train_throughput.py"]
    sample = [sample_throughput.parse_args(a) for n, a in commands if n == "sample_throughput.py"]
    # DDPM CIFAR-10 training in bfloat16 (the MFU target) ...
    assert any(a.workload == "ddpm_cifar10" and "bfloat16" in a.dtype for a in train)
    # ... and 256 samples with 1000 ancestral steps (the wall-time target).
    assert any(a.workload == "ddpm_cifar10" and a.batch == 256 and a.sampler == "ddpm"
               and a.num_steps == 1000 and not a.compile_scaling for a in sample)
    # Both against the peers, alternating.
    compares = [compare.parse_args(a) for n, a in commands if n == "compare.py"]
    assert {(a.task, a.workload) for a in compares} == {("train", "ddpm_cifar10"), ("sample", "ddpm_cifar10")}
    assert all(set(a.impls) == {"ours", "diffusers", "lucidrains"} for a in compares)


def test_every_peer_command_of_the_suite_parses(tmp_path):
    pytest.importorskip("torch")
    sys.path.insert(0, str(BENCH_DIR / "peers"))
    import _torch_harness

    for name, argv in _dry_run_commands(tmp_path):
        if name != "compare.py":
            continue
        args = compare.parse_args(argv)
        for impl in args.impls:
            if impl != "ours":
                cmd = compare.command(compare.IMPLS[impl], args)
                _torch_harness.parse_args(impl, cmd[2:])


@pytest.mark.parametrize("part, env, message", [
    ("everything", {}, "usage"),
    ("all", {"RUN_TIMEOUT": "ten"}, "RUN_TIMEOUT"),
    ("all", {"RUN_TIMEOUT": "0"}, "RUN_TIMEOUT"),
    ("all", {"WHEELS": "EMPTY"}, "WHEELS"),
])
def test_bad_settings_stop_the_suite_before_it_runs_anything(tmp_path, part, env, message):
    if env.get("WHEELS") == "EMPTY":
        (tmp_path / "empty").mkdir()
        env = {"WHEELS": str(tmp_path / "empty")}
    calls = tmp_path / "calls"
    proc = _suite(tmp_path / "out", part, PYTHON=str(_stand_in(tmp_path, calls)), **env)
    assert proc.returncode == 2 and message in proc.stderr
    assert not calls.exists(), "nothing may run before the settings are checked"
    assert not (tmp_path / "out").exists()


def _stand_in(tmp_path, calls):
    """An executable taking the interpreter's place: it logs its arguments; `-c` and
    `-m` (the version check, pip) succeed at once; a script prints one record with the
    PYTHONPATH it saw, then hangs."""
    script = tmp_path / "python"
    script.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {shlex.quote(str(calls))}
case "$1 $2" in *default_backend*) exit "${{STAND_IN_NOT_GPU:-0}}" ;; esac
case "$1" in -c|-m) exit 0 ;; esac
echo '{{"impl": "stand-in", "task": "sample", "workload": "ddpm_cifar10", "device": "none", "batch": 256, '\\
'"dtype": "bfloat16", "img_per_s": 1.0, "pythonpath": "'"${{PYTHONPATH:-}}"'"}}'
exec sleep 60
""")
    script.chmod(0o755)
    return script


def test_a_run_over_the_timeout_is_stopped_its_records_kept_and_the_suite_goes_on(tmp_path):
    calls, out = tmp_path / "calls", tmp_path / "out"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "peer-1.0-py3-none-any.whl").write_bytes(b"")
    proc = _suite(out, "sample", PYTHON=str(_stand_in(tmp_path, calls)), RUN_TIMEOUT="1",
                  WHEELS=str(wheels), TMPDIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    log = (out / "gpu_suite.log").read_text()
    logged = calls.read_text().splitlines()
    # The carried wheels are installed first, offline and without dependencies ...
    pip = [c for c in logged if c.startswith("-m pip install")]
    assert len(pip) == 1 and "--no-index" in pip[0] and "--no-deps" in pip[0]
    site = pip[0].split("--target ")[1].split()[0]
    # ... every sampling command ran and was stopped by the timeout ...
    runs = [c for c in logged if "sample_throughput.py" in c]
    assert logged.index(pip[0]) < logged.index(runs[0])
    assert len(runs) == len([n for n, _ in _dry_run_commands(tmp_path) if n == "sample_throughput.py"])
    assert log.count("(over RUN_TIMEOUT)") == len(runs)
    # ... and the record each printed before it was stopped is kept, with the wheels'
    # folder first on its PYTHONPATH.
    records = [json.loads(line) for line in (out / "gpu_suite.jsonl").read_text().splitlines()]
    assert len(records) == len(runs)
    assert all(r["pythonpath"].split(":")[0] == site for r in records)
    assert f"=== done: {len(runs)} records" in log


def _labels(tmp_path, part):
    proc = _suite(tmp_path / "out", part, DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("# ")]


def test_the_parts_split_the_labelled_commands(tmp_path):
    every = _labels(tmp_path, "all")
    assert len(every) == len(set(every)) == len(_dry_run_commands(tmp_path))
    core, rest = _labels(tmp_path, "core"), _labels(tmp_path, "rest")
    assert sorted(core + rest) == sorted(every) and not set(core) & set(rest)
    # The core holds both targets, each against the peers.
    assert {"train.b128.bf16", "sample.ddpm1000.bf16", "peers.train", "peers.sample.ddpm1000"} <= set(core)
    for part in ("train", "sample", "peers"):
        assert _labels(tmp_path, part) == [label for label in every if label.startswith(part + ".")]
    # A list of labels runs those, in the order given.
    assert _labels(tmp_path, "sample.ddim50.bf16,train.tiny") == ["sample.ddim50.bf16", "train.tiny"]


def test_an_unknown_label_stops_the_suite_before_it_runs_anything(tmp_path):
    calls = tmp_path / "calls"
    proc = _suite(tmp_path / "out", "train.tiny,train.huge", PYTHON=str(_stand_in(tmp_path, calls)))
    assert proc.returncode == 2 and "unknown label 'train.huge'" in proc.stderr
    assert not calls.exists() and not (tmp_path / "out").exists()


def test_a_machine_whose_jax_has_no_gpu_stops_before_measuring(tmp_path):
    calls = tmp_path / "calls"
    proc = _suite(tmp_path / "out", "core", PYTHON=str(_stand_in(tmp_path, calls)), STAND_IN_NOT_GPU="1")
    assert proc.returncode == 3
    assert "not a GPU" in (tmp_path / "out" / "gpu_suite.log").read_text()
    assert not [c for c in calls.read_text().splitlines() if ".py" in c.split()[0]]


def test_the_budget_stops_the_call_and_lists_what_is_left_for_the_next(tmp_path):
    calls, out = tmp_path / "calls", tmp_path / "out"
    proc = _suite(out, "peers.train,sample.ddim50.bf16,sample.ddim100.bf16", PYTHON=str(_stand_in(tmp_path, calls)),
                  SUITE_BUDGET="3", SUITE_MIN_START="1", RUN_TIMEOUT="100")
    assert proc.returncode == 0, proc.stderr
    # The first command (a peer comparison: its runs bounded by RUN_TIMEOUT inside compare.py)
    # hangs until the budget ends; the two after it get no time.
    ran = [c for c in calls.read_text().splitlines() if ".py" in c.split()[0]]
    assert len(ran) == 1 and "compare.py" in ran[0]
    assert ran[0].split("--timeout ")[1].split()[0] == "100"
    assert ran[0].split("--jsonl ")[1].split()[0] == str(out / "gpu_suite.jsonl")
    assert (out / "gpu_suite.todo").read_text().strip() == "peers.train,sample.ddim50.bf16,sample.ddim100.bf16"
    assert "[peers.train] stopped at the end of SUITE_BUDGET" in (out / "gpu_suite.log").read_text()
