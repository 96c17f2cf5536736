"""One training run: `train_and_evaluate(config, workdir)`, resumable from its workdir.

Order of work, so that bad input fails before anything expensive or destructive:
config checks -> data present and usable -> workdir writable -> checkpoint compatible
-> compile and train. A workdir with checkpoints resumes from the latest (a fresh start
never overwrites them); one whose checkpoints were trained differently (`fingerprint`)
is refused, naming each differing field.

Step s means "after s updates". Checkpoints hold the TrainState and the data
iterator's step, so a resumed run sees the same batches and reproduces the
uninterrupted run exactly (bitwise on CPU). The host waits for the devices only at log
steps, evaluations and checkpoints (`_Loop`); a non-finite loss is found then, named by
its step and stage, and stops the run before anything after it is evaluated or
checkpointed.

Multi-process jobs (every process runs this): the mesh spans every device of every
process (`validation.check_devices`); each process reads only the rows of each batch that
its devices hold (`train_shard`), assembled into the global batch on the mesh
(`batch_placement`); evaluation is process-sharded; every
process saves and restores the checkpoints together (Orbax multi-host; spmd's spread
over the devices, `checkpointed_state`), and process 0 alone writes metrics, summary
and config and shows the progress bar. What a process finds on disk and acts on is
agreed by all (`distributed.agreed`).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from experiments.configs import validation
from experiments.lib import builders, datasets, models, optim, records
from experiments.lib.checkpoints import (
    Checkpoints,
    ExperimentError,
    IncompatibleCheckpointError,
    prepare_workdir,
)
from experiments.lib.checkpoints import NonFiniteLossError as NonFiniteLossError  # raised here
from experiments.lib.distributed import agreed, is_primary
from experiments.lib.loop import DeviceBatches, NonFiniteWatch, fetch
from experiments.lib.metrics import MetricWriter, Prefix, evaluate, with_bits_per_byte
from ilbp import data
from ilbp.mesh import global_batch, process_batch_shard


def fingerprint(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by `config`: every field that changes
    the training trajectory, as plain JSON keyed by the config field's name.

    In: the model and K; the strategy (window and combine rule, in its name) and
    aux_weight; the dataset, its seq_len (text) or image_size (images) and the resolved
    augmentation; the optimizer and every field of config.optimizer it reads; batch_size,
    microbatches (BatchNorm statistics and the loss are per microbatch) and seed (data
    order, augmentation); num_train_steps under the cosine schedule, which decays the
    learning rate to 0 there and so sets every step's rate.
    Out, so changeable on resume: num_train_steps under a constant schedule; executor,
    data_parallel, max_in_flight and steps_per_call (the same math, placed differently);
    evaluation, logging and checkpoint cadence and sizes; max_to_keep, progress_bar,
    data_dir and name.
    """
    opt = config.optimizer
    size = (
        {"seq_len": int(config.seq_len)}
        if info.kind == "text"
        else {"image_size": config.image_size}
    )
    fields = {
        "num_stages": int(config.num_stages),
        "model": models.model_fields(config, info),
        "strategy": models.build_strategy(config).name,
        "aux_weight": float(config.aux_weight),
        "dataset": config.dataset,
        **size,
        "augment": datasets.train_augment(config, info),
        "optimizer": opt.name,
        **{f"optimizer.{name}": opt[name] for name in optim.OPTIMIZER_FIELDS[opt.name]},
        "batch_size": int(config.batch_size),
        "microbatches": int(config.microbatches),
        "seed": int(config.seed),
        "num_train_steps": optim.schedule_steps(config),
    }
    return json.loads(json.dumps(fields))  # as a checkpoint's metadata reads back


def resumable_step(ckpts: Checkpoints, num_train_steps: int) -> int | None:
    """The step of the latest checkpoint if the config may resume from it (None: start
    fresh). IncompatibleCheckpointError, before any file is changed, if not."""
    latest = ckpts.latest_step()
    agreed(-1 if latest is None else latest, f"the latest checkpoint in {ckpts.directory}")
    if latest is None:
        return None
    ckpts.check_compatible(latest)
    if latest > num_train_steps:
        raise IncompatibleCheckpointError(
            f"Refusing to resume from {ckpts.directory}: its latest checkpoint is at step "
            f"{latest}, past config.num_train_steps={num_train_steps}. Set num_train_steps "
            f"≥ {latest}, or use a new --workdir to start fresh; nothing was changed."
        )
    return latest


