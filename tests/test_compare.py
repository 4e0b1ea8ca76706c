"""Tests for benchmarks/compare.py: the commands it runs, its alternation, and its table's ratios.

The implementations' scripts are replaced by stand-ins that print fixed records,
so the ratios are checked against hand-computed values and nothing is timed.
"""

import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import compare  # noqa: E402


def test_commands_pass_the_shared_flags_to_every_implementation():
    args = compare.parse_args(["--workload", "tiny", "--task", "sample", "--sampler", "ddim", "--num-steps", "50",
                               "--batch", "64", "--peer-compile", "--allocator", "system"])
    ours = compare.command(compare.IMPLS["ours"], args)
    peer = compare.command(compare.IMPLS["diffusers"], args)
    assert ours[1].endswith("sample_throughput.py") and "--task" not in ours and "--compile" not in ours
    assert peer[1].endswith("diffusers_bench.py") and peer[peer.index("--task") + 1] == "sample"
    for cmd in (ours, peer):
        assert cmd[cmd.index("--batch") + 1] == "64" and cmd[cmd.index("--num-steps") + 1] == "50"
        assert cmd[cmd.index("--allocator") + 1] == "system"
    assert "--compile" in peer
    # Nothing given, nothing passed: each script keeps its own defaults.
    plain = compare.command(compare.IMPLS["ours"], compare.parse_args(["--workload", "tiny", "--task", "train"]))
    assert plain[2:] == ["--workload", "tiny"]


@pytest.mark.parametrize("argv", [
    ["--workload", "tiny", "--task", "train", "--impls", "ours,nope"],
    ["--workload", "tiny", "--task", "train", "--impls", "ours,ours"],
    ["--workload", "tiny", "--task", "train", "--rounds", "0"],
    ["--workload", "tiny", "--task", "train", "--num-steps", "5"],
    ["--workload", "tiny", "--task", "sample", "--steps", "5"],
    ["--workload", "tiny", "--task", "train", "--allocator", "tcmalloc"],
    ["--workload", "nope", "--task", "train"],
    ["--workload", "tiny", "--task", "train", "--dtype", "bf16"],
    ["--workload", "tiny", "--task", "sample", "--sampler", "euler"],
    ["--workload", "tiny", "--task", "train", "--timeout", "0"],
])
def test_bad_flags_are_rejected(argv):
    with pytest.raises(SystemExit):
        compare.parse_args(argv)


def test_the_workload_names_are_workloads_py():
    import workloads  # imports the library, which compare.py itself does not
    assert set(compare.WORKLOAD_NAMES) == set(workloads.WORKLOADS)


def test_dpm_solver_is_passed_on_in_the_spelling_every_script_takes():
    args = compare.parse_args(["--workload", "tiny", "--task", "sample", "--sampler", "dpm_solver++"])
    for impl in ("ours", "diffusers"):
        cmd = compare.command(compare.IMPLS[impl], args)
        assert cmd[cmd.index("--sampler") + 1] == "dpmpp"


def _stand_in(tmp_path, name, img_per_s_by_round, **fields):
    """A script printing one record per run, its img/s the next value of the list, and
    appending its name to tmp_path/order."""
    record = {"impl": name, "task": "train", "workload": "tiny", "device": "cpu", "batch": 32,
              "dtype": "float32", "allocator": "system", **fields}
    script = tmp_path / f"{name}.py"
    script.write_text(f"""import json, pathlib
order = pathlib.Path({str(tmp_path / "order")!r})
done = order.read_text().split().count({name!r}) if order.exists() else 0
with order.open("a") as f:
    f.write({name!r} + "\\n")
print(json.dumps(dict({record!r}, img_per_s={img_per_s_by_round!r}[done])))
""")
    return script


def test_runs_alternate_and_the_table_holds_hand_computed_ratios(tmp_path, monkeypatch, capsys):
    ours = _stand_in(tmp_path, "diffusion_jax", [10.0, 12.0, 11.0], peak_mem_bytes=3 * 2**29)
    peer = _stand_in(tmp_path, "diffusers", [4.0, 5.0, 8.0])
    monkeypatch.setitem(compare.IMPLS, "ours", compare.Impl("ours", "diffusion_jax", ours, ours, is_peer=False))
    monkeypatch.setitem(compare.IMPLS, "diffusers", compare.Impl("diffusers", "diffusers", peer, peer, is_peer=True))
    jsonl = tmp_path / "records.jsonl"
    assert compare.main(["--workload", "tiny", "--task", "train", "--impls", "ours,diffusers", "--rounds", "3",
                         "--jsonl", str(jsonl)]) == 0
    assert (tmp_path / "order").read_text().split() == ["diffusion_jax", "diffusers"] * 3  # A B A B A B
    table = capsys.readouterr().out
    # Medians over rounds: ours 11, diffusers 5; ours / diffusers = 2.20.
    [ours_row] = [line for line in table.splitlines() if line.startswith("diffusion_jax ")]
    [peer_row] = [line for line in table.splitlines() if line.startswith("diffusers ")]
    assert "11.000" in ours_row and ours_row.split()[-2:] == ["1.50", "1.00x"]  # 1.5 GiB peak
    assert "5.000" in peer_row and peer_row.split()[-2:] == ["-", "2.20x"]  # no memory recorded
    assert "allocator: system" in table
    assert [json.loads(line)["img_per_s"] for line in jsonl.read_text().splitlines()] == [10, 4, 12, 5, 11, 8]
