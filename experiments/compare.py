"""Compares strategies: `python -m experiments.compare --config=FILE.py[:ARG]`.

    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py
    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py:k=2 \
        --config.compare.strategies=global,pairwise --config.compare.seeds=0,1,2

Runs every strategy in config.compare.strategies for every seed in config.compare.seeds
(each in WORKDIR/<strategy>/seed<i>, resumable), then writes results.md, results.csv,
runs.csv and a plot of the test metric against step to WORKDIR (default
runs/compare/<config name>) and prints the per-strategy table. With --shard=i/n it
trains only its share of the runs, so n processes (or machines sharing WORKDIR) train
one comparison; the same command without --shard then writes the report.
--finished_only reports the runs finished so far and trains nothing.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.lib import distributed
from experiments.lib.checkpoints import ExperimentError
from experiments.lib.cli import parse_flags
from experiments.lib.report import compare
from ilbp.data import DataMissingError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally FILE.py:ARG (e.g. :k=8)."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default: runs/compare/<config name>)."
)
_SHARD = flags.DEFINE_string(
    "shard",
    "0/1",
    "i/n: train only every n-th run starting at run i and write no report, so n "
    "processes can share a comparison; then run without --shard to report.",
)
_FINISHED_ONLY = flags.DEFINE_bool(
    "finished_only",
    False,
    "Train nothing: report the runs that have finished and list the others.",
)
flags.mark_flags_as_required(["config"])


def parse_shard(text: str) -> tuple[int, int]:
    """ "i/n" → (i, n); ValueError unless 0 ≤ i < n."""
    index, slash, count = text.partition("/")
    if not (slash and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"--shard={text!r}: write i/n with 0 ≤ i < n, e.g. --shard=0/2.")
    return int(index), int(count)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", "compare", config.name or "experiment")
    try:
        distributed.initialize_from_flags()  # before any other JAX call
        shard = parse_shard(_SHARD.value)
        command = shlex.join(["python", "-m", "experiments.compare", *sys.argv[1:]])
        result = compare(config, workdir, command, shard, _FINISHED_ONLY.value)
    except (ExperimentError, DataMissingError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not distributed.is_primary():
        return
    if result is None:
        print(f"Shard {_SHARD.value} done; run without --shard to write the report.")
        return
    print(f"\n{result[0]}\n\nWrote {os.path.abspath(workdir)}/results.md, results.csv, runs.csv")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
