"""`compare(config, workdir)`: every strategy x seed, then results.md, .csv and a plot.

Run r of strategy s and seed i trains in WORKDIR/<s>/seed<i> (so an interrupted
comparison resumes run by run). Outputs in WORKDIR:
  results.md   per-strategy table (mean ± sample std over seeds) and per-run table
  results.csv  the per-strategy table; runs.csv the per-run numbers
  test_<metric>.png  the test metric against step, one colour per strategy
Predicted throughput comes from the schedule model (`ilbp.schedule.simulate`): steps
per unit time of the strategy on K devices relative to global backprop, equal stages.
"""

from __future__ import annotations

import csv
import itertools
import os
import statistics
from typing import Any

import ml_collections

from experiments.lib import builders, trainer
from experiments.lib.checkpoints import Checkpoints, prepare_workdir
from experiments.lib.metrics import METRICS_FILE, read_metrics
from ilbp import data, schedule
from ilbp.strategy import Strategy


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"config.compare.{what} is empty; give a comma-separated list.")
    return items


def run_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """One config per (strategy, seed) of `config.compare`; ValueError on bad names.

    A strategy named with its rule (`pairwise:sum`) runs that rule; one without runs
    the config's `combine`.
    """
    specs = parse_list(config.compare.strategies, "strategies")
    seeds = parse_list(config.compare.seeds, "seeds")
    if not all(s.isdigit() for s in seeds):
        raise ValueError(f"config.compare.seeds must be integers; got {config.compare.seeds!r}.")
    runs = []
    for spec in specs:
        Strategy.parse(spec)  # ValueError naming the accepted names
        base, _, rule = spec.partition(":")
        for seed in seeds:
            c = ml_collections.ConfigDict(config.to_dict())
            c.strategy = Strategy.parse(base).name
            c.combine, c.seed = rule or config.combine, int(seed)
            builders.validate(c)
            runs.append(c)
    return runs


def run_dir(workdir: str, c: ml_collections.ConfigDict) -> str:
    """WORKDIR/<strategy>[_aux<w>]/seed<i>: the strategy (window, rule, aux-loss weight)
    and the seed, which a comparison varies, name the directory, so a comparison under
    another of them never resumes these runs; any other change is refused by the
    checkpoint fingerprint."""
    name = builders.build_strategy(c).name.replace(":", "_")
    if float(c.aux_weight) != 1.0:
        name += f"_aux{float(c.aux_weight):g}"
    return os.path.join(workdir, name, f"seed{c.seed}")


def preflight(runs: list[ml_collections.ConfigDict], workdir: str, info: data.DatasetInfo) -> None:
    """Refuses (before any training) if some run's existing checkpoint is incompatible."""
    for c in runs:
        directory = run_dir(workdir, c)
        if not os.path.isdir(os.path.join(directory, "checkpoints")):
            continue
        ckpts = Checkpoints(directory, trainer.fingerprint(c, info))
        try:
            trainer.resumable_step(ckpts, int(c.num_train_steps))
        finally:
            ckpts.close()


def predicted_speedups(strategies: list[str], num_stages: int, microbatches: int) -> dict:
    """Schedule-model throughput of each strategy on K devices relative to global."""
    base = schedule.simulate("global", num_stages, microbatches).period
    return {s: base / schedule.simulate(s, num_stages, microbatches).period for s in strategies}


def _mean_std(values: list[float]) -> tuple[float, float]:
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return statistics.fmean(values), std


def aggregate(summaries: list[dict[str, Any]], speedups: dict[str, float]) -> list[dict]:
    """Per-strategy rows: mean and sample std of the final metric, aux accuracies, time."""
    rows = []
    for name in dict.fromkeys(s["strategy"] for s in summaries):
        runs = [s for s in summaries if s["strategy"] == name]
        metric, K = runs[0]["metric"], runs[0]["num_stages"]
        mean, std = _mean_std([r["test"][metric] for r in runs])
        row = {"strategy": name, "seeds": len(runs), f"test_{metric}_mean": mean}
        row[f"test_{metric}_std"] = std
        trains_heads = Strategy.parse(name).aux_heads  # e2e's heads stay untrained: NaN
        for k in range(K - 1):
            row[f"aux{k}_accuracy_mean"] = (
                statistics.fmean(r["test"][f"aux/{k}/accuracy"] for r in runs)
                if trains_heads
                else float("nan")
            )
        row["step_time_ms_mean"] = 1e3 * statistics.fmean(r["step_time_s"] for r in runs)
        row[f"predicted_throughput_vs_global_K{K}"] = speedups[name]
        rows.append(row)
    return rows


