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
from ilbp.mesh import DATA_AXIS, STAGE_AXIS, make_mesh
from ilbp.pipeline.homogeneous import check_homogeneous
from ilbp.pipeline.spmd_clock import Clock, stage_program
from ilbp.stage import Batch, StagedModel
from ilbp.strategy import Strategy
from ilbp.train import Optimizer, TrainState, init_train_state

P = jax.P


@flax.struct.dataclass
class SPMDState:
    """step, rng: replicated; params/opt_state: uniform layout stacked K × ... over `stage`."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


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
        if not isinstance(optimizer, optax.GradientTransformation):
            raise ValueError("The spmd executor takes one optax transformation for all stages.")
        if mesh is None:
            check_stage_devices(K, jax.device_count(), "spmd")
            mesh = make_mesh(stage=K)
        if mesh.shape.get(STAGE_AXIS) != K or DATA_AXIS not in mesh.shape:
            raise ValueError(
                f"The spmd executor needs a mesh with axes `{STAGE_AXIS}` of size K={K} and "
                f"`{DATA_AXIS}`; got {dict(mesh.shape)}. Use ilbp.make_mesh(stage={K})."
            )
        self.mesh, self.tx, self.M, self.K = mesh, optimizer, microbatches, K
        self.strategy, self.optimizer = strategy, optimizer
        self.clock = Clock.of(strategy, K, microbatches)
        self.period = self.clock.period  # P: ticks per step per stage
        self.stacked = NamedSharding(mesh, P(STAGE_AXIS))
        self.replicated = NamedSharding(mesh, P())
        # The state is donated: the program updates parameters and optimizer state in place.
        self._step = jax.jit(self._step_fn, static_argnames="squeeze", donate_argnums=0)

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
        K, hom = self.K, self.hom
        uniform = [hom.to_uniform(ts.params[k], k) for k in range(K)]
        opt = [
            self._opt_map(lambda t, k=k: hom.to_uniform(t, k), ts.opt_state[k], ts.params[k])
            for k in range(K)
        ]
        stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
        return SPMDState(
            step=_put(ts.step, self.replicated),
            params=_put(stack(uniform), self.stacked),
            opt_state=_put(stack(opt), self.stacked),
            rng=_put(ts.rng, self.replicated),
        )

    def to_train_state(self, st: SPMDState) -> TrainState:
        """Gathered to host (numpy) in the single-program layout; in a multi-process run
        every process must call it (it all-gathers the stacked arrays)."""
        K, hom = self.K, self.hom
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            gather = lambda t: multihost_utils.process_allgather(t, tiled=True)
        else:
            gather = lambda t: jax.tree.map(np.asarray, t)
        stacked_params, stacked_opt = gather((st.params, st.opt_state))
        # np.asarray keeps 0-d leaves (step counts) arrays, not numpy scalars.
        unstack = lambda tree, k: jax.tree.map(lambda x: np.asarray(x[k]), tree)
        params = tuple(hom.from_uniform(unstack(stacked_params, k), k) for k in range(K))
        uniform0 = unstack(stacked_params, 0)
        opt = tuple(
            self._opt_map(lambda t, k=k: hom.from_uniform(t, k), unstack(stacked_opt, k), uniform0)
            for k in range(K)
        )
        # Homogeneous stages keep no state (check_homogeneous).
        state = ({"stage": {}, "head": {}},) * (K - 1) + ({"stage": {}},)
        return TrainState(jnp.asarray(st.step), params, state, opt, st.rng)

    def init(self, rng: jax.Array, batch: Batch) -> SPMDState:
        self._check(batch)
        return self.from_train_state(init_train_state(self.model, self.optimizer, rng, batch))

    def _check(self, batch: Batch) -> int:
        return check_batch_split(batch, self.mesh.shape[DATA_AXIS], self.M)

    def ticks(self, num_steps: int) -> int:
        """Clock ticks of a `steps` call of T = num_steps steps."""
        return self.clock.ticks(num_steps)

    def step(self, st: SPMDState, batch: Batch) -> tuple[SPMDState, Metrics]:
        """One step (the pipeline drains at its end); donates `st`, as `steps` does."""
        return self._run(st, jax.tree.map(lambda x: x[None], batch), squeeze=True)

    def steps(self, st: SPMDState, batches: Batch) -> tuple[SPMDState, Metrics]:
        """T steps in one program, overlapped as the strategy allows (module docstring).

        `batches`: every leaf T × B × ...: batch t is step t's. Returns the state after
        the T steps and metrics whose values have a leading axis of T. The result is
        that of T `step` calls (one update per step); only the schedule differs. `st` is
        donated (its buffers hold the new state): use the returned state afterwards.
        """
        check_stacked(batches)
        return self._run(st, batches, squeeze=False)

    def _run(self, st: SPMDState, batches: Batch, squeeze: bool) -> tuple[SPMDState, Metrics]:
        self._check(jax.tree.map(lambda x: x[0], batches))
        M = self.M
        split = jax.tree.map(
            lambda x: x.reshape(x.shape[0], M, x.shape[1] // M, *x.shape[2:]), batches
        )
        split = _put(split, NamedSharding(self.mesh, P(None, None, DATA_AXIS)))
        return self._step(st, split, squeeze=squeeze)

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
