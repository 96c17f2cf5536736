"""Measured MPMD timeline: when each op of `MPMDExecutor` ran, next to the model's.

`record_timeline(executor, state, batch, steps=T)` runs T steps with the executor's
tracing hook and returns one `MeasuredOp` per issued op, with the fields the schedule
model's `Op` has for drawing (kind, stage, step, microbatch, loss, start, end; ms from
the start of the first step's dispatch), so a Gantt chart of `Schedule.timeline` draws
it too.

Method. Nothing here makes the host wait for a device, so the pipeline runs as it does
untraced (up to the host time the hook itself costs, about a list append and a queue put
per op):
- issue: the host timestamps each op right after its dispatch returns; `dispatch` is the
  host time since the previous op's issue (its dispatch plus the executor's
  bookkeeping and the sends issued before it).
- completion: one watcher thread per stage takes that stage's ops in issue order and
  blocks (`jax.block_until_ready`) on each op's outputs, then timestamps it. A device is
  assumed to run its ops in issue order, so blocking in that order observes each
  completion once it has happened. The timestamp is an upper bound: a watcher still
  waiting for the previous op, or for the GIL, sees a completion late (the switch
  interval is lowered while recording to shorten the GIL wait).
- end: the observed completion, tightened by the model's two facts: an op cannot finish
  after an op that consumes its outputs finishes (its dependents in the schedule
  graph: same-step data edges, U(t-1) → F(t) and the executor's issue-order edges),
  nor after the op its device runs next. Each end stays an upper bound on the true one.
- start: not observable without a device profiler, so derived as the latest of the
  op's issue, the end of the op its device ran before it, and the ends of the ops it
  depends on in the schedule graph (`ilbp.schedule.simulate` with the executor's options
  and T steps). A bar therefore spans the op's run plus whatever else delayed it once
  its inputs and its device looked free: a transfer, a core taken by another device or
  the host, a late timestamp. An idle gap is time when the device had nothing issued
  whose inputs had been seen ready.

Assumptions and what breaks them:
- In-order devices: as on a GPU's compute stream. XLA:CPU may run two independent
  computations of one device concurrently on its thread pool; the chart then still
  serialises them, attributing the overlap to the later op.
- Transfers (`jax.device_put` of activations and cotangents) are not ops here: a
  consumer's bar includes the wait for its input's copy.
- Concurrency needs cores: on a host with fewer cores than devices plus one (the
  dispatching thread), devices time-share and the measured ops run longer than they do
  alone; the timeline shows that contention, not the schedule's intrinsic shape. On
  XLA:CPU (jax 0.10) all CPU devices also share one intra-op thread pool, so an op
  alone may use several cores and slow down beside another device's op whatever the
  core count. `in_run_costs` gives the model the costs the ops had in the run itself,
  which separates that slowdown from the schedule.
- Compile first (run one untraced step): compilation happens in dispatch and would
  dominate the first step's chart.
"""

from __future__ import annotations

import dataclasses
import queue
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax

from ilbp.pipeline.mpmd import MPMDExecutor, MPMDState
from ilbp.schedule import CostModel, OpKind, simulate
from ilbp.schedule_graph import op_name
from ilbp.stage import Batch

__all__ = ["MeasuredOp", "in_run_costs", "record_timeline"]


@dataclasses.dataclass(frozen=True)
class MeasuredOp:
    """One issued op of a traced run; times in ms from the start of the first dispatch.

    Attributes:
      kind, stage, step, microbatch, loss: as in `ilbp.schedule.Op` (microbatch -1 for U).
      issued: when its dispatch returned on the host.
      dispatch: host time since the previous op's issue (or the step's call).
      completed: when its watcher saw its outputs ready (upper bound on completion).
      start, end: derived run interval on its device (module docstring).
      deps: indices (in the returned list) of the ops it depends on in the schedule graph.
    """

    kind: OpKind
    stage: int
    step: int
    microbatch: int
    loss: int | None
    issued: float
    dispatch: float
    completed: float
    start: float
    end: float
    deps: tuple[int, ...]

    @property
    def cost(self) -> float:
        """Its derived duration (ms)."""
        return self.end - self.start

    @property
    def name(self) -> str:
        return op_name(self.kind, self.step, self.microbatch, self.stage, self.loss)


_Issued = tuple[OpKind, int, int, int | None, int, float, float]  # kind, k, m, loss, t, when, gap


class _Recorder:
    """Issue times from the executor's trace hook; completion times from one watcher
    thread per stage, which blocks on that stage's outputs in issue order."""

    def __init__(self, num_stages: int):
        self.issued: list[_Issued] = []
        self.completed: list[float] = []  # per issued op; filled in by the watchers
        self.errors: list[BaseException] = []
        self.queues = [queue.SimpleQueue() for _ in range(num_stages)]
        self.watchers = [
            threading.Thread(target=self._watch, args=(q,), name=f"ilbp-trace-{k}", daemon=True)
            for k, q in enumerate(self.queues)
        ]
        self.step = 0  # the step being issued
        self.t0 = self.last = 0.0

    def _watch(self, q: queue.SimpleQueue) -> None:
        while (item := q.get()) is not None:
            i, outputs = item
            try:
                jax.block_until_ready(outputs)
            except BaseException as e:  # re-raised on the caller's thread
                self.errors.append(e)
            self.completed[i] = time.perf_counter()

    def start(self) -> None:
        for w in self.watchers:
            w.start()
        self.t0 = self.last = time.perf_counter()  # t = 0: the first step's call

    def trace(self, kind: OpKind, k: int, m: int, loss: int | None, _: int, outputs: Any) -> None:
        """The executor's hook, called right after each op's dispatch returns."""
        now = time.perf_counter()
        self.issued.append((kind, k, m, loss, self.step, now, now - self.last))
        self.completed.append(float("nan"))
        self.queues[k].put((len(self.issued) - 1, outputs))
        self.last = now

    def stop(self) -> None:
        for q in self.queues:
            q.put(None)
        for w in self.watchers:
            w.join()

    def in_ms(self) -> tuple[list[_Issued], list[float]]:
        """The issued ops and completions with host seconds turned into ms from t0."""
        ms = lambda s: (s - self.t0) * 1e3
        issued = [(*op, ms(when), gap * 1e3) for *op, when, gap in self.issued]
        return issued, [ms(c) for c in self.completed]


