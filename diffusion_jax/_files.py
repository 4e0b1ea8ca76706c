"""Writing the run's small output files (JSON, PNG, NPZ) to a local folder or a bucket.

Every path goes through ``etils.epath``, as the checkpoints do, so a workdir
such as ``gs://bucket/run`` is written to the bucket (with the file-system
backend epath finds, e.g. ``gcsfs``) and never to a local folder named ``gs:``.
"""

from __future__ import annotations

import os
import uuid

from etils import epath


def as_path(path: os.PathLike | str) -> epath.Path:
    """``path`` as an epath.Path: URLs (``scheme://``) as they are, local paths made absolute."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def write_file(path: os.PathLike | str, data: bytes | str) -> epath.Path:
    """Writes ``data`` to ``path``, creating its folder; readers never see half a file.

    Written under a temporary name in the same folder, then renamed over
    ``path`` (atomic on a local file system; a copy and delete on object stores,
    where a reader sees the old object or the new one).
    """
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.replace(path)
    return path


def check_writable(directory: os.PathLike | str) -> None:
    """Creates ``directory`` if missing and writes and removes a file in it.

    Raises:
      OSError: the folder cannot be created or written.
    """
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    probe.write_text("")
    probe.unlink()
