"""SPMD executor: homogeneous stages stacked over mesh axis `stage`, one shard_map program.

Every stage runs the same clock-tick loop (`lax.fori_loop`) inside `jax.shard_map`,
manual over `stage` and automatic over `data` (so it composes with data parallelism and
runs multi-process unchanged: nothing in it is host-local). `steps(state, batches)` runs
T steps in one program; stage k lags stage k - 1 by one tick, and each step takes it
P = M + 2 i*_max ticks, where i*(k) is the farthest loss stage k trains on (pairwise:
1, n-wise: n - 1, global: K - 1 - k) and i*_max = max_k i*(k). With window
n_ = min(n, K), at its local tick u = τ - k = s·P + q (step s, phase q) stage k

  1. forwards microbatch q of step s if q < M (input: the embedding on stage 0, else the
     activation received from stage k - 1) and stores the VJP residuals in slot u mod S;
  2. runs its head: ∂(w_k L_k)/∂h_k is lane 0 of its cotangent list;
  3. holds the list [∂L_{k+i}/∂h_k, i = 0..n_-1]: lane i (i ≥ 1, received from stage
     k + 1) belongs to microbatch q - 2i of step s; lanes are buffered per microbatch;
  4. takes the input VJPs of the lanes i whose loss k + i it must send back
     (`plan[k].sends`; vmapped, each with its microbatch's residuals) and sends them
     left as lanes i + 1 of a NaN-filled list of n_ - 1 (`ppermute`);
  5. takes one parameter VJP on Σ_i c_{k,i} ∂L_{k+i}/∂h_k for microbatch q - 2 i*(k)
     (its last lane arrives this tick), and accumulates the gradient;
  6. at q = M - 1 + 2 i*(k), after its last parameter VJP of step s, updates its own
     slot (gradient mean over M microbatches, one update per step), so that its
     forwards of step s + 1, from q = 0 of the next period, use θ_k after step s;
  7. sends h_k right (`ppermute`).

Steps overlap: stage k starts step s + 1 while the stages after it still finish step s,
which interlocking allows and global does not (its P = M + 2(K - 1) is the drained
pipeline's). T steps take (T - 1)·P + M + max_k(k + 2 i*(k)) ticks: pairwise with M = 1
needs 3 ticks per step against global's 2K - 1. `step` is `steps` with T = 1 (drains).
Bubbles (microbatch outside [0, M), lanes whose loss j > K - 1, ticks before a stage's
first step or after its last) are skipped on their device (`lax.cond`) and yield NaN,
which is masked with `where`, never multiplied by 0, so a leak into real values fails
the equality tests. A stage computes
only the input VJPs its plan sends (global: one per tick, though its list has K - 1
lanes, mostly NaN).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from ilbp.engine import Metrics, loss_metrics
from ilbp.mesh import DATA_AXIS, STAGE_AXIS, make_mesh
from ilbp.pipeline.executor import check_batch_split, check_microbatches, check_stage_devices
from ilbp.pipeline.homogeneous import HEAD, PROLOGUE, HomogeneousStages, transformer_stages
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


def _where(mask, tree, fill):
    return jax.tree.map(lambda x: jnp.where(mask, x, jnp.asarray(fill, x.dtype)), tree)


class SPMDExecutor:
    """One shard_map program over the (stage, data) mesh (module docstring)."""

    def __init__(
        self,
        model: StagedModel | HomogeneousStages,
        strategy: Strategy,
        optimizer: Optimizer,
        *,
        microbatches: int = 1,
        mesh: Mesh | None = None,
    ):
        check_microbatches(microbatches)
        self.hom = transformer_stages(model)
        self.model = self.hom.model
        K = self.model.num_stages
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
        plan = strategy.plan(K)
        self.lanes = min(strategy.window, K)  # n_: lanes 0..n_-1 of the cotangent list
        self.reach = [max(j - k for j, _ in plan[k].train_on) for k in range(K)]  # i*(k)
        self.coef = np.array(
            [[plan.coefficient(k, k + i) for i in range(self.lanes)] for k in range(K)], np.float32
        )
        self.weights = np.array([strategy.aux_weight(k) for k in range(K - 1)] + [1.0], np.float32)
        # Lanes each stage sends back, padded to a common width with the unused lane n_-1.
        sends = [[j - k for j in plan[k].sends] for k in range(K)]
        width = max(len(x) for x in sends)
        self.send_lanes = np.array(
            [x + [self.lanes - 1] * (width - len(x)) for x in sends], np.int32
        ).reshape(K, width)
        self.slots = 2 * max(self.reach) + 1
        self.period = microbatches + 2 * max(self.reach)  # P: ticks per step per stage
        self.drain = microbatches + max(k + 2 * r for k, r in enumerate(self.reach))
        self.stacked = NamedSharding(mesh, P(STAGE_AXIS))
        self.replicated = NamedSharding(mesh, P())
        self._step = jax.jit(self._step_fn, static_argnames="squeeze")

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
        # Transformer stages keep no mutable state.
        state = ({"stage": {}, "head": {}},) * (K - 1) + ({"stage": {}},)
        return TrainState(jnp.asarray(st.step), params, state, opt, st.rng)

    def init(self, rng: jax.Array, batch: Batch) -> SPMDState:
        self._check(batch)
        return self.from_train_state(init_train_state(self.model, self.optimizer, rng, batch))

    def _check(self, batch: Batch) -> int:
        return check_batch_split(batch, self.mesh.shape[DATA_AXIS], self.M)

    def ticks(self, num_steps: int) -> int:
        """Clock ticks of a `steps` call of T = num_steps steps."""
        return (num_steps - 1) * self.period + self.drain

    def step(self, st: SPMDState, batch: Batch) -> tuple[SPMDState, Metrics]:
        """One step (the pipeline drains at its end)."""
        return self._run(st, jax.tree.map(lambda x: x[None], batch), squeeze=True)

    def steps(self, st: SPMDState, batches: Batch) -> tuple[SPMDState, Metrics]:
        """T steps in one program, overlapped as the strategy allows (module docstring).

        `batches`: every leaf T × B × ...: batch t is step t's. Returns the state after
        the T steps and metrics whose values have a leading axis of T. The result is
        that of T `step` calls (one update per step); only the schedule differs.
        """
        leaves = jax.tree.leaves(batches)
        if not leaves or any(np.ndim(x) < 2 for x in leaves):
            raise ValueError("steps() takes batches stacked T × B × ...: one batch per step.")
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
            self._stage_program,
            mesh=self.mesh,
            in_specs=(P(STAGE_AXIS), P(STAGE_AXIS), P(), P()),
            out_specs=(P(STAGE_AXIS), P(STAGE_AXIS), P(STAGE_AXIS)),
            axis_names={STAGE_AXIS},
            check_vma=False,  # the tick loop's carries mix stage-varying and invariant values
        )
        params, opt_state, stacked = stage_fn(st.params, st.opt_state, split, rng)
        metrics: Metrics = {}
        for k in range(self.K):
            names = loss_metrics(k, self.K, 0, {n: 0 for n in stacked["loss_fn"]})
            values = [stacked["loss"][k], *(stacked["loss_fn"][n][k] for n in stacked["loss_fn"])]
            metrics.update(dict(zip(names, values)))
            metrics[f"grad_norm/{k}"] = stacked["grad_norm"][k]
            metrics[f"param_norm/{k}"] = stacked["param_norm"][k]
        if squeeze:
            metrics = {name: v[0] for name, v in metrics.items()}
        return SPMDState(st.step + T, params, opt_state, st.rng), metrics

    def _stage_program(self, params_1, opt_1, split: Batch, rng: jax.Array):
        """Stage k's T steps; params_1/opt_1 are its 1 × ... slices, split T × M × b × ...."""
        hom, K, M, S, n_, P_ = self.hom, self.K, self.M, self.slots, self.lanes, self.period
        T = jax.tree.leaves(split)[0].shape[0]
        k = jax.lax.axis_index(STAGE_AXIS)
        params0 = jax.tree.map(lambda x: x[0], params_1)
        opt_state0 = jax.tree.map(lambda x: x[0], opt_1)
        reach = jnp.asarray(self.reach)[k]
        coef_N = jnp.asarray(self.coef)[k]
        weight = jnp.asarray(self.weights)[k]
        key = self.model.input_key
        clip = lambda i, n: jnp.clip(i, 0, n - 1)
        mb = lambda s, m: jax.tree.map(lambda x: x[clip(s, T), clip(m, M)], split)
        trunk_of = lambda p: {PROLOGUE: p[PROLOGUE], "body": p["body"]}

        def forward(p_trunk, x_in, tokens):
            h0 = hom.prologue(p_trunk[PROLOGUE], tokens)
            x = jnp.where(k == 0, h0, x_in)  # stage 0 starts from its embedding
            return hom.body(p_trunk["body"], x)

        def run_forward(trunk, x_in, s, m, valid):
            x_in = jnp.where(valid, x_in, jnp.nan)  # bubbles are NaN
            return jax.vjp(lambda p, x: forward(p, x, mb(s, m)[key]), trunk, x_in)

        trunk0 = trunk_of(params0)
        tokens0 = split[key][0, 0]
        h_shape = jax.eval_shape(lambda: forward(trunk0, jnp.zeros(()), tokens0))
        zeros_h = jnp.zeros(h_shape.shape, h_shape.dtype)
        zero_i = jnp.zeros((), jnp.int32)
        _, vjp_proto = jax.eval_shape(run_forward, trunk0, zeros_h, zero_i, zero_i, True)
        res_protos, res_treedef = jax.tree.flatten(vjp_proto)
        nan_like = lambda r, *lead: jnp.full(
            (*lead, *r.shape), jnp.nan if jnp.issubdtype(r.dtype, jnp.floating) else 0, r.dtype
        )
        # Residual buffers, NaN until written: a backward reading an unwritten slot fails.
        res_bufs = [nan_like(r, S) for r in res_protos]
        nan_h = jnp.full(h_shape.shape, jnp.nan, h_shape.dtype)

        def head_loss(p_head, h, batch):
            logits = hom.head(p_head, h)
            if hom.aux_loss is hom.loss:
                loss, m = hom.loss(logits, batch)
            else:
                loss, m = jax.lax.cond(
                    k == K - 1,
                    lambda: hom.loss(logits, batch),
                    lambda: hom.aux_loss(logits, batch),
                )
            return weight * loss, (loss, m)

        # Norms of θ_k as the single program sees it (its head slot is θ_{K-1}'s output layer).
        def sq(t):
            return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t))

        def stage_norm(t):
            total = sq(t["body"]) + jnp.where(k == 0, sq(_where(k == 0, t[PROLOGUE], 0)), 0)
            return jnp.sqrt(total + jnp.where(k == K - 1, sq(t[HEAD]), 0))

        def update(params, opt_state, grads, hgrads):
            """Mean gradient; padding slots get zero gradient and stay NaN."""
            grads = {PROLOGUE: grads[PROLOGUE], "body": grads["body"], HEAD: hgrads}
            if M > 1:
                grads = jax.tree.map(lambda g: g / M, grads)
            grads[PROLOGUE] = _where(k == 0, grads[PROLOGUE], 0)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            params[PROLOGUE] = _where(k == 0, params[PROLOGUE], jnp.nan)
            return params, opt_state, stage_norm(grads), stage_norm(params)

        def tick(tau, carry):
            params, opt_state, x_in, cot_in, res, cots, grads, hgrads, sums = carry
            u = tau - k  # stage k's local tick: phase q of step s
            s = jnp.floor_divide(u, P_)
            q = u - s * P_
            live = (u >= 0) & (s < T)
            # Work a stage does not have this tick (a bubble) is skipped on its device
            # (`lax.cond`, per device: no collective inside) and yields NaN, as if it had
            # run on NaN; the masks below keep it out of every sum.

            # 1. forward of microbatch q of step s
            valid_f = live & (q < M)

            def forward_op(x_in):
                h, vjp_fn = run_forward(trunk_of(params), x_in, s, q, True)
                return h, jax.tree.leaves(vjp_fn)

            h, leaves = jax.lax.cond(
                valid_f, forward_op, lambda _: (nan_h, [nan_like(r) for r in res_protos]), x_in
            )
            res = [r.at[u % S].set(x) for r, x in zip(res, leaves)]

            # 2. head: lane 0
            def head_op(h):
                return jax.value_and_grad(head_loss, argnums=(0, 1), has_aux=True)(
                    params[HEAD], h, mb(s, q)
                )

            head_shapes = jax.eval_shape(head_op, h)
            (_, (loss, mets)), (dphi, dh) = jax.lax.cond(
                valid_f,
                head_op,
                lambda _: jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan, x.dtype), head_shapes),
                h,
            )
            hgrads = jax.tree.map(lambda a, g: a + jnp.where(valid_f, g, 0), hgrads, dphi)
            add_at = lambda a, v: a.at[clip(s, T)].add(jnp.where(valid_f, v, 0))
            sums = {
                **sums,
                "loss": add_at(sums["loss"], loss),
                "loss_fn": jax.tree.map(add_at, sums["loss_fn"], mets),
            }
            # 3. the cotangent list and its per-microbatch buffer
            lane_i = jnp.arange(n_)
            q_N = q - 2 * lane_i
            slot_N = (u - 2 * lane_i) % S
            valid_N = live & (k + lane_i <= K - 1) & (q_N >= 0) & (q_N < M)
            list_N = jnp.concatenate([dh[None], cot_in], 0) if n_ > 1 else dh[None]
            list_N = jnp.where(valid_N.reshape(-1, *[1] * dh.ndim), list_N, jnp.nan)
            cots = cots.at[slot_N, lane_i].set(list_N)

            def vjp_of(slot, c):
                fn = jax.tree.unflatten(res_treedef, [r[slot] for r in res])
                return fn(c)

            # 4. input VJPs of lanes 0..n_-2, sent left
            if n_ > 1:
                if self.send_lanes.shape[1]:
                    lanes = jnp.asarray(self.send_lanes)[k]
                    dx = jax.lax.cond(
                        jnp.any(valid_N[lanes]),
                        lambda: jax.vmap(lambda s, c: vjp_of(s, c)[1])(
                            slot_N[lanes], list_N[lanes]
                        ),
                        lambda: jnp.full(
                            (len(self.send_lanes[0]), *h_shape.shape), jnp.nan, h_shape.dtype
                        ),
                    )
                    # Padding lanes (n_ - 1) fall off the end of the list and are dropped.
                    sent = jnp.full_like(cot_in, jnp.nan).at[lanes].set(dx, mode="drop")
                else:
                    sent = jnp.full_like(cot_in, jnp.nan)
                perm = [(j + 1, j) for j in range(K - 1)]
                cot_in = jax.lax.ppermute(sent, STAGE_AXIS, perm)
            # 5. parameter VJP on the combined cotangent of microbatch q - 2 i*(k)
            q_w = q - 2 * reach
            slot_w = (u - 2 * reach) % S
            valid_w = live & (q_w >= 0) & (q_w < M)
            used = coef_N != 0
            terms = jnp.where(
                used.reshape(-1, *[1] * dh.ndim),
                coef_N.reshape(-1, *[1] * dh.ndim) * cots[slot_w],
                0,
            )
            total = terms[0]
            for i in range(1, n_):
                total = total + terms[i]
            dtheta = jax.lax.cond(
                valid_w,
                lambda: vjp_of(slot_w, total)[0],
                lambda: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), grads),
            )
            grads = jax.tree.map(lambda a, g: a + jnp.where(valid_w, g, 0), grads, dtheta)

            # 6. after the last parameter VJP of step s: update θ_k, φ_k; restart the sums
            def do_update(args):
                params, opt_state, grads, hgrads, sums = args
                params, opt_state, g_norm, p_norm = update(params, opt_state, grads, hgrads)
                sums = {
                    **sums,
                    "grad_norm": sums["grad_norm"].at[s].set(g_norm),
                    "param_norm": sums["param_norm"].at[s].set(p_norm),
                }
                return params, opt_state, zeros(grads), zeros(hgrads), sums

            params, opt_state, grads, hgrads, sums = jax.lax.cond(
                live & (q == M - 1 + 2 * reach),
                do_update,
                lambda args: args,
                (params, opt_state, grads, hgrads, sums),
            )
            # 7. activations right
            x_in = jax.lax.ppermute(h, STAGE_AXIS, [(j, j + 1) for j in range(K - 1)])
            return params, opt_state, x_in, cot_in, res, cots, grads, hgrads, sums

        zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
        per_step = lambda x: jnp.zeros((T, *x.shape), x.dtype)
        mets_shape = jax.eval_shape(lambda: head_loss(params0[HEAD], zeros_h, mb(0, 0))[1][1])
        sums0 = {
            "loss": jnp.zeros((T,)),
            "loss_fn": jax.tree.map(per_step, mets_shape),
            "grad_norm": jnp.zeros((T,)),
            "param_norm": jnp.zeros((T,)),
        }
        cot_in0 = jnp.full((max(n_ - 1, 1), *h_shape.shape), jnp.nan, h_shape.dtype)
        carry = (
            params0,
            opt_state0,
            nan_h,
            cot_in0 if n_ > 1 else cot_in0[:0],
            res_bufs,
            jnp.full((S, n_, *h_shape.shape), jnp.nan, h_shape.dtype),
            zeros(trunk0),
            zeros(params0[HEAD]),
            sums0,
        )
        params, opt_state, *_, sums = jax.lax.fori_loop(0, self.ticks(T), tick, carry)
        metrics = {
            "loss": sums["loss"] / M,
            "loss_fn": jax.tree.map(lambda v: v / M, sums["loss_fn"]),
            "grad_norm": sums["grad_norm"],
            "param_norm": sums["param_norm"],
        }
        add = lambda t: jax.tree.map(lambda x: x[None], t)
        return add(params), add(opt_state), add(metrics)
