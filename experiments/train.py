"""Trains one experiment: `python -m experiments.train --config=FILE.py[:ARG] --workdir=DIR`.

    python -m experiments.train \
        --config=experiments/configs/fashion_mnist_resnet.py:pairwise,k=4 \
        --workdir=runs/fmnist_pairwise --config.num_train_steps=400

A workdir with checkpoints is resumed; metrics go to DIR/metrics.jsonl and
DIR/tensorboard, the final summary to DIR/summary.json and the console.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.lib import distributed
from experiments.lib.checkpoints import ExperimentError
from experiments.lib.cli import parse_flags
from experiments.lib.records import format_summary
from experiments.lib.trainer import train_and_evaluate
from ilbp.data import DataMissingError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally FILE.py:ARG (e.g. :pairwise,k=4)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        distributed.initialize_from_flags()  # before any other JAX call
        summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ExperimentError, DataMissingError, ValueError) as e:
        sys.exit(f"error: {e}")
    if distributed.is_primary():
        print(format_summary(summary))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
