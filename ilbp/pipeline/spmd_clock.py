"""The SPMD executor's clock: the tick schedule and the program every stage runs.

Every stage runs the same clock-tick loop (`lax.fori_loop`, `stage_program`) inside the
SPMD executor's `jax.shard_map`. Over T steps in one program stage k lags stage k - 1 by
one tick, and each step takes it
P = M + 2 i*_max ticks, where i*(k) is the farthest loss stage k trains on (pairwise:
1, n-wise: n - 1, global: K - 1 - k) and i*_max = max_k i*(k). With window
n_ = min(n, K), at its local tick u = τ - k = s·P + q (step s, phase q) stage k

  1. forwards microbatch q of step s if q < M (input: the embedding on stage 0, else the
     activation received from stage k - 1) and stores the VJP residuals in slot u mod S;
  2. runs its head: ∂(w_k L_k)/∂h_k is lane 0 of its cotangent list (without aux heads,
     e2e, only the last stage has a head; lane 0 of the others is empty);
  3. holds the list [∂L_{k+i}/∂h_k, i = 0..n_-1]: lane i (i ≥ 1, received from stage
     k + 1) belongs to microbatch q - 2i of step s; lanes are buffered per microbatch;
  4. takes the input VJPs of the lanes i whose loss k + i it must send back
     (`plan[k].sends`; vmapped, each with its microbatch's residuals) and sends only
     them left (`ppermute`), where they become lanes i + 1 of a NaN-filled list of n_ - 1;
  5. takes one parameter VJP on Σ_i c_{k,i} ∂L_{k+i}/∂h_k for microbatch q - 2 i*(k)
     (its last lane arrives this tick), and accumulates the gradient;
  6. at q = M - 1 + 2 i*(k), after its last parameter VJP of step s, updates its own
     slot (gradient mean over M microbatches, each counted by its tokens on padded
     batches as in `ilbp.train.accumulate_grads`; one update per step), so that its
     forwards of step s + 1, from q = 0 of the next period, use θ_k after step s;
  7. sends h_k right (`ppermute`), issued right after step 1 so that the transfer
     overlaps steps 2-6.

Steps overlap: stage k starts step s + 1 while the stages after it still finish step s,
which interlocking allows and global does not (its P = M + 2(K - 1) is the drained
pipeline's). T steps take (T - 1)·P + M + max_k(k + 2 i*(k)) ticks: pairwise with M = 1
needs 3 ticks per step against global's 2K - 1. `step` is `steps` with T = 1 (drains).
Bubbles (microbatch outside [0, M), lanes whose loss j > K - 1, ticks before a stage's
first step or after its last) are skipped on their device (`lax.cond`) and yield NaN,
which is masked with `where`, never multiplied by 0, so a leak into real values fails
the equality tests. `lax.cond` guards only work that costs: the forward, the head, the
input VJPs, the parameter VJP and the update (which reads and writes every parameter
and optimizer state; it runs once per step, not per tick); choices between values that
are cheap to compute (the masks, the aux or final loss on a head's logits) are `where`.
A stage computes and sends only the input VJPs its plan sends (global: one per tick,
though its list has K - 1 lanes, mostly NaN).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ilbp.mesh import STAGE_AXIS
from ilbp.pipeline.spmd_stage import Carry, StageContext, nan_like, trunk_params, zeros_tree
from ilbp.pipeline.spmd_ticks import Clock
from ilbp.stage import HEAD, Batch, Params, StagedModel


class _Tick(NamedTuple):
    """Where stage k is at clock tick τ: its local tick u = τ - k = s·P + q."""

    u: jax.Array
    s: jax.Array  # the step
    q: jax.Array  # the phase within it
    live: jax.Array  # inside the T steps
    forwards: jax.Array  # it forwards microbatch q of step s (and runs its head)

    @classmethod
    def of(cls, stage: StageContext, tau: jax.Array) -> _Tick:
        P_, M = stage.clock.period, stage.clock.microbatches
        u = tau - stage.k
        s = jnp.floor_divide(u, P_)
        q = u - s * P_
        live = (u >= 0) & (s < stage.num_steps)
        return cls(u, s, q, live, live & (q < M))


class _Lanes(NamedTuple):
    """This tick's cotangent list, lane i for microbatch q - 2i."""

    slot: jax.Array  # n_: the residual slot of each lane's microbatch
    valid: jax.Array  # n_: a real cotangent (loss k + i exists, microbatch in [0, M))
    cot: jax.Array  # n_ × h, NaN where not valid


# The tick's steps (module docstring). Work a stage does not have this tick (a bubble) is
# skipped on its device (`lax.cond`, per device: no collective inside) and yields NaN, as if
# it had run on NaN; the masks keep it out of every sum.


