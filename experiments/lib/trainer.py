"""One training run: `train_and_evaluate(config, workdir)`, resumable from its workdir.

Order of work, so that bad input fails before anything expensive or destructive:
config checks -> data present and usable -> workdir writable -> checkpoint compatible
-> compile and train. A workdir with checkpoints resumes from the latest (a fresh start
never overwrites them); one whose checkpoints were trained differently (`fingerprint`)
is refused, naming each differing field.

Step s means "after s updates". Checkpoints hold the gathered TrainState and the data
iterator's step, so a resumed run sees the same batches and reproduces the
uninterrupted run exactly (bitwise on CPU). A non-finite loss stops the run before
anything of that step is checkpointed.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from experiments.lib import builders
from experiments.lib.checkpoints import (
    Checkpoints,
    ExperimentError,
    IncompatibleCheckpointError,
    prepare_workdir,
)
from experiments.lib.metrics import MetricWriter, Prefix, evaluate
from ilbp import data

SUMMARY_FILE = "summary.json"


class NonFiniteLossError(ExperimentError, FloatingPointError):
    """A loss became NaN or infinite; the message names the step and stage."""


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
        "model": builders.model_fields(config, info),
        "strategy": builders.build_strategy(config).name,
        "aux_weight": float(config.aux_weight),
        "dataset": config.dataset,
        **size,
        "augment": builders.train_augment(config, info),
        "optimizer": opt.name,
        **{f"optimizer.{name}": opt[name] for name in builders.OPTIMIZER_FIELDS[opt.name]},
        "batch_size": int(config.batch_size),
        "microbatches": int(config.microbatches),
        "seed": int(config.seed),
        "num_train_steps": builders.schedule_steps(config),
    }
    return json.loads(json.dumps(fields))  # as a checkpoint's metadata reads back


def resumable_step(ckpts: Checkpoints, num_train_steps: int) -> int | None:
    """The step of the latest checkpoint if the config may resume from it (None: start
    fresh). IncompatibleCheckpointError, before any file is changed, if not."""
    latest = ckpts.latest_step()
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


def first_nonfinite(metrics: dict[str, Any], num_stages: int) -> tuple[int, str, float] | None:
    """(stage k, metric name, value) of the earliest stage with a non-finite loss/grad."""
    for k in range(num_stages):
        loss = "loss" if k == num_stages - 1 else f"aux/{k}/loss"
        for name in (loss, f"grad_norm/{k}"):
            value = float(metrics.get(name, 0.0))
            if not math.isfinite(value):
                return k, name, value
    return None


def _log_step(
    writer: MetricWriter,
    metrics: dict[str, Any],
    step: int,
    end: int,
    config: ml_collections.ConfigDict,
    K: int,
    ckpts: Checkpoints,
    schedule: Any,
    step_time: float,
) -> None:
    """Writes step `step`'s train metrics when due; NonFiniteLossError if one is NaN/inf."""
    done = step + 1
    bad = first_nonfinite(metrics, K)
    if bad or done % int(config.log_every_steps) == 0 or done == end:
        record = {k: float(np.asarray(v)) for k, v in metrics.items()}
        record.update(step_time=step_time, learning_rate=schedule(step))
        writer.write("train", done, record)
    if bad:
        k, name, value = bad
        kept = ckpts.latest_step()
        raise NonFiniteLossError(
            f"{name} = {value} at step {done}, stage {k} (of K={K}); training stopped. "
            + (
                f"The last good checkpoint (step {kept}) is kept in {ckpts.directory}. "
                if kept is not None
                else "No checkpoint had been written yet. "
            )
            + "Lower --config.optimizer.learning_rate or set --config.optimizer.grad_clip_norm."
        )


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
    workdir, train_src, test_src, ckpts, latest = open_run(config, workdir)
    info = train_src.info
    built = builders.build(config, info)
    ex, K, T = built.executor, built.model.num_stages, int(config.num_train_steps)
    it = data.batches(
        train_src,
        int(config.batch_size),
        seed=int(config.seed),
        augment=builders.train_augment(config, info),
    )
    state = builders.initial_state(built, config, it.batch_at(0))
    start = 0
    if latest is not None:
        ts, meta = ckpts.restore(latest, ex.to_train_state(state))
        state, start, it.step = ex.from_train_state(ts), latest, int(meta["data_step"])
        print(f"Resuming {workdir} from step {start}.", file=sys.stderr)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    text = info.kind == "text"
    final_examples = int(config.get("final_eval_examples", 0))
    final_src = Prefix(test_src, final_examples) if final_examples else test_src
    schedule = builders.learning_rate_schedule(config)
    writer = MetricWriter(workdir)
    end = T if stop_after is None else min(T, int(stop_after))
    step_times: list[float] = []
    wall = time.perf_counter()
    bar = tqdm(
        total=T, initial=start, desc=f"train {built.strategy.name}", unit="step",
        disable=not config.progress_bar, dynamic_ncols=True,
    )  # fmt: skip
    per_call = int(config.steps_per_call)
    step = start
    try:
        while step < end:
            # `per_call` steps in one call (spmd: overlapped); eval and checkpoint
            # intervals are multiples of it, so only a stop_after cut is shorter.
            n = min(per_call, end - step)
            t0 = time.perf_counter()
            state, per_step = _call(ex, state, it, n, per_call)
            step_time = (time.perf_counter() - t0) / n
            if step > start:  # this process's first call includes compilation
                step_times.append(step_time)
            for i, metrics in enumerate(per_step):
                _log_step(writer, metrics, step + i, end, config, K, ckpts, schedule, step_time)
                bar.update(1)
                bar.set_postfix(loss=f"{float(metrics['loss']):.4g}", refresh=False)
            step += n
            done = step
            if config.eval_every_steps and done % config.eval_every_steps == 0 and done < T:
                subset = Prefix(test_src, config.eval_examples or len(test_src))
                ts = ex.to_train_state(state)
                writer.write(
                    "eval",
                    done,
                    evaluate(
                        built.eval_step, ts, subset, int(config.eval_batch_size),
                        desc=f"eval@{done}", progress=config.progress_bar, text=text,
                    ),
                )  # fmt: skip
            if done % int(config.checkpoint_every_steps) == 0 or done == end:
                ckpts.save(done, ex.to_train_state(state), it.step)
        if end < T:
            return {"stopped_at": end, "workdir": workdir}
        bar.close()
        final = evaluate(
            built.eval_step, ex.to_train_state(state), final_src, int(config.eval_batch_size),
            desc="final eval", progress=config.progress_bar, text=text,
        )  # fmt: skip
        writer.write("eval", T, final)
        writer.write("final", T, final)
    finally:
        bar.close()
        ckpts.close()
        writer.close()
    summary = {
        "name": config.name,
        "strategy": built.strategy.name,
        "num_stages": K,
        "seed": int(config.seed),
        "steps": T,
        "resumed_from": start,
        "test_examples": len(final_src),
        "metric": "perplexity" if text else "accuracy",
        "test": final,
    }
    return _write_summary(workdir, summary, step_times, time.perf_counter() - wall)


