"""Metrics of a run: JSONL + TensorBoard writing, and exact evaluation over a split.

WORKDIR/metrics.jsonl has one JSON object per line: {"kind": "train"|"eval"|"final",
"step": int, "time": unix seconds, <metric>: float, ...}; TensorBoard event files go to
WORKDIR/tensorboard with tags "<kind>/<metric>". A resumed run appends; readers take the
last record of each (kind, step).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.lib.loop import fetch
from ilbp import data
from ilbp.mesh import global_batch, process_batch_shard

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends metrics to WORKDIR/metrics.jsonl and TensorBoard event files; writes
    nothing unless `enabled` (in a multi-process job, process 0 writes)."""

    def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file = open(self.path, "a") if enabled else None  # noqa: SIM115 - see close()
        self._tb = None
        if tensorboard and enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, kind: str, step: int, metrics: Mapping[str, float]) -> None:
        if self._file is None:
            return
        record = {"kind": kind, "step": int(step), "time": time.time()}
        record.update({k: float(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{kind}/{name}", float(value), int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, keeping the last one of each (kind, step)."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                latest[(record["kind"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))


def with_perplexity(metrics: dict[str, float]) -> dict[str, float]:
    """Adds "perplexity" (and "aux/k/perplexity") = exp(loss) for language models."""
    out = dict(metrics)
    for name, value in metrics.items():
        if name == "loss" or name.endswith("/loss"):
            out[name[: -len("loss")] + "perplexity"] = math.exp(min(value, 700.0))
    return out


def with_bits_per_byte(metrics: dict[str, float], token_bytes: float) -> dict[str, float]:
    """Adds "bits_per_byte" (and "aux/k/bits_per_byte") = loss / (ln 2 · bytes per
    token) when the data's bytes per token are known (`DatasetInfo.token_bytes` > 0)."""
    if token_bytes <= 0:
        return dict(metrics)
    out = dict(metrics)
    for name, value in metrics.items():
        if name == "loss" or name.endswith("/loss"):
            out[name[: -len("loss")] + "bits_per_byte"] = value / (math.log(2) * token_bytes)
    return out


class Prefix:
    """The first `n` examples of a random-access source (intermediate evaluations)."""

    def __init__(self, source: Any, n: int):
        self.source, self.n, self.info = source, min(n, len(source)), source.info

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index]

    def getitems(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if hasattr(self.source, "getitems"):
            return self.source.getitems(indices)
        examples = [self.source[int(i)] for i in indices]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def evaluate(
    eval_step: Callable[[Any, dict], dict],
    train_state: Any,
    source: Any,
    batch_size: int,
    *,
    mesh: jax.sharding.Mesh | None = None,
    desc: str = "eval",
    progress: bool = True,
    text: bool = False,
) -> dict[str, float]:
    """Metrics of every head over all of `source`, exact despite the padded last batch.

    Each batch's metrics are means over its counted entries (examples, or tokens with
    weight 1), so the total is their mean weighted by each batch's sum of "weights".
    With a `mesh` (eval_step's), each process reads only its rows of every batch, which
    `global_batch` assembles on the mesh: over all processes every example is evaluated
    exactly once, and every process gets the same totals.
    """
    batch_size = min(batch_size, len(source))
    if mesh is None:
        it: Iterable = data.eval_batches(source, batch_size, shard_by_process=False)
        place = lambda batch: batch
    else:
        index, count = process_batch_shard(mesh)
        it = data.eval_batches(source, batch_size, process_index=index, process_count=count)
        place = lambda batch: global_batch(batch, mesh)
    if progress:
        it = tqdm(it, total=len(it), desc=desc, leave=False, unit="batch", dynamic_ncols=True)
    sums: dict[str, float] = {}
    total = 0.0
    for local in it:
        batch = place(local)
        metrics, count = fetch((eval_step(train_state, batch), _weight_sum(batch["weights"])))
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value) * float(count)
        total += float(count)
    out = {name: value / max(total, 1.0) for name, value in sums.items()}
    return with_perplexity(out) if text else out


@jax.jit
def _weight_sum(weights: jax.Array) -> jax.Array:
    """The counted entries of a batch (over every process's rows of a global batch)."""
    return jnp.sum(weights)
