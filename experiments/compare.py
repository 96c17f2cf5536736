"""Compares strategies: `python -m experiments.compare --config=FILE.py[:ARG]`.

    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py
    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py:k=2 \
        --config.compare.strategies=global,pairwise --config.compare.seeds=0,1,2

Runs every strategy in config.compare.strategies for every seed in config.compare.seeds
(each in WORKDIR/<strategy>/seed<i>, resumable), then writes results.md, results.csv,
runs.csv and a plot of the test metric against step to WORKDIR (default
runs/compare/<config name>) and prints the per-strategy table.
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
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", "compare", config.name or "experiment")
    try:
        distributed.initialize_from_flags()  # before any other JAX call
        command = shlex.join(["python", "-m", "experiments.compare", *sys.argv[1:]])
        table, _ = compare(config, workdir, command)
    except (ExperimentError, DataMissingError, ValueError) as e:
        sys.exit(f"error: {e}")
    if distributed.is_primary():
        print(f"\n{table}\n\nWrote {os.path.abspath(workdir)}/results.md, results.csv, runs.csv")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