class _Loop:
    """Steps start..end of a run, one executor call at a time, never waiting for a step
    it has no reason to look at.

    The host looks at the devices only at log steps (a call's metrics are fetched after
    the next call is dispatched, so one call is always queued behind the one running),
    before an evaluation or a checkpoint, after the first call (compilation) and at the
    end; each look reads the `NonFiniteWatch` record too, so a non-finite loss stops the
    run before anything after it is evaluated or checkpointed. Step times are measured
    between looks, over the steps the devices finished in between.
    """

    def __init__(self, config, built, ckpts, writer, test_src, bar, text: bool):
        self.config, self.built, self.ckpts, self.writer = config, built, ckpts, writer
        self.test_src, self.bar, self.text = test_src, bar, text
        self.K = built.model.num_stages
        self.schedule = optim.learning_rate_schedule(config)
        self.watch = NonFiniteWatch(self.K)
        # (first step, n, stacked, (metrics, learning rates), flag) of a call with a log
        # step, fetched together.
        self.pending: tuple | None = None
        self.step_times: list[float] = []
        # (time, steps done): when the devices were last seen idle, and whether the
        # steps since then are timed (not the first call's, which compiles).
        self._mark: tuple[float, int, bool] = (time.perf_counter(), 0, False)
        self.end = 0

    def run(self, state: Any, it: data.BatchIterator, start: int, end: int) -> Any:
        """Trains steps start..end (`it` at step start); returns the state."""
        per_call, ex = validation.steps_per_call(self.config), self.built.executor
        sizes = call_sizes(start, end, per_call)
        place = batch_placement(self.config, ex, stacked=per_call > 1)
        feed = DeviceBatches(it, sizes, place, stack=per_call > 1)
        self._mark, self.end = (time.perf_counter(), start, False), end
        step = start
        try:
            for n in sizes:
                batch = feed.next()
                state, metrics = ex.step(state, batch) if per_call == 1 else ex.steps(state, batch)
                self.watch.observe(metrics, step)
                self._flush()  # the previous call's log steps, now that this one is queued
                if any(self._log_due(s + 1) for s in range(step, step + n)):
                    rates = [self.schedule(s) for s in range(step, step + n)]  # on device
                    self.pending = (step, n, per_call > 1, (metrics, rates), self.watch.flag)
                step += n
                self.bar.update(n)
                if step == start + n:  # the first call compiles: time the others only
                    self._look(step)
                self._evaluate_and_save(state, step, end)
        finally:
            feed.close()
        self._look(end)
        return state

    def _log_due(self, done: int) -> bool:
        return done % int(self.config.log_every_steps) == 0 or done == self.end

    def _evaluate_and_save(self, state: Any, done: int, end: int) -> None:
        c, ex = self.config, self.built.executor
        T = int(c.num_train_steps)
        evaluating = c.eval_every_steps and done % c.eval_every_steps == 0 and done < T
        saving = done % int(c.checkpoint_every_steps) == 0 or done == end
        if not (evaluating or saving):
            return
        self._look(done)  # nothing non-finite is evaluated or checkpointed
        ts = ex.to_train_state(state) if evaluating or not spread_checkpoints(c) else None
        if evaluating:
            subset = Prefix(self.test_src, c.eval_examples or len(self.test_src))
            metrics = evaluate(
                self.built.eval_step, ts, subset, int(c.eval_batch_size), mesh=self.built.mesh,
                desc=f"eval@{done}", progress=not self.bar.disable, text=self.text,
            )  # fmt: skip
            self.writer.write("eval", done, metrics)
        if saving:
            saved = checkpointed_state(c, ex, state, ts)
            self.ckpts.save(done, saved, done)  # batch s is step s's: the data step is `done`
        self._mark = (time.perf_counter(), done, True)

    def _look(self, done: int) -> None:
        """Logs what is pending and raises if a non-finite value was seen; the devices
        are then idle up to step `done`."""
        self._flush()
        self.watch.check(fetch(self.watch.flag), self._kept)
        self._mark = (time.perf_counter(), done, True)

    def _flush(self) -> None:
        """Fetches and writes the pending call's log steps (waits for that call)."""
        if self.pending is None:
            return
        first, n, stacked, values, flag = self.pending
        self.pending = None
        (metrics, rates), flag = fetch((values, flag))
        now, (then, since, timed) = time.perf_counter(), self._mark
        step_time = (now - then) / max(first + n - since, 1)
        if timed:  # an interval that does not include the compilation
            self.step_times.append(step_time)
        self._mark = (now, first + n, True)
        for i in range(n):
            done = first + i + 1
            if not self._log_due(done):
                continue
            record = {k: float(np.asarray(v[i] if stacked else v)) for k, v in metrics.items()}
            record.update(step_time=step_time, learning_rate=float(rates[i]))
            self.writer.write("train", done, record)
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
        self.watch.check(flag, self._kept)

    def _kept(self) -> str:
        kept = self.ckpts.latest_step()
        if kept is None:
            return "No checkpoint had been written yet. "
        return f"The last good checkpoint (step {kept}) is kept in {self.ckpts.directory}. "