def render_markdown(rows: list[dict], summaries: list[dict], config) -> tuple[str, str]:
    """(the per-strategy table and ranking, which `compare` prints; all of results.md)."""
    metric, K = summaries[0]["metric"], summaries[0]["num_stages"]
    s0 = summaries[0]
    head = [
        "strategy",
        f"test {metric} (mean ± std)",
        f"aux acc (k=0..{K - 2})",
        "step (ms)",
        f"pred. ×global (K={K})",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        aux = " / ".join(f"{r[f'aux{k}_accuracy_mean']:.3f}" for k in range(K - 1))
        aux = aux.replace("nan", "—")
        lines.append(
            f"| {r['strategy']} | {r[f'test_{metric}_mean']:.4f} ± {r[f'test_{metric}_std']:.4f} "
            f"| {aux} | {r['step_time_ms_mean']:.0f} "
            f"| {r[f'predicted_throughput_vs_global_K{K}']:.2f} |"
        )
    table = "\n".join(lines)
    better = (lambda v: -v) if metric == "perplexity" else (lambda v: v)
    ranked = sorted(rows, key=lambda r: -better(r[f"test_{metric}_mean"]))
    ranking = " > ".join(r["strategy"] for r in ranked)
    gaps = []
    for a, b in itertools.pairwise(ranked):
        (ma, sa), (mb, sb) = ((r[f"test_{metric}_mean"], r[f"test_{metric}_std"]) for r in (a, b))
        within = not abs(ma - mb) > sa + sb  # NaN std (one seed) counts as "within"
        gaps.append(
            f"{a['strategy']} − {b['strategy']} = {ma - mb:+.4f} "
            f"({'within' if within else 'beyond'} the sum of their stds)"
        )
    runs = [
        "| strategy | seed | test " + metric + " | step time (ms) | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        runs.append(
            f"| {s['strategy']} | {s['seed']} | {s['test'][metric]:.4f} "
            f"| {1e3 * s['step_time_s']:.0f} | {s['wall_time_s']:.0f} |"
        )
    summary = f"{table}\n\nRanking by mean test {metric}: {ranking}; " + "; ".join(gaps) + "."
    return summary, "\n".join(
        [
            f"# {config.name}: strategies compared",
            "",
            f"K={K} stages, {s0['steps']} steps of batch {config.batch_size}, "
            f"{len(summaries) // len(rows)} seeds; final numbers on all {s0['test_examples']} "
            "test examples. std: sample standard deviation over seeds. Step time: median "
            "of one single-program step on this machine (all stages in one jit; noisy on a "
            "shared machine). aux acc: each aux head's test accuracy, mean over seeds. "
            "pred. ×global: throughput relative to global that the schedule model predicts "
            f"with one device per stage, equal stages, M={config.microbatches}. "
            "The plot's curve uses the first "
            f"{config.eval_examples or 'all'} test examples every {config.eval_every_steps} "
            "steps; its last point is the final evaluation.",
            "",
            summary,
            "",
            "## Runs",
            "",
            "\n".join(runs),
            "",
        ]
    )


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(path: str, summaries: list[dict], metric: str) -> None:
    """Test metric against step: thin line per seed, thick line for the seed mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(dict.fromkeys(s["strategy"] for s in summaries))
    for i, name in enumerate(names):
        color = f"C{i}"
        curves = []
        for s in (s for s in summaries if s["strategy"] == name):
            records = read_metrics(os.path.join(s["workdir"], METRICS_FILE))
            points = [(r["step"], r[metric]) for r in records if r["kind"] == "eval"]
            curves.append(dict(points))
            ax.plot(*zip(*points), color=color, alpha=0.3, lw=1)
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [statistics.fmean(c[t] for c in curves) for t in steps]
        ax.plot(steps, mean, color=color, lw=2, marker="o", ms=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{summaries[0]['name']}, K={summaries[0]['num_stages']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, list[dict]]:
    """Trains every (strategy, seed) of `config.compare` and writes the report.

    Returns (the per-strategy markdown table, the per-strategy rows).
    """
    runs = run_configs(config)
    train = builders.build_data(runs[0], "train")
    builders.check_data(runs[0], train)
    workdir = prepare_workdir(workdir)
    preflight(runs, workdir, train.info)
    summaries = []
    for c in runs:
        summary = trainer.train_and_evaluate(c, run_dir(workdir, c))
        print(trainer.format_summary(summary), flush=True)
        summaries.append(summary)
    names = list(dict.fromkeys(s["strategy"] for s in summaries))
    speedups = predicted_speedups(names, int(config.num_stages), int(config.microbatches))
    rows = aggregate(summaries, speedups)
    table, markdown = render_markdown(rows, summaries, config)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown)
    write_csv(os.path.join(workdir, "results.csv"), rows)
    per_run = [
        {"strategy": s["strategy"], "seed": s["seed"], **s["test"], "step_time_s": s["step_time_s"]}
        for s in summaries
    ]
    write_csv(os.path.join(workdir, "runs.csv"), per_run)
    metric = summaries[0]["metric"]
    plot(os.path.join(workdir, f"test_{metric}.png"), summaries, metric)
    return table, rows
