"""The per-stage jitted ops of the MPMD executor, built from `ilbp.engine`'s pieces.

One op per kind of the schedule model (`ilbp.schedule_graph`), for one microbatch m on
one stage k; every op runs wherever its (committed) inputs live, i.e. on device group k:

  F  forward(params, state, x, rng, step, m) -> (h, vjp_fn, new_state)
     The last stage's F also takes the final loss: -> (vjp_fn, new_state, dh, metrics).
  A  head(params, state, h, batch, rng, step, m, acc, count)
       -> (acc + count·∂φ, new_state, dh, metrics)
  V  input_vjp(vjp_fn, cot) -> ∂L_j/∂h_{k-1}
  W  backward(vjp_fn, cotangents, acc, count) -> (acc + count·∂θ, {j: ∂L_j/∂h_{k-1}})
     (B, the fused shared-cotangent backward, is W whose plan sends the shared loss)
  U  update(params, opt_state, grads, step, metrics, counts)
       -> (params, opt_state, step, metrics)

`count` is microbatch m's `loss_count` when microbatches are token-weighted (M > 1 and
the batch has "weights"; U divides by the total), else None (plain sum; U divides by M),
as in `ilbp.train.accumulate_grads`. A stage without aux head (e2e) has no A op.

`vjp_fn` (a pytree of the forward's residuals) is returned by F and passed to V and W,
so no forward is recomputed. Ops are cached per (stage, plan), so executors of several
strategies on one model share compilations. rngs follow `make_train_step`: microbatch m
of step t uses stage_rngs(fold_in(fold_in(rng, t), m), k).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from ilbp.engine import head_forward_backward, loss_metrics, stage_backward, stage_forward
from ilbp.stage import LossFn, Stage, stage_rngs
from ilbp.strategy import StagePlan
from ilbp.train import apply_gradients


def microbatch_rngs(rng: jax.Array, step: jax.Array, m: jax.Array, k: int) -> tuple:
    """(stage rng, head rng) of stage k for microbatch m of step `step`."""
    return stage_rngs(jax.random.fold_in(jax.random.fold_in(rng, step), m), k)


def _add(acc, tree, count=None):
    """acc + count · tree (acc None: nothing yet; count None: 1)."""
    if count is not None:
        tree = jax.tree.map(lambda x: count.astype(x.dtype) * x, tree)
    return tree if acc is None else jax.tree.map(jnp.add, acc, tree)


@functools.cache
def forward_op(stage: Stage, k: int, first: bool) -> Callable:
    """F of an inner stage: (params, state, x, rng, step, m) -> (h, vjp_fn, new_state)."""

    def forward(params, state, x, rng, step, m):
        rng_stage, _ = microbatch_rngs(rng, step, m, k)
        return stage_forward(stage, params, state, x, rng_stage, first=first)

    return jax.jit(forward)


@functools.cache
def last_forward_op(stage: Stage, loss_fn: LossFn, k: int, first: bool) -> Callable:
    """F of the last stage, with the final loss:
    (params, state, x, batch, rng, step, m) -> (vjp_fn, new_state, ∂L_K/∂logits, metrics)."""

    def forward(params, state, x, batch, rng, step, m):
        rng_stage, rng_head = microbatch_rngs(rng, step, m, k)
        logits, vjp_fn, new_state = stage_forward(stage, params, state, x, rng_stage, first=first)
        loss, metrics, _, dh, _ = head_forward_backward(
            None, loss_fn, 1.0, {}, {}, logits, batch, rng_head
        )
        return vjp_fn, new_state, dh, loss_metrics(k, k + 1, loss, metrics)

    return jax.jit(forward)


@functools.cache
def head_op(head: Stage, loss_fn: LossFn, weight: float, k: int, num_stages: int) -> Callable:
    """A: aux head forward + backward, accumulating ∂φ_k: (params, state, h, batch, rng,
    step, m, acc, count) -> (acc + count·∂φ, new_state, dh, metrics)."""

    def aux(params, state, h, batch, rng, step, m, acc, count=None):
        _, rng_head = microbatch_rngs(rng, step, m, k)
        loss, metrics, dphi, dh, new_state = head_forward_backward(
            head, loss_fn, weight, params, state, h, batch, rng_head
        )
        return _add(acc, dphi, count), new_state, dh, loss_metrics(k, num_stages, loss, metrics)

    return jax.jit(aux)


# V for any stage and loss: the vjp_fn's pytree structure keys the compilation cache.
input_vjp_op: Callable = jax.jit(lambda vjp_fn, cot: vjp_fn(cot)[1])


@functools.cache
def backward_op(stage_plan: StagePlan) -> Callable:
    """W (or B if `stage_plan.sends` is the shared cotangent): one parameter VJP on the
    plan's combined cotangent, accumulated;
    (vjp_fn, cotangents, acc, count) -> (acc + count·∂θ, sent)."""

    def backward(vjp_fn, cotangents, acc, count=None):
        dtheta, sent = stage_backward(stage_plan, vjp_fn, cotangents)
        return _add(acc, dtheta, count), sent

    return jax.jit(backward)


@functools.cache
def update_op(tx: optax.GradientTransformation, k: int, microbatches: int) -> Callable:
    """U: the full batch's mean gradient, optimizer update and the stage's step metrics:
    (params, opt_state, grad_sum, step, metrics_list, counts) -> (params, opt_state,
    step + 1, metrics), metrics the microbatches' mean (weighted by `counts` unless None)
    plus grad/param norms. grad_sum without "head" (e2e) leaves the head as it is."""

    def update(params, opt_state, grad_sum, step, metrics_list, counts=None):
        if counts is None:
            divide = lambda g: g / microbatches
            mean = lambda values: jnp.mean(jnp.stack(values), 0)
        else:
            counts_M = jnp.stack(counts)
            total = jnp.maximum(jnp.sum(counts_M), 1.0)
            divide = lambda g: g / total.astype(g.dtype)
            mean = lambda values: jnp.tensordot(counts_M, jnp.stack(values), 1) / total
        grads = jax.tree.map(divide, grad_sum) if microbatches > 1 else grad_sum
        params, opt_state = apply_gradients(tx, params, opt_state, grads)
        names = metrics_list[0] if metrics_list else ()  # e2e: inner stages have none
        metrics = {name: mean([m[name] for m in metrics_list]) for name in names}
        metrics[f"grad_norm/{k}"] = optax.tree.norm(grads["stage"])
        metrics[f"param_norm/{k}"] = optax.tree.norm(params["stage"])
        return params, opt_state, step + 1, metrics

    return jax.jit(update)
