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

State (`MPMDState`): TrainState's fields, each a K-tuple whose entry k lives on stage k's
devices, replicated over that group's `data` axis (a step counter and rng copy per
stage, so that no op reads another device's memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from ilbp.engine import Metrics
from ilbp.losses import loss_count
from ilbp.mesh import DATA_AXIS, STAGE_AXIS
from ilbp.pipeline import mpmd_ops as ops
from ilbp.pipeline.executor import check_batch_split, check_microbatches, check_stage_devices
from ilbp.schedule import MaxInFlight, OpKind, simulate
from ilbp.stage import Batch, StagedModel
from ilbp.strategy import StagePlan, Strategy
from ilbp.train import Optimizer, TrainState, init_train_state, per_stage_optimizers

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
        self.max_in_flight = max_in_flight
        self.order = issue_order(strategy, K, microbatches, max_in_flight)
        self._build_ops()

    def _build_ops(self) -> None:
        model, K = self.model, self.model.num_stages
        self.forward, self.head, self.backward, self.update = [], [], [], []
        for k, stage in enumerate(model.stages):
            if k < K - 1:
                self.forward.append(ops.forward_op(stage, k, k == 0))
                weight = self.strategy.aux_weight(k)
                head = model.heads[k]
                self.head.append(
                    ops.head_op(head, model.head_loss(k), weight, k, K)
                    if self.plan.aux_heads
                    else None
                )
            else:
                self.forward.append(ops.last_forward_op(stage, model.loss, k, k == 0))
            sp = self.plan[k]
            shared = sp.shared_cotangent
            # W trains; when the trained cotangent is also sent back, one VJP gives both (B).
            self.backward.append(
                ops.backward_op(StagePlan(sp.train_on, () if shared is None else (shared,)))
            )
            self.update.append(ops.update_op(self.optimizers[k], k, self.microbatches))

    # Placement -------------------------------------------------------------------------
    def from_train_state(self, ts: TrainState) -> MPMDState:
        K = self.model.num_stages
        put = lambda tree, k: jax.device_put(tree, self.replicated[k])
        return MPMDState(
            step=tuple(put(ts.step, k) for k in range(K)),
            params=tuple(put(ts.params[k], k) for k in range(K)),
            state=tuple(put(ts.state[k], k) for k in range(K)),
            opt_state=tuple(put(ts.opt_state[k], k) for k in range(K)),
            rng=tuple(put(ts.rng, k) for k in range(K)),
        )

    def to_train_state(self, state: MPMDState) -> TrainState:
        """Gathered onto stage 0's first device, in the single-program layout."""
        ts = TrainState(state.step[0], state.params, state.state, state.opt_state, state.rng[0])
        return jax.device_put(ts, self.meshes[0].devices.flat[0])

    def init(self, rng: jax.Array, batch: Batch) -> MPMDState:
        self._check_batch(batch)
        return self.from_train_state(init_train_state(self.model, self.optimizer, rng, batch))

    def _check_batch(self, batch: Batch) -> int:
        return check_batch_split(batch, self.meshes[0].shape[DATA_AXIS], self.microbatches)

    # One step --------------------------------------------------------------------------
    def step(
        self, st: MPMDState, batch: Batch, trace: TraceFn | None = None
    ) -> tuple[MPMDState, Metrics]:
        """Issues one step's ops (no host synchronisation); returns the new state.

        `trace`, if given, is called on the host right after each op is issued, as
        `trace(kind, k, m, loss, index, outputs)`: the op's entry of `self.order`, its
        position there, and the arrays it returned on stage k's devices (before any
        send). It must not block, or it serialises the pipeline
        (`ilbp.pipeline.trace.record_timeline` hands them to watcher threads).
        """
        size = self._check_batch(batch)
        model, K, M = self.model, self.model.num_stages, self.microbatches
        b = size // M
        # Microbatch m on stage k's devices (every stage's loss reads its labels).
        placed: dict[tuple[int, int], Batch] = {}
        # Its loss_count there if microbatches are token-weighted (mpmd_ops), else None.
        weighted = M > 1 and loss_count(batch) is not None
        counted: dict[tuple[int, int], jax.Array | None] = {}

        def microbatch(m: int, k: int) -> Batch:
            if (m, k) not in placed:
                piece = jax.tree.map(lambda x: x[m * b : (m + 1) * b], batch)
                placed[(m, k)] = jax.device_put(piece, self.batch_sharding[k])
            return placed[(m, k)]

        def count(m: int, k: int) -> jax.Array | None:
            if (m, k) not in counted:
                counted[(m, k)] = loss_count(microbatch(m, k)) if weighted else None
            return counted[(m, k)]

        params, opt_state, step = list(st.params), list(st.opt_state), list(st.step)
        stage_state = [dict(s) for s in st.state]
        inputs: dict[tuple[int, int], jax.Array] = {}  # (m, k) -> h_{k-1} on stage k
        outputs: dict[tuple[int, int], jax.Array] = {}  # (m, k) -> h_k for the aux head
        vjps: dict[tuple[int, int], Any] = {}
        cots: dict[tuple[int, int], dict[int, jax.Array]] = {}  # ∂L_j/∂h_k on stage k
        grad_sum: list[dict[str, Any]] = [{"stage": None, "head": None} for _ in range(K)]
        stage_metrics: list[dict[int, Metrics]] = [{} for _ in range(K)]  # by microbatch
        metrics: Metrics = {}

        def send_back(m: int, k: int, sent: dict[int, jax.Array]) -> None:
            for j, dx in sent.items():
                cots.setdefault((m, k - 1), {})[j] = jax.device_put(dx, self.batch_sharding[k - 1])

        # Drop a microbatch's residuals and cotangents after its last backward op on k.
        pending = {(m, k): 1 + len(self.plan[k].input_vjps) for m in range(M) for k in range(K)}

        def release(m: int, k: int) -> None:
            pending[(m, k)] -= 1
            if not pending[(m, k)]:
                del vjps[(m, k)], cots[(m, k)]

        for index, (kind, k, m, j) in enumerate(self.order):
            if kind == OpKind.FORWARD:
                x = microbatch(m, 0)[model.input_key] if k == 0 else inputs.pop((m, k))
                args = (params[k]["stage"], stage_state[k]["stage"], x)
                if k < K - 1:
                    out = self.forward[k](*args, st.rng[k], step[k], m)
                    h, vjps[(m, k)], stage_state[k]["stage"] = out
                    outputs[(m, k)] = h
                    inputs[(m, k + 1)] = jax.device_put(h, self.batch_sharding[k + 1])
                else:
                    out = self.forward[k](*args, microbatch(m, k), st.rng[k], step[k], m)
                    vjps[(m, k)], stage_state[k]["stage"], dh, mets = out
                    cots.setdefault((m, k), {})[k] = dh
                    stage_metrics[k][m] = mets
            elif kind == OpKind.AUX:
                g = grad_sum[k]
                out = self.head[k](
                    params[k]["head"],
                    stage_state[k]["head"],
                    outputs.pop((m, k)),
                    microbatch(m, k),
                    st.rng[k],
                    step[k],
                    m,
                    g["head"],
                    count(m, k),
                )
                g["head"], stage_state[k]["head"], dh, mets = out
                cots.setdefault((m, k), {})[k] = dh
                stage_metrics[k][m] = mets
            elif kind == OpKind.INPUT_VJP:
                out = ops.input_vjp_op(vjps[(m, k)], cots[(m, k)][j])
                send_back(m, k, {j: out})
                release(m, k)
            elif kind in (OpKind.PARAM_VJP, OpKind.BACKWARD):
                needed = {jj for jj, _ in self.plan[k].train_on}
                cot = {jj: c for jj, c in cots[(m, k)].items() if jj in needed}
                out = self.backward[k](vjps[(m, k)], cot, grad_sum[k]["stage"], count(m, k))
                grad_sum[k]["stage"], sent = out
                send_back(m, k, sent)
                release(m, k)
            elif kind == OpKind.UPDATE:
                # No "head" on the last stage, nor without aux heads (e2e).
                grads = {name: g for name, g in grad_sum[k].items() if g is not None}
                mets = [stage_metrics[k][i] for i in sorted(stage_metrics[k])]
                counts = [count(i, k) for i in range(M)] if weighted else None
                out = self.update[k](params[k], opt_state[k], grads, step[k], mets, counts)
                params[k], opt_state[k], step[k], mets = out
                metrics.update(mets)
            if trace is not None:
                trace(kind, k, m, j, index, out)
        new = MPMDState(tuple(step), tuple(params), tuple(stage_state), tuple(opt_state), st.rng)
        return new, metrics
