"""Device meshes and shardings shared by the train step and the executors.

Multi-process (multi-host) runs: the mesh spans every device of every process, and each
process feeds only the batch rows its devices hold (`process_batch_shard`), which
`global_batch` assembles into one global array on the mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

DATA_AXIS = "data"
STAGE_AXIS = "stage"


def make_mesh(data: int | None = None, stage: int = 1) -> Mesh:
    """A mesh with axes ("stage", "data") over the first stage·data devices.

    `data=None` spreads the stage axis over every device, which must then divide evenly.
    With several processes the mesh must use every device of every process (stage·data =
    jax.device_count()), so that each process holds part of it.
    Axes are Auto so that jit propagates shardings (jax.make_mesh defaults to Explicit).
    """
    count = jax.device_count()
    if stage < 1 or (data is None and count % stage):
        raise ValueError(
            f"The stage axis ({stage}) must be ≥ 1 and divide the {count} available devices "
            "(or give `data` to use stage·data of them)."
        )
    data = count // stage if data is None else data
    if data < 1 or stage * data > count:
        raise ValueError(
            f"A mesh of stage={stage} × data={data} devices does not fit the {count} "
            "available devices; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count"
            "=N before importing jax."
        )
    processes = jax.process_count()
    if processes > 1 and stage * data != count:
        raise ValueError(
            f"A mesh of stage={stage} × data={data} devices leaves some of the {count} devices "
            f"of the {processes} processes ({jax.local_device_count()} each) unused; a "
            f"multi-process mesh uses them all: make stage × data = {count}."
        )
    devices = jax.devices()[: stage * data]
    return jax.make_mesh(
        (stage, data),
        (STAGE_AXIS, DATA_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.P())


def batch_sharding(mesh: Mesh, *, stacked: bool = False) -> NamedSharding:
    """Leading (batch) axis split over `data`, replicated over every other axis; of
    batches stacked T × B × ... (`stacked`), the B axis."""
    return NamedSharding(mesh, jax.P(None, DATA_AXIS) if stacked else jax.P(DATA_AXIS))


def process_batch_shard(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process's rows of a global batch split by `batch_sharding`.

    The batch is cut into `count` equal blocks along the data axis and this process's
    devices hold block `index` (rows [index·B/count, (index+1)·B/count)). Processes whose
    devices hold the same data positions (the stage axis spans processes) get the same
    block; on one process it is (0, 1). Pass it to `ilbp.data.batches` as
    process_index/process_count (with microbatches=M for the spmd executor, whose
    devices hold block `index` of each microbatch: `SPMDExecutor.place`).
    """
    axis = mesh.axis_names.index(DATA_AXIS)
    me = jax.process_index()
    held = sorted({i[axis] for i, d in np.ndenumerate(mesh.devices) if d.process_index == me})
    size = mesh.shape[DATA_AXIS]
    n = len(held)
    if not n or held != list(range(held[0], held[0] + n)) or size % n or held[0] % n:
        raise ValueError(
            f"Process {me} holds data positions {held} of {size} on mesh {dict(mesh.shape)}: "
            "not one block of equal contiguous blocks, so it cannot feed its rows alone. "
            "Build the mesh with ilbp.make_mesh."
        )
    return held[0] // n, size // n


def global_batch(local_batch: Any, mesh: Mesh, *, stacked: bool = False) -> Any:
    """The global batch on `mesh` from this process's rows of it.

    `local_batch`: a pytree of numpy arrays [B/count, ...] ([T, B/count, ...] if
    `stacked`: T steps' batches), block `index` of `process_batch_shard(mesh)`. Returns
    the same pytree of jax.Arrays [B, ...] ([T, B, ...]) sharded by
    `batch_sharding(mesh, stacked=stacked)`; nothing is copied between processes.
    """
    sharding = batch_sharding(mesh, stacked=stacked)
    return jax.make_array_from_process_local_data(sharding, local_batch)