def _call(ex: Any, state: Any, it: data.BatchIterator, n: int, per_call: int) -> tuple:
    """`n` steps in one executor call (overlapped by spmd's `steps` if per_call > 1):
    (the new state, a host dict of metrics per step)."""
    if per_call == 1:
        state, metrics = ex.step(state, next(it))
        return state, [jax.device_get(metrics)]
    batches = [next(it) for _ in range(n)]
    state, metrics = ex.steps(state, jax.tree.map(lambda *xs: np.stack(xs), *batches))
    metrics = jax.device_get(metrics)
    return state, [{name: v[i] for name, v in metrics.items()} for i in range(n)]


def open_run(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[str, Any, Any, Checkpoints, int | None]:
    """Checks `config`, reads its data, then opens `workdir` and its checkpoints, in
    that order, so that bad input fails before any file is written.

    Returns (workdir's absolute path, train source, test source, its Checkpoints, the
    step to resume from or None).
    """
    builders.validate(config)
    train_src = builders.build_data(config, "train")
    test_src = builders.build_data(config, "test")
    builders.check_data(config, train_src)
    workdir = prepare_workdir(workdir)
    ckpts = Checkpoints(workdir, fingerprint(config, train_src.info), int(config.max_to_keep))
    try:
        latest = resumable_step(ckpts, int(config.num_train_steps))
    except ExperimentError:
        ckpts.close()
        raise
    return workdir, train_src, test_src, ckpts, latest


def _write_summary(
    workdir: str, summary: dict[str, Any], step_times: list[float], wall_time: float
) -> dict[str, Any]:
    """Adds timing and the workdir to `summary` and writes WORKDIR/summary.json."""
    # A run resumed at its end keeps the step time and wall time it measured.
    previous = {"step_time_s": float("nan"), "wall_time_s": 0.0}
    if not step_times and os.path.exists(os.path.join(workdir, SUMMARY_FILE)):
        with open(os.path.join(workdir, SUMMARY_FILE)) as f:
            previous.update({k: v for k, v in json.load(f).items() if k in previous})
    summary = {
        **summary,
        "step_time_s": statistics.median(step_times) if step_times else previous["step_time_s"],
        "wall_time_s": wall_time + previous["wall_time_s"],
        "workdir": workdir,
    }
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the console: final test metrics of every head and timing."""
    test, K = summary["test"], summary["num_stages"]
    metric = summary["metric"]
    lines = [
        f"{summary['name']} | {summary['strategy']} | K={K} | seed {summary['seed']} | "
        f"{summary['steps']} steps | {summary['test_examples']} test examples",
        f"  final head: {metric} {test[metric]:.4f}"
        + (f", accuracy {test['accuracy']:.4f}" if metric != "accuracy" else "")
        + f", loss {test['loss']:.4f}",
    ]
    for k in range(K - 1):
        lines.append(
            f"  aux head {k}: accuracy {test[f'aux/{k}/accuracy']:.4f}, "
            f"loss {test[f'aux/{k}/loss']:.4f}"
        )
    lines.append(
        f"  step time {summary['step_time_s'] * 1e3:.1f} ms (median), "
        f"wall {summary['wall_time_s']:.1f} s, workdir {summary['workdir']}"
    )
    return "\n".join(lines)
