"""The schedule model's op graph and list scheduler (used by `ilbp.schedule`).

Pure Python (no JAX), docs/design.md §4. For K stages (one per device), M microbatches per
step and T steps, `build_graph` makes the dependency graph of the ops an executor issues;
`list_schedule` runs it: every device runs one op at a time and starts, whenever it is
idle, the highest-priority op whose inputs are ready (earliest-start semantics: a device
never idles while some op of its own is ready).

Ops per (step t, microbatch m, stage k), all on device k:

  F     forward of stage k. Needs F(t, m, k-1) and U(t-1, k): the forward for step t uses
        θ_k after its update for step t-1, so pipelining adds no staleness.
  A     aux head forward + backward (k < K-1); yields ∂L_k/∂h_k. Needs F. The final
        head's loss is folded into the last stage's F. None when `plan.aux_heads` is
        False (e2e: only the final loss exists).
  V_j   input VJP for loss j ∈ plan[k].sends: ∂L_j/∂h_{k-1}, sent to stage k-1. Needs
        the cotangent ∂L_j/∂h_k (A if j == k, F if j == K-1 == k, else V_j at stage k+1).
  W     parameter VJP: needs every cotangent in plan[k].train_on. When
        plan[k].shared_cotangent is s, W reuses V_s's intermediates: it runs after V_s and
        costs `param_vjp_shared` (≈ F) instead of `param_vjp` (≈ 2F).
  B     fused_backward=True only: V_s and W as one op (cost V + W_shared ≈ 2F), as the
        reference implementation does; the cotangent it sends exists only when it ends.
  U     optimizer update of θ_k and φ_k after all M microbatches' W and A of step t.

Priority on a device (`priority="sends_first"`, the default): the oldest step first (an
old step's work gates the next step's forwards through U); within a step, ops that produce
a cotangent (A, V) first, because stage k-1 waits on them and, under interlocking, its
update does too; then forwards, because stage k+1 waits on them; then W/B, on which only
this stage's update waits; ties by microbatch, then the farthest loss first (its chain has
the longest way to go). A cap on the microbatches a stage holds (`max_in_flight`, default
min(n, K - k) for stage k: what its window needs, and 1F1B's K - k for global) makes a
forward wait until the backward ops of the microbatch `cap` places earlier are done.
`priority="gpipe"` is a GPipe flush instead: all M forwards of a step run before any
backward op of that step on a stage (a barrier dependency), no cap.

`eager_sends=True` is ilbp's order: a stage sends each cotangent as soon as it exists.
`eager_sends=False` models the reference implementation: a stage's backward ops for
(t, m) wait for its whole incoming cotangent list, which chains the wait down to stage K-1.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from ilbp.strategy import Plan

Priority = Literal["sends_first", "gpipe"]
PRIORITIES: tuple[str, ...] = ("sends_first", "gpipe")
_EPS = 1e-9

PerStage = float | Sequence[float]


class OpKind(enum.StrEnum):
    """The kinds of op a stage runs (module docstring); the value is the chart letter.

    A StrEnum, so a kind prints as its letter ("F", "V", ...) in op names and tables.
    """

    FORWARD = "F"
    AUX = "A"  # aux head forward + backward
    INPUT_VJP = "V"
    PARAM_VJP = "W"
    BACKWARD = "B"  # V and W of one cotangent as one op
    UPDATE = "U"


# The ops that read a microbatch's forward residuals (held until the last one ends).
VJP_KINDS = frozenset({OpKind.INPUT_VJP, OpKind.PARAM_VJP, OpKind.BACKWARD})


def op_name(kind: OpKind, step: int, microbatch: int, stage: int, loss: int | None) -> str:
    """An op's display name, e.g. "V[3](t1,m0,k2)" (no microbatch for an update)."""
    j = "" if loss is None else f"[{loss}]"
    m = "" if microbatch < 0 else f",m{microbatch}"
    return f"{kind}{j}(t{step}{m},k{stage})"


class TimedOp(Protocol):
    """What a scheduled or measured op has for steady-state measures and charts."""

    kind: OpKind
    stage: int
    step: int
    start: float
    end: float

    @property
    def cost(self) -> float: ...


