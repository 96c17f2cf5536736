"""What a comparison writes: results.md's markdown, the CSVs and the figures.

`experiments.lib.report.compare` trains and aggregates; this module turns its rows and
run summaries into WORKDIR's files (listed in report's docstring).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import os
import statistics
from collections.abc import Mapping
from typing import Any

from experiments.lib.metrics import METRICS_FILE, read_metrics
from ilbp import costs
from ilbp.schedule_graph import OpKind

# Time to quality: reach this fraction of the reference's final quality (accuracy ×
# 0.98; loss ÷ 0.98 for LMs).
QUALITY_FRACTION = 0.98
COMMAND_FILE = "command.txt"


@dataclasses.dataclass(frozen=True)
class QualityTarget:
    """What time to quality measures: `metric` of the eval records reaching `value`."""

    reference: str
    metric: str
    value: float
    higher_is_better: bool

    def describe(self) -> str:
        relation = "≥" if self.higher_is_better else "≤"
        scale = f"{QUALITY_FRACTION:g} ×" if self.higher_is_better else f"1/{QUALITY_FRACTION:g} ×"
        return (
            f"test {self.metric} {relation} {self.value:.4f} ({scale} {self.reference}'s final "
            "mean)"
        )


def eval_curve(summary: dict[str, Any], metric: str) -> list[tuple[int, float]]:
    """(step, value) of a run's eval records (the last one is the final evaluation)."""
    records = read_metrics(os.path.join(summary["workdir"], METRICS_FILE))
    return [(r["step"], r[metric]) for r in records if r["kind"] == "eval"]


def aux_metrics(metric: str) -> tuple[str, ...]:
    """The aux heads' metrics a report gives: accuracy, and the loss for LMs."""
    return ("accuracy", "loss") if metric == "perplexity" else ("accuracy",)


def _spread(mean: float, std: float) -> str:
    """mean ± std, or the mean alone with (n=1) when one seed gives no spread."""
    return f"{mean:.4f} (n=1)" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _gap(a: dict, b: dict, metric: str) -> str:
    """`a − b` of the mean test metric, and whether it is beyond the seeds' spread."""
    (ma, sa), (mb, sb) = ((r[f"test_{metric}_mean"], r[f"test_{metric}_std"]) for r in (a, b))
    if math.isnan(sa) or math.isnan(sb):
        verdict = "one seed: no spread to judge it by"
    else:
        verdict = f"{'beyond' if abs(ma - mb) > sa + sb else 'within'} the sum of their stds"
    return f"{a['strategy']} − {b['strategy']} = {ma - mb:+.4f} ({verdict})"


