"""Devices, meshes and shardings: the one module that knows about them.

Everything diffusion_jax runs on more than one device goes through here: a
1-D mesh over all devices of the job with the axis name ``"data"``, the state
replicated (``P()``) and the batch split along its first axis
(``P("data")``). Per-device functions are written with collectives over
``"data"`` (``lax.pmean``, ``lax.psum``) and mapped with ``jax.shard_map``
under ``jax.jit``, so the same code runs on one CPU, eight GPUs or a TPU pod
slice, and on several processes joined by ``jax.distributed``.

Data layout. The mesh built by :func:`make_mesh` lists the devices process by
process (:func:`process_contiguous`), so each process holds a contiguous block
of the global batch, and :func:`shard_batch` places this process's host batch
in that block.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

def launched_as_multi_process() -> bool:
    """Whether a launcher's environment says this is one process of a job of several.

    A coordinator address (``JAX_COORDINATOR_ADDRESS``, ``MEGASCALE_COORDINATOR_ADDRESS``),
    or more than one task (``SLURM_NTASKS``, ``OMPI_COMM_WORLD_SIZE``,
    ``JAX_NUM_PROCESSES``) or TPU host (``TPU_WORKER_HOSTNAMES``). A one-task
    SLURM allocation (``SLURM_NTASKS=1``, as ``srun`` sets inside any
    allocation) is not.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
        try:
            if int(env.get(name) or 0) > 1:
                return True
        except ValueError:  # not a number: not ours to judge; jax.distributed would say
            return True
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1


def distributed_setting(value: bool | str) -> bool | str:
    """``config.distributed`` as True, False or "auto".

    Accepts the booleans and the strings "true", "false" and "auto" in any
    case (a command line gives ``--config.distributed=false`` as a string).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "auto"):
        return {"true": True, "false": False, "auto": "auto"}[value.lower()]
    raise ValueError(f"must be True, False or 'auto' (or the strings 'true', 'false'), got {value!r}")


def maybe_initialize_distributed(enabled: bool | str) -> bool:
    """Joins the multi-process job with ``jax.distributed.initialize`` if asked.

    Must run before anything touches a JAX device, because the backend is
    created once per process.

    Args:
      enabled: ``True`` always initializes (from ``JAX_COORDINATOR_ADDRESS``,
        ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or from a cluster that
        JAX detects: SLURM, Open MPI, Cloud TPU, Kubernetes);
        ``False`` never does; ``"auto"`` initializes when
        :func:`launched_as_multi_process`. The strings "true" and "false"
        (any case) mean the booleans.

    Returns:
      Whether ``jax.distributed.initialize`` was called.
    """
    try:
        enabled = distributed_setting(enabled)
    except ValueError as e:
        raise ValueError(f"config.distributed {e}") from None
    if enabled == "auto":
        enabled = launched_as_multi_process()
    if not enabled:
        return False
    if jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(**_process_args_from_env())
    return True


def _process_args_from_env() -> dict[str, int]:
    """``num_processes``/``process_id`` from ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, where set.

    ``jax.distributed.initialize`` itself reads only ``JAX_COORDINATOR_ADDRESS``
    from the environment (a cluster it detects, e.g. SLURM, supplies all three).
    """
    args = {}
    for name, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        value = os.environ.get(name)
        if value:
            try:
                args[arg] = int(value)
            except ValueError:
                raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None
    return args


_CPU_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def usable_cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_devices_for(batch_size: int, cores: int, num_processes: int = 1) -> int:
    """How many XLA CPU devices to split each process's CPU into for a data-parallel job.

    The most devices, at most one per core, that split the global batch
    evenly over all ``num_processes`` processes' devices.

    Why split at all: XLA:CPU runs a small model's many small kernels poorly
    on several threads at once, and one device per core running its share of
    the batch keeps every core busy. Measured on 2 cores (BENCHMARKS.md): 2
    devices train the ``tiny`` UNet 1.2-1.3x and sample it 1.9x as fast as
    one; the 35.7M DDPM UNet trains 4-7% slower and samples 8-12% faster.

    Args:
      batch_size: the global batch.
      cores: cores per process (:func:`usable_cpu_cores`).
      num_processes: processes of the job.

    Returns:
      The device count per process, >= 1.
    """
    for name, value in (("batch_size", batch_size), ("cores", cores), ("num_processes", num_processes)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"cpu_devices_for: {name} must be an int >= 1, got {value!r}")
    return max(d for d in range(1, cores + 1) if batch_size % (d * num_processes) == 0) \
        if batch_size % num_processes == 0 else 1


def backend_started() -> bool:
    """Whether a JAX backend has started (after which ``XLA_FLAGS`` is no longer read)."""
    # No public API says whether a backend started.
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    started = getattr(xla_bridge, "backends_are_initialized", lambda: False)
    return bool(started())


def request_cpu_devices(count: int) -> bool:
    """Asks XLA to present the host CPU as ``count`` devices, unless ``XLA_FLAGS`` already says how many.

    Sets ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``. Only the
    CPU backend is affected (on a GPU or TPU job the accelerators stay the
    devices). XLA reads the flag when the first backend starts, so this must
    run before anything touches a JAX device.

    Args:
      count: devices, >= 1.

    Returns:
      True if the flag was set; False if ``XLA_FLAGS`` (or a flag file it
      names) already had it, or JAX's ``jax_num_cpu_devices`` setting
      (``JAX_NUM_CPU_DEVICES``), which takes precedence in JAX, is set: the
      user's choice wins.

    Raises:
      ValueError: ``count`` is not an int >= 1.
      RuntimeError: a JAX backend has already started, so the flag would be ignored.
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"request_cpu_devices: count must be an int >= 1, got {count!r}")
    from diffusion_jax import xla_cpu  # pylint: disable=g-import-not-at-top

    if _CPU_DEVICE_FLAG in xla_cpu.effective_xla_flags() or _jax_num_cpu_devices_set():
        return False
    if backend_started():
        raise RuntimeError("request_cpu_devices: a JAX backend has already started; call it before "
                           "anything touches a JAX device")
    xla_cpu.add_xla_flag(f"{_CPU_DEVICE_FLAG}={int(count)}")
    return True


