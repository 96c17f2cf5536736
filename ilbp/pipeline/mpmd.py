"""MPMD executor: stage k's state and ops on device (group) k, issued in schedule order.

For heterogeneous stages (ResNets). Every stage has its own jitted ops (`mpmd_ops`); a
step issues them from Python in the order of the schedule model's timeline
(`ilbp.schedule.simulate` with eager sends, the window's in-flight cap and the fused
backward where a stage trains on the cotangent it also sends back). Dispatch is
asynchronous, so the host runs ahead and each device executes its ops in issue order as
soon as their inputs exist: stages overlap, and a stage sends every cotangent the
moment it is computed (`jax.device_put` to the previous stage's devices). Nothing
blocks on the host; consecutive steps overlap too, within what the updates allow.

Microbatches: M slices of the batch, in order; gradients accumulate over them (weighted
by their counted tokens on padded batches) and each stage updates once per step;
BatchNorm state threads through microbatches in order, as in
`ilbp.train.accumulate_grads`. Without aux heads (e2e) no head op exists or runs.
Stage 0 alone receives a microbatch's input; the stages with a loss (the last, and
those with aux heads) receive every other entry of it (labels, weights); the others get
its token count as a device scalar when microbatches are token-weighted.

Buffers: a step donates the state it is given (the ops reuse its buffers, `mpmd_ops`),
forward residuals hold no parameter copies (`ilbp.pipeline.residuals`), and a
microbatch's residuals, cotangents and activations are dropped after their last use.

State (`MPMDState`): TrainState's fields, each a K-tuple whose entry k lives on stage k's
devices, replicated over that group's `data` axis (a step counter and rng copy per
stage, so that no op reads another device's memory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from ilbp.checks import check_batch_split, check_microbatches, check_stage_devices
from ilbp.engine import Metrics
from ilbp.losses import WEIGHTS_KEY, loss_count
from ilbp.mesh import DATA_AXIS, STAGE_AXIS
from ilbp.pipeline import mpmd_ops as ops
from ilbp.schedule import MaxInFlight, OpKind, simulate
from ilbp.stage import Batch, StagedModel
from ilbp.strategy import StagePlan, Strategy
from ilbp.train import (
    Optimizer,
    TrainState,
    init_train_state,
    per_stage_optimizers,
    run_steps,
    slice_rows,
)

# trace(kind, k, m, loss, index in the issue order, the op's outputs on stage k)
TraceFn = Callable[[OpKind, int, int, int | None, int, Any], None]


@flax.struct.dataclass
class MPMDState:
    """Per-stage K-tuples; entry k of each field lives on stage k's device group."""

    step: tuple
    params: tuple
    state: tuple
    opt_state: tuple
    rng: tuple


def stage_meshes(
    num_stages: int, mesh: Mesh | None = None, devices: Sequence[Any] | None = None
) -> list[Mesh]:
    """One 1-D mesh (axis `data`) per stage: its device group.

    From `mesh` (row k of its `stage` axis), `devices` (K devices or K equal groups), or
    the first K devices. ValueError (before any compilation) if they do not fit K.
    """
    if mesh is not None and devices is not None:
        raise ValueError("Pass either `mesh` or `devices` to the mpmd executor, not both.")
    if mesh is not None:
        if STAGE_AXIS not in mesh.shape or mesh.shape[STAGE_AXIS] != num_stages:
            raise ValueError(
                f"The mpmd executor's mesh needs a `{STAGE_AXIS}` axis of size K={num_stages} "
                f"(one device group per stage); got mesh shape {dict(mesh.shape)}. Use "
                f"ilbp.make_mesh(stage={num_stages})."
            )
        grid = np.asarray(mesh.devices).reshape(num_stages, -1)  # stage axis first
        axes = mesh.axis_names
        if axes.index(STAGE_AXIS) != 0:
            grid = np.moveaxis(np.asarray(mesh.devices), axes.index(STAGE_AXIS), 0)
            grid = grid.reshape(num_stages, -1)
        groups = [list(row) for row in grid]
    elif devices is not None:
        groups = [list(d) if isinstance(d, Sequence) else [d] for d in devices]
        if len(groups) != num_stages:
            raise ValueError(
                f"Got {len(groups)} devices (groups) for a model with K={num_stages} stages; "
                "pass exactly one per stage."
            )
        if len({len(g) for g in groups}) != 1:
            raise ValueError("Every stage's device group must have the same size.")
    else:
        check_stage_devices(num_stages, jax.device_count(), "mpmd")
        groups = [[d] for d in jax.devices()[:num_stages]]
    flat = [d for g in groups for d in g]
    if len(set(flat)) != len(flat):
        raise ValueError("A device appears in two stages' groups; give each stage its own.")
    return [Mesh(np.array(g), (DATA_AXIS,), axis_types=(AxisType.Auto,)) for g in groups]


