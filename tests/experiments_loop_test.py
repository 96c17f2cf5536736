"""The trainer's hot loop: the on-device non-finite record and batches placed ahead."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

from experiments.lib.checkpoints import NonFiniteLossError
from experiments.lib.loop import DeviceBatches, NonFiniteWatch

KEPT = lambda: "kept. "


def _metrics(loss, aux0, grad1=1.0, device=None):
    values = {"loss": loss, "aux/0/loss": aux0, "grad_norm/0": 1.0, "grad_norm/1": grad1}
    return {k: jax.device_put(np.float32(v), device) for k, v in values.items()}


def test_watch_keeps_the_first_nonfinite_value_on_device():
    watch = NonFiniteWatch(2)
    watch.observe(_metrics(1.0, 2.0), 0)
    watch.check(jax.device_get(watch.flag), KEPT)  # nothing yet
    watch.observe(_metrics(1.0, 2.0, grad1=np.inf), 1)  # step 2: stage 1's gradient norm
    watch.observe(_metrics(np.nan, np.nan), 2)  # later, and earlier stages: not reported
    assert all(isinstance(v, jax.Array) for v in watch.flag.values())
    with pytest.raises(NonFiniteLossError, match=r"grad_norm/1 = inf at step 2, stage 1 \(of K=2"):
        watch.check(jax.device_get(watch.flag), KEPT)


def test_watch_reads_stacked_steps_and_metrics_on_several_devices():
    """spmd's steps(): metrics [T]; mpmd: each stage's metrics on its own device."""
    watch = NonFiniteWatch(2)
    stacked = {k: np.array([1.0, 2.0, 3.0], np.float32) for k in _metrics(0, 0)}
    stacked["aux/0/loss"][1:] = np.nan  # steps 6 and 7 of the call at step 4
    watch.observe(stacked, 4)
    devices = jax.devices()
    split = _metrics(1.0, 1.0, device=devices[0])
    split["loss"] = jax.device_put(np.float32(np.nan), devices[1])
    watch.observe(split, 8)
    with pytest.raises(NonFiniteLossError, match=r"aux/0/loss = nan at step 6, stage 0"):
        watch.check(jax.device_get(watch.flag), KEPT)
    watch = NonFiniteWatch(2)
    watch.observe(split, 8)
    with pytest.raises(NonFiniteLossError, match=r"^loss = nan at step 9, stage 1"):
        watch.check(jax.device_get(watch.flag), KEPT)


class _Source:
    """An iterator of numbered batches that records who reads it."""

    def __init__(self, fail_at: int | None = None):
        self.read, self.threads, self.fail_at = 0, set(), fail_at

    def __next__(self):
        if self.read == self.fail_at:
            raise ValueError("bad example")
        self.threads.add(threading.current_thread().name)
        self.read += 1
        return {"x": np.full((2,), self.read, np.float32)}


def test_batches_are_read_and_placed_ahead_on_a_background_thread():
    src = _Source()
    feed = DeviceBatches(src, [1, 1, 2, 1], jax.device_put, stack=False, depth=2)
    try:
        deadline = time.monotonic() + 10
        while src.read < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert src.read >= 2  # two calls ahead before the loop asked for any
        assert src.threads and threading.current_thread().name not in src.threads
        first = feed.next()
        assert isinstance(first["x"], jax.Array) and float(first["x"][0]) == 1
    finally:
        feed.close()
    stacked = DeviceBatches(_Source(), [1, 2], lambda b: b, stack=True)
    assert stacked.next()["x"].shape == (1, 2)
    np.testing.assert_array_equal(stacked.next()["x"][:, 0], [2, 3])
    stacked.close()


def test_a_reading_error_reaches_the_loop():
    feed = DeviceBatches(_Source(fail_at=1), [1, 1, 1], lambda b: b, stack=False)
    feed.next()
    with pytest.raises(ValueError, match="bad example"):
        feed.next()
    feed.close()
