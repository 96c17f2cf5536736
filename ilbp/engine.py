"""The gradient math of interlocking backprop: the spec engine and the routed engine.

Both have one signature,

    engine(model, strategy, params, state, batch, rng) -> (grads, new_state, metrics)

with `grads` laid out like `params` (a K-tuple of {"stage", "head"} dicts; without aux
heads, e2e, only {"stage"}: `trained_params`), and compute the same thing (DESIGN.md §1):

* `spec_grads` is the readable oracle: one forward per loss L_j, in which stage k's
  parameters carry gradient only if the strategy credits L_j to θ_k (scaled by the
  combine rule's coefficient), and one `jax.grad` of the sum. It recomputes forwards.
* `routed_grads` is the production engine (DESIGN.md §2): one forward per stage with
  `jax.vjp`, then a backward sweep in which stage k receives the cotangents
  {j: ∂L_j/∂h_k} that the plan routes to it, takes one parameter VJP on the combined
  cotangent, and input VJPs (batched with `vmap`) only for what earlier stages need.

The per-stage pieces (`stage_forward`, `head_forward`, `stage_backward`) are
public so that the pipelined executors run exactly this math, one stage per device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ilbp.stage import Batch, LossFn, Params, Stage, StagedModel, State, stage_rngs
from ilbp.strategy import Plan, StagePlan, Strategy

Grads = tuple[dict[str, Params], ...]
Metrics = dict[str, jax.Array]
Cotangents = dict[int, jax.Array]  # loss index j -> ∂L_j/∂h
Engine = Callable[
    [StagedModel, Strategy, tuple, tuple, Batch, jax.Array], tuple[Grads, tuple, Metrics]
]


# Per-stage pieces ------------------------------------------------------------------------
def stage_forward(
    stage: Stage, params: Params, state: State, x: jax.Array, rng: jax.Array, *, first: bool
) -> tuple[jax.Array, Callable, State]:
    """Training forward of one stage, keeping its residuals.

    Returns (h, vjp_fn, new_state) where vjp_fn(∂L/∂h) -> (∂L/∂θ, ∂L/∂x); for the first
    stage x is data (possibly integer tokens), so vjp_fn returns (∂L/∂θ,) only.
    """
    if first:
        return jax.vjp(lambda p: stage.apply(p, state, x, rng, True), params, has_aux=True)
    return jax.vjp(lambda p, x: stage.apply(p, state, x, rng, True), params, x, has_aux=True)


def head_forward(
    head: Stage | None,
    loss_fn: LossFn,
    weight: float,
    params: Params,
    state: State,
    h: jax.Array,
    batch: Batch,
    rng: jax.Array,
) -> tuple[jax.Array, Metrics, State, Callable]:
    """Loss on h (through `head` if given, else h are the logits), keeping residuals.

    Returns (loss, metrics, new head state, head_vjp) where head_vjp() -> (∂(w·loss)/∂φ,
    ∂(w·loss)/∂h); loss and metrics are unweighted. Deferring head_vjp to the backward
    sweep keeps the activation-sized ∂L_k/∂h_k out of memory until stage k needs it.
    """

    def weighted_loss(p, h):
        logits, new_state = (h, state) if head is None else head.apply(p, state, h, rng, True)
        loss, metrics = loss_fn(logits, batch)
        return weight * loss, (loss, metrics, new_state)

    weighted, vjp_fn, (loss, metrics, new_state) = jax.vjp(weighted_loss, params, h, has_aux=True)
    return loss, metrics, new_state, functools.partial(vjp_fn, jnp.ones_like(weighted))


def head_forward_backward(
    head: Stage | None,
    loss_fn: LossFn,
    weight: float,
    params: Params,
    state: State,
    h: jax.Array,
    batch: Batch,
    rng: jax.Array,
) -> tuple[jax.Array, Metrics, Params, jax.Array, State]:
    """`head_forward` and its backward at once: (loss, metrics, ∂φ, ∂h, new state)."""
    loss, metrics, new_state, head_vjp = head_forward(
        head, loss_fn, weight, params, state, h, batch, rng
    )
    dphi, dh = head_vjp()
    return loss, metrics, dphi, dh, new_state


def combine_cotangents(stage_plan: StagePlan, cotangents: Mapping[int, jax.Array]) -> jax.Array:
    """θ_k's cotangent Σ_j c_j · ∂L_j/∂h_k (a VJP is linear, so one VJP serves the sum)."""
    terms = [cotangents[j] if c == 1.0 else c * cotangents[j] for j, c in stage_plan.train_on]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def stage_backward(
    stage_plan: StagePlan, vjp_fn: Callable, cotangents: Mapping[int, jax.Array]
) -> tuple[Params, Cotangents]:
    """One stage's backward: its parameter gradient and the cotangents it sends back.

    `cotangents` maps each loss j available at h_k (own aux loss, plus those received
    from stage k + 1) to ∂L_j/∂h_k. Returns (∂θ_k, {j: ∂L_j/∂h_{k-1}} for j in
    `stage_plan.sends`). Costs one parameter VJP plus one input VJP per sent cotangent
    that is not the training cotangent; unused outputs are removed by XLA.
    """
    param_vjp = vjp_fn(combine_cotangents(stage_plan, cotangents))
    sent: Cotangents = {}
    if stage_plan.shared_cotangent is not None:
        sent[stage_plan.shared_cotangent] = param_vjp[1]
    losses = stage_plan.input_vjps
    if len(losses) == 1:
        sent[losses[0]] = vjp_fn(cotangents[losses[0]])[1]
    elif losses:
        cot_NxBx = jnp.stack([cotangents[j] for j in losses])
        dx_NxBx = jax.vmap(lambda c: vjp_fn(c)[1])(cot_NxBx)
        sent.update({j: dx_NxBx[i] for i, j in enumerate(losses)})
    return param_vjp[0], sent