def spread_checkpoints(config: ml_collections.ConfigDict) -> bool:
    """Whether checkpoints hold the state spread over the devices rather than whole on
    every process: spmd in a multi-process job (its stages live on different processes;
    simulated state is replicated anyway, and mpmd runs in one process)."""
    return config.executor == "spmd" and jax.process_count() > 1


def checkpointed_state(
    config: ml_collections.ConfigDict, ex: Any, state: Any, ts: Any = None
) -> Any:
    """The TrainState a checkpoint holds (and a restore is shaped and placed like): `ts`
    (`ex.to_train_state(state)`, made if not given), or spread over the mesh
    (`spread_checkpoints`): each process writes and reads only its shards, and nothing
    is gathered onto a host."""
    if spread_checkpoints(config):
        return ex.to_train_state(state, spread=True)
    return ex.to_train_state(state) if ts is None else ts


def call_sizes(start: int, end: int, per_call: int) -> list[int]:
    """The steps of each executor call from step `start` to `end`: calls end on
    multiples of `per_call` (where evaluations and checkpoints fall), so a run resumed
    from a stop_after cut between them first completes the cut call."""
    edges = [start, *range((start // per_call + 1) * per_call, end, per_call), end]
    return [b - a for a, b in itertools.pairwise(edges) if b > a]


def batch_placement(
    config: ml_collections.ConfigDict, ex: Any, *, stacked: bool = False
) -> Callable[[Any], Any]:
    """How this process's rows of a batch (`train_shard`; T × rows × ... if `stacked`)
    are placed before the executor's call, on the feeding thread: assembled into the
    global batch on the mesh (the single-program step's data mesh, or spmd's microbatches
    over (stage, data), `SPMDExecutor.place`); mpmd places each microbatch on its
    stage's devices itself, from the whole host batch."""
    if config.executor == "spmd":
        return lambda batch: ex.place(batch, stacked=stacked)
    if config.executor != "simulated":
        return lambda batch: batch
    mesh = ex.mesh
    if mesh is None:
        return jax.device_put
    return lambda batch: global_batch(batch, mesh, stacked=stacked)


def train_shard(config: ml_collections.ConfigDict, ex: Any) -> tuple[int, int, int]:
    """(index, count, microbatches) of the rows of every training batch this process
    reads (`ilbp.data.batches`): its block of the data mesh, of each of spmd's
    microbatches; all of the batch for mpmd, which runs in one process."""
    if config.executor == "spmd":
        return (*process_batch_shard(ex.mesh), int(config.microbatches))
    if config.executor == "simulated" and ex.mesh is not None:
        return (*process_batch_shard(ex.mesh), 1)
    return 0, 1, 1


def batch_iterator(
    config: ml_collections.ConfigDict, ex: Any, train_src: Any
) -> data.BatchIterator:
    """This process's training batches: its shard, the config's augmentation, and the
    microbatch split the executor needs (see `train_shard`)."""
    index, count, microbatches = train_shard(config, ex)
    return data.batches(
        train_src,
        int(config.batch_size),
        seed=int(config.seed),
        augment=datasets.train_augment(config, train_src.info),
        process_index=index,
        process_count=count,
        microbatches=microbatches,
    )


def _start(
    config: ml_collections.ConfigDict,
    built: builders.Built,
    train_src: Any,
    ckpts: Checkpoints,
    latest: int | None,
) -> tuple[data.BatchIterator, Any, int]:
    """(this process's batch iterator, executor state, first step): the initial state,
    or checkpoint `latest` with the iterator moved to its data step."""
    ex = built.executor
    it = batch_iterator(config, ex, train_src)
    _, count, _ = train_shard(config, ex)
    first = it.batch_at(0)
    if config.executor == "spmd":  # its init checks the global batch's split; the
        # parameters depend on the example shapes only
        first = jax.tree.map(lambda x: np.concatenate([x] * count), first)
    state = builders.initial_state(built, config, first)
    if latest is None:
        return it, state, 0
    ts, meta = ckpts.restore(latest, checkpointed_state(config, ex, state))
    it.step = int(meta["data_step"])
    return it, ex.from_train_state(ts), latest


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None
) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if it has checkpoints) and evaluates.

    Args:
      config: an experiment config (see experiments/configs).
      workdir: where checkpoints, metrics.jsonl, tensorboard/ and summary.json go.
      stop_after: stop (with a checkpoint) once this many steps are done, as if
        interrupted; no final evaluation then.

    Returns:
      The summary (also in WORKDIR/summary.json): final test metrics of every head,
      median step time, and what was run.

    Raises:
      ValueError (bad config), ilbp.data.DataMissingError, ExperimentError subclasses
      (unwritable workdir, incompatible or corrupt checkpoint, non-finite loss).
    """
    workdir, train_src, test_src, final_src, finished, ckpts, latest = open_run(config, workdir)
    if finished:  # not trained or evaluated again
        return finished
    info = train_src.info
    built = builders.build(config, info)
    K, T = built.model.num_stages, int(config.num_train_steps)
    it, state, start = _start(config, built, train_src, ckpts, latest)
    _record_config(config, workdir, start)
    text = info.kind == "text"
    writer = MetricWriter(workdir, enabled=is_primary())
    end = T if stop_after is None else min(T, int(stop_after))
    wall = time.perf_counter()
    bar = tqdm(
        total=T, initial=start, desc=f"train {built.strategy.name}", unit="step",
        disable=not (config.progress_bar and is_primary()), dynamic_ncols=True,
    )  # fmt: skip
    loop = _Loop(config, built, ckpts, writer, test_src, bar, text)
    try:
        state = loop.run(state, it, start, end)
        if end < T:
            return {"stopped_at": end, "workdir": workdir}
        bar.close()
        final = _final_evaluation(config, built, state, final_src, progress=not bar.disable)
        writer.write("eval", T, final)
        writer.write("final", T, final)
    finally:
        it.close()
        bar.close()
        ckpts.close()
        writer.close()
    summary = {
        "name": config.name, "strategy": built.strategy.name, "num_stages": K,
        "seed": int(config.seed), "steps": T, "resumed_from": start,
        "test_examples": len(final_src), "metric": "perplexity" if text else "accuracy",
        "test": final, "fingerprint": fingerprint(config, info),
    }  # fmt: skip
    return records.write_summary(workdir, summary, loop.step_times, time.perf_counter() - wall)


class OpenRun(NamedTuple):
    """A run's workdir (absolute), data sources, and either its summary (`finished`, no
    checkpoints opened) or its Checkpoints and the step to resume from (None: fresh)."""

    workdir: str
    train_src: Any
    test_src: Any
    final_src: Any  # the test examples of the final evaluation
    finished: dict[str, Any] | None
    ckpts: Checkpoints | None = None
    latest: int | None = None


def _record_config(config: ml_collections.ConfigDict, workdir: str, start: int) -> None:
    """Writes WORKDIR/config.json (process 0) and says where a resumed run starts."""
    if not is_primary():
        return
    if start:
        print(f"Resuming {workdir} from step {start}.", file=sys.stderr)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _final_evaluation(
    config: ml_collections.ConfigDict,
    built: builders.Built,
    state: Any,
    final_src: Any,
    progress: bool,
) -> dict[str, float]:
    """Every head's metrics on all of `final_src` (with bits per byte for byte text)."""
    info = final_src.info
    final = evaluate(
        built.eval_step, built.executor.to_train_state(state), final_src,
        int(config.eval_batch_size), mesh=built.mesh, desc="final eval", progress=progress,
        text=info.kind == "text",
    )  # fmt: skip
    return with_bits_per_byte(final, info.token_bytes)


