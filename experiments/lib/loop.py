"""What keeps the trainer's devices busy: non-finite checks on device, batches placed ahead.

The host never waits for a step just to look at it. `NonFiniteWatch` folds each step's
losses and gradient norms into a tiny on-device record of the first non-finite one (a
jitted reduction dispatched after the step), which the host reads only when it looks at
the devices anyway (log steps, evaluations, checkpoints, the end). `DeviceBatches`
reads the batches of the coming calls on a background thread and places them on their
devices before the loop asks for them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lib.checkpoints import NonFiniteLossError


def watched_metrics(num_stages: int) -> list[tuple[int, str]]:
    """(stage k, metric) checked for non-finite values, in the order they are reported:
    stage by stage, its loss (the final or aux head's) before its gradient norm."""
    out = []
    for k in range(num_stages):
        loss = "loss" if k == num_stages - 1 else f"aux/{k}/loss"
        out += [(k, loss), (k, f"grad_norm/{k}")]
    return out


@jax.jit
def _first_nonfinite(flag: dict, values: list[jax.Array], first_step: jax.Array) -> dict:
    """`flag` unless it is unset (step -1) and `values` hold a non-finite entry; then that
    entry's (steps done, index into `values`, value), the earliest step first.

    values: N arrays [] or [T] (T steps, the first of which is `first_step` + 1 done).
    """
    x_TN = jnp.stack([jnp.reshape(v, (-1,)).astype(jnp.float32) for v in values], axis=1)
    bad_TN = ~jnp.isfinite(x_TN)
    t = jnp.argmax(bad_TN.any(axis=1))
    n = jnp.argmax(bad_TN[t])
    found = {"step": first_step + t + 1, "index": n, "value": x_TN[t, n]}
    take = (flag["step"] < 0) & bad_TN.any()
    return jax.tree.map(lambda new, old: jnp.where(take, new, old).astype(old.dtype), found, flag)


class NonFiniteWatch:
    """The first non-finite watched metric (`watched_metrics`) of a run, kept on device."""

    def __init__(self, num_stages: int):
        self.K = num_stages
        # step -1: no non-finite value seen yet.
        self.flag = {
            "step": jnp.asarray(-1, jnp.int32),
            "index": jnp.asarray(-1, jnp.int32),
            "value": jnp.asarray(0.0, jnp.float32),
        }
        self._watched: list[tuple[int, str]] = []

    def observe(self, metrics: dict[str, Any], first_step: int) -> None:
        """Folds in the metrics of the call whose first step is `first_step` (0-based);
        dispatches a tiny program, never waits."""
        self._watched = [(k, name) for k, name in watched_metrics(self.K) if name in metrics]
        values = [metrics[name] for _, name in self._watched]
        placed = [v.sharding for v in values if isinstance(v, jax.Array)]
        if len({frozenset(s.device_set) for s in placed}) > 1:  # mpmd: one device per stage
            values = jax.device_put(values, placed[-1])
        self.flag = _first_nonfinite(self.flag, values, first_step)

    def check(self, host_flag: dict[str, Any], describe_kept: Callable[[], str]) -> None:
        """Raises NonFiniteLossError if `host_flag` (a fetched `self.flag`) records a
        non-finite value; `describe_kept()` says what checkpoint survives."""
        step = int(host_flag["step"])
        if step < 0:
            return
        k, name = self._watched[int(host_flag["index"])]
        raise NonFiniteLossError(
            f"{name} = {float(host_flag['value'])} at step {step}, stage {k} (of K={self.K}); "
            f"training stopped. {describe_kept()}"
            "Lower --config.optimizer.learning_rate or set --config.optimizer.grad_clip_norm."
        )


class DeviceBatches:
    """The batches of calls `sizes` (steps per call), read from `iterator` and placed
    by `place` on a background thread, at most `depth` calls ahead.

    A call of n steps gets n batches, stacked T × B × ... when `stack`; `next()` returns
    the next call's placed batch. The iterator must start at the first call's step and is
    not touched by anyone else until `close()`.
    """

    def __init__(
        self,
        iterator: Iterator[dict[str, np.ndarray]],
        sizes: list[int],
        place: Callable[[Any], Any],
        *,
        stack: bool,
        depth: int = 2,
    ):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(iterator, sizes, place, stack), daemon=True
        )
        self._thread.start()

    def _fill(self, iterator, sizes, place, stack) -> None:
        try:
            for n in sizes:
                batches = [next(iterator) for _ in range(n)]
                if stack:
                    batch = jax.tree.map(lambda *xs: np.stack(xs), *batches)
                else:
                    (batch,) = batches
                if not self._put(("batch", place(batch))):
                    return
        except BaseException as e:  # handed to the loop, which raises it
            self._put(("error", e))

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> Any:
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """Stops the thread (it may be blocked on a full queue)."""
        self._stop.set()
        self._thread.join()