def _jax_num_cpu_devices_set() -> bool:
    """Whether JAX's own ``jax_num_cpu_devices`` (``JAX_NUM_CPU_DEVICES``) asks for a count."""
    try:
        return int(getattr(jax.config, "jax_num_cpu_devices", -1)) >= 0
    except (TypeError, ValueError):
        return False


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Returns a 1-D mesh with axis ``"data"`` over ``devices`` (default: all, process by process)."""
    devices = process_contiguous(jax.devices()) if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def process_contiguous(devices: Sequence[Any]) -> list[Any]:
    """``devices`` with each process's devices in one block, in process order, keeping
    their order within a process (a stable sort by ``process_index``).

    :func:`shard_batch` places a process's rows of the global batch on its own
    devices, which must then be one block of the mesh. ``jax.devices()`` is
    usually in that order already (then this changes nothing); nothing in
    JAX promises it for every platform.
    """
    return sorted(devices, key=lambda d: d.process_index)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, *, stacked: bool = False) -> NamedSharding:
    """Sharding that splits the batch axis over ``"data"``: the leading axis, or with
    ``stacked`` the second (behind a leading axis of steps, kept whole)."""
    return NamedSharding(mesh, P(None, DATA_AXIS) if stacked else P(DATA_AXIS))


def _shard_map(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    """``jax.shard_map`` with replication checking on, across JAX versions.

    With the check on, JAX tracks which values differ between devices, so an
    output declared replicated (``P()``) that is not is an error at trace
    time. Note its effect on gradients: the gradient w.r.t. a replicated
    input is summed over devices implicitly; see :func:`vary_over_data`. The
    flag is ``check_vma`` from JAX 0.7 on and ``check_rep`` in
    ``jax.experimental.shard_map`` before.
    """
    if hasattr(jax, "shard_map"):
        shard_map = jax.shard_map
    else:  # JAX < 0.7
        from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top
    params = inspect.signature(shard_map).parameters
    check = {"check_vma": True} if "check_vma" in params else {"check_rep": True}
    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **check)


def data_parallel(
    per_device_fn: Callable,
    mesh: Mesh,
    *,
    in_specs: Any,
    out_specs: Any,
    donate_argnums: int | Sequence[int] = (),
) -> Callable:
    """Maps a per-device function over ``mesh`` and jits it.

    Args:
      per_device_fn: sees this device's block of every ``P("data")`` input and
        a full copy of every ``P()`` input; reduces over devices with
        collectives on the axis ``"data"``.
      mesh: from :func:`make_mesh`.
      in_specs, out_specs: ``PartitionSpec`` pytrees (prefixes allowed), e.g.
        ``(P(), P("data"), P())`` for ``(state, batch, key)``.
      donate_argnums: arguments whose buffers the caller will not read again
        (the training state), so XLA updates them in place.

    Returns:
      A jitted function of global ``jax.Array`` arguments.
    """
    mapped = _shard_map(per_device_fn, mesh, in_specs, out_specs)
    return jax.jit(mapped, donate_argnums=donate_argnums)


def vary_over_data(tree: Any) -> Any:
    """Inside a per-device function: treats replicated values as per-device ones.

    Differentiating w.r.t. the result gives this device's own gradient (to be
    averaged with ``lax.pmean``), instead of the implicit ``psum`` that JAX's
    replication checking applies to the gradient of a replicated input. It
    also lets custom-VJP layers, whose backward rules return per-device
    cotangents, take replicated parameters. (``lax.pcast`` from JAX 0.8,
    ``lax.pvary`` before; without replication types it is the identity.)
    """
    if hasattr(lax, "pcast"):
        return lax.pcast(tree, DATA_AXIS, to="varying")
    if hasattr(lax, "pvary"):
        return lax.pvary(tree, DATA_AXIS)
    return tree


def shard_batch(batch: Any, mesh: Mesh, *, stacked: bool = False) -> Any:
    """Builds global arrays, split over ``"data"``, from this process's batch.

    Each process passes its own block of the global batch (leading axis
    ``global_batch // process_count``); the result has the global batch as
    its leading axis. With ``stacked``, every leaf is several steps' batches,
    ``[steps, global_batch // process_count, ...]``, and the batch axis is the
    second. Works the same with one process.
    """
    sharding = batch_sharding(mesh, stacked=stacked)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies a pytree of host values (equal on every process) to all devices."""
    sharding = replicated_sharding(mesh)

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.jit(lambda y: y, out_shardings=sharding)(x)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            # A typed key (jax.random.key) has no NumPy form: its key data goes across.
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        x = np.asarray(x)
        # A global shape equal to the local one says: every process holds the
        # whole (identical) value.
        return jax.make_array_from_process_local_data(sharding, x, x.shape)

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Fetches a pytree of global arrays as numpy arrays, whole, on every process.

    Leaves this process holds whole (host values, arrays on its own devices) are
    fetched as they are: gathering them would concatenate every process's copy.
    """
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(fetch, tree)


def sync_processes(name: str) -> None:
    """Waits until every process of the job reaches the barrier ``name``."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def reached_preemption_sync_point(step: int) -> bool:
    """Whether all processes agreed to stop at ``step`` after a SIGTERM.

    ``step`` counts up by one per call of this function and is the same on
    every process at each call (the trainer passes its count of device calls).

    With several processes a local signal flag is not enough (one process
    stopping would leave the others blocked in a collective); JAX's
    preemption service, started by ``jax.distributed.initialize``, catches
    SIGTERM in any process and picks one step at which all of them stop.
    Always ``False`` in a single-process job.
    """
    if jax.process_count() == 1:
        return False
    return multihost_utils.reached_preemption_sync_point(step)