def loss_metrics(k: int, num_stages: int, loss: jax.Array, metrics: Metrics) -> Metrics:
    """Names the metrics of loss k: "loss", "accuracy" for the final one, "aux/k/..." else."""
    prefix = "" if k == num_stages - 1 else f"aux/{k}/"
    return {f"{prefix}loss": loss, **{f"{prefix}{name}": v for name, v in metrics.items()}}


# Engines -------------------------------------------------------------------------------
def routed_grads(
    model: StagedModel,
    strategy: Strategy,
    params: tuple,
    state: tuple,
    batch: Batch,
    rng: jax.Array,
) -> tuple[Grads, tuple, Metrics]:
    """Production engine: one forward per stage, routed cotangent lists (DESIGN.md §2).

    Without aux heads (`plan.aux_heads` False, e2e) no head runs and grads[k] has no
    "head" entry; the heads' state is returned as it came.
    """
    K = model.num_stages
    plan = strategy.plan(K)
    grads: list[dict[str, Any]] = [{} for _ in range(K)]
    new_state: list[dict[str, Any]] = [dict(s) for s in state]
    metrics: Metrics = {}
    vjp_fns, head_vjps = [], []

    h = batch[model.input_key]
    for k, stage in enumerate(model.stages):
        rng_stage, rng_head = stage_rngs(rng, k)
        h, vjp_fn, new_state[k]["stage"] = stage_forward(
            stage, params[k]["stage"], state[k]["stage"], h, rng_stage, first=k == 0
        )
        vjp_fns.append(vjp_fn)
        is_last = k == K - 1
        if not (is_last or plan.aux_heads):
            head_vjps.append(None)
            continue
        loss, m, head_state, head_vjp = head_forward(
            None if is_last else model.heads[k],
            model.head_loss(k),
            1.0 if is_last else strategy.aux_weight(k),
            params[k].get("head", {}),
            state[k].get("head", {}),
            h,
            batch,
            rng_head,
        )
        head_vjps.append(head_vjp)
        metrics.update(loss_metrics(k, K, loss, m))
        if not is_last:
            new_state[k]["head"] = head_state

    received: Cotangents = {}
    for k in reversed(range(K)):
        cotangents = dict(received)
        if head_vjps[k] is not None:
            dphi, cotangents[k] = head_vjps[k]()
            if k < K - 1:
                grads[k]["head"] = dphi
        grads[k]["stage"], received = stage_backward(plan[k], vjp_fns[k], cotangents)
    return tuple(grads), tuple(new_state), metrics


def _scale_gradient(tree: Params, scale: float) -> Params:
    """Identity on values; multiplies the gradient flowing into `tree` by `scale`."""
    if scale == 1.0:
        return tree
    if scale == 0.0:
        return jax.lax.stop_gradient(tree)
    frozen = jax.lax.stop_gradient(tree)
    return jax.tree.map(lambda t, f: f + scale * (t - f), tree, frozen)


def spec_grads(
    model: StagedModel,
    strategy: Strategy,
    params: tuple,
    state: tuple,
    batch: Batch,
    rng: jax.Array,
) -> tuple[Grads, tuple, Metrics]:
    """Readable oracle: Σ_j L_j, each with gradient reaching only the θ_k it credits.

    Without aux heads (e2e) only L_{K-1} exists and only the stages are differentiated.
    """
    K = model.num_stages
    plan = strategy.plan(K)
    losses = range(K) if plan.aux_heads else [K - 1]

    def objective(trained):
        total = 0.0
        metrics: Metrics = {}
        new_state: list[dict[str, Any]] = [dict(s) for s in state]
        for j in losses:  # One full forward per loss: the recomputation routed avoids.
            h = batch[model.input_key]
            for k in range(j + 1):
                theta = _scale_gradient(trained[k]["stage"], plan.coefficient(k, j))
                h, s = model.stages[k].apply(
                    theta, state[k]["stage"], h, stage_rngs(rng, k)[0], True
                )
                if j == K - 1:
                    new_state[k]["stage"] = s
            weight = 1.0
            if j < K - 1:
                weight = strategy.aux_weight(j)
                h, new_state[j]["head"] = model.heads[j].apply(
                    trained[j]["head"], state[j]["head"], h, stage_rngs(rng, j)[1], True
                )
            loss, m = model.head_loss(j)(h, batch)
            metrics.update(loss_metrics(j, K, loss, m))
            total = total + weight * loss
        return total, (tuple(new_state), metrics)

    grads, (new_state, metrics) = jax.grad(objective, has_aux=True)(trained_params(params, plan))
    return grads, new_state, metrics


def trained_params(params: tuple, plan: Plan) -> tuple:
    """The part of `params` a plan trains, laid out as its grads: all of it, or without
    aux heads (e2e) only each stage's {"stage": θ_k}."""
    if plan.aux_heads:
        return params
    return tuple({"stage": p["stage"]} for p in params)


ENGINES: dict[str, Engine] = {"routed": routed_grads, "spec": spec_grads}


def grads(
    model: StagedModel,
    strategy: Strategy,
    params: tuple,
    state: tuple,
    batch: Batch,
    rng: jax.Array | None = None,
    *,
    engine: str = "routed",
) -> tuple[Grads, tuple, Metrics]:
    """Per-stage gradients of `strategy` for one batch: (grads, new_state, metrics).

    `engine` is "routed" (production) or "spec" (the oracle); both return the same.
    """
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; choose one of {sorted(ENGINES)}.")
    if rng is None:
        rng = jax.random.key(0)
    return ENGINES[engine](model, strategy, params, state, batch, rng)
