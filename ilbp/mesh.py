"""Device meshes and shardings shared by the train step and the executors."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding

DATA_AXIS = "data"
STAGE_AXIS = "stage"


def make_mesh(data: int | None = None, stage: int = 1) -> Mesh:
    """A mesh with axes ("stage", "data") over the first stage·data devices.

    `data=None` spreads the stage axis over every device, which must then divide evenly.
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
    devices = jax.devices()[: stage * data]
    return jax.make_mesh(
        (stage, data),
        (STAGE_AXIS, DATA_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, replicated over every other axis."""
    return NamedSharding(mesh, jax.P(DATA_AXIS))
