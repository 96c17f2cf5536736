"""Draws the README's figures into docs/: `python scripts/readme_figures.py`.

docs/credit.png      which loss trains which stage, per strategy (K = 4)
docs/schedules.png   the schedule model's op timeline per strategy (K = 4, M = 1)
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ilbp import schedule
from ilbp.plotting import credit_matrix, gantt
from ilbp.strategy import Strategy

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
K = 4


def main() -> None:
    os.makedirs(DOCS, exist_ok=True)
    names = ["global", "local", "pairwise", "3wise", "pairwise:sum"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2))
    for ax, name in zip(axes, names):
        credit_matrix(ax, Strategy.parse(name), K)
    fig.suptitle("Coefficient of ∂L_j/∂θ_k in stage k's update, and the cotangents it sends back")
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "credit.png"), dpi=90)

    runs = {n: schedule.simulate(n, K, microbatches=1, steps=4) for n in names[:4]}
    horizon = max(op.end for s in runs.values() for op in s.timeline)
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.7 * len(runs)), sharex=True)
    for ax, (name, s) in zip(axes, runs.items()):
        gantt(ax, s.timeline, K, name, horizon=horizon, period=s.period, busy=s.busy)
    axes[-1].set_xlabel(
        "time in stage forwards F (blue F forward, orange V input gradients, "
        "green W parameter gradients; alternate steps lighter)"
    )
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "schedules.png"), dpi=90)


if __name__ == "__main__":
    main()
