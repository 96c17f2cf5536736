"""Schedule model: op timeline, step period, utilisation and memory of a strategy.

Pure Python (no JAX), docs/design.md §4. `simulate(strategy, K, M, T, costs)` builds the op
graph of T steps of M microbatches on K stages from `Strategy.plan(K)` and list-schedules
it (ops, dependencies and priorities: `ilbp.schedule_graph`). The `Schedule` it returns
has the timeline, the steady-state step period, each device's busy fraction, the critical
path of a step and each stage's peak number of microbatches held in flight.
`throughput_table` and `render_table` predict each strategy's throughput relative to
global backprop for several K and M.

With equal stages, free aux heads and free transfers it reproduces docs/design.md §4 exactly:
split-backward global (2K + 1)F per step, fused 3K·F; local 3F; pairwise 5F whatever K;
n-wise (2n + 1)F (its critical path grows with n, not K); GPipe-style global (fused
backward) 3(M + K - 1)F, a bubble of (K - 1)/(M + K - 1). A strategy without aux heads
(`Strategy.e2e()`, `plan.aux_heads` False) has no A ops; `simulate_e2e` runs it under
the pipeline schedules a user would compare against (1F1B, zero-bubble split backward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from ilbp.schedule_graph import (
    PRIORITIES,
    VJP_KINDS,
    CostModel,
    Op,
    OpKind,
    Priority,
    TimedOp,
    build_graph,
    list_schedule,
)
from ilbp.strategy import Strategy

__all__ = [
    "PIPELINE_SCHEDULES",
    "CostModel",
    "MaxInFlight",
    "Op",
    "OpKind",
    "Prediction",
    "Schedule",
    "render_table",
    "simulate",
    "simulate_e2e",
    "stage_work",
    "steady_state",
    "throughput_table",
]


# A cap on the microbatches whose residuals a stage holds: "window" (what the strategy's
# window needs), one int for all stages, one per stage, or None (no cap).
MaxInFlight = int | Sequence[int] | Literal["window"] | None


@dataclasses.dataclass
class Schedule:
    """A simulated run: the timeline and what it says about throughput and memory.

    Attributes:
      timeline: every op with its device (`stage`), step, microbatch, start and end,
        sorted by start time.
      period: steady-state time per step: the mean gap between the completions of the
        later half of the steps.
      busy: per device, its work per step (mean over the later half) over the period:
        its busy fraction when paced at the pipeline's rate; 1 - busy is its bubble.
        In a transient (too few steps) it can exceed 1.
      in_flight: per device, the peak number of microbatches whose forward residuals it
        holds: from the start of F(t, m, k) to the end of stage k's last VJP for (t, m).
    """

    strategy: Strategy
    num_stages: int
    microbatches: int
    steps: int
    timeline: list[Op]
    period: float
    busy: tuple[float, ...]
    in_flight: tuple[int, ...]

    @property
    def throughput(self) -> float:
        """Microbatches per unit time in steady state."""
        return self.microbatches / self.period

    @property
    def bubble(self) -> tuple[float, ...]:
        return tuple(1.0 - b for b in self.busy)

    def critical_path(self, step: int | None = None, stage: int = 0) -> list[Op]:
        """The chain of ops that decided when `stage` could update for `step`.

        Walks back from U(step, stage) through each op's binding predecessor (its
        latest input, or the op its device ran before it if that ended later) until it
        leaves the step. Default step: the last one. For M = 1, equal stages and stage 0,
        its span `path[-1].end - path[0].start` is the step period: (2K + 1)F for split
        global, (2n + 1)F for n-wise whatever K is.
        """
        step = self.steps - 1 if step is None else step
        op = next(
            o
            for o in self.timeline
            if o.kind == OpKind.UPDATE and o.step == step and o.stage == stage
        )
        path = [op]
        while op.binding is not None and op.binding.step >= step:
            op = op.binding
            path.append(op)
        return path[::-1]


def simulate(
    strategy: Strategy | str,
    num_stages: int,
    microbatches: int = 1,
    steps: int = 6,
    costs: CostModel | None = None,
    *,
    fused_backward: bool = False,
    priority: Priority = "sends_first",
    eager_sends: bool = True,
    max_in_flight: MaxInFlight = "window",
) -> Schedule:
    """Builds and list-schedules the op graph of `strategy` on `num_stages` devices.

    Args:
      strategy: a Strategy or a name Strategy.parse accepts ("global", "pairwise", ...).
      num_stages: K ≥ 1, one device per stage.
      microbatches: M ≥ 1 per step; gradients accumulate, one update per step.
      steps: T ≥ 1 steps; the period is measured over the later half.
      costs: per-op costs (default: CostModel(), docs/design.md §2.2's units).
      fused_backward: V and W of a shared cotangent as one op (reference implementation).
      priority: "sends_first" (default) or "gpipe" (flush: all forwards of a step
        before its backward ops on each stage; ignores max_in_flight).
      eager_sends: False makes each stage wait for its whole cotangent list (reference
        implementation's order).
      max_in_flight: the most microbatches a stage may hold residuals for: "window"
        (min(n, K - k) for stage k), one int for all stages, one per stage, or None
        (no cap: a stage runs every ready forward, holding up to M).
    """
    if isinstance(strategy, str):
        strategy = Strategy.parse(strategy)
    for name, value in (("num_stages", num_stages), ("microbatches", microbatches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer ≥ 1; got {value!r}.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1; got {steps!r}.")
    if priority not in PRIORITIES:
        raise ValueError(f"Unknown priority {priority!r}; choose one of {PRIORITIES}.")
    costs = CostModel() if costs is None else costs
    _check_costs(costs, num_stages)
    K, M, T = num_stages, microbatches, steps
    caps = _caps(max_in_flight, strategy, K) if priority != "gpipe" else None
    ops = build_graph(
        strategy.plan(K),
        M,
        T,
        costs,
        fused_backward=fused_backward,
        gpipe=priority == "gpipe",
        eager_sends=eager_sends,
        max_in_flight=caps,
    )
    list_schedule(ops, K, priority)
    ops.sort(key=lambda o: (o.start, o.stage, o.end))

    period, busy = steady_state(ops, K)
    return Schedule(strategy, K, M, T, ops, period, busy, _in_flight(ops, K))


def steady_state(ops: Iterable[TimedOp], num_stages: int) -> tuple[float, tuple[float, ...]]:
    """(period, busy) of a timeline of T steps, as `Schedule` defines them.

    period: the mean gap between the completions of the later half of the steps (the
    first step's end when T = 1); busy: per device, its op time per steady step over the
    period. Used for simulated and measured (`ilbp.pipeline.trace`) timelines alike.
    """
    ops = list(ops)
    T = 1 + max(o.step for o in ops)
    done = [0.0] * T  # when step t's last op ended
    for o in ops:
        done[o.step] = max(done[o.step], o.end)
    first = (T - 1) // 2  # steady state: the steps after `first`
    period = done[0] if T == 1 else (done[T - 1] - done[first]) / (T - 1 - first)
    # A device faster than the pipeline (e.g. under local learning) could run ahead in
    # the model; any executor with bounded buffers paces it at the period.
    work = [0.0] * num_stages
    for o in ops:
        if o.step > first or T == 1:
            work[o.stage] += o.cost
    steady = max(T - 1 - first, 1)
    return period, tuple(w / steady / period if period > 0 else 0.0 for w in work)


# The end-to-end pipeline schedules a user would pick instead of interlocking: e2e (no
# aux heads), M microbatches, stage k holding at most K - k of them (the window cap of a
# global strategy), an update per step.
PIPELINE_SCHEDULES: dict[str, dict[str, Any]] = {
    # One backward op per microbatch: period 3(M + K - 1)F with equal stages.
    "1f1b": dict(fused_backward=True),
    # The backward split into input VJP and parameter VJP (zero-bubble style, ZB-H1's
    # memory): V goes back first, W fills the bubbles; period 3M + 2(K - 1)F.
    "zb": dict(fused_backward=False),
}


def simulate_e2e(
    num_stages: int,
    microbatches: int,
    schedule: str = "1f1b",
    costs: CostModel | None = None,
    steps: int = 6,
) -> Schedule:
    """The plain network (Strategy.e2e()) on a pipeline under `schedule`, one of
    PIPELINE_SCHEDULES: the baseline a user would run instead of interlocking."""
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(
            f"Unknown pipeline schedule {schedule!r}; choose one of {tuple(PIPELINE_SCHEDULES)}."
        )
    options = PIPELINE_SCHEDULES[schedule]
    return simulate(Strategy.e2e(), num_stages, microbatches, steps, costs, **options)


def stage_work(
    strategy: Strategy | str,
    num_stages: int,
    costs: CostModel | None = None,
    *,
    fused_backward: bool = False,
) -> tuple[float, ...]:
    """Per device, the work one microbatch gives it under `strategy`: the summed cost of
    its F, A, V and W (or B) ops, without the once-per-step update.

    With the default unit costs (docs/design.md §4, free aux heads) this is each stage's work
    in units of its own forward: pairwise gives 3F to the end stages (no input VJP to
    send at stage 0; one fused backward at stage K-1) and 4F to the middle ones. A split
    that equalises these, not the forwards, lets every device be busy at once
    (`ilbp.models.balance_split(stage_weights=...)`).
    """
    if isinstance(strategy, str):
        strategy = Strategy.parse(strategy)
    costs = CostModel() if costs is None else costs
    _check_costs(costs, num_stages)
    ops = build_graph(strategy.plan(num_stages), 1, 1, costs, fused_backward=fused_backward)
    work = [0.0] * num_stages
    for o in ops:
        if o.kind != OpKind.UPDATE:
            work[o.stage] += o.cost
    return tuple(work)


def _caps(max_in_flight: MaxInFlight, strategy: Strategy, K: int) -> list[int] | None:
    if max_in_flight is None:
        return None
    if max_in_flight == "window":
        return [min(strategy.window, K - k) for k in range(K)]
    caps = [max_in_flight] * K if isinstance(max_in_flight, int) else list(max_in_flight)
    if len(caps) != K or any(not isinstance(c, int) or c < 1 for c in caps):
        raise ValueError(
            f"max_in_flight must be 'window', None, an int ≥ 1 or K={K} of them; "
            f"got {max_in_flight!r}."
        )
    return caps


def _check_costs(costs: CostModel, K: int) -> None:
    for f in dataclasses.fields(costs):
        value = getattr(costs, f.name)
        values = [value] if isinstance(value, int | float) else list(value)
        needed = K - 1 if f.name == "transfer" else K  # transfers: one per boundary
        if not isinstance(value, int | float) and len(values) < needed:
            raise ValueError(
                f"CostModel.{f.name} has {len(values)} entries; K={K} stages need {needed}."
            )
        if any(v < 0 for v in values):
            raise ValueError(f"CostModel.{f.name} must be ≥ 0; got {value!r}.")


def _in_flight(ops: Sequence[Op], K: int) -> tuple[int, ...]:
    held: dict[tuple[int, int, int], list[float]] = {}  # (k, t, m) → [F start, last VJP end]
    for o in ops:
        key = (o.stage, o.step, o.microbatch)
        if o.kind == OpKind.FORWARD:
            held.setdefault(key, [o.start, o.start])[0] = o.start
        elif o.kind in VJP_KINDS:
            span = held.setdefault(key, [o.end, o.end])
            span[1] = max(span[1], o.end)
    peak = [0] * K
    events: list[list[tuple[float, int]]] = [[] for _ in range(K)]
    for (k, _, _), (start, end) in held.items():
        events[k] += [(start, 1), (end, -1)]
    for k in range(K):
        count = 0
        for _, delta in sorted(events[k]):  # at equal times a release comes first
            count += delta
            peak[k] = max(peak[k], count)
    return tuple(peak)


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
