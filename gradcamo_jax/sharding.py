"""One device mesh over every device of every process, and the moves on and off it.

Conventions: the mesh has one axis, ``"data"``; parameters, BatchNorm statistics and
optimiser state are replicated (``P()``); batches are split on their leading axis
(``P("data")``). Each process loads only its rows of a global batch (see
`gradcamo_jax.data.pipeline`) and `to_global` assembles the global array without
moving data between hosts. Training maps its step over the ``"data"`` axis (`shard_map`
or `pmap`, see `gradcamo_jax.train`), so BatchNorm averages its statistics over the global
batch through ``ModelConfig.bn_axis_name = DATA_AXIS``.

Multi-host start-up: `initialize_distributed` calls `jax.distributed.initialize` from
explicit arguments, or from ``GRADCAMO_COORDINATOR`` / ``GRADCAMO_NUM_PROCESSES`` /
``GRADCAMO_PROCESS_ID`` (and otherwise lets JAX detect SLURM, Open MPI, TPU pods …
when ``GRADCAMO_DISTRIBUTED=auto``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Join a multi-process JAX job; returns True if `jax.distributed.initialize` was called.

    Arguments left None are read from ``GRADCAMO_COORDINATOR`` (``host:port``),
    ``GRADCAMO_NUM_PROCESSES`` and ``GRADCAMO_PROCESS_ID``. With none of them set and
    ``GRADCAMO_DISTRIBUTED=auto``, JAX's own cluster detection is used; otherwise this
    is a single-process run and nothing happens. On CPU the collectives go over gloo
    (XLA:CPU has no cross-process collectives by default). Call before any JAX
    computation.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("GRADCAMO_COORDINATOR")
    if num_processes is None and "GRADCAMO_NUM_PROCESSES" in env:
        num_processes = int(env["GRADCAMO_NUM_PROCESSES"])
    if process_id is None and "GRADCAMO_PROCESS_ID" in env:
        process_id = int(env["GRADCAMO_PROCESS_ID"])
    auto = env.get("GRADCAMO_DISTRIBUTED", "").lower() == "auto"
    if coordinator_address is None and not auto:
        if num_processes not in (None, 1):
            raise ValueError(f"num_processes={num_processes} needs a coordinator address (host:port)")
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` over `devices` (default: all devices of all processes).

    Axis type Auto: the classic jit + NamedSharding behaviour, where the compiler
    propagates shardings (jax 0.10's `jax.make_mesh` defaults to Explicit)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimiser state)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"``; the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows ``(B/P, ...)`` → global arrays ``(B, ...)`` sharded on ``"data"``.

    Process p's rows become rows ``[p*B/P, (p+1)*B/P)`` (process-major device order,
    as `jax.devices()` lists them), which is how the pipeline slices global batches.
    """
    sharding = batch_sharding(mesh)
    n = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (v.shape[0] * n, *v.shape[1:]))
        for k, v in local_batch.items()
    }


def replicate(tree, mesh: Mesh):
    """Host values (identical on every process) → arrays replicated over `mesh`."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def to_host(tree):
    """Replicated (or fully addressable) arrays → NumPy, without cross-host traffic:
    a replicated array is read from this process's first copy."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"to_host: array of shape {x.shape} is sharded across processes")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(get, tree)


# ----------------------------------------------------------------------------- pmap


def pmap_replicate(tree):
    """Host values → one copy per local device (leading axis = local devices), for `jax.pmap`."""
    devices = jax.local_devices()
    n = len(devices)
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree)
    # The identity under pmap leaves the copies resident on the devices, so later steps
    # do not re-transfer the state from the host.
    return jax.pmap(lambda t: t, devices=devices)(stacked)


def pmap_unreplicate(tree):
    """The first local copy of a `pmap_replicate`d tree ``(D, ...)`` → ``(...)``, as NumPy."""

    def first(x):
        shard = np.asarray(x.addressable_data(0))
        # Depending on how pmap lays out its outputs, a shard keeps the device axis (1, ...) or not.
        return shard[0] if shard.ndim == x.ndim else shard

    return jax.tree.map(first, tree)


def pmap_split(local_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``(B/P, ...)`` → ``(D, B/(P*D), ...)`` for the D local devices (ValueError unless D divides)."""
    d = jax.local_device_count()

    def split(x):
        if x.shape[0] % d:
            raise ValueError(f"per-process batch {x.shape[0]} does not divide over {d} local devices")
        return x.reshape(d, x.shape[0] // d, *x.shape[1:])

    return {k: split(np.asarray(v)) for k, v in local_batch.items()}
