"""Fills the README's result tables from the committed `docs/results/<name>/` files.

    python -m scripts.results_tables            # rewrite README.md's tables
    python -m scripts.results_tables --check    # exit 1 if README.md is out of date

Each table sits between `<!-- results:<name> -->` and `<!-- /results -->` in README.md
and is generated from `docs/results/<name>/`, the output of `experiments.compare`:
runs.csv (every run's final test metrics), results.csv (per-strategy predictions and
time to quality) and command.txt (the command that produced them). Every test number
is the mean ± sample std over seeds, each aux head's the mean; the recovery ratio
(s − local)/(e2e − local) of every interlocking strategy s, in the quality metric (test
accuracy; test loss for LMs), is taken per seed, then averaged, and printed with its
denominator e2e − local, flagged as noise when that gap is within two sample std of 0.
A marker whose directory has no runs.csv yet (none, or still training) renders as a
one-line note.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import sys
from collections.abc import Iterator, Sequence

from experiments.lib.report_files import COMMAND_FILE, time_to_target_cell
from ilbp.strategy import Strategy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join("docs", "results")
MARKER = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _spread(values: Sequence[float], digits: int = 4) -> str:
    """mean ± sample std (n); the std is omitted for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f} (n={len(values)})"


def quality_metric(runs: list[dict[str, str]]) -> str:
    """Test accuracy for classifiers, test loss for LMs (runs with a perplexity)."""
    return "loss" if "perplexity" in runs[0] else "accuracy"


def _per_seed(
    runs: list[dict[str, str]], metric: str, strategies: Sequence[str]
) -> Iterator[list[float]]:
    """`metric` of each of `strategies`, for every seed that ran all of them."""
    by = {(r["strategy"], r["seed"]): float(r[metric]) for r in runs}
    for seed in sorted({seed for _, seed in by}, key=int):
        if all((s, seed) in by for s in strategies):
            yield [by[s, seed] for s in strategies]


def recovery(runs: list[dict[str, str]], metric: str, strategy: str = "pairwise") -> list[float]:
    """Per seed that e2e, local and `strategy` all ran: (strategy − local)/(e2e − local)."""
    return [
        (mine - local) / (e2e - local)
        for e2e, local, mine in _per_seed(runs, metric, ("e2e", "local", strategy))
        if e2e != local
    ]


def gap_note(runs: list[dict[str, str]], metric: str) -> str:
    """The recovery's denominator e2e − local per seed, flagged when it cannot be told
    from 0 (|mean| < 2 sample std): then every ratio divides by seed noise."""
    gaps = [e2e - local for e2e, local in _per_seed(runs, metric, ("e2e", "local"))]
    if not gaps:
        return ""
    note = f" It divides by e2e − local = {_spread(gaps)}"
    if len(gaps) == 1:
        note += ": one seed, no spread to tell it from 0"
    elif abs(statistics.fmean(gaps)) < 2 * statistics.stdev(gaps):
        note += f": within 2 std of 0, so the ratios are noise; compare the test {metric} directly"
    return note + "."


def recovery_line(runs: list[dict[str, str]], metric: str) -> str:
    """The recovery ratio of every interlocking strategy (window between local and global)."""
    ends = ("e2e", "global", "local")
    strategies = [s for s in dict.fromkeys(r["strategy"] for r in runs) if s not in ends]
    parts = []
    for strategy in strategies:
        ratios = recovery(runs, metric, strategy)
        if ratios:
            parts.append(f"{strategy} {_spread(ratios, 3)}")
    if not parts:
        return "Recovery: n/a (needs e2e, local and an interlocking strategy)."
    found = "; ".join(parts)
    return (
        f"Recovery (strategy − local)/(e2e − local) of test {metric}, per seed: {found}."
        + gap_note(runs, metric)
    )


