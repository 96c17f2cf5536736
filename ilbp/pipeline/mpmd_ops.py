"""The per-stage jitted ops of the MPMD executor, built from `ilbp.engine`'s pieces.

One op per kind of the schedule model (`ilbp.schedule_graph`), for one microbatch m on
one stage k; every op runs wherever its (committed) inputs live, i.e. on device group k:

  F  forward(params, state, x, rng, step, m) -> (h, residuals, new_state)
     The last stage's F also takes the final loss: -> (residuals, new_state, dh, metrics).
  A  head(params, state, h, batch, rng, step, m, acc, count)
       -> (acc + count·∂φ, new_state, dh, metrics)
  V  input_vjp(params, residuals, cot) -> ∂L_j/∂h_{k-1}
  W  backward(params, residuals, cotangents, acc, count)
       -> (acc + count·∂θ, {j: ∂L_j/∂h_{k-1}})
     (B, the fused shared-cotangent backward, is W whose plan sends the shared loss)
  U  update(params, opt_state, grads, step, metrics, counts)
       -> (params, opt_state, step, metrics)

`params` of F, V and W are the stage's θ_k (`params[k]["stage"]`), the same for all three
(θ_k changes only at U, after the step's last W). F returns its VJP residuals without
the ones computed from θ_k alone (`ilbp.pipeline.residuals`): V and W recompute those
from θ_k, so no microbatch in flight holds a copy of the parameters, and no forward is
recomputed. `m` is the microbatch index (a device scalar in the executor).

`count` is microbatch m's `loss_count` when microbatches are token-weighted (M > 1 and
the batch has "weights"; U divides by the total), else None (plain sum; U divides by M),
as in `ilbp.train.accumulate_grads`. A stage without aux head (e2e) has no A op.

With `donate` (the default), each op donates what it consumes: F and A the state they
replace, A and W the gradient sum they add to, U the parameters, optimizer state and
step counter it replaces; the caller must not use those arrays again. Ops are cached per
(stage, plan, donate), so executors of several strategies on one model share
compilations. rngs follow `make_train_step`: microbatch m of step t uses
stage_rngs(fold_in(fold_in(rng, t), m), k).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from ilbp.engine import head_forward_backward, loss_metrics, stage_backward
from ilbp.pipeline import residuals
from ilbp.stage import LossFn, Stage, stage_rngs
from ilbp.strategy import StagePlan
from ilbp.train import apply_gradients


def microbatch_rngs(rng: jax.Array, step: jax.Array, m: jax.Array, k: int) -> tuple:
    """(stage rng, head rng) of stage k for microbatch m of step `step`."""
    return stage_rngs(jax.random.fold_in(jax.random.fold_in(rng, step), m), k)


def _add(acc, tree, count=None):
    """acc + count · tree (acc None: M = 1, no sum; count None: 1)."""
    if count is not None:
        tree = jax.tree.map(lambda x: count.astype(x.dtype) * x, tree)
    return tree if acc is None else jax.tree.map(jnp.add, acc, tree)


@functools.cache
def _train_apply(stage: Stage) -> residuals.ForwardFn:
    """stage.apply in training as fn(params, x, state, rng) -> (h, new_state); one
    function object per stage, so that residual recipes compare equal across calls."""
    return lambda params, x, state, rng: stage.apply(params, state, x, rng, True)


def _forward(stage: Stage, first: bool, params, state, x, rng):
    """(h, residuals, new_state); the first stage's input is data (not differentiated)."""
    return residuals.vjp(_train_apply(stage), params, x, state, rng, wrt_x=not first)


def _jit(fn: Callable, donate: bool, donate_argnums: tuple[int, ...]) -> Callable:
    return jax.jit(fn, donate_argnums=donate_argnums if donate else ())


@functools.cache
def forward_op(stage: Stage, k: int, first: bool, donate: bool = True) -> Callable:
    """F of an inner stage: (params, state, x, rng, step, m) -> (h, residuals, new_state);
    donates `state`."""

    def forward(params, state, x, rng, step, m):
        rng_stage, _ = microbatch_rngs(rng, step, m, k)
        return _forward(stage, first, params, state, x, rng_stage)

    return _jit(forward, donate, (1,))


