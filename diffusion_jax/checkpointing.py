"""Checkpoints: the train state, the data iterator's position and the run config.

This is the only module that talks to Orbax (STYLE.md, "each dependency has one
home"). It wraps one ``orbax.checkpoint.CheckpointManager`` whose every step is
a composite of three items:

* ``state``: the TrainState pytree (``StandardSave`` / ``StandardRestore``:
  OCDBT + zarr through tensorstore, no pickle),
* ``data``: the grain iterator's ``get_state()`` dict as JSON, one file per
  process (grain's own Orbax handler),
* ``config``: the run's config as JSON (when the Checkpointer was given one).

On-disk layout of ``directory``::

    config.json                    save_config(): the run's config (JSON)
    <step>/                        one finalized checkpoint per saved step
      _CHECKPOINT_METADATA         Orbax step metadata (JSON)
      state/                       the TrainState (_METADATA, manifest.ocdbt, d/...)
      data/process_<i>-of-<n>.json grain iterator state of process i (JSON)
      config/metadata              the run's config (JSON)
      checksums.json               size + sha256 of every file under the item
                                   folders, written before the step is committed
    <step>.orbax-checkpoint-tmp/   a save in progress, or one killed mid-way:
                                   never read; removed when a writable
                                   Checkpointer opens the directory
    <step>.corrupt-<n>/            a step that restore() found damaged, moved
                                   aside (never deleted) for inspection

Atomicity comes from Orbax: a step is written under
``<step>.orbax-checkpoint-tmp`` and renamed to ``<step>`` only after every
process has finished writing. A process killed mid-save leaves only the tmp
folder, which is not a step, so the previous step stays the latest.

Orbax does not notice every kind of damage to a finalized step: a flipped byte
inside a compressed zarr chunk restores silently to wrong values, and some
files (per-process OCDBT manifests) are never read back. So, just before Orbax's
atomic rename, the primary process records the size and sha256 of every file
of the step in ``checksums.json`` (Orbax's ``post_finalization_callback``
runs on the primary host after all writes and before the commit). ``restore`` checks those first: a step whose files are missing,
truncated or altered, or whose ``checksums.json`` is missing (at two looks a second
apart, so a network file system's stale listing is not taken for damage), is reported with
``logging.warning`` naming the folder and the problem, moved aside to
``<step>.corrupt-<n>``, and the next older step is tried. A step whose files
all verify is the exact bytes that were written, so an error while restoring
it (wrong template, out of memory) is raised, never taken for corruption.

Loading is safe: nothing here uses pickle, and values are restored into the
structure of a caller-provided template; no object is ever deserialized from
the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import _files
from diffusion_jax._checks import as_step

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.json"
CHECKSUMS_FILENAME = "checksums.json"
_STATE, _DATA, _CONFIG = "state", "data", "config"
# Files Orbax rewrites after our checksums are taken (commit timestamp, commit
# marker); they are not needed to restore, so they are left out.
_UNCHECKED_FILENAMES = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})
_TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX
_HASH_CHUNK_BYTES = 1 << 22
_BARRIER_IDS = itertools.count()


_MOVED_ASIDE = ".corrupt-"  # <step>.corrupt-<n>: a damaged step, kept


def _is_moved_aside(name: str) -> bool:
    step, moved, n = name.partition(_MOVED_ASIDE)
    return bool(moved) and step.isdigit() and n.isdigit()


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint that verifies exists in the directory (or at the step asked)."""