def aux_cell(mine: list[dict[str, str]], metric: str) -> str:
    """Each aux head's test `metric`, mean over seeds, k = 0..K−2 ("–" without heads)."""
    heads = sorted(
        int(key.split("/")[1]) for key in mine[0] if key.startswith("aux/") and key.endswith(metric)
    )
    values = [[float(r[f"aux/{k}/{metric}"]) for r in mine] for k in heads]
    if not values or any(math.isnan(v) for v in values[0]):
        return "–"
    return " / ".join(f"{statistics.fmean(v):.3f}" for v in values)


def render(name: str, root: str = ROOT) -> str:
    """The markdown between the markers of `name` (module docstring)."""
    directory = os.path.join(root, RESULTS_DIR, name)
    if not os.path.exists(os.path.join(directory, "runs.csv")):  # none, or still training
        return f"_No committed results yet: `{RESULTS_DIR}/{name}/` will hold them._\n"
    runs = _read_csv(os.path.join(directory, "runs.csv"))
    rows = {r["strategy"]: r for r in _read_csv(os.path.join(directory, "results.csv"))}
    with open(os.path.join(directory, COMMAND_FILE)) as f:
        command = f.read().strip()
    text = "perplexity" in runs[0]
    metrics = ["loss", "perplexity"] + (["bits_per_byte"] if "bits_per_byte" in runs[0] else [])
    metrics = metrics if text else ["accuracy"]
    aux_metric = "loss" if text else "accuracy"
    head = [f"test {m}" for m in metrics] + [
        f"aux heads' test {aux_metric} (k=0..)",
        "pred. ×e2e split, M=1",
        "pred. ×best e2e pipeline (schedule, M)",
        "activations / device (strategy / pipeline)",
        "pred. time to target",
    ]
    lines = ["| strategy | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for strategy, row in rows.items():
        mine = [r for r in runs if r["strategy"] == strategy]
        cells = [_spread([float(r[m]) for r in mine]) for m in metrics]
        trained = Strategy.parse(strategy).aux_heads  # e2e evaluates untrained heads
        cells.append(aux_cell(mine, aux_metric) if trained else "–")
        cells += _prediction_cells(row)
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(
        [
            f"`{command}`",
            "",
            *lines,
            "",
            f"{recovery_line(runs, quality_metric(runs))} "
            f"Files: [`{RESULTS_DIR}/{name}/`]({RESULTS_DIR}/{name}/results.md)."
            + unfinished_note(directory),
            "",
        ]
    )


def unfinished_note(directory: str) -> str:
    """results.md's list of the comparison's runs not finished yet (compare
    --finished_only), with a leading space, or ""."""
    path = os.path.join(directory, "results.md")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        notes = [line.strip() for line in f if line.startswith("Not yet finished")]
    return f" {notes[-1]}" if notes else ""


def _prediction_cells(row: dict[str, str]) -> list[str]:
    if row["pred_pipeline"]:
        best = f"{float(row['pred_vs_pipeline']):.2f} ({row['pred_pipeline']}, "
        best += f"M={row['pred_pipeline_microbatches']})"
        pipeline_memory = f"{float(row['pred_pipeline_activation_MiB']):.3g} MiB"
    else:
        best, pipeline_memory = "none fits", "–"
    memory = f"{float(row['pred_activation_MiB']):.3g} MiB / {pipeline_memory}"
    mean, std = float(row["time_to_target_s_mean"]), float(row["time_to_target_s_std"])
    reach = time_to_target_cell(mean, std, row["target_reached"])
    return [f"{float(row['pred_vs_e2e_split_M1']):.2f}", best, memory, reach]


def fill(readme: str, root: str = ROOT) -> str:
    """`readme` with every marked table regenerated."""
    return MARKER.sub(lambda m: m.group(1) + render(m.group("name"), root) + m.group(4), readme)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        current = f.read()
    wanted = fill(current, os.path.dirname(os.path.abspath(args.readme)))
    if args.check:
        if wanted != current:
            print(f"{args.readme} is out of date: run python -m scripts.results_tables")
            return 1
        return 0
    with open(args.readme, "w") as f:
        f.write(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
