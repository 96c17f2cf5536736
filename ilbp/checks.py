"""Checks of user input shared by the train step and the executors.

Each raises a ValueError that says what to do, before anything is traced or compiled.
A leaf module: it imports nothing from ilbp.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np


def check_microbatches(microbatches: int) -> None:
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be an integer ≥ 1; got {microbatches!r}.")


def check_batch_split(batch: Mapping[str, jax.Array], data: int, microbatches: int) -> int:
    """Returns the batch size; ValueError if it does not split into data × M pieces."""
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"Every batch entry needs the same leading size; got {sorted(sizes)}.")
    (size,) = sizes
    if size % (data * microbatches):
        raise ValueError(
            f"Batch size {size} must be divisible by the `data` mesh axis ({data}) times "
            f"the number of microbatches ({microbatches}); choose a batch size that is a "
            f"multiple of {data * microbatches} or change microbatches."
        )
    return size


def check_stacked(batches: Mapping[str, jax.Array]) -> int:
    """Returns T of batches stacked T × B × ... (one batch per step); ValueError if not."""
    leaves = jax.tree.leaves(batches)
    if not leaves or any(np.ndim(x) < 2 for x in leaves):
        raise ValueError("steps() takes batches stacked T × B × ...: one batch per step.")
    steps = {np.shape(x)[0] for x in leaves}
    if len(steps) != 1:
        raise ValueError(f"Every stacked batch entry needs the same T; got {sorted(steps)}.")
    return steps.pop()


def check_stage_devices(num_stages: int, available: int, kind: str) -> None:
    """ValueError unless there is a device (group) for each of the K stages."""
    if num_stages > available:
        raise ValueError(
            f"The {kind} executor needs one device (group) per stage: the model has "
            f"K={num_stages} stages but only {available} devices are available. Cut the "
            "model into fewer stages, or on CPU set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={num_stages} before importing jax."
        )