def _forward_step(st: StageContext, c: Carry, t: _Tick) -> tuple[Carry, jax.Array]:
    """1. Forward microbatch q of step s; its VJP residuals go to slot u mod S. Returns h."""

    def forward(x_in):
        h, vjp_fn = st.forward_vjp(trunk_params(c.params), x_in, t.s, t.q)
        return h, jax.tree.leaves(vjp_fn)

    def bubble(_):
        return nan_like(st.h), [nan_like(r) for r in st.res_protos]

    h, leaves = jax.lax.cond(t.forwards, forward, bubble, c.x_in)
    res = [r.at[t.u % st.clock.slots].set(x) for r, x in zip(c.res, leaves)]
    return c.replace(res=res), h


def _head_step(st: StageContext, c: Carry, t: _Tick, h: jax.Array) -> tuple[Carry, jax.Array]:
    """2. The head on h (if stage k has one: not the aux heads of e2e): loss and metrics
    into the step's sums, ∂φ_k into hgrads. Returns ∂(w_k L_k)/∂h_k, lane 0 of the
    cotangent list (NaN without a head)."""

    def head(h):
        grad_fn = jax.value_and_grad(st.head_loss, argnums=(0, 1), has_aux=True)
        return grad_fn(c.params[HEAD], h, st.microbatch(t.s, t.q))

    runs = t.forwards & st.has_head
    shapes = jax.eval_shape(head, h)
    bubble = lambda _: jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan, x.dtype), shapes)
    (_, (loss, mets)), (dphi, dh) = jax.lax.cond(runs, head, bubble, h)
    dphi, loss, mets = st.weighted(t.s, t.q, (dphi, loss, mets))
    hgrads = jax.tree.map(lambda a, g: a + jnp.where(runs, g, 0), c.hgrads, dphi)
    step = jnp.clip(t.s, 0, st.num_steps - 1)
    add_at = lambda a, v: a.at[step].add(jnp.where(runs, v, 0))
    sums = {
        **c.sums,
        "loss": add_at(c.sums["loss"], loss),
        "loss_fn": jax.tree.map(add_at, c.sums["loss_fn"], mets),
    }
    return c.replace(hgrads=hgrads, sums=sums), dh


def _cotangent_list(st: StageContext, c: Carry, t: _Tick, dh: jax.Array) -> tuple[Carry, _Lanes]:
    """3. The list [dh, received lanes], buffered per microbatch slot."""
    K, M, S, n_ = st.clock.num_stages, st.clock.microbatches, st.clock.slots, st.clock.lanes
    lane = jnp.arange(n_)
    q_N = t.q - 2 * lane
    slot_N = (t.u - 2 * lane) % S
    valid_N = t.live & (st.k + lane <= K - 1) & (q_N >= 0) & (q_N < M)
    valid_N = valid_N & ((lane > 0) | st.has_head)  # lane 0 is the head's
    list_N = jnp.concatenate([dh[None], c.cot_in], 0) if n_ > 1 else dh[None]
    list_N = jnp.where(valid_N.reshape(-1, *[1] * dh.ndim), list_N, jnp.nan)
    cots = c.cots.at[slot_N, lane].set(list_N)
    return c.replace(cots=cots), _Lanes(slot_N, valid_N, list_N)


def _send_input_vjps(st: StageContext, c: Carry, lanes: _Lanes) -> Carry:
    """4. Input VJPs of the lanes the plan sends back, sent left as lanes i + 1: only
    the `send_lanes` rows travel; the receiver puts them at their lanes (NaN elsewhere)."""
    clock, K = st.clock, st.clock.num_stages
    width = clock.send_lanes.shape[1]
    if clock.lanes == 1 or not width:  # no stage ever sends: cot_in stays NaN
        return c
    send_lanes = jnp.asarray(clock.send_lanes)
    send = send_lanes[st.k]
    dx = jax.lax.cond(
        jnp.any(lanes.valid[send]),
        lambda: jax.vmap(lambda s, g: st.vjp(c.res, s, g)[1])(lanes.slot[send], lanes.cot[send]),
        lambda: nan_like(st.h, width),
    )
    received = jax.lax.ppermute(dx, STAGE_AXIS, [(j + 1, j) for j in range(K - 1)])
    # Stage k + 1's lane i is lane i + 1 here; padding lanes (n_ - 1) fall off the end.
    # (The last stage receives nothing: its lanes i ≥ 1 are masked as losses past K.)
    here = send_lanes[jnp.minimum(st.k + 1, K - 1)]
    return c.replace(cot_in=nan_like(c.cot_in).at[here].set(received, mode="drop"))


def _parameter_vjp(st: StageContext, c: Carry, t: _Tick) -> Carry:
    """5. One parameter VJP on Σ_i c_{k,i} ∂L_{k+i}/∂h_k for microbatch q - 2 i*(k)."""
    M, S, n_ = st.clock.microbatches, st.clock.slots, st.clock.lanes
    q_w = t.q - 2 * st.reach
    slot_w = (t.u - 2 * st.reach) % S
    valid_w = t.live & (q_w >= 0) & (q_w < M)
    lead = (-1, *[1] * len(st.h.shape))
    used = st.coef != 0
    terms = jnp.where(used.reshape(lead), st.coef.reshape(lead) * c.cots[slot_w], 0)
    total = terms[0]
    for i in range(1, n_):
        total = total + terms[i]
    dtheta = jax.lax.cond(
        valid_w,
        lambda: st.vjp(c.res, slot_w, total)[0],
        lambda: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), c.grads),
    )
    dtheta = st.weighted(t.s, q_w, dtheta)
    grads = jax.tree.map(lambda a, g: a + jnp.where(valid_w, g, 0), c.grads, dtheta)
    return c.replace(grads=grads)


