"""A run's record: WORKDIR/summary.json, written when a run finishes and read back so
that a finished run is neither trained nor evaluated again, with or without its
checkpoints (a committed comparison keeps the records, not the checkpoints)."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

from experiments.lib.checkpoints import IncompatibleCheckpointError, fingerprint_diff
from experiments.lib.distributed import is_primary

SUMMARY_FILE = "summary.json"


def read_finished(
    workdir: str, wanted: dict[str, Any], steps: int, test_examples: int | None = None
) -> dict[str, Any] | None:
    """WORKDIR/summary.json if it records a finished run of the config whose fingerprint
    is `wanted` (all its `steps`, and its final evaluation on `test_examples` examples
    unless None), else None; the summary's "workdir" is WORKDIR.

    A summary records its config's fingerprint, so a finished run is recognised from the
    summary alone (checkpoints are not committed with results); one written before
    summaries recorded fingerprints is returned as is, for the caller to check against
    the checkpoint. IncompatibleCheckpointError if the summary is of another config:
    training there would overwrite a finished run's results.
    """
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    diffs, _ = fingerprint_diff(summary.get("fingerprint", wanted), wanted, "finished run")
    if diffs:
        raise IncompatibleCheckpointError(
            f"{path} records a finished run of another config ({'; '.join(diffs)}). Use "
            "another --workdir, or move that run away to train this config there."
        )
    if summary.get("steps") != steps or (
        test_examples is not None and summary.get("test_examples") != test_examples
    ):
        return None
    return {**summary, "workdir": workdir}


def write_summary(
    workdir: str, summary: dict[str, Any], step_times: list[float], wall_time: float
) -> dict[str, Any]:
    """Adds timing to `summary` and saves it; every process returns it with "workdir"
    added, which the file leaves out so that it names no path of the machine that
    trained it."""
    # A run resumed at its end keeps the step time and wall time it measured.
    previous = {"step_time_s": float("nan"), "wall_time_s": 0.0}
    if not step_times and os.path.exists(os.path.join(workdir, SUMMARY_FILE)):
        with open(os.path.join(workdir, SUMMARY_FILE)) as f:
            previous.update({k: v for k, v in json.load(f).items() if k in previous})
    summary = {
        **summary,
        "step_time_s": statistics.median(step_times) if step_times else previous["step_time_s"],
        "wall_time_s": wall_time + previous["wall_time_s"],
    }
    return save_summary(workdir, summary)


def save_summary(workdir: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Writes WORKDIR/summary.json (process 0), whole or not at all: the other processes
    may read it next. Returns it with "workdir" added."""
    if is_primary():
        path = os.path.join(workdir, SUMMARY_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
    return {**summary, "workdir": workdir}


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the console: final test metrics of every head and timing."""
    test, K = summary["test"], summary["num_stages"]
    metric = summary["metric"]
    lines = [
        f"{summary['name']} | {summary['strategy']} | K={K} | seed {summary['seed']} | "
        f"{summary['steps']} steps | {summary['test_examples']} test examples",
        f"  final head: {metric} {test[metric]:.4f}"
        + (f", accuracy {test['accuracy']:.4f}" if metric != "accuracy" else "")
        + f", loss {test['loss']:.4f}"
        + (f", {test['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in test else ""),
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
