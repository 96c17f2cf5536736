"""SPMD executor: homogeneous stages stacked over mesh axis `stage`, one shard_map program.

Stage k's parameters and optimizer state are row k of arrays stacked K × ... and sharded
over `stage`; one jitted program runs `ilbp.pipeline.spmd_clock.stage_program` inside
`jax.shard_map`, manual over `stage` and automatic over `data`, so it composes with data
parallelism and runs multi-process unchanged (nothing in it is host-local). Every stage
runs the same clock-tick loop, with `ppermute` right for activations and left for
cotangent lists (the schedule: `ilbp.pipeline.spmd_clock`). `steps(state, batches)` runs
T steps in one program, each stage starting step s + 1 as soon as its own update allows
(pairwise with M = 1: 3 ticks per step against global's 2K - 1); `step` is `steps` with
T = 1, which drains the pipeline.

Batches: `step`/`steps` take the whole batch on every process (each process places its
own shards), or `place`d batches assembled on the mesh from each process's rows: the rows
its data shards hold after the B -> M × b microbatch split (`ilbp.data.batches` with
`microbatches=M` and `ilbp.mesh.process_batch_shard`), so each process reads only those.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from ilbp.checks import (
    check_batch_split,
    check_microbatches,
    check_stacked,
    check_stage_devices,
)
from ilbp.engine import Metrics, loss_metrics
from ilbp.mesh import DATA_AXIS, STAGE_AXIS, make_mesh, process_batch_shard
from ilbp.pipeline.homogeneous import check_homogeneous
from ilbp.pipeline.spmd_clock import stage_program
from ilbp.pipeline.spmd_ticks import Clock
from ilbp.stage import Batch, StagedModel
from ilbp.strategy import Strategy
from ilbp.train import Optimizer, TrainState, init_train_state, per_stage_optimizers

P = jax.P


@flax.struct.dataclass
class SPMDState:
    """step, rng: replicated; params/opt_state: uniform layout stacked K × ... over `stage`."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@flax.struct.dataclass
class PlacedBatches:
    """Batches split into microbatches on the mesh (`SPMDExecutor.place`): every leaf a
    jax.Array T × M × b × ..., b sharded over `data`."""

    split: Any


def _put(tree: Any, sharding: NamedSharding) -> Any:
    """Places host values; each process builds only its own shards (no host-local
    assumption, and no cross-process equality check, which NaN padding would fail)."""

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def _by_stage(txs: tuple[optax.GradientTransformation, ...]) -> optax.GradientTransformation:
    """The one transformation the stage program applies: `txs[0]` if every stage has
    it, else one whose update is stage k's (k: the `stage` axis index, so it is only
    called inside the program; stage k's state is initialised by `txs[k]`)."""
    if all(tx is txs[0] for tx in txs):
        return txs[0]

    def init(params):
        raise NotImplementedError("init each stage's state with its own transformation")

    def update(updates, state, params=None):
        k = jax.lax.axis_index(STAGE_AXIS)
        branches = [functools.partial(tx.update, params=params) for tx in txs]
        return jax.lax.switch(k, branches, updates, state)

    return optax.GradientTransformation(init, update)


def _check_stackable(opt_states: list[Any]) -> None:
    """The stages' optimizer states (uniform layout) are stacked: ValueError unless each
    has stage 0's structure, shapes and dtypes."""
    layout = lambda t: jax.tree.map(lambda x: (np.shape(x), jnp.result_type(x)), t)
    first = layout(opt_states[0])
    for k, state in enumerate(opt_states[1:], 1):
        if jax.tree.structure(state) != jax.tree.structure(opt_states[0]) or (
            layout(state) != first
        ):
            raise ValueError(
                f"The spmd executor stacks the stages' optimizer states, but stage {k}'s "
                f"optimizer state differs from stage 0's in structure or shapes:\n"
                f"  stage 0: {jax.tree.structure(opt_states[0])}\n"
                f"  stage {k}: {jax.tree.structure(state)}\n"
                "Give every stage a transformation of the same kind (the same optax chain "
                "with its own hyperparameters, e.g. its own learning rate), or use the "
                "simulated or mpmd executor, which take any transformation per stage."
            )