class Checkpointer:
    """Saves and restores training checkpoints, one folder per step.

    Use one instance per training job, created and called on every process (the
    Orbax manager coordinates the processes; the primary one commits). Not
    thread-safe.

    Example::

        ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, save_interval_steps=1000)
        if ckpt.latest_step() is not None:
            state = ckpt.restore(state, data_iterator=train_iter)
        for step in range(int(state.step) + 1, num_steps + 1):
            state = train_step(state, next(train_iter))
            ckpt.save(step, state, data_iterator=train_iter)
        ckpt.close()

    Save semantics: ``save(step, ...)`` writes a checkpoint when ``force`` is
    true or ``step % save_interval_steps == 0``, and ``step`` is newer than
    every step already in the directory. Preemption is the caller's: stop where
    ``parallel.reached_preemption_sync_point`` says, then ``save(..., force=True)``
    (Orbax's own preemption policy is left out: it would report the step to
    JAX's preemption service as well, and the service's one counter per process
    must be fed one sequence of numbers, or the processes miss the stop point).
    An existing step is never overwritten. Writing happens in the
    background (``async_save=True``); the state is copied to host memory before
    ``save`` returns, so the caller may donate or change it afterwards. The data
    iterator's position is read synchronously in ``save``.

    Restore semantics: see ``restore``.
    """

    def __init__(
        self,
        directory: os.PathLike | str,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        config: Mapping[str, Any] | None = None,
        read_only: bool = False,
    ):
        """Opens (and unless ``read_only`` creates) a checkpoint directory.

        Args:
          directory: folder holding one sub-folder per step (local or any path
            ``etils.epath`` understands, e.g. ``gs://``).
          max_to_keep: keep the newest ``max_to_keep`` steps and delete older ones
            after each save; None keeps all.
          save_interval_steps: ``save`` writes only steps divisible by this (unless
            forced).
          async_save: write in a background thread; ``save`` then returns once the
            arrays are on the host.
          config: the run's config; if given, every step stores it as JSON.
          read_only: never write, delete, clean up or move anything (e.g. an
            evaluator reading a directory that a trainer is writing).
        """
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}.")
        if isinstance(save_interval_steps, bool) or not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be a positive int, got {save_interval_steps!r}.")
        self._config = None if config is None else _config_as_json_dict(config)
        self._directory = _files.as_path(directory)
        self._save_interval_steps = save_interval_steps
        self._async_save = async_save
        self._read_only = read_only
        self._pending_step: int | None = None

        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for name, handler, save_args, restore_args in (
            (_STATE, ocp.StandardCheckpointHandler, ocp.args.StandardSave, ocp.args.StandardRestore),
            (
                _DATA,
                grain.checkpoint.CheckpointHandler,
                grain.checkpoint.CheckpointSave,
                grain.checkpoint.CheckpointRestore,
            ),
            (_CONFIG, ocp.JsonCheckpointHandler, ocp.args.JsonSave, ocp.args.JsonRestore),
        ):
            registry.add(name, save_args, handler)
            registry.add(name, restore_args, handler)
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(save_interval_steps),
            preservation_policy=policies.LatestN(max_to_keep),
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            # Always the async checkpointer: its post-finalization hook is where
            # the checksums are written. async_save=False just waits after saving.
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums_before_commit),
        )
        self._manager = _CheckpointManager(self._directory, options=options, handler_registry=registry)

    @property
    def directory(self) -> epath.Path:
        return self._directory

    def latest_step(self) -> int | None:
        """Newest finalized step in the directory (or being saved), else None.

        This lists folders only; the step's files are verified by ``restore``.
        """
        return self._manager.latest_step()

    def saved_config(self, step: int | None = None) -> dict[str, Any] | None:
        """The run config stored with ``step`` (default: the newest), or None if it has none.

        Raises:
          ValueError: the step's config file is not JSON (``restore`` verifies
            it against its checksum first: a damaged one makes the step damaged).
        """
        step = self.latest_step() if step is None else as_step(step)
        if step is None:
            return None
        path = self._step_dir(step) / _CONFIG / "metadata"
        if not path.exists():
            return None
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"The config saved with checkpoint step {step}, {path}, is not JSON: {e}") from e
        return config if isinstance(config, dict) else None

    def all_steps(self) -> list[int]:
        """All finalized steps in the directory, oldest first."""
        return sorted(self._manager.all_steps())

    def damaged_steps(self) -> list[str]:
        """The folders of the steps ``restore`` found damaged and moved aside
        (``<step>.corrupt-<n>``), sorted by name; they are kept until someone
        removes them."""
        if not self._directory.exists():
            return []
        return sorted(p.name for p in self._directory.iterdir() if _is_moved_aside(p.name))

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: Any = None,
        force: bool = False,
    ) -> bool:
        """Starts saving ``state`` (and the iterator's position) as ``step``.

        Args:
          step: the training step this state is the result of (>= 0).
          state: the TrainState pytree (jax arrays, numpy arrays or scalars).
          data_iterator: a grain iterator (``get_state``/``set_state``) whose
            position is saved with the state, per process.
          force: save even if ``step`` is not a multiple of
            ``save_interval_steps``.

        Returns:
          True if a save was started, False if skipped: not a save step, or not
          newer than the newest step in the directory (logged, as a warning when
          older).
        """
        if self._read_only:
            raise ValueError(f"Checkpointer for {self._directory} is read-only; cannot save.")
        step = as_step(step)
        _check_iterator(data_iterator)
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            if force or step % self._save_interval_steps == 0:
                # Re-saving the newest step (e.g. a forced save after the loop) is
                # routine; saving behind it means a run resumed from an older step.
                log = logger.info if step == latest else logger.warning
                log(
                    "Not saving step %d to %s: step %d exists there and checkpoints are never overwritten.",
                    step,
                    self._directory,
                    latest,
                )
            return False
        if not force and not self._manager.should_save(step):
            return False
        # The checksum hook reads `_pending_step` from Orbax's background thread;
        # the previous save must be finished before it changes.
        self._manager.wait_until_finished()
        self._pending_step = step
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if self._config is not None:
            items[_CONFIG] = ocp.args.JsonSave(self._config)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if not self._async_save:
            self._manager.wait_until_finished()
        return saved

    def restore(
        self,
        state_template: Any,
        *,
        data_iterator: Any = None,
        step: int | None = None,
        optional_fields: Sequence[str] = (),
    ) -> Any:
        """Restores a step into the structure of ``state_template``.

        Steps are tried newest first (or only ``step`` when given). Each is first
        verified against its ``checksums.json``: a step with a missing, truncated
        or altered file is logged (``logging.warning`` with its folder and the
        problem), moved aside to ``<step>.corrupt-<n>`` (unless read-only) and
        skipped. The first step that verifies is restored; any error while
        restoring it is raised (its files are intact, so the cause is elsewhere:
        a template that does not match, devices, memory).

        Args:
          state_template: a pytree with the structure, shapes and dtypes of the
            saved state: concrete arrays, or ``jax.ShapeDtypeStruct`` leaves (e.g.
            from ``jax.eval_shape``). Restored arrays get each leaf's sharding;
            leaves without one go to the first device (single-process only).
          data_iterator: a grain iterator; its position is set in place to the
            restored step's (this process's file). An iterator whose position is
            the same on every process (``state_is_global = True``, as the train
            iterator of ``input_pipeline``) also restores from a step saved by
            another number of processes.
          step: restore exactly this step instead of the newest; if it is
            damaged it is reported and moved aside as above, and no other step is
            tried.
          optional_fields: for a dataclass template (a TrainState), fields that
            a checkpoint written before they existed may lack; such a field,
            and any field whose template value is None, is restored as None
            when the checkpoint does not have it (logged).

        Returns:
          The restored state: same pytree structure as ``state_template``, values
          bit-identical to those saved.

        Raises:
          CheckpointNotFoundError: no step (or not ``step``) exists, or every step
            failed verification.
          ValueError: the template's leaves (paths, shapes, dtypes) differ from the
            checkpoint's, or ``data_iterator`` is given but the step saved none,
            or saved per-process positions for another number of processes.
        """
        _check_iterator(data_iterator)
        target = _abstract_target(state_template)
        self._manager.wait_until_finished()
        self._manager.reload()
        available = self.all_steps()
        if step is not None:
            step = as_step(step)
            if step not in available:
                raise CheckpointNotFoundError(
                    f"No checkpoint for step {step} in {self._directory}; steps there: {available}."
                )
            candidates = [step]
        else:
            candidates = available[::-1]
        if not candidates:
            raise CheckpointNotFoundError(f"No checkpoint in {self._directory}.")

        skipped = []
        for candidate in candidates:
            step_dir = self._step_dir(candidate)
            problem = self._verify_on_primary(step_dir)
            if problem is not None:
                logger.warning(
                    "Checkpoint %s is damaged and will not be loaded: %s",
                    step_dir,
                    problem,
                )
                self._move_aside(candidate)
                skipped.append(f"{step_dir}: {problem}")
                continue
            manifest = json.loads((step_dir / CHECKSUMS_FILENAME).read_text())
            if data_iterator is not None and not any(name.startswith(_DATA + "/") for name in manifest["files"]):
                raise ValueError(f"A data iterator was given, but checkpoint {step_dir} holds no data iterator state.")
            saved_tree = self._manager.item_metadata(candidate)[_STATE]
            target_here, absent = _without_absent_fields(target, saved_tree, optional_fields, step_dir)
            _check_template_matches(target_here, saved_tree, step_dir)
            items = {_STATE: ocp.args.StandardRestore(target_here)}
            global_position = None
            if data_iterator is not None:
                global_position = _global_position_from_other_process_count(step_dir, data_iterator)
                if global_position is None:
                    items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
            restored = self._manager.restore(candidate, args=ocp.args.Composite(**items))
            if global_position is not None:
                data_iterator.set_state(global_position)
            if skipped:
                logger.warning(
                    "Restored step %d from %s after skipping %d damaged step(s).",
                    candidate,
                    self._directory,
                    len(skipped),
                )
            if absent:
                return dataclasses.replace(target, **restored[_STATE], **{name: None for name in absent})
            return restored[_STATE]
        raise CheckpointNotFoundError(f"No intact checkpoint in {self._directory}; damaged: {skipped}.")

    def wait_until_finished(self) -> None:
        """Blocks until the background save (if any) is committed; raises its error."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and deletions, then releases resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---------------------------------------------------------------- private

    def _step_dir(self, step: int) -> epath.Path:
        return self._directory / str(step)

    def _write_checksums_before_commit(self) -> None:
        """Orbax hook: on the primary host, after all writes, before the rename."""
        step = self._pending_step
        tmp_dir = self._directory / f"{step}{_TMP_SUFFIX}"
        step_dir = tmp_dir if tmp_dir.exists() else self._step_dir(step)
        manifest = {
            "format": 1,
            "step": step,
            "algorithm": "sha256",
            "files": _file_digests(step_dir),
        }
        (step_dir / CHECKSUMS_FILENAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))

    def _verify_on_primary(self, step_dir: epath.Path) -> str | None:
        """The primary process checks the files; all processes get its verdict."""
        if jax.process_count() == 1:
            return _verify_twice(step_dir)
        problem = _verify_twice(step_dir) if jax.process_index() == 0 else None
        damaged = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
        if bool(damaged) and problem is None:
            problem = "reported damaged by the primary process"
        return problem

    def _move_aside(self, step: int) -> None:
        """Renames a damaged step to <step>.corrupt-<n> so it is kept, not reused."""
        if self._read_only:
            return
        if jax.process_index() == 0:
            n = 0
            while (self._directory / f"{step}{_MOVED_ASIDE}{n}").exists():
                n += 1
            target = self._directory / f"{step}{_MOVED_ASIDE}{n}"
            self._step_dir(step).rename(target)
            logger.warning("Moved damaged checkpoint %s to %s.", self._step_dir(step), target)
        if jax.process_count() > 1:
            # Every process runs the same sequence of barriers, so the counter agrees.
            ocp.multihost.sync_global_processes(f"diffusion_jax_move_aside_{step}_{next(_BARRIER_IDS)}")
        self._manager.reload()


class _CheckpointManager(ocp.CheckpointManager):
    """Orbax's manager, kept away from JAX's preemption service.

    Orbax asks ``multihost_utils.reached_preemption_sync_point(step)`` in every
    ``should_save`` and ``save``. The service keeps one counter per process and
    stops the job at (the highest number any process reported) + 1, exactly;
    the trainer reports its count of device calls there, which differs from
    the step after a resume or with several steps per call, so Orbax's reports
    would move the stop point to a number the trainer's count reaches only
    much later, or never. The caller decides about preemption (see
    :class:`Checkpointer`).
    """

    def reached_preemption(self, step: int) -> bool:
        del step
        return False


def save_config(directory: os.PathLike | str, config_dict: Mapping[str, Any]):
    """Writes ``config_dict`` to ``<directory>/config.json`` (primary process).

    JSON only (never pickle); tuples come back as lists. The file is written
    to a temporary name and renamed, so a reader never sees half of it.

    Args:
      directory: folder to write into (created if missing).
      config_dict: a mapping of JSON-serializable values, or an object with
        ``to_dict()`` (e.g. ``ml_collections.ConfigDict``).
    """
    text = json.dumps(_config_as_json_dict(config_dict), indent=2, sort_keys=True)
    if jax.process_index() != 0:
        return
    _files.write_file(_files.as_path(directory) / CONFIG_FILENAME, text + "\n")


def load_config(directory: os.PathLike | str) -> dict[str, Any]:
    """Reads ``<directory>/config.json`` written by ``save_config``."""
    path = _files.as_path(directory) / CONFIG_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"No {CONFIG_FILENAME} in {directory}.")
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not an object.")
    return config


# ------------------------------------------------------------------ helpers


def _global_position_from_other_process_count(step_dir: epath.Path, data_iterator: Any) -> dict | None:
    """The data position to restore when the step was saved by another number of processes.

    None when this process's own file (``process_<i>-of-<n>.json``) is there:
    grain's handler restores it. Otherwise the saved positions can only be
    used by an iterator whose position is global (``state_is_global``: the
    same on every process, as ``input_pipeline.create_train_iterator``'s),
    which takes any process's file.

    Raises:
      ValueError: the step was saved by another number of processes and the
        iterator's position is per process.
    """
    data_dir = step_dir / _DATA
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if (data_dir / own).exists():
        return None
    saved = sorted(p.name for p in data_dir.glob("process_*-of-*.json"))
    if not getattr(data_iterator, "state_is_global", False):
        raise ValueError(
            f"Checkpoint {step_dir} holds the data positions of another number of processes ({saved}; "
            f"this is {own[:-5]}), and this data iterator's position is per process, so it cannot be "
            "restored here. Resume with the process count that saved it."
        )
    return json.loads((data_dir / saved[0]).read_text())


def _check_iterator(data_iterator: Any) -> None:
    if data_iterator is not None and not (
        callable(getattr(data_iterator, "get_state", None)) and callable(getattr(data_iterator, "set_state", None))
    ):
        raise TypeError(
            "data_iterator must be a grain iterator with get_state()/set_state(),"
            f" got {type(data_iterator).__name__}."
        )


def _config_as_json_dict(config: Any) -> dict[str, Any]:
    if not isinstance(config, Mapping) and callable(getattr(config, "to_dict", None)):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}.")
    try:
        return json.loads(json.dumps(dict(config)))
    except TypeError as e:
        raise TypeError(f"config is not JSON-serializable: {e}") from None


def _walk_files(root: epath.Path):
    for path in sorted(root.iterdir()):
        if path.is_dir():
            yield from _walk_files(path)
        else:
            yield path


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _file_digests(step_dir: epath.Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file in the step's item folders."""
    digests = {}
    for item_dir in sorted(p for p in step_dir.iterdir() if p.is_dir()):
        for path in _walk_files(item_dir):
            if path.name in _UNCHECKED_FILENAMES:
                continue
            relative = os.path.relpath(os.fspath(path), os.fspath(step_dir))
            digests[relative.replace(os.sep, "/")] = {
                "size": path.stat().length,
                "sha256": _sha256(path),
            }
    return digests


# Seconds before a step that failed verification is checked again.
_RECHECK_AFTER_S = 1.0


def _verify_twice(step_dir: epath.Path) -> str | None:
    """:func:`_verify_step_dir`, and once more after a pause if it found a problem.

    A network file system can briefly show a file as missing or short (a
    listing not yet refreshed); a step is taken for damaged, and moved aside,
    only if the second look agrees.
    """
    problem = _verify_step_dir(step_dir)
    if problem is None:
        return None
    time.sleep(_RECHECK_AFTER_S)
    return _verify_step_dir(step_dir)


def _verify_step_dir(step_dir: epath.Path) -> str | None:
    """None if every file listed in checksums.json is intact, else the problem."""
    manifest_path = step_dir / CHECKSUMS_FILENAME
    if not manifest_path.exists():
        return f"{CHECKSUMS_FILENAME} is missing"
    try:
        files = json.loads(manifest_path.read_text())["files"]
        entries = [(str(k), int(v["size"]), str(v["sha256"])) for k, v in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{CHECKSUMS_FILENAME} is unreadable ({type(e).__name__}: {e})"
    if not any(name.startswith(_STATE + "/") for name, _, _ in entries):
        return f"{CHECKSUMS_FILENAME} lists no '{_STATE}' files"
    for name, size, sha256 in entries:
        parts = name.split("/")
        if name.startswith("/") or ".." in parts:
            return f"{CHECKSUMS_FILENAME} lists a path outside the step: {name!r}"
        path = step_dir.joinpath(*parts)
        if not path.exists():
            return f"file {name} is missing"
        actual_size = path.stat().length
        if actual_size != size:
            return f"file {name} has {actual_size} bytes, expected {size}"
        if _sha256(path) != sha256:
            return f"file {name} does not match its sha256 checksum"
    return None


def _abstract_target(template: Any) -> Any:
    """Template -> ShapeDtypeStruct leaves carrying the shardings to restore to."""

    def leaf(x):
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            sharding = getattr(x, "sharding", None)
            if sharding is None:
                if jax.process_count() > 1:
                    raise ValueError(
                        "Every array leaf of the restore template needs a sharding when"
                        " running on more than one process."
                    )
                sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return x

    leaves = jax.tree.leaves(template)
    if not leaves:
        raise ValueError("state_template has no leaves.")
    return jax.tree.map(leaf, template)


def _without_absent_fields(target: Any, saved_tree: Any, optional_fields: Sequence[str],
                           step_dir) -> tuple[Any, list[str]]:
    """``(target to restore, [fields to set to None])`` for a dataclass target whose
    None-valued or optional fields the checkpoint lacks (it predates them)."""
    tree = getattr(saved_tree, "tree", saved_tree)
    if not (dataclasses.is_dataclass(target) and isinstance(tree, dict)):
        return target, []
    fields = [f.name for f in dataclasses.fields(target)]
    absent = [name for name in fields if name not in tree
              and (getattr(target, name) is None or name in optional_fields)]
    if not absent:
        return target, []
    logger.warning("Checkpoint %s has no %s (written before they existed): restored as None.",
                   step_dir, ", ".join(absent))
    return {name: getattr(target, name) for name in fields if name not in absent}, absent


def _leaf_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _dtype_name(dtype: Any) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _check_template_matches(target: Any, metadata: Any, step_dir) -> None:
    """Raises ValueError listing leaves whose path, shape or dtype differ."""
    tree = getattr(metadata, "tree", metadata)
    saved = {_leaf_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    wanted = {_leaf_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
    problems = [f"{n}: not in the checkpoint" for n in sorted(wanted.keys() - saved.keys())]
    problems += [f"{n}: not in the template" for n in sorted(saved.keys() - wanted.keys())]
    for name in sorted(wanted.keys() & saved.keys()):
        want, have = wanted[name], saved[name]
        if isinstance(want, jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            want = jax.eval_shape(jax.random.key_data, want)  # typed keys are stored as their key data
        want_shape = tuple(np.shape(want))
        want_dtype = _dtype_name(want.dtype if hasattr(want, "dtype") else np.asarray(want).dtype)
        have_shape = tuple(getattr(have, "shape", ()) or ())
        have_dtype = None if getattr(have, "dtype", None) is None else _dtype_name(have.dtype)
        if have_shape != want_shape:
            problems.append(f"{name}: shape {have_shape} saved, {want_shape} wanted")
        elif have_dtype is not None and have_dtype != want_dtype:
            problems.append(f"{name}: dtype {have_dtype} saved, {want_dtype} wanted")
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError(f"Restore template does not match checkpoint {step_dir}: {shown}{more}.")
