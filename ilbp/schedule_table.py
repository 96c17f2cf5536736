"""Predicted throughput of strategies relative to global backprop, and a text table.

Pure Python on top of `ilbp.schedule`; benchmarks/pipeline.py puts these predictions next
to measured numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ilbp.schedule import CostModel, simulate
from ilbp.strategy import Strategy

DEFAULT_STRATEGIES: tuple[str, ...] = ("global", "local", "pairwise", "3wise")
DEFAULT_STAGE_COUNTS: tuple[int, ...] = (4, 8, 16, 32)
DEFAULT_MICROBATCH_COUNTS: tuple[int, ...] = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One (strategy, K, M) cell of the table.

    Attributes:
      period: steady-state time per step (in the cost model's unit, F by default).
      busy_mean, busy_min: mean and lowest per-device busy fraction.
      in_flight: the most microbatches' residuals any stage holds at once.
      speedup: throughput relative to the baseline (global) at the same K and M.
    """

    strategy: str
    num_stages: int
    microbatches: int
    period: float
    busy_mean: float
    busy_min: float
    in_flight: int
    speedup: float


def throughput_table(
    strategies: Sequence[str | Strategy] = DEFAULT_STRATEGIES,
    stage_counts: Sequence[int] = DEFAULT_STAGE_COUNTS,
    microbatch_counts: Sequence[int] = DEFAULT_MICROBATCH_COUNTS,
    costs: CostModel | None = None,
    *,
    baseline: str | Strategy = "global",
    baseline_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> list[Prediction]:
    """Simulates every strategy for every K and M; speedups are vs `baseline`.

    `options` go to `simulate` for every strategy (e.g. fused_backward, priority,
    max_in_flight, steps); the baseline runs with `baseline_options` if given, else the
    same options. The default baseline is split-backward global under the same schedule.
    """
    rows = []
    base_options = dict(options if baseline_options is None else baseline_options)
    for K in stage_counts:
        for M in microbatch_counts:
            base = simulate(baseline, K, M, costs=costs, **base_options)
            for spec in strategies:
                s = simulate(spec, K, M, costs=costs, **options)
                rows.append(
                    Prediction(
                        strategy=s.strategy.name,
                        num_stages=K,
                        microbatches=M,
                        period=s.period,
                        busy_mean=sum(s.busy) / K,
                        busy_min=min(s.busy),
                        in_flight=max(s.in_flight),
                        speedup=base.period / s.period,
                    )
                )
    return rows


def render_table(rows: Sequence[Prediction]) -> str:
    """A fixed-width text table of predictions, one line per row."""
    header = ("strategy", "K", "M", "period", "period/M", "busy", "min busy", "held", "vs global")
    lines = [header] + [
        (
            r.strategy,
            str(r.num_stages),
            str(r.microbatches),
            f"{r.period:.4g}",
            f"{r.period / r.microbatches:.3g}",
            f"{r.busy_mean:.3f}",
            f"{r.busy_min:.3f}",
            str(r.in_flight),
            f"{r.speedup:.3f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
    )
    return "\n".join(
        [fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(x) for x in lines[1:]]
    )