def _update_at_step_end(st: StageContext, c: Carry, t: _Tick) -> Carry:
    """6. After its last parameter VJP of step s, stage k updates θ_k, φ_k and restarts
    its gradient sums."""

    def update(args):
        params, opt_state, grads, hgrads, sums = args
        params, opt_state, g_norm, u_norm, p_norm = st.update(params, opt_state, grads, hgrads, t.s)
        sums = {
            **sums,
            "grad_norm": sums["grad_norm"].at[t.s].set(g_norm),
            "update_norm": sums["update_norm"].at[t.s].set(u_norm),
            "param_norm": sums["param_norm"].at[t.s].set(p_norm),
        }
        return params, opt_state, zeros_tree(grads), zeros_tree(hgrads), sums

    last = t.live & (t.q == st.clock.microbatches - 1 + 2 * st.reach)
    args = (c.params, c.opt_state, c.grads, c.hgrads, c.sums)
    params, opt_state, grads, hgrads, sums = jax.lax.cond(last, update, lambda a: a, args)
    return c.replace(params=params, opt_state=opt_state, grads=grads, hgrads=hgrads, sums=sums)


def _tick(st: StageContext, tau: jax.Array, c: Carry) -> Carry:
    """One clock tick of stage k: steps 1-7 of the module docstring."""
    t = _Tick.of(st, tau)
    c, h = _forward_step(st, c, t)
    # 7. activations right, issued as soon as h exists: the transfer overlaps steps 2-6.
    K = st.clock.num_stages
    x_next = jax.lax.ppermute(h, STAGE_AXIS, [(j, j + 1) for j in range(K - 1)])
    c, dh = _head_step(st, c, t, h)
    c, lanes = _cotangent_list(st, c, t, dh)
    c = _send_input_vjps(st, c, lanes)
    c = _parameter_vjp(st, c, t)
    c = _update_at_step_end(st, c, t)
    return c.replace(x_in=x_next)


def _initial_carry(st: StageContext, params: Params, opt_state: Any) -> Carry:
    """Buffers NaN until written (a backward reading an unwritten slot fails); sums zero."""
    T, S, n_, h = st.num_steps, st.clock.slots, st.clock.lanes, st.h
    per_step = lambda x: jnp.zeros((T, *x.shape), x.dtype)
    zeros_h = jnp.zeros(h.shape, h.dtype)
    mets = jax.eval_shape(lambda: st.head_loss(params[HEAD], zeros_h, st.microbatch(0, 0)))
    sums = {
        "loss": jnp.zeros((T,)),
        "loss_fn": jax.tree.map(per_step, mets[1][1]),
        "grad_norm": jnp.zeros((T,)),
        "update_norm": jnp.zeros((T,)),
        "param_norm": jnp.zeros((T,)),
    }
    return Carry(
        params=params,
        opt_state=opt_state,
        x_in=nan_like(h),
        cot_in=nan_like(h, n_ - 1),
        res=[nan_like(r, S) for r in st.res_protos],
        cots=nan_like(h, S, n_),
        grads=zeros_tree(trunk_params(params)),
        hgrads=zeros_tree(params[HEAD]),
        sums=sums,
    )


def stage_program(
    clock: Clock,
    model: StagedModel,
    tx: optax.GradientTransformation,
    params_1: Any,
    opt_1: Any,
    split: Batch,
    rng: jax.Array,
) -> tuple[Any, Any, dict[str, Any]]:
    """Stage k's T steps, run inside `jax.shard_map` manual over `stage` (module docstring),
    through `model.homogeneous` (checked by `ilbp.pipeline.homogeneous.check_homogeneous`).

    params_1/opt_1: its 1 × ... slices of the stacked parameters and optimizer state;
    split: T × M × b × ... microbatches. Returns its new slices and its metrics (1 × T).
    """
    params = jax.tree.map(lambda x: x[0], params_1)
    opt_state = jax.tree.map(lambda x: x[0], opt_1)
    st = StageContext.of(clock, model, tx, params, split)
    carry = _initial_carry(st, params, opt_state)
    tick = lambda tau, c: _tick(st, tau, c)
    carry = jax.lax.fori_loop(0, clock.ticks(st.num_steps), tick, carry)
    sums, divisor = carry.sums, st.step_divisor(jnp.arange(st.num_steps))
    metrics = {
        "loss": sums["loss"] / divisor,
        "loss_fn": jax.tree.map(lambda v: v / divisor, sums["loss_fn"]),
        "grad_norm": sums["grad_norm"],
        "update_norm": sums["update_norm"],
        "param_norm": sums["param_norm"],
    }
    add = lambda t: jax.tree.map(lambda x: x[None], t)
    return add(carry.params), add(carry.opt_state), add(metrics)