def format_seconds(x: float) -> str:
    """A duration with a readable unit."""
    if x != x:  # NaN
        return "nan"
    if x == 0:
        return "0 s"
    for unit, scale in (("h", 3600.0), ("min", 60.0), ("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x / 1e-9:.3g} ns"


def format_bytes(x: float) -> str:
    """A size in bytes with a readable binary unit."""
    for unit, scale in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} B"


def time_to_target_cell(mean: float, std: float, reached: str) -> str:
    """Time to target over seeds: mean ± std (no spread from one seed) and
    `reached` ("seeds that reached it/all"); "not reached" when no seed did."""
    if reached.startswith("0/") or math.isnan(mean):
        return f"not reached ({reached})"
    spread = "" if math.isnan(std) else f" ± {format_seconds(std)}"
    return f"{format_seconds(mean)}{spread} ({reached})"


def _time_to_target(r: dict) -> str:
    mean, std = r["time_to_target_s_mean"], r["time_to_target_s_std"]
    return time_to_target_cell(mean, std, r["target_reached"])


def _vs_pipeline(r: dict) -> str:
    if not r["pred_pipeline"]:
        return "— (none fits)"
    return (
        f"{r['pred_vs_pipeline']:.2f} ({r['pred_pipeline']}, M={r['pred_pipeline_microbatches']})"
    )


def render_predictions(rows: list[dict], K: int) -> str:
    """The predicted-throughput table: step time, memory, both baselines with memory."""
    lines = [
        f"| strategy | M | pred. step (K={K}) | activations / device | ×e2e split, M=1 "
        "| best e2e pipeline within memory | its activations / device | ×it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = (
            f"{r['pred_pipeline']}, M={r['pred_pipeline_microbatches']}"
            if r["pred_pipeline"]
            else "none fits"
        )
        lines.append(
            f"| {r['strategy']} | {r['pred_microbatches']} "
            f"| {format_seconds(r['pred_step_time_s'])} "
            f"| {r['pred_activation_MiB']:.3g} MiB | {r['pred_vs_e2e_split_M1']:.2f} | {best} "
            f"| {r['pred_pipeline_activation_MiB']:.3g} MiB | {r['pred_vs_pipeline']:.2f} |"
        )
    return "\n".join(lines)


_COST_COLUMNS = tuple(OpKind)  # F, A, V, W, B, U


def render_stage_costs(
    by_strategy: Mapping[str, costs.StageCosts],
    hardware: costs.Hardware = costs.DEFAULT_HARDWARE,
) -> str:
    """The per-stage op costs behind the predictions, one table per distinct set of
    costs (strategies whose stages are cut alike share one), in seconds on `hardware`."""
    groups: dict[int, tuple[list[str], costs.StageCosts]] = {}
    for name, stage_costs in by_strategy.items():
        groups.setdefault(id(stage_costs), ([], stage_costs))[0].append(name)
    first = next(iter(groups.values()))[1]
    source = "XLA's FLOP count over the peak" if first.unit == "flop" else "measured"
    parts = [
        f"Each stage's ops on one step's batch of {first.batch_size} as one microbatch, "
        f"on {hardware.name} ({source}): F forward, A aux head (forward and backward), "
        "V input VJP, W parameter VJP, B both VJPs as one op, U update; send: h_k over "
        "the link to stage k + 1 (its cotangent returns at the same size); residuals: the "
        "forward residuals one example leaves on the stage. The predictions above are "
        "built from these."
    ]
    for names, stage_costs in groups.values():
        if len(groups) > 1:
            parts.append(f"{', '.join(names)}:")
        parts.append(_stage_costs_table(stage_costs, hardware))
    return "\n\n".join(parts)


def _stage_costs_table(stage_costs: costs.StageCosts, hardware: costs.Hardware) -> str:
    def time(seconds: float) -> str:
        return format_seconds(seconds) if seconds > 0 else "—"

    kinds = " | ".join(kind.value for kind in _COST_COLUMNS)
    lines = [
        f"| stage | {kinds} | send h_k | residuals / example |",
        "|---|" + "---|" * (len(_COST_COLUMNS) + 2),
    ]
    last = stage_costs.num_stages - 1
    for k in range(stage_costs.num_stages):
        ops = " | ".join(time(stage_costs.seconds(kind, k, hardware)) for kind in _COST_COLUMNS)
        send = time(stage_costs.send_seconds(k, hardware)) if k < last else "—"
        residuals = format_bytes(stage_costs.residual_bytes[k])
        lines.append(f"| {k} | {ops} | {send} | {residuals} |")
    return "\n".join(lines)


def render_markdown(
    rows: list[dict],
    summaries: list[dict],
    config,
    target: QualityTarget,
    stage_costs: Mapping[str, costs.StageCosts] | None = None,
) -> tuple[str, str]:
    """(the per-strategy table and ranking, which `compare` prints; all of results.md).

    `stage_costs` (by strategy) adds the op costs behind the predictions."""
    metric, K = summaries[0]["metric"], summaries[0]["num_stages"]
    summary = f"{_strategy_table(rows, metric, K)}\n\n{_ranking(rows, metric)}"
    sections = [
        f"# {config.name}: strategies compared",
        _preamble(rows, summaries[0], config, target),
        summary,
        "## Predicted throughput",
        render_predictions(rows, K),
    ]
    if stage_costs:
        sections += ["### Per-stage op costs", render_stage_costs(stage_costs)]
    sections += ["## Runs", _runs_table(summaries, metric)]
    return summary, "\n\n".join(sections) + "\n"


def _strategy_table(rows: list[dict], metric: str, K: int) -> str:
    aux_metric = aux_metrics(metric)[-1]
    head = [
        "strategy",
        f"test {metric} (mean ± std)",
        f"aux {aux_metric} (k=0..{K - 2})",
        "step (ms)",
        "pred. ×e2e split, M=1",
        "pred. ×best e2e pipeline",
        "pred. time to target",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        aux = " / ".join(f"{r[f'aux{k}_{aux_metric}_mean']:.3f}" for k in range(K - 1))
        aux = aux.replace("nan", "—")
        spread = _spread(r[f"test_{metric}_mean"], r[f"test_{metric}_std"])
        lines.append(
            f"| {r['strategy']} | {spread} "
            f"| {aux} | {r['step_time_ms_mean']:.0f} | {r['pred_vs_e2e_split_M1']:.2f} "
            f"| {_vs_pipeline(r)} | {_time_to_target(r)} |"
        )
    return "\n".join(lines)


def _ranking(rows: list[dict], metric: str) -> str:
    better = (lambda v: -v) if metric == "perplexity" else (lambda v: v)
    ranked = sorted(rows, key=lambda r: -better(r[f"test_{metric}_mean"]))
    ranking = " > ".join(r["strategy"] for r in ranked)
    gaps = [_gap(a, b, metric) for a, b in itertools.pairwise(ranked)]
    return f"Ranking by mean test {metric}: {ranking}; " + "; ".join(gaps) + "."


def _runs_table(summaries: list[dict], metric: str) -> str:
    runs = [
        "| strategy | seed | test " + metric + " | step time (ms) | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        runs.append(
            f"| {s['strategy']} | {s['seed']} | {s['test'][metric]:.4f} "
            f"| {1e3 * s['step_time_s']:.0f} | {s['wall_time_s']:.0f} |"
        )
    return "\n".join(runs)


def _preamble(rows: list[dict], s0: dict, config, target: QualityTarget) -> str:
    """What the tables hold and how each column was measured or predicted."""
    aux_metric = aux_metrics(s0["metric"])[-1]
    return (
        f"K={s0['num_stages']} stages, {s0['steps']} steps of batch {config.batch_size}, "
        f"{_seed_counts(rows)} seeds; final numbers on all {s0['test_examples']} "
        "test examples. std: sample standard deviation over seeds. Step time: median "
        "of one single-program step on this machine (all stages in one jit; noisy on a "
        f"shared machine). aux {aux_metric}: each aux head's test {aux_metric}, mean "
        "over seeds. "
        "pred.: the schedule model fed with each stage's op costs (XLA cost analysis "
        f"of this model's per-stage ops on {costs.DEFAULT_HARDWARE.name}), one device per "
        f"stage, M={config.microbatches}: throughput relative to e2e with split "
        "backward at M = 1, and to the fastest e2e pipeline (1F1B or zero-bubble split "
        "backward, M ≤ 16) whose activation memory per device does not exceed the "
        f"strategy's. Time to target: predicted wall-clock until {target.describe()}, "
        "per seed (mean ± std; seeds that reached it / all). The curves use "
        f"{_curve_examples(config.eval_examples)} every {config.eval_every_steps} "
        "steps; their last point is the final evaluation."
    )


def _curve_examples(eval_examples: int) -> str:
    return f"the first {eval_examples} test examples" if eval_examples else "all test examples"


def _seed_counts(rows: list[dict]) -> str:
    counts = sorted({int(r["seeds"]) for r in rows})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]} (per strategy)"