class SPMDExecutor:
    """One shard_map program over the (stage, data) mesh (module docstring)."""

    def __init__(
        self,
        model: StagedModel,
        strategy: Strategy,
        optimizer: Optimizer,
        *,
        microbatches: int = 1,
        mesh: Mesh | None = None,
    ):
        check_microbatches(microbatches)
        self.hom = check_homogeneous(model)
        self.model = model
        K = model.num_stages
        strategy.check(K)
        if mesh is None:
            check_stage_devices(K, jax.device_count(), "spmd")
            mesh = make_mesh(stage=K)
        if mesh.shape.get(STAGE_AXIS) != K or DATA_AXIS not in mesh.shape:
            raise ValueError(
                f"The spmd executor needs a mesh with axes `{STAGE_AXIS}` of size K={K} and "
                f"`{DATA_AXIS}`; got {dict(mesh.shape)}. Use ilbp.make_mesh(stage={K})."
            )
        self.mesh, self.M, self.K = mesh, microbatches, K
        self.tx = _by_stage(per_stage_optimizers(optimizer, K))
        self.strategy, self.optimizer = strategy, optimizer
        self.clock = Clock.of(strategy, K, microbatches)
        self.period = self.clock.period  # P: ticks per step per stage
        self.stacked = NamedSharding(mesh, P(STAGE_AXIS))
        self.replicated = NamedSharding(mesh, P())
        self.split = NamedSharding(mesh, P(None, None, DATA_AXIS))  # T × M × b batches
        # The state is donated: the program updates parameters and optimizer state in place.
        self._step = jax.jit(self._step_fn, static_argnames="squeeze", donate_argnums=0)
        self._restack = jax.jit(self._stacked_layout, out_shardings=(self.stacked,) * 2)
        self._to_devices: dict[bool, Any] = {}

    # Layout ----------------------------------------------------------------------------
    def _opt_map(self, fn, opt_state, params_like):
        """Applies fn to every params-shaped subtree of an optimizer state."""
        structure = jax.tree.structure(params_like)
        return jax.tree.map(
            lambda t: fn(t) if jax.tree.structure(t) == structure else t,
            opt_state,
            is_leaf=lambda t: jax.tree.structure(t) == structure,
        )

    def from_train_state(self, ts: TrainState) -> SPMDState:
        """The stacked state of `ts`: placed from the host, or, when its arrays span
        processes (a multi-process checkpoint restored like `to_train_state(st,
        spread=True)`), restacked on the devices without visiting any host."""
        leaves = jax.tree.leaves((ts.params, ts.opt_state))
        if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves):
            params, opt_state = self._restack(ts.params, ts.opt_state)
            return SPMDState(self._replicate(ts.step), params, opt_state, self._replicate(ts.rng))
        uniform, opt = self._stacked_layout(ts.params, ts.opt_state)
        return SPMDState(
            step=_put(ts.step, self.replicated),
            params=_put(uniform, self.stacked),
            opt_state=_put(opt, self.stacked),
            rng=_put(ts.rng, self.replicated),
        )

    def _stacked_layout(self, params, opt_state) -> tuple[Any, Any]:
        """(stacked uniform params, stacked optimizer state) of per-stage ones."""
        K, hom = self.K, self.hom
        uniform = [hom.to_uniform(params[k], k) for k in range(K)]
        opt = [
            self._opt_map(lambda t, k=k: hom.to_uniform(t, k), opt_state[k], params[k])
            for k in range(K)
        ]
        _check_stackable(opt)
        stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
        return stack(uniform), stack(opt)

    def _model_layout(self, params, opt_state, take) -> tuple[tuple, tuple]:
        """(per-stage params, per-stage optimizer states) in the model's layout, stage k's
        leaves `take(stacked leaf, k)`."""
        K, hom = self.K, self.hom
        unstack = lambda tree, k: jax.tree.map(lambda x: take(x, k), tree)
        per_stage = tuple(hom.from_uniform(unstack(params, k), k) for k in range(K))
        uniform0 = unstack(params, 0)
        opt = tuple(
            self._opt_map(lambda t, k=k: hom.from_uniform(t, k), unstack(opt_state, k), uniform0)
            for k in range(K)
        )
        return per_stage, opt

    def to_train_state(self, st: SPMDState, *, spread: bool = False) -> TrainState:
        """The single-program layout. In one process, gathered to host (numpy). In several
        (every process calls it), it stays on the devices: replicated over the mesh (what
        a single-program eval step takes) or, with `spread`, every leaf split over the
        mesh (`_spread`), for checkpoints that each process writes and reads its own
        shards of. `spread` gives the on-device layout in one process too."""
        if jax.process_count() == 1 and not spread:
            host = jax.tree.map(np.asarray, (st.params, st.opt_state))
            # np.asarray keeps 0-d leaves (step counts) arrays, not numpy scalars.
            params, opt = self._model_layout(*host, take=lambda x, k: np.asarray(x[k]))
            step = jnp.asarray(st.step)
        else:
            params, opt = self._on_devices(spread, st)(st.params, st.opt_state)
            step = st.step
        # Homogeneous stages keep no state (check_homogeneous).
        state = ({"stage": {}, "head": {}},) * (self.K - 1) + ({"stage": {}},)
        return TrainState(step, params, state, opt, st.rng)

    def _on_devices(self, spread: bool, st: SPMDState):
        """The jitted `_model_layout` of states like `st`, its outputs replicated or
        `_spread` (made once)."""
        if spread not in self._to_devices:
            layout = functools.partial(self._model_layout, take=lambda x, k: x[k])
            out = self.replicated
            if spread:
                shapes = jax.eval_shape(layout, st.params, st.opt_state)
                out = jax.tree.map(lambda x: self._spread(x.shape), shapes)
            self._to_devices[spread] = jax.jit(layout, out_shardings=out)
        return self._to_devices[spread]

    def _spread(self, shape: tuple[int, ...]) -> NamedSharding:
        """A leaf's first dimension that the device count divides, split over every
        device; else one that K divides, over `stage`; else replicated (small leaves)."""
        for axes, size in (((STAGE_AXIS, DATA_AXIS), self.mesh.devices.size), (STAGE_AXIS, self.K)):
            for d, n in enumerate(shape):
                if n % size == 0:
                    return NamedSharding(self.mesh, P(*(None,) * d, axes))
        return self.replicated

    def _replicate(self, x: Any) -> Any:
        """`x` replicated over the mesh (placed from the host unless it is already)."""
        if isinstance(x, jax.Array) and x.sharding == self.replicated:
            return x
        return _put(x, self.replicated)

    def init(self, rng: jax.Array, batch: Batch) -> SPMDState:
        self._check(batch)
        return self.from_train_state(init_train_state(self.model, self.optimizer, rng, batch))

    def _check(self, batch: Batch) -> int:
        return check_batch_split(batch, self.mesh.shape[DATA_AXIS], self.M)

    def ticks(self, num_steps: int) -> int:
        """Clock ticks of a `steps` call of T = num_steps steps."""
        return self.clock.ticks(num_steps)

    def step(self, st: SPMDState, batch: Batch | PlacedBatches) -> tuple[SPMDState, Metrics]:
        """One step (the pipeline drains at its end); donates `st`, as `steps` does.
        `batch`: the whole batch B × ... on every process, or `place(rows)`."""
        if isinstance(batch, PlacedBatches):
            if {x.shape[0] for x in jax.tree.leaves(batch.split)} != {1}:
                raise ValueError("step() takes one placed batch: place(rows, stacked=False).")
        else:
            batch = jax.tree.map(lambda x: x[None], batch)
        return self._run(st, batch, squeeze=True)

    def steps(self, st: SPMDState, batches: Batch | PlacedBatches) -> tuple[SPMDState, Metrics]:
        """T steps in one program, overlapped as the strategy allows (module docstring).

        `batches`: every leaf T × B × ... (batch t is step t's) on every process, or
        `place(rows, stacked=True)`. Returns the state after the T steps and metrics
        whose values have a leading axis of T. The result is that of T `step` calls (one
        update per step); only the schedule differs. `st` is donated (its buffers hold
        the new state): use the returned state afterwards.
        """
        if not isinstance(batches, PlacedBatches):
            check_stacked(batches)
        return self._run(st, batches, squeeze=False)

    def place(self, rows: Batch, *, stacked: bool = False) -> PlacedBatches:
        """The global batches assembled on the mesh from this process's `rows` of them;
        nothing is copied between processes.

        `rows`: leaves [B/c, ...] ([T, B/c, ...] if `stacked`): block `index` of `count`
        = `process_batch_shard(self.mesh)` of every microbatch, microbatch after
        microbatch, as `ilbp.data.batches(..., process_index=index, process_count=count,
        microbatches=self.M)` reads them (in one process, the whole batch).
        """
        _, count = process_batch_shard(self.mesh)
        rows = rows if stacked else jax.tree.map(lambda x: x[None], rows)
        shapes = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((x.shape[1] * count, *x.shape[2:]), x.dtype), rows
        )
        self._check(shapes)
        M = self.M

        def put(x):
            T, n, *example = x.shape
            split = x.reshape(T, M, n // M, *example)
            global_shape = (T, M, n // M * count, *example)
            return jax.make_array_from_process_local_data(self.split, split, global_shape)

        return PlacedBatches(jax.tree.map(put, rows))

    def _run(
        self, st: SPMDState, batches: Batch | PlacedBatches, squeeze: bool
    ) -> tuple[SPMDState, Metrics]:
        if not isinstance(batches, PlacedBatches):  # whole batches: each process its shards
            self._check(jax.tree.map(lambda x: x[0], batches))
            M = self.M
            split = jax.tree.map(
                lambda x: x.reshape(x.shape[0], M, x.shape[1] // M, *x.shape[2:]), batches
            )
            batches = PlacedBatches(_put(split, self.split))
        return self._step(st, batches.split, squeeze=squeeze)

    # The program -----------------------------------------------------------------------
    def _step_fn(self, st: SPMDState, split: Batch, squeeze: bool):
        """The jitted program: T steps; metrics named as the single program names them,
        each with a leading T axis unless `squeeze` (T = 1)."""
        T = jax.tree.leaves(split)[0].shape[0]
        rng = jax.random.fold_in(st.rng, st.step)
        stage_fn = jax.shard_map(
            functools.partial(stage_program, self.clock, self.model, self.tx),
            mesh=self.mesh,
            in_specs=(P(STAGE_AXIS), P(STAGE_AXIS), P(), P()),
            out_specs=(P(STAGE_AXIS), P(STAGE_AXIS), P(STAGE_AXIS)),
            axis_names={STAGE_AXIS},
            check_vma=False,  # the tick loop's carries mix stage-varying and invariant values
        )
        params, opt_state, stacked = stage_fn(st.params, st.opt_state, split, rng)
        metrics: Metrics = {}
        for k in range(self.K):
            if self.clock.heads[k]:  # not the aux heads of e2e
                names = loss_metrics(k, self.K, 0, {n: 0 for n in stacked["loss_fn"]})
                loss_fn = stacked["loss_fn"]
                values = [stacked["loss"][k], *(loss_fn[n][k] for n in loss_fn)]
                metrics.update(dict(zip(names, values)))
            metrics[f"grad_norm/{k}"] = stacked["grad_norm"][k]
            metrics[f"update_norm/{k}"] = stacked["update_norm"][k]
            metrics[f"param_norm/{k}"] = stacked["param_norm"][k]
        if squeeze:
            metrics = {name: v[0] for name, v in metrics.items()}
        return SPMDState(st.step + T, params, opt_state, st.rng), metrics
