"""`compare(config, workdir)`: every strategy x seed, then results.md, .csv and a plot.

Run r of strategy s and seed i trains in WORKDIR/<s>/seed<i> (so an interrupted
comparison resumes run by run). Outputs in WORKDIR:
  results.md   per-strategy table (mean ± sample std over seeds), the predictions with
               the per-stage op costs behind them, and the per-run table
  results.csv  the per-strategy table; runs.csv the per-run numbers; curves.csv every
               run's evaluations by step
  test_<metric>.png  the test metric against step, one colour per strategy
  quality_vs_time.png  the quality metric against predicted wall-clock on K devices
  command.txt  the command that produced them (when `compare` is given it)
Predicted throughput comes from the model's own per-stage op costs (`ilbp.costs`: XLA
cost analysis of each stage's ops on one training batch, on `ilbp.costs.DEFAULT_HARDWARE`)
fed to the schedule model, one device per stage, against e2e with split backward at
M = 1 and against the fastest e2e pipeline (1F1B or zero-bubble split backward, any
M ≤ 16) whose activation memory per device does not exceed the strategy's. Time to
quality: the predicted wall-clock at which a run's eval curve first reaches
QUALITY_FRACTION of the reference strategy's final quality (accuracy; loss for LMs).
"""

from __future__ import annotations

import itertools
import os
import statistics
from typing import Any

import ml_collections

from experiments.configs import validation
from experiments.lib import datasets, models, optim, records, trainer
from experiments.lib.checkpoints import Checkpoints, prepare_workdir
from experiments.lib.distributed import agreed, is_primary
from experiments.lib.metrics import with_bits_per_byte
from experiments.lib.report_files import (
    QUALITY_FRACTION,
    QualityTarget,
    aux_metrics,
    eval_curve,
    render_markdown,
    write_report,
)
from ilbp import costs, data
from ilbp.strategy import Strategy

# The reference of time to quality: e2e if compared, else global, else the first strategy.
REFERENCES: tuple[str, ...] = ("e2e", "global")


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"config.compare.{what} is empty; give a comma-separated list.")
    return items


def run_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """One config per (seed, strategy) of `config.compare`, seed-major; ValueError on
    bad names.

    A strategy named with its rule (`pairwise:sum`) runs that rule; one without runs
    the config's `combine` (e2e, which has no aux losses, ignores `combine` and
    `aux_weight`).
    """
    specs = parse_list(config.compare.strategies, "strategies")
    seeds = parse_list(config.compare.seeds, "seeds")
    if not all(s.isdigit() for s in seeds):
        raise ValueError(f"config.compare.seeds must be integers; got {config.compare.seeds!r}.")
    for spec in specs:
        Strategy.parse(spec)  # ValueError naming the accepted names
    runs = []
    for seed in seeds:  # seed-major: an interrupted comparison has every strategy
        for spec in specs:
            base, _, rule = spec.partition(":")
            heads = Strategy.parse(base).aux_heads
            c = ml_collections.ConfigDict(config.to_dict())
            c.strategy = Strategy.parse(base).name
            c.combine, c.seed = rule or config.combine, int(seed)
            if not heads:  # e2e has no aux losses to combine or weight
                c.combine, c.aux_weight = "last", 1.0
            validation.validate(c)
            runs.append(c)
    return runs


def run_dir(workdir: str, c: ml_collections.ConfigDict) -> str:
    """WORKDIR/<strategy>[_aux<w>]/seed<i>: the strategy (window, rule, aux-loss weight)
    and the seed, which a comparison varies, name the directory, so a comparison under
    another of them never resumes these runs; any other change is refused by the
    checkpoint fingerprint."""
    name = models.build_strategy(c).name.replace(":", "_")
    if float(c.aux_weight) != 1.0:
        name += f"_aux{float(c.aux_weight):g}"
    return os.path.join(workdir, name, f"seed{c.seed}")