def write_csv(path: str, rows: list[dict]) -> None:
    """`rows` as CSV; the columns are every key of any row, in first-seen order."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def curve_rows(summaries: list[dict]) -> list[dict]:
    """Every run's evaluations, in step order: kind "eval" (the config's eval_examples)
    and, at the last step, kind "final" (final_eval_examples); the train records stay
    in each run's metrics.jsonl."""
    rows = []
    for s in summaries:
        records = read_metrics(os.path.join(s["workdir"], METRICS_FILE))
        final_step = max(r["step"] for r in records)
        for r in records:
            if r["kind"] == "final" or (r["kind"] == "eval" and r["step"] < final_step):
                values = {k: v for k, v in r.items() if k not in ("kind", "step", "time")}
                rows.append({"strategy": s["strategy"], "seed": s["seed"], "step": r["step"],
                             "kind": r["kind"], **values})  # fmt: skip
    return rows


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


def plot_quality_vs_time(
    path: str,
    summaries: list[dict],
    predictions: dict[str, costs.Throughput],
    target: QualityTarget,
) -> None:
    """The quality metric's seed-mean eval curve against predicted wall-clock on K devices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(dict.fromkeys(s["strategy"] for s in summaries)):
        curves = [dict(eval_curve(s, target.metric)) for s in summaries if s["strategy"] == name]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [statistics.fmean(c[t] for c in curves) for t in steps]
        seconds = [t * predictions[name].step_time for t in steps]
        ax.plot(seconds, mean, color=f"C{i}", lw=2, marker="o", ms=3, label=name)
    ax.axhline(target.value, color="grey", ls="--", lw=1, label="target")
    ax.set_xlabel(f"predicted wall-clock (s, {costs.DEFAULT_HARDWARE.name})")
    ax.set_ylabel(f"test {target.metric}")
    ax.set_title(f"{summaries[0]['name']}, K={summaries[0]['num_stages']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    workdir: str,
    markdown: str,
    rows: list[dict],
    summaries: list[dict],
    predictions: dict[str, costs.Throughput],
    target: QualityTarget,
    command: str | None,
) -> None:
    """results.md, command.txt, results.csv, runs.csv and the two figures."""
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown)
    if command is not None:
        with open(os.path.join(workdir, COMMAND_FILE), "w") as f:
            f.write(command + "\n")
    write_csv(os.path.join(workdir, "results.csv"), rows)
    per_run = [
        {"strategy": s["strategy"], "seed": s["seed"], **s["test"], "step_time_s": s["step_time_s"]}
        for s in summaries
    ]
    write_csv(os.path.join(workdir, "runs.csv"), per_run)
    write_csv(os.path.join(workdir, "curves.csv"), curve_rows(summaries))
    metric = summaries[0]["metric"]
    plot(os.path.join(workdir, f"test_{metric}.png"), summaries, metric)
    plot_quality_vs_time(
        os.path.join(workdir, "quality_vs_time.png"), summaries, predictions, target
    )