def _per_stage(value: PerStage, k: int) -> float:
    return float(value) if isinstance(value, int | float) else float(value[k])


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Per-op costs; each field is one number for all stages or a per-stage sequence.

    Defaults are docs/design.md §2.2's units: forward F = 1, input VJP V = F, parameter VJP
    W = 2F alone and F when it reuses V's intermediates, free aux heads, updates and
    transfers. `transfer` is a latency on every cross-device edge (activations right,
    cotangents left): one number, or one per boundary (entry k: between stages k and
    k + 1; K - 1 entries). It occupies no device (asynchronous send).
    """

    forward: PerStage = 1.0
    aux: PerStage = 0.0
    input_vjp: PerStage = 1.0
    param_vjp: PerStage = 2.0
    param_vjp_shared: PerStage = 1.0
    update: PerStage = 0.0
    transfer: PerStage = 0.0

    @classmethod
    def from_measured(
        cls,
        forward: Sequence[float],
        input_vjp: Sequence[float],
        param_vjp: Sequence[float],
        *,
        fused_vjp: Sequence[float] | None = None,
        aux: PerStage = 0.0,
        update: PerStage = 0.0,
        transfer: PerStage = 0.0,
    ) -> CostModel:
        """Costs from measured per-stage op times (e.g. seconds of jitted calls).

        `fused_vjp[k]` is the time of one VJP giving both parameter and input gradients;
        W_shared is what it adds to the input VJP. Without it, W_shared is estimated as
        param_vjp - input_vjp (a parameter VJP alone also pulls input gradients through
        the stage's inner layers, so V's share is already inside it).
        """
        n = len(forward)
        if not (len(input_vjp) == len(param_vjp) == n) or n == 0:
            raise ValueError("forward, input_vjp and param_vjp need one entry per stage.")
        if fused_vjp is None:
            shared = [max(w - v, 0.0) for v, w in zip(input_vjp, param_vjp)]
        else:
            if len(fused_vjp) != n:
                raise ValueError("fused_vjp needs one entry per stage.")
            shared = [max(b - v, 0.0) for v, b in zip(input_vjp, fused_vjp)]
        return cls(
            forward=tuple(forward),
            aux=aux,
            input_vjp=tuple(input_vjp),
            param_vjp=tuple(param_vjp),
            param_vjp_shared=tuple(shared),
            update=update,
            transfer=transfer,
        )

    def transfer_after(self, k: int) -> float:
        """Latency of the boundary between stages k and k + 1 (either direction)."""
        return _per_stage(self.transfer, k)

    def of(self, kind: OpKind, k: int, *, shared: bool = False) -> float:
        """Cost of op `kind` on stage k; `shared`: a parameter VJP that reuses the
        intermediates of the input VJP of its cotangent (W_shared)."""
        if kind == OpKind.BACKWARD:
            return self.of(OpKind.INPUT_VJP, k) + self.of(OpKind.PARAM_VJP, k, shared=True)
        if kind == OpKind.PARAM_VJP and shared:
            return _per_stage(self.param_vjp_shared, k)
        field = {
            OpKind.FORWARD: self.forward,
            OpKind.AUX: self.aux,
            OpKind.INPUT_VJP: self.input_vjp,
            OpKind.PARAM_VJP: self.param_vjp,
            OpKind.UPDATE: self.update,
        }[OpKind(kind)]
        return _per_stage(field, k)


@dataclasses.dataclass(eq=False)
class Op:
    """One op of the graph; `deps` are (op, latency) pairs. Filled in by `simulate`."""

    kind: OpKind
    stage: int
    step: int
    microbatch: int  # -1 for U
    loss: int | None  # the loss j of a V/B op
    cost: float
    deps: list[tuple[Op, float]] = dataclasses.field(default_factory=list)
    start: float = -1.0
    end: float = -1.0
    binding: Op | None = None  # what its start waited for last (input or device)

    @property
    def name(self) -> str:
        return op_name(self.kind, self.step, self.microbatch, self.stage, self.loss)

    def __repr__(self) -> str:
        return f"{self.name}@[{self.start:g},{self.end:g}]"


def build_graph(
    plan: Plan,
    microbatches: int,
    steps: int,
    costs: CostModel,
    *,
    fused_backward: bool = False,
    gpipe: bool = False,
    eager_sends: bool = True,
    max_in_flight: Sequence[int] | None = None,
) -> list[Op]:
    """The op DAG of `steps` steps of M microbatches under `plan` (module docstring)."""
    K, M = len(plan), microbatches
    ops: list[Op] = []

    def new(kind: OpKind, k: int, t: int, m: int, loss=None, *, shared=False) -> Op:
        op = Op(kind, k, t, m, loss, costs.of(kind, k, shared=shared))
        ops.append(op)
        return op

    updates: list[Op | None] = [None] * K
    for t in range(steps):
        fwd = [[new(OpKind.FORWARD, k, t, m) for k in range(K)] for m in range(M)]
        for m in range(M):
            for k in range(K):
                if k > 0:
                    fwd[m][k].deps.append((fwd[m][k - 1], costs.transfer_after(k - 1)))
                if updates[k] is not None:
                    fwd[m][k].deps.append((updates[k], 0.0))
        step = _StepOps(K)
        for m in range(M):
            _microbatch_backward(new, plan, costs, t, m, fwd[m], step, fused_backward, eager_sends)
        for k in range(K):
            if max_in_flight is not None:
                cap = max_in_flight[k]
                for m in range(cap, M):
                    done = [o for o in step.backward[k] if o.microbatch == m - cap]
                    fwd[m][k].deps += [(o, 0.0) for o in done]
            if gpipe:  # GPipe flush: every forward of the step before any backward op
                for b in step.backward[k]:
                    b.deps.append((fwd[M - 1][k], 0.0))
            u = new(OpKind.UPDATE, k, t, -1)
            u.deps += [(op, 0.0) for op in step.update_inputs[k]]
            updates[k] = u
    return ops


class _StepOps:
    """Per stage, the ops of one step that later edges attach to."""

    def __init__(self, num_stages: int):
        self.update_inputs: list[list[Op]] = [[] for _ in range(num_stages)]  # A, W, B
        self.backward: list[list[Op]] = [[] for _ in range(num_stages)]  # V, W, B


def _microbatch_backward(
    new: Callable[..., Op],
    plan: Plan,
    costs: CostModel,
    t: int,
    m: int,
    fwd: Sequence[Op],
    step: _StepOps,
    fused_backward: bool,
    eager_sends: bool,
) -> None:
    """The A, V and W (or B) ops of microbatch m of step t, last stage first."""
    K = len(plan)
    sent: list[dict[int, Op]] = [{} for _ in range(K)]  # the op that sends ∂L_j/∂h_{k-1}
    for k in reversed(range(K)):
        sp = plan[k]
        # Where each cotangent ∂L_j/∂h_k comes from: (producer, latency).
        cot: dict[int, tuple[Op, float]] = {}
        if k == K - 1:  # the last stage's loss is part of its forward
            cot[k] = (fwd[k], 0.0)
        elif plan.aux_heads:
            a = new(OpKind.AUX, k, t, m)
            a.deps.append((fwd[k], 0.0))
            step.update_inputs[k].append(a)
            cot[k] = (a, 0.0)
        if k < K - 1:
            tr = costs.transfer_after(k)
            cot.update({j: (v, tr) for j, v in sent[k + 1].items()})
        # Eager sends wait for the cotangents they use; the reference order for all.
        inputs = lambda js, cot=cot: [cot[j] for j in js] if eager_sends else list(cot.values())
        shared = sp.shared_cotangent
        for j in sp.sends:
            if j == shared and fused_backward:
                continue
            v = new(OpKind.INPUT_VJP, k, t, m, loss=j)
            v.deps += inputs([j])
            sent[k][j] = v
            step.backward[k].append(v)
        train_js = [j for j, _ in sp.train_on]
        if shared is not None and fused_backward:
            w = new(OpKind.BACKWARD, k, t, m, loss=shared)
            w.deps += inputs(train_js)
            sent[k][shared] = w
        elif shared is not None:
            w = new(OpKind.PARAM_VJP, k, t, m, shared=True)
            w.deps += [*inputs(train_js), (sent[k][shared], 0.0)]
        else:
            w = new(OpKind.PARAM_VJP, k, t, m)
            w.deps += inputs(train_js)
        step.update_inputs[k].append(w)
        step.backward[k].append(w)


_RANK = {
    # kind → rank within a step; lower runs first among ready ops.
    "sends_first": {
        OpKind.UPDATE: 0,
        OpKind.AUX: 1,
        OpKind.INPUT_VJP: 1,
        OpKind.FORWARD: 2,
        OpKind.BACKWARD: 3,
        OpKind.PARAM_VJP: 3,
    },
    "gpipe": {
        OpKind.UPDATE: 0,
        OpKind.FORWARD: 1,
        OpKind.AUX: 2,
        OpKind.INPUT_VJP: 2,
        OpKind.BACKWARD: 3,
        OpKind.PARAM_VJP: 3,
    },
}


def _priority_key(op: Op, priority: str) -> tuple:
    return (op.step, _RANK[priority][op.kind], op.microbatch, -(op.loss or 0))


def list_schedule(ops: Sequence[Op], num_devices: int, priority: str = "sends_first") -> None:
    """Sets start/end/binding of every op: non-preemptive list scheduling, one op at a
    time per device, earliest start, ties broken by `priority` (see module docstring)."""
    if priority not in _RANK:
        raise ValueError(f"Unknown priority {priority!r}; choose one of {PRIORITIES}.")
    run = _ListScheduler(ops, num_devices, priority)
    while run.done < len(ops):
        # Start what can start now; zero-cost ops may make more ready at the same time.
        # `|`, not `or`: each pass both ends the due ops and starts the ready ones.
        while run.finish_due() | run.start_ready():
            pass
        if run.done < len(ops):
            run.now = run.next_event()


class _ListScheduler:
    """The state of `list_schedule`: what waits, what runs, and when devices free up."""

    def __init__(self, ops: Sequence[Op], num_devices: int, priority: str):
        self.priority = priority
        self.users: dict[int, list[tuple[Op, float]]] = {id(op): [] for op in ops}
        self.missing: dict[int, int] = {}  # op → inputs not yet done
        for op in ops:
            self.missing[id(op)] = len(op.deps)
            for d, lat in op.deps:
                self.users[id(d)].append((op, lat))
        self.ready_at: dict[int, tuple[float, Op | None]] = {}  # op → (time, dep that set it)
        self.pending: list[list[Op]] = [[] for _ in range(num_devices)]  # inputs done
        for op in ops:
            if not op.deps:
                self.ready_at[id(op)] = (0.0, None)
                self.pending[op.stage].append(op)
        self.free_at = [0.0] * num_devices
        self.last_on: list[Op | None] = [None] * num_devices
        self.running: list[tuple[float, int, Op]] = []  # heap of (end, seq, op)
        self.seq, self.done, self.now = 0, 0, 0.0

    def finish_due(self) -> bool:
        """Ends the ops that end by `now` and readies their users; True if any ended."""
        ended = False
        while self.running and self.running[0][0] <= self.now + _EPS:
            _, _, op = heapq.heappop(self.running)
            self.done += 1
            for u, lat in self.users[id(op)]:
                t_ready = op.end + lat
                prev = self.ready_at.get(id(u))
                if prev is None or t_ready > prev[0]:
                    self.ready_at[id(u)] = (t_ready, op)
                self.missing[id(u)] -= 1
                if self.missing[id(u)] == 0:
                    self.pending[u.stage].append(u)
            ended = True
        return ended

    def start_ready(self) -> bool:
        """Starts, on every idle device, its best op whose inputs have arrived by `now`;
        True if any started."""
        started = False
        for dev, pending in enumerate(self.pending):
            if self.free_at[dev] > self.now + _EPS:
                continue
            cands = [o for o in pending if self.ready_at[id(o)][0] <= self.now + _EPS]
            if cands:
                self._start(min(cands, key=lambda o: _priority_key(o, self.priority)), dev)
                started = True
        return started

    def _start(self, op: Op, dev: int) -> None:
        self.pending[dev].remove(op)
        t_ready, dep = self.ready_at[id(op)]
        # Exact times: `now` may trail an input's end by rounding (_EPS).
        op.start = max(self.now, t_ready, self.free_at[dev])
        op.end = op.start + op.cost
        # It waited for its device if the device freed after the inputs arrived.
        prev_op = self.last_on[dev]
        device_bound = prev_op is not None and prev_op.end > t_ready + _EPS
        op.binding = prev_op if device_bound else dep
        self.free_at[dev], self.last_on[dev] = op.end, op
        heapq.heappush(self.running, (op.end, self.seq, op))
        self.seq += 1

    def next_event(self) -> float:
        """The next time an op ends or a pending op's input arrives on an idle device."""
        upcoming = [e for e, _, _ in self.running[:1]]
        upcoming += [
            self.ready_at[id(o)][0]
            for dev, pending in enumerate(self.pending)
            if self.free_at[dev] <= self.now + _EPS
            for o in pending
        ]
        upcoming = [x for x in upcoming if x > self.now + _EPS]
        if not upcoming:
            raise RuntimeError("Schedule deadlocked: the op graph has a cycle.")
        return min(upcoming)
