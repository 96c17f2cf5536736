"""One process of the multi-process tests, started by `experiments.launch`.

    python -m experiments.launch --num_processes=2 --module=tests.multihost_worker -- --case=X

--case=batches: the global batch assembled from process-local rows on (stage × data) meshes
  equals the single-process batch; evaluation sees every example once; a mesh that leaves
  devices unused is refused. Prints "OK <process> <shards>".
--case=fail: process 1 dies (status 3, no clean-up) while process 0 waits for it in a
  collective.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from experiments.lib import distributed

_CASE = flags.DEFINE_enum("case", "batches", ["batches", "fail"], "What to run.")


def _source(n: int = 37):
    from ilbp import data

    inputs = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 4, 4, 1))
    info = data.DatasetInfo(kind="image", example_shape=(4, 4, 1), num_classes=n)
    return data.ArraySource({"inputs": inputs.copy(), "label": np.arange(n, dtype=np.int32)}, info)


def _gathered(local, mesh):
    from jax.experimental import multihost_utils

    from ilbp.mesh import global_batch

    batch = global_batch(local, mesh)
    assert all(x.shape[0] == 16 for x in batch.values()), {k: x.shape for k, x in batch.items()}
    return multihost_utils.process_allgather(batch, tiled=True)


def check_batches() -> list[tuple[int, int]]:
    import ilbp
    from ilbp import data
    from ilbp.mesh import process_batch_shard

    src, shards = _source(), []
    single = data.batches(src, 16, seed=1, augment="flip", shard_by_process=False)
    for stage, data_parallel in ((1, 8), (2, 4), (4, 2)):
        mesh = ilbp.make_mesh(data=data_parallel, stage=stage)
        index, count = process_batch_shard(mesh)
        shards.append((index, count))
        it = data.batches(src, 16, seed=1, augment="flip", process_index=index, process_count=count)
        for step in range(3):
            got, want = _gathered(next(it), mesh), single.batch_at(step)
            assert all(np.array_equal(got[k], want[k]) for k in want), (stage, step)
    mesh = ilbp.make_mesh(data=8)
    index, count = process_batch_shard(mesh)
    seen = []
    for local in data.eval_batches(src, 16, process_index=index, process_count=count):
        batch = _gathered(local, mesh)
        seen += batch["label"][batch["mask"] > 0].tolist()
    assert sorted(seen) == list(range(37)), seen
    try:
        ilbp.make_mesh(data=2, stage=2)
    except ValueError as e:
        assert "unused" in str(e), e
    else:
        raise AssertionError("a mesh of 4 of the 8 devices was accepted")
    return shards


def main(argv: list[str]) -> None:
    del argv
    assert distributed.initialize_from_flags()
    import jax
    from jax.experimental import multihost_utils

    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    if _CASE.value == "fail":
        if jax.process_index() == 1:
            os._exit(3)  # dies: no exception handling, no JAX shut-down barrier
        multihost_utils.sync_global_devices("never reached by process 1")
        return
    print("OK", jax.process_index(), check_batches())


if __name__ == "__main__":
    app.run(main)
