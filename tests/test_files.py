"""A workdir in a bucket (gs://...): the run's own files go through etils.epath, as the
checkpoints do, and never to a local folder named "gs:".

No bucket is reachable here, so epath's file operations are redirected: every
path under gs://bucket/ lands in a temporary folder, and each call is recorded.
"""
import io
import json
import os

import numpy as np
import PIL.Image
import pytest
from etils.epath import testing as epath_testing

from diffusion_jax import _files, checkpointing, metric_writers
from diffusion_jax.training import trainer

_OPERATIONS = ("open", "mkdir", "makedirs", "replace", "rename", "remove", "exists", "isdir", "stat")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """Redirects gs://bucket/... to tmp_path/bucket/...; yields (that folder, the gs:// paths touched)."""
    root = tmp_path / "bucket_contents"
    root.mkdir()
    touched = []

    def local(path):
        path = os.fspath(path)
        return path.replace("gs://", f"{root}/", 1) if path.startswith("gs://") else path

    def redirect(original, path, *args, **kwargs):
        paths = [os.fspath(p) for p in (path, *args) if isinstance(p, (str, os.PathLike))]
        touched.extend(p for p in paths if p.startswith("gs://"))
        args = [local(a) if isinstance(a, (str, os.PathLike)) else a for a in args]
        return original(local(path), *args, **kwargs)

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with epath_testing.mock_epath(**{name: redirect for name in _OPERATIONS}):
        yield root / "bucket", touched
    assert os.listdir(cwd) == [], "something was written to a local folder instead of the bucket"


def test_outputs_of_a_run_go_to_the_bucket(bucket):
    root, touched = bucket
    workdir = "gs://bucket/run"

    trainer._check_workdir(workdir)
    trainer._write_json(f"{workdir}/nll.json", {"nll_bpd": 3.25})
    checkpointing.save_config(workdir, {"batch_size": 8})
    grid = np.arange(2 * 3 * 1, dtype=np.uint8).reshape(2, 3, 1) * 40
    metric_writers.save_png(f"{workdir}/samples/grid.png", grid)
    images = np.linspace(-1, 1, 2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
    writer = metric_writers.MetricWriter(f"{workdir}/tensorboard", enabled=False)
    trainer._save_samples(workdir, "sample", images, writer, 0, with_npz=True)

    run = root / "run"
    assert json.loads((run / "nll.json").read_text()) == {"nll_bpd": 3.25}
    assert checkpointing.load_config(run) == {"batch_size": 8}
    with PIL.Image.open(run / "samples" / "grid.png") as png:
        np.testing.assert_array_equal(np.asarray(png), grid[..., 0])
    np.testing.assert_array_equal(np.load(run / "samples" / "sample.npz")["images"], images)
    assert (run / "samples" / "sample.png").is_file()
    # Only the results are left: no write probe, no temporary names.
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "nll.json", "samples"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["grid.png", "sample.npz", "sample.png"]
    assert any(p.endswith("nll.json") for p in touched)


def test_write_file_replaces_whole_files(tmp_path):
    path = tmp_path / "a" / "b.json"
    _files.write_file(path, "first")
    _files.write_file(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["b.json"]


def test_png_bytes_are_a_png(tmp_path):
    """save_png encodes in memory and writes the bytes: the file is a PNG of the grid."""
    grid = np.zeros((4, 5, 3), np.uint8)
    grid[1, 2] = (255, 128, 0)
    metric_writers.save_png(tmp_path / "g.png", grid)
    data = (tmp_path / "g.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(data))), grid)
