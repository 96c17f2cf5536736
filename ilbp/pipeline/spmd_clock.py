"""The SPMD executor's clock: the tick schedule and the program every stage runs.

Every stage runs the same clock-tick loop (`lax.fori_loop`, `stage_program`) inside the
SPMD executor's `jax.shard_map`. Over T steps in one program stage k lags stage k - 1 by
one tick, and each step takes it
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
the equality tests. A stage computes only the input VJPs its plan sends (global: one
per tick, though its list has K - 1 lanes, mostly NaN).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilbp.mesh import STAGE_AXIS
from ilbp.pipeline.homogeneous import HEAD, PROLOGUE, HomogeneousStages
from ilbp.stage import Batch
from ilbp.strategy import Strategy


@dataclasses.dataclass(frozen=True, eq=False)
class Clock:
    """The tick schedule of `strategy` on K stages with M microbatches per step.

    Attributes:
      lanes: n_ = min(n, K), the length of a stage's cotangent list.
      reach: i*(k) per stage, the farthest loss it trains on (relative to k).
      coef: K × n_ coefficients c_{k,i} of ∂L_{k+i}/∂h_k in stage k's parameter VJP.
      weights: per stage, the weight of its head's loss (1 for the final loss).
      send_lanes: K × width lanes each stage sends back, padded with the unused lane n_-1.
      slots: S, residual buffer slots per stage (a microbatch's residuals live 2 i* ticks).
      period: P = M + 2 max_k i*(k), ticks per step per stage.
      drain: ticks of one step run alone, M + max_k(k + 2 i*(k)).
    """

    num_stages: int
    microbatches: int
    lanes: int
    reach: tuple[int, ...]
    coef: np.ndarray
    weights: np.ndarray
    send_lanes: np.ndarray
    slots: int
    period: int
    drain: int

    @classmethod
    def of(cls, strategy: Strategy, num_stages: int, microbatches: int) -> Clock:
        K, M = num_stages, microbatches
        plan = strategy.plan(K)
        lanes = min(strategy.window, K)
        reach = tuple(max(j - k for j, _ in plan[k].train_on) for k in range(K))
        coef = np.array(
            [[plan.coefficient(k, k + i) for i in range(lanes)] for k in range(K)], np.float32
        )
        weights = np.array([strategy.aux_weight(k) for k in range(K - 1)] + [1.0], np.float32)
        sends = [[j - k for j in plan[k].sends] for k in range(K)]
        width = max(len(x) for x in sends)
        send_lanes = np.array(
            [x + [lanes - 1] * (width - len(x)) for x in sends], np.int32
        ).reshape(K, width)
        return cls(
            num_stages=K,
            microbatches=M,
            lanes=lanes,
            reach=reach,
            coef=coef,
            weights=weights,
            send_lanes=send_lanes,
            slots=2 * max(reach) + 1,
            period=M + 2 * max(reach),
            drain=M + max(k + 2 * r for k, r in enumerate(reach)),
        )

    def ticks(self, num_steps: int) -> int:
        """Clock ticks of T = num_steps steps in one program."""
        return (num_steps - 1) * self.period + self.drain


def _where(mask, tree, fill):
    return jax.tree.map(lambda x: jnp.where(mask, x, jnp.asarray(fill, x.dtype)), tree)


def stage_program(
    clock: Clock,
    hom: HomogeneousStages,
    tx: optax.GradientTransformation,
    params_1: Any,
    opt_1: Any,
    split: Batch,
    rng: jax.Array,
) -> tuple[Any, Any, dict[str, Any]]:
    """Stage k's T steps, run inside `jax.shard_map` manual over `stage` (module docstring).

    params_1/opt_1: its 1 × ... slices of the stacked parameters and optimizer state;
    split: T × M × b × ... microbatches. Returns its new slices and its metrics (1 × T).
    """
    K, M, S, n_, P_ = clock.num_stages, clock.microbatches, clock.slots, clock.lanes, clock.period
    T = jax.tree.leaves(split)[0].shape[0]
    k = jax.lax.axis_index(STAGE_AXIS)
    params0 = jax.tree.map(lambda x: x[0], params_1)
    opt_state0 = jax.tree.map(lambda x: x[0], opt_1)
    reach = jnp.asarray(clock.reach)[k]
    coef_N = jnp.asarray(clock.coef)[k]
    weight = jnp.asarray(clock.weights)[k]
    key = hom.model.input_key
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
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params[PROLOGUE] = _where(k == 0, params[PROLOGUE], jnp.nan)
        return params, opt_state, stage_norm(grads), stage_norm(updates), stage_norm(params)

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
            if clock.send_lanes.shape[1]:
                lanes = jnp.asarray(clock.send_lanes)[k]
                dx = jax.lax.cond(
                    jnp.any(valid_N[lanes]),
                    lambda: jax.vmap(lambda s, c: vjp_of(s, c)[1])(slot_N[lanes], list_N[lanes]),
                    lambda: jnp.full(
                        (len(clock.send_lanes[0]), *h_shape.shape), jnp.nan, h_shape.dtype
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
            params, opt_state, g_norm, u_norm, p_norm = update(params, opt_state, grads, hgrads)
            sums = {
                **sums,
                "grad_norm": sums["grad_norm"].at[s].set(g_norm),
                "update_norm": sums["update_norm"].at[s].set(u_norm),
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
        "update_norm": jnp.zeros((T,)),
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
    params, opt_state, *_, sums = jax.lax.fori_loop(0, clock.ticks(T), tick, carry)
    metrics = {
        "loss": sums["loss"] / M,
        "loss_fn": jax.tree.map(lambda v: v / M, sums["loss_fn"]),
        "grad_norm": sums["grad_norm"],
        "update_norm": sums["update_norm"],
        "param_norm": sums["param_norm"],
    }
    add = lambda t: jax.tree.map(lambda x: x[None], t)
    return add(params), add(opt_state), add(metrics)