@functools.cache
def last_forward_op(
    stage: Stage, loss_fn: LossFn, k: int, first: bool, donate: bool = True
) -> Callable:
    """F of the last stage, with the final loss: (params, state, x, batch, rng, step, m)
    -> (residuals, new_state, ∂L_K/∂logits, metrics); donates `state`."""

    def forward(params, state, x, batch, rng, step, m):
        rng_stage, rng_head = microbatch_rngs(rng, step, m, k)
        logits, res, new_state = _forward(stage, first, params, state, x, rng_stage)
        loss, metrics, _, dh, _ = head_forward_backward(
            None, loss_fn, 1.0, {}, {}, logits, batch, rng_head
        )
        return res, new_state, dh, loss_metrics(k, k + 1, loss, metrics)

    return _jit(forward, donate, (1,))


@functools.cache
def head_op(
    head: Stage, loss_fn: LossFn, weight: float, k: int, num_stages: int, donate: bool = True
) -> Callable:
    """A: aux head forward + backward, accumulating ∂φ_k: (params, state, h, batch, rng,
    step, m, acc, count) -> (acc + count·∂φ, new_state, dh, metrics); donates `state`
    and `acc`."""

    def aux(params, state, h, batch, rng, step, m, acc, count=None):
        _, rng_head = microbatch_rngs(rng, step, m, k)
        loss, metrics, dphi, dh, new_state = head_forward_backward(
            head, loss_fn, weight, params, state, h, batch, rng_head
        )
        return _add(acc, dphi, count), new_state, dh, loss_metrics(k, num_stages, loss, metrics)

    return _jit(aux, donate, (1, 7))


@functools.cache
def zeros_op(sharding: jax.sharding.Sharding) -> Callable:
    """tree -> zeros like it, placed by `sharding` (a stage's devices: outputs that read
    no input would land on the default device). The gradient sums at M > 1 start from
    them (as in `accumulate_grads`), so that A and W take one signature at every
    microbatch (None at the first would compile them twice)."""
    return jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree), out_shardings=sharding)


# V for any stage and loss: the residuals' recipe (their stage's forward) keys the cache.
input_vjp_op: Callable = jax.jit(lambda params, res, cot: res.vjp_fn(params)(cot)[1])


@functools.cache
def backward_op(stage_plan: StagePlan, donate: bool = True) -> Callable:
    """W (or B if `stage_plan.sends` is the shared cotangent): one parameter VJP on the
    plan's combined cotangent, accumulated; (params, residuals, cotangents, acc, count)
    -> (acc + count·∂θ, sent); donates `acc`."""

    def backward(params, res, cotangents, acc, count=None):
        dtheta, sent = stage_backward(stage_plan, res.vjp_fn(params), cotangents)
        return _add(acc, dtheta, count), sent

    return _jit(backward, donate, (3,))


@functools.cache
def update_op(
    tx: optax.GradientTransformation, k: int, microbatches: int, donate: bool = True
) -> Callable:
    """U: the full batch's mean gradient, optimizer update and the stage's step metrics:
    (params, opt_state, grad_sum, step, metrics_list, counts) -> (params, opt_state,
    step + 1, metrics), metrics the microbatches' mean (weighted by `counts` unless None)
    plus grad/update/param norms. grad_sum without "head" (e2e) leaves the head as it is.
    Donates params, opt_state and step (the gradient sums have no output to reuse their
    buffers: they are freed when the caller drops them)."""

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
        old = params["stage"]
        params, opt_state = apply_gradients(tx, params, opt_state, grads)
        names = metrics_list[0] if metrics_list else ()  # e2e: inner stages have none
        metrics = {name: mean([m[name] for m in metrics_list]) for name in names}
        metrics[f"grad_norm/{k}"] = optax.tree.norm(grads["stage"])
        change = jax.tree.map(jnp.subtract, params["stage"], old)
        metrics[f"update_norm/{k}"] = optax.tree.norm(change)
        metrics[f"param_norm/{k}"] = optax.tree.norm(params["stage"])
        return params, opt_state, step + 1, metrics

    return _jit(update, donate, (0, 1, 3))
