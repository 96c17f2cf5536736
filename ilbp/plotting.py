"""Figures used by the notebooks and the README: credit matrices and Gantt charts.

matplotlib is imported by the caller's figure; these functions only draw on axes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ilbp.schedule_graph import OpKind, TimedOp
from ilbp.strategy import Strategy

OP_COLORS = {
    OpKind.FORWARD: "#4c72b0",
    OpKind.AUX: "#8172b3",
    OpKind.INPUT_VJP: "#dd8452",
    OpKind.PARAM_VJP: "#55a868",
    OpKind.BACKWARD: "#c44e52",  # V and W on one cotangent
    OpKind.UPDATE: "#937860",
}


def credit_matrix(ax: Any, strategy: Strategy, num_stages: int) -> None:
    """Stage × loss matrix of `strategy`: row k, column j = coefficient of ∂L_j/∂θ_k,
    with the losses whose cotangent stage k sends back written beside each row."""
    K = num_stages
    plan = strategy.plan(K)
    credit = np.array(plan.credit_matrix())
    ax.imshow(credit, cmap="Blues", vmin=0, vmax=1)
    for k in range(K):
        for j in range(K):
            if credit[k, j]:
                color = "white" if credit[k, j] > 0.5 else "black"
                ax.text(j, k, f"{credit[k, j]:g}", ha="center", va="center", color=color)
        sends = ", ".join(f"L{j + 1}" for j in plan[k].sends) or "–"
        ax.text(K - 0.3, k, f"sends {sends}", va="center", fontsize=7)
    ax.set_title(strategy.name)
    ax.set_xticks(range(K), [f"L{j + 1}" for j in range(K)])
    ax.set_yticks(range(K), [f"θ{k + 1}" for k in range(K)])
    ax.set_xlim(-0.5, K + 1.6)


def gantt(
    ax: Any,
    timeline: Iterable[TimedOp],
    num_stages: int,
    title: str,
    *,
    horizon: float | None = None,
    period: float | None = None,
    busy: Sequence[float] | None = None,
    unit: str = "F",
) -> None:
    """One row per device, one bar per op coloured by kind (OP_COLORS); alternate steps
    lighter. Works for the schedule model's ops and for measured ones."""
    ops = [op for op in timeline if op.end > op.start]
    for op in ops:
        ax.broken_barh(
            [(op.start, op.end - op.start)],
            (op.stage - 0.4, 0.8),
            color=OP_COLORS.get(op.kind, "grey"),
            alpha=0.3 + 0.7 * (op.step % 2),
        )
    ax.set_yticks(range(num_stages), [f"dev {k}" for k in range(num_stages)])
    ax.set_ylim(num_stages - 0.5, -0.5)
    ax.set_xlim(0, horizon or max(op.end for op in ops))
    if period is not None:
        title += f": period {period:.4g}{unit}"
    if busy is not None:
        title += f", mean busy {np.mean(busy):.2f}"
    ax.set_title(title)