def open_run(config: ml_collections.ConfigDict, workdir: str) -> OpenRun:
    """Checks `config`, reads its data, then opens `workdir` and its checkpoints, in
    that order, so that bad input fails before any file is written; a finished run
    (`records.read_finished`) opens no checkpoints."""
    validation.validate(config)
    train_src = datasets.build_data(config, "train")
    test_src = datasets.build_data(config, "test")
    validation.check_data(config, train_src)
    final_examples = int(config.get("final_eval_examples", 0))
    final_src = Prefix(test_src, final_examples) if final_examples else test_src
    workdir = prepare_workdir(workdir)
    wanted, steps = fingerprint(config, train_src.info), int(config.num_train_steps)
    summary = records.read_finished(workdir, wanted, steps, len(final_src))
    sources = (workdir, train_src, test_src, final_src)
    if agreed(summary is not None and "fingerprint" in summary, f"whether {workdir} is done"):
        return OpenRun(*sources, finished=summary)
    ckpts = Checkpoints(workdir, wanted, int(config.max_to_keep))
    try:
        latest = resumable_step(ckpts, steps)
    except ExperimentError:
        ckpts.close()
        raise
    if agreed(summary is not None and latest == steps, f"whether {workdir} is done"):
        ckpts.close()  # finished before summaries recorded fingerprints: record the one
        # its final checkpoint agrees on, and drop the path that older summaries held
        record = {k: v for k, v in summary.items() if k != "workdir"}
        summary = records.save_summary(workdir, {**record, "fingerprint": wanted})
        return OpenRun(*sources, finished=summary)
    return OpenRun(*sources, finished=None, ckpts=ckpts, latest=latest)
