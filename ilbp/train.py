"""Train and eval steps: pure, jitted, data parallel over a mesh axis `data`.

    state = init_train_state(model, optimizer, rng, batch, mesh=mesh)
    step = make_train_step(model, strategy, optimizer, mesh=mesh)
    state, metrics = step(state, batch)

Each stage k owns its optimizer state (for θ_k and φ_k): one optax transformation for
all stages or one per stage. With `microbatches=M` a step accumulates the gradients of
M equal slices of the batch (in order, threading BatchNorm state) and updates once; on
padded batches ("weights") each slice counts by its tokens, so M does not change the
objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ilbp.checks import check_batch_split, check_microbatches, check_stacked
from ilbp.engine import ENGINES, Grads, Metrics, loss_metrics, trained_params
from ilbp.losses import loss_count
from ilbp.mesh import DATA_AXIS, batch_sharding, replicated
from ilbp.stage import Batch, StagedModel
from ilbp.strategy import Strategy

Optimizer = optax.GradientTransformation | Sequence[optax.GradientTransformation]


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; each field a K-tuple indexed by stage.

    Attributes:
      step: number of updates done.
      params: per stage {"stage": θ_k, "head": φ_k} ("head" absent on the last).
      state: per stage mutable collections (BatchNorm statistics), same layout.
      opt_state: per stage optax state of that stage's parameters.
      rng: base key; step t uses fold_in(rng, t).
    """

    step: jax.Array
    params: tuple
    state: tuple
    opt_state: tuple
    rng: jax.Array


def per_stage_optimizers(
    optimizer: Optimizer, num_stages: int
) -> tuple[optax.GradientTransformation, ...]:
    """One optax transformation per stage (the same one repeated if one is given)."""
    if isinstance(optimizer, optax.GradientTransformation):
        return (optimizer,) * num_stages
    optimizers = tuple(optimizer)
    if len(optimizers) != num_stages:
        raise ValueError(
            f"Got {len(optimizers)} optimizers for a model with K={num_stages} stages; "
            "pass one optimizer for all stages or exactly one per stage."
        )
    return optimizers


def init_train_state(
    model: StagedModel,
    optimizer: Optimizer,
    rng: jax.Array,
    batch: Batch,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainState:
    """Initialises parameters (shape-checked against `batch`) and optimizer states.

    With a mesh, the state is created replicated over it.
    """
    optimizers = per_stage_optimizers(optimizer, model.num_stages)
    x = batch[model.input_key]
    init_rng, step_rng = jax.random.split(rng)
    model.check_shapes(x)

    def init(init_rng, step_rng):
        params, state = model.init(init_rng, x)
        opt_state = tuple(tx.init(p) for tx, p in zip(optimizers, params))
        return TrainState(jnp.zeros((), jnp.int32), params, state, opt_state, step_rng)

    out_shardings = None if mesh is None else replicated(mesh)
    return jax.jit(init, out_shardings=out_shardings)(init_rng, step_rng)


def accumulate_grads(
    grad_fn: Callable[[tuple, tuple, Batch, int], tuple[Grads, tuple, Metrics]],
    params: tuple,
    state: tuple,
    batch: Batch,
    microbatches: int,
    *,
    grads_like: Any = None,
) -> tuple[Grads, tuple, Metrics]:
    """The full batch's gradient and metrics from M microbatches, state threaded in order.

    `grad_fn(params, state, microbatch, m)`; `grads_like`: a tree shaped like its grads
    (default `params`). Microbatch means are averaged with weights ∝ `loss_count` (their
    counted tokens or examples) when the batch has weights, else equally: either way the
    result is the mean over the whole batch.
    """
    if microbatches == 1:
        return grad_fn(params, state, batch, 0)
    split = jax.tree.map(
        lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:]), batch
    )
    counts_M = None if loss_count(batch) is None else jax.vmap(loss_count)(split)

    def body(carry, inputs):
        grad_sum, state = carry
        m, microbatch = inputs
        grads, state, metrics = grad_fn(params, state, microbatch, m)
        if counts_M is not None:  # the microbatch's sum over its counted entries
            grads = jax.tree.map(lambda g: counts_M[m].astype(g.dtype) * g, grads)
        return (jax.tree.map(jnp.add, grad_sum, grads), state), metrics

    zeros = jax.tree.map(jnp.zeros_like, params if grads_like is None else grads_like)
    (grad_sum, state), metrics = jax.lax.scan(
        body, (zeros, state), (jnp.arange(microbatches), split)
    )
    if counts_M is None:
        mean = lambda tree: jax.tree.map(lambda x: x / microbatches, tree)
        return mean(grad_sum), state, jax.tree.map(lambda x: jnp.mean(x, 0), metrics)
    total = jnp.maximum(jnp.sum(counts_M), 1.0)
    grads = jax.tree.map(lambda g: g / total.astype(g.dtype), grad_sum)
    weighted = lambda x: jnp.tensordot(counts_M.astype(x.dtype), x, 1) / total.astype(x.dtype)
    return grads, state, jax.tree.map(weighted, metrics)


def apply_gradients(
    tx: optax.GradientTransformation, params: dict, opt_state: Any, grads: dict
) -> tuple[dict, Any]:
    """One optimizer update of one stage's {"stage", "head"} params.

    Grads without a "head" entry (e2e: the head is not trained) leave the head's
    parameters as they are; the optimizer sees zeros for it, so stateful transforms that
    only accumulate gradients (momentum, Adam moments) keep their initial head state too.
    """
    if "head" not in params or "head" in grads:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    zeros = jax.tree.map(jnp.zeros_like, params["head"])
    updates, opt_state = tx.update({**grads, "head": zeros}, opt_state, params)
    new = optax.apply_updates(params, updates)
    return {**new, "head": params["head"]}, opt_state