def record_timeline(
    executor: MPMDExecutor,
    state: MPMDState,
    batch: Batch,
    steps: int = 1,
    *,
    switch_interval: float = 1e-4,
) -> tuple[MPMDState, list[MeasuredOp]]:
    """Runs `steps` traced steps on `batch`; returns the new state and the timeline.

    The state is what as many untraced `executor.step` calls return. Traced steps run
    the executor's ops without donation (the watchers wait on every output), compiled
    on their first use: record a step before the one you measure. `switch_interval`
    (seconds) is the interpreter's thread switch interval while recording, so that a
    watcher woken by a completion gets the GIL soon; the old value is restored.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1; got {steps!r}.")
    recorder = _Recorder(executor.model.num_stages)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval)
    recorder.start()
    try:
        for i in range(steps):
            recorder.step, recorder.last = i, time.perf_counter()
            state, _ = executor.step(state, batch, trace=recorder.trace)
    finally:
        recorder.stop()
        sys.setswitchinterval(old_interval)
    if recorder.errors:
        raise recorder.errors[0]
    return state, _derive(executor, steps, *recorder.in_ms())


def _derive(
    executor: MPMDExecutor,
    steps: int,
    issued: Sequence[_Issued],
    completed: Sequence[float],
) -> list[MeasuredOp]:
    """Ends tightened through dependents, starts from issue, device order and deps."""
    K, M = executor.model.num_stages, executor.microbatches
    # The executor's issue order comes from this model (steps=1, fused backward, its cap).
    graph = simulate(
        executor.strategy,
        K,
        M,
        steps=steps,
        fused_backward=True,
        max_in_flight=executor.max_in_flight,
    ).timeline
    index = {
        op_name(kind, t, m, k, loss): i for i, (kind, k, m, loss, t, _, _) in enumerate(issued)
    }
    if len(index) != len(issued) or len(graph) != len(issued):
        raise RuntimeError(
            f"Traced {len(issued)} ops ({len(index)} distinct), the schedule model has "
            f"{len(graph)}: the executor's order and the model disagree."
        )
    deps: list[tuple[int, ...]] = [()] * len(issued)
    for op in graph:
        i = index[op.name]
        deps[i] = tuple(sorted(index[d.name] for d, _ in op.deps))
        if any(d >= i for d in deps[i]):
            raise RuntimeError(f"{op.name} was issued before an op it depends on.")
    # Each op's previous op on its device, and everything that must finish after it.
    prev: list[int | None] = []
    last_on: list[int | None] = [None] * K
    for i, (_, k, *_) in enumerate(issued):
        prev.append(last_on[k])
        last_on[k] = i
    after: list[list[int]] = [[] for _ in issued]
    for i in range(len(issued)):
        for d in deps[i]:
            after[d].append(i)
        if prev[i] is not None:
            after[prev[i]].append(i)
    end = list(completed)
    for i in reversed(range(len(issued))):  # dependents come later in issue order
        end[i] = min([completed[i]] + [end[u] for u in after[i]])
    out = []
    for i, (kind, k, m, loss, t, when, gap) in enumerate(issued):
        before = [end[d] for d in deps[i]] + ([end[prev[i]]] if prev[i] is not None else [])
        start = max([when, *before])
        out.append(MeasuredOp(kind, k, t, m, loss, when, gap, completed[i], start, end[i], deps[i]))
    return out


def in_run_costs(ops: Sequence[MeasuredOp], num_stages: int, skip_steps: int = 1) -> CostModel:
    """The schedule model's per-op costs as the ops ran in a measured timeline (ms).

    Per stage and kind, the median derived duration over the steps from `skip_steps`
    on (the first ones fill the pipeline). Transfers are inside their consumers' bars,
    so the transfer latency is 0. Simulate with `fused_backward=True`, as the MPMD
    executor issues its ops: a stage's B then costs its measured B, a W its measured W.
    With these costs the model's period tests the executor's ordering and dependencies
    alone: a measured period longer than the model's means idle time that no
    dependency explains (e.g. a host that dispatched late).
    """
    if not any(o.step >= skip_steps for o in ops):
        raise ValueError(f"No ops from step {skip_steps} on; record more steps.")
    durations: dict[tuple[OpKind, int], list[float]] = {}
    for o in ops:
        if o.step >= skip_steps:
            durations.setdefault((o.kind, o.stage), []).append(o.cost)

    def median(kind: OpKind, k: int) -> float:
        return statistics.median(durations.get((kind, k), [0.0]))

    per_stage = lambda kind: tuple(median(kind, k) for k in range(num_stages))
    return CostModel.from_measured(
        per_stage(OpKind.FORWARD),
        per_stage(OpKind.INPUT_VJP),
        per_stage(OpKind.PARAM_VJP),
        fused_vjp=per_stage(OpKind.BACKWARD),
        aux=per_stage(OpKind.AUX),
        update=per_stage(OpKind.UPDATE),
    )