def issue_order(
    strategy: Strategy,
    num_stages: int,
    microbatches: int,
    max_in_flight: MaxInFlight = "window",
) -> list[tuple]:
    """One step's ops as (kind, k, m, loss) in the schedule model's start-time order.

    Any topological order is correct (each device runs its ops in issue order); this one
    is the model's, so measurement and prediction describe the same schedule. Without
    aux heads (e2e) there are no head ops (A), whatever the model lists.
    `max_in_flight` is the model's cap on the microbatches a stage holds residuals for
    (`ilbp.schedule.simulate`); ValueError if it is malformed.
    """
    sched = simulate(
        strategy,
        num_stages,
        microbatches,
        steps=1,
        fused_backward=True,
        max_in_flight=max_in_flight,
    )
    heads = strategy.plan(num_stages).aux_heads
    return [
        (o.kind, o.stage, o.microbatch, o.loss)
        for o in sched.timeline
        if heads or o.kind != OpKind.AUX
    ]


def _copy_to(tree: Any, sharding: NamedSharding) -> Any:
    """`tree` replicated over `sharding`'s devices in buffers of its own. (On a device
    group, jax.device_put(may_alias=False) still shares the shard on a device the source
    is on, and donating it would delete the source: copy onto one device first.)"""
    own = jax.device_put(tree, sharding.mesh.devices.flat[0], may_alias=False)
    return jax.device_put(own, sharding)


@dataclasses.dataclass(frozen=True)
class _StageOps:
    """Stage k's jitted ops (`mpmd_ops`); `head` is None on the last stage and without
    aux heads (e2e)."""

    forward: Callable
    head: Callable | None
    backward: Callable
    update: Callable