def preflight(runs: list[ml_collections.ConfigDict], workdir: str, info: data.DatasetInfo) -> None:
    """Refuses (before any training) if some run's existing checkpoint or finished
    summary is of another config. Every process of a job looks at the same runs, before
    any of them creates one."""
    for c in runs:
        directory = run_dir(workdir, c)
        records.read_finished(directory, trainer.fingerprint(c, info), int(c.num_train_steps))
        found = os.path.isdir(os.path.join(directory, "checkpoints"))
        if not agreed(found, f"whether {directory} has checkpoints"):
            continue
        ckpts = Checkpoints(directory, trainer.fingerprint(c, info))
        try:
            trainer.resumable_step(ckpts, int(c.num_train_steps))
        finally:
            ckpts.close()


def predict_runs(
    runs: list[ml_collections.ConfigDict],
) -> tuple[dict[str, costs.Throughput], dict[str, costs.StageCosts]]:
    """Each strategy's predicted throughput from its model's per-stage op costs at the
    config's K and M (module docstring), and those costs; both by strategy name."""
    first = runs[0]
    info = datasets.build_data(first, "train").info
    batch = data.batches(datasets.build_data(first, "train"), int(first.batch_size), seed=0)
    batch = batch.batch_at(0)
    optimizer = optim.build_optimizer(first)
    by_cuts: dict[tuple[str, ...], costs.StageCosts] = {}

    def costs_of(c: ml_collections.ConfigDict) -> costs.StageCosts:
        model = models.build_model(c, info)
        cuts = tuple(stage.name for stage in model.stages)  # balance="work" moves them
        if cuts not in by_cuts:
            by_cuts[cuts] = costs.stage_costs(model, optimizer, batch)
        return by_cuts[cuts]

    plain = ml_collections.ConfigDict(first.to_dict())
    plain.strategy, plain.combine, plain.aux_weight = "e2e", "last", 1.0
    e2e_costs = costs_of(plain)
    baselines = costs.pipeline_baselines(e2e_costs)
    out, op_costs = {}, {}
    for c in runs:
        strategy = models.build_strategy(c)
        if strategy.name not in out:
            op_costs[strategy.name] = costs_of(c)
            out[strategy.name] = costs.predict_throughput(
                strategy,
                op_costs[strategy.name],
                int(c.microbatches),
                e2e_costs=e2e_costs,
                baselines=baselines,
            )
    return out, op_costs


def quality_target(summaries: list[dict[str, Any]]) -> QualityTarget:
    """QUALITY_FRACTION of the reference strategy's final test quality (module docstring)."""
    names = list(dict.fromkeys(s["strategy"] for s in summaries))
    reference = next((r for r in REFERENCES if r in names), names[0])
    text = summaries[0]["metric"] == "perplexity"
    metric = "loss" if text else summaries[0]["metric"]
    final = statistics.fmean(s["test"][metric] for s in summaries if s["strategy"] == reference)
    value = final / QUALITY_FRACTION if text else final * QUALITY_FRACTION
    return QualityTarget(reference, metric, value, not text)


def times_to_quality(
    summaries: list[dict[str, Any]],
    predictions: dict[str, costs.Throughput],
    target: QualityTarget,
) -> dict[str, list[float | None]]:
    """Per strategy, each seed's predicted wall-clock (s) to reach the target."""
    out: dict[str, list[float | None]] = {}
    for s in summaries:
        step_time = predictions[s["strategy"]].step_time
        out.setdefault(s["strategy"], []).append(
            costs.time_to_quality(
                eval_curve(s, target.metric),
                step_time,
                target.value,
                higher_is_better=target.higher_is_better,
            )
        )
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return statistics.fmean(values), std


def aggregate(
    summaries: list[dict[str, Any]],
    predictions: dict[str, costs.Throughput],
    times: dict[str, list[float | None]],
) -> list[dict]:
    """Per-strategy rows: mean and sample std of the final metric, aux accuracies, time,
    predicted throughput and time to quality."""
    rows = []
    for name in dict.fromkeys(s["strategy"] for s in summaries):
        runs = [s for s in summaries if s["strategy"] == name]
        metric, K = runs[0]["metric"], runs[0]["num_stages"]
        mean, std = _mean_std([r["test"][metric] for r in runs])
        row = {"strategy": name, "seeds": len(runs), f"test_{metric}_mean": mean}
        row[f"test_{metric}_std"] = std
        trains_heads = Strategy.parse(name).aux_heads  # e2e's heads stay untrained: NaN
        for k, aux in itertools.product(range(K - 1), aux_metrics(metric)):
            row[f"aux{k}_{aux}_mean"] = (
                statistics.fmean(r["test"][f"aux/{k}/{aux}"] for r in runs)
                if trains_heads
                else float("nan")
            )
        row["step_time_ms_mean"] = 1e3 * statistics.fmean(r["step_time_s"] for r in runs)
        row.update(prediction_columns(predictions[name], times[name]))
        rows.append(row)
    return rows