def _data_size(mesh: jax.sharding.Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[DATA_AXIS]


def _update_stages(
    optimizers: list, ts: TrainState, grads: list, metrics: Metrics
) -> tuple[tuple, tuple]:
    """(new params, new optimizer states) of every stage, each by its own optimizer;
    adds each stage's grad, update and parameter norms to `metrics`."""
    params, opt_state = [], []
    for k, tx in enumerate(optimizers):
        p, opt = apply_gradients(tx, ts.params[k], ts.opt_state[k], grads[k])
        params.append(p)
        opt_state.append(opt)
        metrics[f"grad_norm/{k}"] = optax.tree.norm(grads[k]["stage"])
        change = jax.tree.map(jnp.subtract, p["stage"], ts.params[k]["stage"])
        metrics[f"update_norm/{k}"] = optax.tree.norm(change)
        metrics[f"param_norm/{k}"] = optax.tree.norm(p["stage"])
    return tuple(params), tuple(opt_state)


def make_train_step(
    model: StagedModel,
    strategy: Strategy,
    optimizer: Optimizer,
    *,
    mesh: jax.sharding.Mesh | None = None,
    engine: str = "routed",
    microbatches: int = 1,
    donate: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A pure `step(state, batch) -> (state, metrics)`, jitted (with donation).

    The batch is sharded over the mesh axis `data` and everything else replicated; the
    result equals the single-device step up to float reassociation. The returned
    function checks the batch shape before tracing; `.jitted` is the jitted function
    (for lowering and cost analysis).

    Metrics: "loss", "accuracy" (final head), "aux/k/loss", "aux/k/accuracy" (not for
    e2e, whose heads neither run nor train), and per stage "grad_norm/k" (of θ_k),
    "update_norm/k" (of the change of θ_k this step) and "param_norm/k". With
    microbatches they are the full batch's means (`accumulate_grads`).
    """
    K = model.num_stages
    plan = strategy.plan(K)  # ValueError if the strategy does not fit K
    optimizers = per_stage_optimizers(optimizer, K)
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; choose one of {sorted(ENGINES)}.")
    check_microbatches(microbatches)
    engine_fn = ENGINES[engine]

    def step(ts: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(ts.rng, ts.step)
        grad_fn = lambda params, state, b, m: engine_fn(
            model, strategy, params, state, b, jax.random.fold_in(rng, m)
        )
        grads, new_state, metrics = accumulate_grads(
            grad_fn,
            ts.params,
            ts.state,
            batch,
            microbatches,
            grads_like=trained_params(ts.params, plan),
        )
        params, opt_state = _update_stages(optimizers, ts, grads, metrics)
        new = TrainState(ts.step + 1, params, new_state, opt_state, ts.rng)
        return new, metrics

    shardings: dict[str, Any] = {}
    if mesh is not None:
        shardings = dict(
            in_shardings=(replicated(mesh), batch_sharding(mesh)),
            out_shardings=(replicated(mesh), replicated(mesh)),
        )
    jitted = jax.jit(step, donate_argnums=(0,) if donate else (), **shardings)

    def checked_step(ts: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        check_batch_split(batch, _data_size(mesh), microbatches)
        return jitted(ts, batch)

    checked_step.jitted = jitted
    return checked_step


def slice_rows(x: Any, start: int, stop: int) -> Any:
    """x[start:stop]: numpy on the host, a static slice on the device for a jax array
    (indexing one with Python ints would first transfer them to its device)."""
    if isinstance(x, jax.Array):
        return jax.lax.slice_in_dim(x, start, stop)
    return x[start:stop]


def run_steps(
    step: Callable[[Any, Batch], tuple[Any, Metrics]], state: Any, batches: Batch
) -> tuple[Any, Metrics]:
    """T calls of `step` on batches stacked T × B × ..., one after another (nothing
    waits for the devices between them): the state after them, and every step's metrics
    stacked on a leading T axis."""
    metrics = []
    for t in range(check_stacked(batches)):
        batch = jax.tree.map(lambda x, t=t: slice_rows(x, t, t + 1).reshape(x.shape[1:]), batches)
        state, step_metrics = step(state, batch)
        metrics.append(step_metrics)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)


def make_eval_step(
    model: StagedModel, *, mesh: jax.sharding.Mesh | None = None
) -> Callable[[TrainState, Batch], Metrics]:
    """`eval_step(state, batch) -> metrics` of the final and every aux head (no updates).

    Uses the inference mode of every stage (BatchNorm running statistics). It does not
    depend on the strategy: after e2e training the aux heads are still as initialised,
    and their metrics are those of untrained heads on trained features.
    """
    K = model.num_stages

    def evaluate(ts: TrainState, batch: Batch) -> Metrics:
        metrics: Metrics = {}
        h = batch[model.input_key]
        for k, stage in enumerate(model.stages):
            p, s = ts.params[k], ts.state[k]
            h, _ = stage.apply(p["stage"], s["stage"], h, None, False)
            logits = h
            if k < K - 1:
                logits, _ = model.heads[k].apply(p["head"], s["head"], h, None, False)
            loss, m = model.head_loss(k)(logits, batch)
            metrics.update(loss_metrics(k, K, loss, m))
        return metrics

    shardings: dict[str, Any] = {}
    if mesh is not None:
        shardings = dict(
            in_shardings=(replicated(mesh), batch_sharding(mesh)), out_shardings=replicated(mesh)
        )
    jitted = jax.jit(evaluate, **shardings)

    def checked_eval(ts: TrainState, batch: Batch) -> Metrics:
        check_batch_split(batch, _data_size(mesh), 1)
        return jitted(ts, batch)

    checked_eval.jitted = jitted
    return checked_eval