class MPMDExecutor:
    """Per-stage jitted ops on per-stage device groups (module docstring)."""

    def __init__(
        self,
        model: StagedModel,
        strategy: Strategy,
        optimizer: Optimizer,
        *,
        microbatches: int = 1,
        mesh: Mesh | None = None,
        devices: Sequence[Any] | None = None,
        max_in_flight: MaxInFlight = "window",
    ):
        check_microbatches(microbatches)
        K = model.num_stages
        strategy.check(K)
        self.model, self.strategy, self.optimizer = model, strategy, optimizer
        self.microbatches = microbatches
        self.optimizers = per_stage_optimizers(optimizer, K)
        self.meshes = stage_meshes(K, mesh, devices)
        self.replicated = [NamedSharding(m, jax.P()) for m in self.meshes]
        self.batch_sharding = [NamedSharding(m, jax.P(DATA_AXIS)) for m in self.meshes]
        self.plan = strategy.plan(K)
        # The stages whose losses read the labels: the last, and those with aux heads.
        self.loss_stages = frozenset(range(K) if self.plan.aux_heads else [K - 1])
        self.max_in_flight = max_in_flight
        self.order = issue_order(strategy, K, microbatches, max_in_flight)
        # Microbatch indices as device scalars on each stage: no transfer per op.
        self.indices = [
            [jax.device_put(np.int32(m), self.replicated[k]) for m in range(microbatches)]
            for k in range(K)
        ]
        self.zeros = [ops.zeros_op(s) for s in self.replicated]  # gradient sums, M > 1
        self._ops = {True: self._build_ops(donate=True)}

    def stage_ops(self, donate: bool = True) -> list[_StageOps]:
        """Every stage's ops, donating their consumed inputs or not (traced steps)."""
        if donate not in self._ops:
            self._ops[donate] = self._build_ops(donate)
        return self._ops[donate]

    def _build_ops(self, donate: bool) -> list[_StageOps]:
        model, K = self.model, self.model.num_stages
        built = []
        for k, stage in enumerate(model.stages):
            head = None
            if k < K - 1:
                forward = ops.forward_op(stage, k, k == 0, donate)
                if self.plan.aux_heads:
                    weight = self.strategy.aux_weight(k)
                    head = ops.head_op(model.heads[k], model.head_loss(k), weight, k, K, donate)
            else:
                forward = ops.last_forward_op(stage, model.loss, k, k == 0, donate)
            sp = self.plan[k]
            shared = sp.shared_cotangent
            # W trains; when the trained cotangent is also sent back, one VJP gives both (B).
            plan = StagePlan(sp.train_on, () if shared is None else (shared,))
            backward = ops.backward_op(plan, donate)
            update = ops.update_op(self.optimizers[k], k, self.microbatches, donate)
            built.append(_StageOps(forward, head, backward, update))
        return built

    # Placement -------------------------------------------------------------------------
    def from_train_state(self, ts: TrainState) -> MPMDState:
        """Places a copy of `ts` on the stages (steps donate it: `ts` stays valid)."""
        K = self.model.num_stages
        put = lambda tree, k: _copy_to(tree, self.replicated[k])
        return MPMDState(
            step=tuple(put(ts.step, k) for k in range(K)),
            params=tuple(put(ts.params[k], k) for k in range(K)),
            state=tuple(put(ts.state[k], k) for k in range(K)),
            opt_state=tuple(put(ts.opt_state[k], k) for k in range(K)),
            rng=tuple(put(ts.rng, k) for k in range(K)),
        )

    def to_train_state(self, state: MPMDState) -> TrainState:
        """On the host (numpy) in the single-program layout, each stage's state fetched
        straight from its devices (no gather onto one device): for checkpoints and eval."""
        fetch = lambda trees: tuple(jax.device_get(tree) for tree in trees)
        step = np.asarray(jax.device_get(state.step[0]))  # 0-d array, not a numpy scalar
        params, stage_state, opt_state = map(fetch, (state.params, state.state, state.opt_state))
        return TrainState(step, params, stage_state, opt_state, state.rng[0])

    def init(self, rng: jax.Array, batch: Batch) -> MPMDState:
        self._check_batch(batch)
        return self.from_train_state(init_train_state(self.model, self.optimizer, rng, batch))

    def _check_batch(self, batch: Batch) -> int:
        return check_batch_split(batch, self.meshes[0].shape[DATA_AXIS], self.microbatches)

    # Steps -----------------------------------------------------------------------------
    def steps(self, st: MPMDState, batches: Batch) -> tuple[MPMDState, Metrics]:
        """T `step`s on batches stacked T × B × ..., issued back to back (they overlap
        as far as the updates allow); metrics with a leading T axis."""
        return run_steps(self.step, st, batches)

    def step(
        self, st: MPMDState, batch: Batch, trace: TraceFn | None = None
    ) -> tuple[MPMDState, Metrics]:
        """Issues one step's ops (no host synchronisation); returns the new state.

        The step donates `st`'s parameters, optimizer and model state and step counters:
        use the returned state, not `st`, afterwards. `trace`, if given, is called on the
        host right after each op is issued, as `trace(kind, k, m, loss, index, outputs)`:
        the op's entry of `self.order`, its position there, and the arrays it returned
        on stage k's devices (before any send). It must not block, or it serialises the
        pipeline (`ilbp.pipeline.trace.record_timeline` hands them to watcher threads).
        A traced step runs the same ops without donation, so that its outputs stay
        valid until the watchers have seen them (its ops compile on their first use).
        """
        size = self._check_batch(batch)
        run = _StepRun(self, st, batch, size // self.microbatches, trace is None)
        for index, (kind, k, m, j) in enumerate(self.order):
            out = run.issue(kind, k, m, j)
            if trace is not None:
                trace(kind, k, m, j, index, out)
        return run.new_state(), run.metrics


class _StepRun:
    """One step's ops in flight: microbatches placed per stage, forward outputs,
    residuals, cotangents and gradient sums, released after their last use."""

    def __init__(self, ex: MPMDExecutor, st: MPMDState, batch: Batch, b: int, donate: bool):
        K, M = ex.model.num_stages, ex.microbatches
        self.ex, self.st, self.batch, self.b = ex, st, batch, b
        self.ops = ex.stage_ops(donate)
        self.params, self.opt_state, self.step = list(st.params), list(st.opt_state), list(st.step)
        self.stage_state = [dict(s) for s in st.state]
        self.placed: dict[tuple[int, int], Batch] = {}  # (m, k) -> what stage k reads
        # Microbatch loss_counts if token-weighted (mpmd_ops), else None.
        self.weighted = M > 1 and WEIGHTS_KEY in batch  # as loss_count is not None
        self.counted: dict[tuple[int, int], jax.Array | None] = {}
        self.inputs: dict[tuple[int, int], jax.Array] = {}  # (m, k) -> h_{k-1} on stage k
        self.outputs: dict[tuple[int, int], jax.Array] = {}  # (m, k) -> h_k for the aux head
        self.residuals: dict[tuple[int, int], Any] = {}
        self.cots: dict[tuple[int, int], dict[int, jax.Array]] = {}  # ∂L_j/∂h_k on stage k
        # Gradient sums (no head sum without an A op): None at M = 1, where an op's
        # gradient is the sum, else zeros (one signature for every microbatch's op),
        # made by one dispatch per stage.
        like = lambda p, o: {"stage": p["stage"], "head": p["head"] if o.head else None}
        self.grad_sum: list[dict[str, Any]] = [
            {"stage": None, "head": None} if M == 1 else ex.zeros[k](like(p, o))
            for k, (p, o) in enumerate(zip(self.params, self.ops))
        ]
        self.stage_metrics: list[dict[int, Metrics]] = [{} for _ in range(K)]  # by microbatch
        self.metrics: Metrics = {}
        # A microbatch's residuals and cotangents go after its last backward op on k.
        self.pending = {(m, k): 1 + len(ex.plan[k].input_vjps) for m in range(M) for k in range(K)}

    def issue(self, kind: OpKind, k: int, m: int, j: int | None) -> Any:
        """Issues one op of the order; returns its outputs."""
        if kind == OpKind.FORWARD:
            return self.forward(k, m)
        if kind == OpKind.AUX:
            return self.aux(k, m)
        if kind == OpKind.INPUT_VJP:
            return self.input_vjp(k, m, j)
        if kind in (OpKind.PARAM_VJP, OpKind.BACKWARD):
            return self.backward(k, m)
        return self.update(k)

    # Inputs ----------------------------------------------------------------------------
    def microbatch(self, m: int, k: int) -> Batch:
        """Microbatch m's entries that stage k reads, on its devices: the input on stage
        0, everything else (labels, weights) on the stages with a loss."""
        if (m, k) not in self.placed:
            ex, key = self.ex, self.ex.model.input_key
            wanted = {key} if k == 0 else set()
            if k in ex.loss_stages:
                wanted |= set(self.batch) - {key}
            rows = lambda x: slice_rows(x, m * self.b, (m + 1) * self.b)
            piece = {n: rows(x) for n, x in self.batch.items() if n in wanted}
            self.placed[(m, k)] = jax.device_put(piece, ex.batch_sharding[k])
        return self.placed[(m, k)]

    def count(self, m: int, k: int) -> jax.Array | None:
        """Microbatch m's loss_count on stage k: counted where the weights are (a loss
        stage), sent as a scalar to the others."""
        if not self.weighted:
            return None
        if (m, k) not in self.counted:
            if k in self.ex.loss_stages:
                self.counted[(m, k)] = loss_count(self.microbatch(m, k))
            else:
                last = self.count(m, self.ex.model.num_stages - 1)
                self.counted[(m, k)] = jax.device_put(last, self.ex.replicated[k])
        return self.counted[(m, k)]

    def send_back(self, m: int, k: int, sent: dict[int, jax.Array]) -> None:
        for j, dx in sent.items():
            dx = jax.device_put(dx, self.ex.batch_sharding[k - 1])
            self.cots.setdefault((m, k - 1), {})[j] = dx

    def release(self, m: int, k: int) -> None:
        self.pending[(m, k)] -= 1
        if not self.pending[(m, k)]:
            del self.residuals[(m, k)], self.cots[(m, k)]

    # The ops ---------------------------------------------------------------------------
    def forward(self, k: int, m: int) -> Any:
        ex, st, K = self.ex, self.st, self.ex.model.num_stages
        x = self.microbatch(m, 0)[ex.model.input_key] if k == 0 else self.inputs.pop((m, k))
        args = (self.params[k]["stage"], self.stage_state[k]["stage"], x)
        index = ex.indices[k][m]
        if k < K - 1:
            out = self.ops[k].forward(*args, st.rng[k], self.step[k], index)
            h, self.residuals[(m, k)], self.stage_state[k]["stage"] = out
            if k in ex.loss_stages:
                self.outputs[(m, k)] = h
            self.inputs[(m, k + 1)] = jax.device_put(h, ex.batch_sharding[k + 1])
            return out
        out = self.ops[k].forward(*args, self.microbatch(m, k), st.rng[k], self.step[k], index)
        self.residuals[(m, k)], self.stage_state[k]["stage"], dh, mets = out
        self.cots.setdefault((m, k), {})[k] = dh
        self.stage_metrics[k][m] = mets
        return out

    def aux(self, k: int, m: int) -> Any:
        g, state = self.grad_sum[k], self.stage_state[k]
        out = self.ops[k].head(
            self.params[k]["head"],
            state["head"],
            self.outputs.pop((m, k)),
            self.microbatch(m, k),
            self.st.rng[k],
            self.step[k],
            self.ex.indices[k][m],
            g["head"],
            self.count(m, k),
        )
        g["head"], state["head"], dh, mets = out
        self.cots.setdefault((m, k), {})[k] = dh
        self.stage_metrics[k][m] = mets
        return out

    def input_vjp(self, k: int, m: int, j: int) -> Any:
        res, cot = self.residuals[(m, k)], self.cots[(m, k)][j]
        out = ops.input_vjp_op(self.params[k]["stage"], res, cot)
        self.send_back(m, k, {j: out})
        self.release(m, k)
        return out

    def backward(self, k: int, m: int) -> Any:
        needed = {jj for jj, _ in self.ex.plan[k].train_on}
        cot = {jj: c for jj, c in self.cots[(m, k)].items() if jj in needed}
        g = self.grad_sum[k]
        res = self.residuals[(m, k)]
        out = self.ops[k].backward(self.params[k]["stage"], res, cot, g["stage"], self.count(m, k))
        g["stage"], sent = out
        self.send_back(m, k, sent)
        self.release(m, k)
        return out

    def update(self, k: int) -> Any:
        # No "head" on the last stage, nor without aux heads (e2e).
        grads = {name: g for name, g in self.grad_sum[k].items() if g is not None}
        self.grad_sum[k] = {}  # freed once U has read them
        mets = [self.stage_metrics[k][i] for i in sorted(self.stage_metrics[k])]
        M = self.ex.microbatches
        counts = [self.count(i, k) for i in range(M)] if self.weighted else None
        out = self.ops[k].update(
            self.params[k], self.opt_state[k], grads, self.step[k], mets, counts
        )
        self.params[k], self.opt_state[k], self.step[k], mets = out
        self.metrics.update(mets)
        return out

    def new_state(self) -> MPMDState:
        state = tuple(self.stage_state)
        return MPMDState(
            tuple(self.step), tuple(self.params), state, tuple(self.opt_state), self.st.rng
        )
