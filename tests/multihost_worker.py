"""One process of the multi-process tests, started by `experiments.launch`.

    python -m experiments.launch --num_processes=2 --module=tests.multihost_worker -- --case=X

--case=batches: the global batch assembled from process-local rows on (stage × data) meshes
  equals the single-process batch; evaluation sees every example once; a mesh that leaves
  devices unused is refused; processes that disagree (`distributed.agreed`) all raise.
  Prints "OK <process> <shards>".
--case=fail: process 1 dies (status 3, no clean-up) while process 0 waits for it in a
  collective.
--case=train --root=DIR --idx=DIR: `train_and_evaluate` of `train_config(DIR)` across
  the processes: bad configs refused (prints "BAD OK"); ROOT/full trained 10 steps;
  ROOT/cut stopped at step 5 (copied to ROOT/cut5) and resumed to 10; ROOT/cmp, a
  comparison of seeds 0 and 1 (`check_compare`); then ROOT/nan, where process 1's rows
  of batch 3 are NaN: every process exits with the trainer's error, as
  `experiments.train` does.
--case=spmd_rows --root=DIR --text=FILE (4 processes × 2 devices): `spmd_rows_config`
  trained in ROOT/spmd, its stages and its data axis both across processes; each process
  checks that it read exactly its rows of every microbatch of every batch and prints
  "ROWS <data block>/<blocks> <rows read> of <rows in the batches>".
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from experiments.lib import distributed

_CASE = flags.DEFINE_enum(
    "case", "batches", ["batches", "fail", "train", "spmd_rows"], "What to run."
)
_ROOT = flags.DEFINE_string("root", None, "--case=train, spmd_rows: directory of the runs.")
_IDX = flags.DEFINE_string("idx", None, "--case=train: IDX data directory.")
_TEXT = flags.DEFINE_string("text", None, "--case=spmd_rows: text corpus.")


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
    import jax

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
    assert distributed.agreed(True, "x")
    try:
        distributed.agreed(jax.process_index() == 0, "whether it works")
    except distributed.DistributedError as e:
        assert "disagree on whether it works (process i says [1, 0][i])" in str(e), e
    else:
        raise AssertionError("processes that disagree were not refused")
    return shards


def train_config(idx_dir: str):
    """A data-parallel ResNet over all 8 devices: 10 steps, an evaluation, checkpoint and
    log record every 5 (the test runs it in one process too)."""
    from tests import experiments_fixtures as fx

    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=2")
    c.num_train_steps, c.data_parallel, c.batch_size, c.eval_batch_size = 10, 8, 16, 16
    c.eval_every_steps = c.checkpoint_every_steps = c.log_every_steps = 5
    return c


BAD = [  # (overrides, what the error says)
    ({"executor": "mpmd"}, "executor=mpmd drives every stage from one process"),
    ({"data_parallel": 16}, "needs 16 devices; the job has 8 devices (2 processes × 4)"),
    ({"data_parallel": 4}, "set config.data_parallel=8"),
]


def check_compare(root: str, idx_dir: str) -> None:
    """`report.compare` across the processes: shard 0/2 trains seed 0; the whole
    comparison then trains seed 1, reads seed 0 back from its summary (its metrics are
    not appended to) and process 0 alone writes the report. Process 1 starts late, so
    that what it finds on disk would differ had the processes not agreed on it before
    process 0 created anything. Prints "COMPARE OK"."""
    import glob
    import time

    import jax

    from experiments.lib import report

    c = train_config(idx_dir)
    c.compare.strategies, c.compare.seeds = "pairwise", "0,1"
    primary = jax.process_index() == 0  # the process that writes
    if not primary:
        time.sleep(3)
    assert report.compare(c, root + "/cmp", shard=(0, 2)) is None
    if primary:
        (seed0,) = glob.glob(root + "/cmp/*/seed0/metrics.jsonl")
        with open(seed0) as f:
            records = f.readlines()
    result = report.compare(c, root + "/cmp")
    assert (result is not None) == primary, result
    if primary:
        with open(seed0) as f:
            assert f.readlines() == records
    print("COMPARE OK", flush=True)


def check_training(root: str, idx_dir: str) -> None:
    import shutil

    import jax
    from jax.experimental import multihost_utils

    from experiments.lib import trainer
    from experiments.lib.checkpoints import NonFiniteLossError
    from tests import experiments_fixtures as fx

    for overrides, message in BAD:
        try:
            trainer.train_and_evaluate(fx.override(train_config(idx_dir), overrides), root + "/x")
        except ValueError as e:
            assert message in str(e), e
        else:
            raise AssertionError(f"{overrides} was accepted")
    assert not os.path.exists(root + "/x")
    print("BAD OK", flush=True)
    c = train_config(idx_dir)
    trainer.train_and_evaluate(c, root + "/full")
    trainer.train_and_evaluate(c, root + "/cut", stop_after=5)
    if jax.process_index() == 0:
        shutil.copytree(root + "/cut", root + "/cut5")
    multihost_utils.sync_global_devices("copied")
    trainer.train_and_evaluate(c, root + "/cut")
    check_compare(root, idx_dir)
    place, placed = trainer.batch_placement, []

    def poisoned(config, ex, **kw):  # one step per call: batch 3 is the third placed
        def put(batch):
            placed.append(None)
            if len(placed) == 3 and jax.process_index() == 1:
                batch = {**batch, "inputs": batch["inputs"] * np.float32("nan")}
            return place(config, ex, **kw)(batch)

        return put

    trainer.batch_placement = poisoned
    try:
        trainer.train_and_evaluate(c, root + "/nan")
    except NonFiniteLossError as e:
        raise SystemExit(f"error: {e}") from None


SPMD_ROWS = {  # a 2-stage Transformer LM, (stage 2 × data 4), M = 2, 2 steps per call
    "seq_len": 16, "model.num_layers": 2, "model.d_model": 16, "model.num_heads": 2,
    "batch_size": 16, "data_parallel": 4, "microbatches": 2, "steps_per_call": 2,
    "num_train_steps": 10, "checkpoint_every_steps": 10, "log_every_steps": 2,
    "eval_every_steps": 0, "eval_batch_size": 32, "final_eval_examples": 64,
    "optimizer.warmup_steps": 0, "progress_bar": False,
}  # fmt: skip


def spmd_rows_config(text: str):
    from experiments.configs import stdlib_lm
    from tests import experiments_fixtures as fx

    c = stdlib_lm.get_config("pairwise,k=2,executor=spmd")
    return fx.override(c, {"dataset": f"text:{text}", **SPMD_ROWS})


def check_spmd_rows(root: str, text: str) -> None:
    """Trains `spmd_rows_config` recording the rows this process reads (what the
    trainer's iterator yields; it fetches nothing else) and checks them against the
    single-process batches: of each of the M microbatches, this process's data block."""
    from experiments.lib import trainer
    from ilbp import data

    batches, place, made, read = data.batches, trainer.batch_placement, [], []

    def recording_batches(source, batch_size, **kw):
        made.append((source, batch_size, kw))
        return batches(source, batch_size, **kw)

    def recording_placement(config, ex, **kw):
        put = place(config, ex, **kw)

        def record(rows):
            read.append(rows)
            return put(rows)

        return record

    data.batches, trainer.batch_placement = recording_batches, recording_placement
    c = spmd_rows_config(text)
    trainer.train_and_evaluate(c, root + "/spmd")
    ((source, B, kw),) = made
    index, count, M = kw["process_index"], kw["process_count"], int(c.microbatches)
    got = np.concatenate([rows["inputs"] for rows in read])  # steps_per_call = 2: stacked
    whole = batches(source, B, seed=kw["seed"], augment=kw["augment"], shard_by_process=False)
    for step, rows in enumerate(got):
        want = whole.batch_at(step)["inputs"]
        want = want.reshape(M, count, B // (M * count), -1)[:, index].reshape(rows.shape)
        assert np.array_equal(rows, want), step
    print(f"ROWS {index}/{count} {got.shape[0] * got.shape[1]} of {len(got) * B}", flush=True)


def main(argv: list[str]) -> None:
    del argv
    assert distributed.initialize_from_flags()
    import jax
    from jax.experimental import multihost_utils

    assert jax.device_count() == 8, jax.devices()
    if _CASE.value == "spmd_rows":
        check_spmd_rows(_ROOT.value, _TEXT.value)
        return
    assert jax.process_count() == 2, jax.process_count()
    if _CASE.value == "fail":
        if jax.process_index() == 1:
            os._exit(3)  # dies: no exception handling, no JAX shut-down barrier
        multihost_utils.sync_global_devices("never reached by process 1")
        return
    if _CASE.value == "train":
        check_training(_ROOT.value, _IDX.value)
        return
    print("OK", jax.process_index(), check_batches())


if __name__ == "__main__":
    app.run(main)
