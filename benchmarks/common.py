"""What the benchmarks share: CPU device setup before JAX starts, and timing."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


def use_cpu_devices(count: int, *, multi_thread_eigen: bool = True) -> None:
    """Asks for `count` CPU devices (one per stage) when the platform is CPU.

    Must run before JAX's first computation: a benchmark's `main` calls it first.
    `multi_thread_eigen=False` asks XLA:CPU for single-threaded devices (jax 0.10 does
    not honour it; benchmarks.pipeline measures what happens instead). RuntimeError
    if JAX already started with fewer devices.
    """
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if not multi_thread_eigen:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    with contextlib.suppress(RuntimeError):  # JAX already started: fine if enough devices
        jax.config.update("jax_num_cpu_devices", count)
    if jax.device_count() < count:
        raise RuntimeError(
            f"This benchmark needs {count} devices but JAX started with "
            f"{jax.device_count()}; run it in a fresh process (python -m benchmarks.X)."
        )


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of fn(), blocking on its result, after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(
    calls: Mapping[Any, Callable[[], Any]], repeats: int
) -> dict[Any, float]:
    """Median seconds of each zero-argument call, timed round-robin so that drift in
    the machine's load affects every call alike."""
    for call in calls.values():
        jax.block_until_ready(call())
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}