def prediction_columns(t: costs.Throughput, times: list[float | None]) -> dict[str, Any]:
    """The results.csv columns of a strategy's prediction and time to quality."""
    reached = [x for x in times if x is not None]
    mean, std = _mean_std(reached) if reached else (float("nan"), float("nan"))
    best = t.pipeline
    return {
        "pred_microbatches": t.microbatches,
        "pred_step_time_s": t.step_time,
        "pred_activation_MiB": t.memory / 2**20,
        "pred_vs_e2e_split_M1": t.vs_e2e,
        "pred_pipeline": "" if best is None else best.schedule,
        "pred_pipeline_microbatches": 0 if best is None else best.microbatches,
        "pred_pipeline_activation_MiB": float("nan") if best is None else best.memory / 2**20,
        "pred_vs_pipeline": float("nan") if t.vs_pipeline is None else t.vs_pipeline,
        "time_to_target_s_mean": mean,
        "time_to_target_s_std": std,
        "target_reached": f"{len(reached)}/{len(times)}",
    }


def compare(
    config: ml_collections.ConfigDict,
    workdir: str,
    command: str | None = None,
    shard: tuple[int, int] = (0, 1),
    finished_only: bool = False,
) -> tuple[str, list[dict]] | None:
    """Trains every (strategy, seed) of `config.compare` and writes the report.

    `command`, if given, is the command line that ran this; it goes to command.txt.
    `shard=(i, n)` with n > 1 trains only runs i, i + n, i + 2n, ... (in `run_configs`
    order) and writes no report: n such processes train a
    comparison in parallel, and a run without `shard` then reports (finished runs are
    read back, not trained again).
    `finished_only` trains nothing: the report covers the runs that have finished
    (summary.json at num_train_steps) and lists the others as not yet finished, e.g.
    while shards still train a long comparison.
    In a multi-process job every process trains the same runs (each a multi-process
    run), and process 0 alone prints and writes the report.
    Returns (the per-strategy markdown table, the per-strategy rows), or None for a shard
    or a process other than 0.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 ≤ i < n.")
    runs = run_configs(config)
    train = datasets.build_data(runs[0], "train")
    validation.check_data(runs[0], train)
    workdir = prepare_workdir(workdir)
    preflight(runs, workdir, train.info)
    summaries, unfinished = [], []
    for c in runs[index::count]:
        if finished_only:
            fp, steps = trainer.fingerprint(c, train.info), int(c.num_train_steps)
            summary = records.read_finished(run_dir(workdir, c), fp, steps)
            if summary is None:
                unfinished.append(f"{models.build_strategy(c).name} seed {c.seed}")
                continue
            summaries.append(summary)
            continue
        summary = trainer.train_and_evaluate(c, run_dir(workdir, c))
        if is_primary():
            print(records.format_summary(summary), flush=True)
        summaries.append(summary)
    if count > 1 or not is_primary():
        return None
    if not summaries:
        raise ValueError(f"No run of this comparison has finished in {workdir} yet.")
    for s in summaries:  # runs finished before bits per byte were recorded
        s["test"] = with_bits_per_byte(s["test"], train.info.token_bytes)
    predictions, op_costs = predict_runs(runs)
    target = quality_target(summaries)
    rows = aggregate(summaries, predictions, times_to_quality(summaries, predictions, target))
    table, markdown = render_markdown(rows, summaries, config, target, op_costs)
    if unfinished:
        note = f"Not yet finished, so not in this report: {', '.join(unfinished)}."
        table, markdown = f"{table}\n\n{note}", f"{markdown.rstrip()}\n\n{note}\n"
    write_report(workdir, markdown, rows, summaries, predictions, target, command)
    return table, rows
