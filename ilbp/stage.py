"""Stages and staged models: the contract every strategy, engine and executor works on.

A *stage* is a pure pair of functions over explicit pytrees:

    init(rng, x)                           -> (params, state)
    apply(params, state, x, rng, train)    -> (y, new_state)

`params` are trained; `state` holds everything else a forward may update (BatchNorm
statistics, NNX RNG counters). An auxiliary head is a stage too: its output is logits.

A `StagedModel` is K stages, K - 1 auxiliary heads (one on the output of every stage
but the last) and the loss. Its variables are grouped by the stage that owns them, so
that stage k's parameters, state and optimizer state can live on device k:

    params[k] = {"stage": θ_k, "head": φ_k}   for k < K - 1
    params[K - 1] = {"stage": θ_K}
    state has the same layout.

A StagedModel may also carry `homogeneous`, a description of its stages as one program
that every stage runs (`HomogeneousStages`); the spmd executor needs it, and
`ilbp.models.transformer_lm` attaches it.

Indices in code are 0-based: stage k = 0..K-1; docs/design.md §1.1's f_1..f_K are stages 0..K-1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

Params = Any
State = Any
Batch = Mapping[str, jax.Array]
# loss_fn(logits, batch) -> (scalar mean loss, metrics such as {"accuracy": ...}).
LossFn = Callable[[jax.Array, Batch], tuple[jax.Array, dict[str, jax.Array]]]
InitFn = Callable[[jax.Array, jax.Array], tuple[Params, State]]
ApplyFn = Callable[[Params, State, jax.Array, jax.Array | None, bool], tuple[jax.Array, State]]
# The uniform per-stage parameter layout of `HomogeneousStages`.
PROLOGUE, BODY, HEAD = "prologue", "body", "head"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One depthwise piece of a network (or an auxiliary head) as pure functions.

    Attributes:
      init: `init(rng, x) -> (params, state)`.
      apply: `apply(params, state, x, rng, train) -> (y, new_state)`. `rng` may be None
        when `train` is False; `new_state` has the structure of `state`.
      name: used in error messages.
    """

    init: InitFn
    apply: ApplyFn
    name: str = "stage"


def from_linen(
    module: nn.Module,
    name: str | None = None,
    *,
    train_kwarg: str | None = "train",
    rng_streams: Sequence[str] = ("dropout",),
) -> Stage:
    """Wraps a Linen module as a Stage.

    Collection "params" becomes `params`; every other collection (e.g. "batch_stats")
    becomes `state` and is mutable when training. `train_kwarg` names the module's
    boolean training argument (None if it has none). `rng_streams` receive the step's
    rng during training.
    """

    def kwargs(train: bool) -> dict[str, bool]:
        return {} if train_kwarg is None else {train_kwarg: train}

    def init(rng: jax.Array, x: jax.Array) -> tuple[Params, State]:
        rngs = {"params": rng, **{s: rng for s in rng_streams}}
        variables = dict(module.init(rngs, x, **kwargs(False)))
        params = variables.pop("params", {})
        return params, variables

    def apply(params, state, x, rng, train):
        rngs = {s: rng for s in rng_streams} if (train and rng is not None) else None
        variables = {"params": params, **state}
        if train and state:
            y, new_state = module.apply(
                variables, x, **kwargs(train), rngs=rngs, mutable=list(state)
            )
            return y, dict(new_state)
        return module.apply(variables, x, **kwargs(train), rngs=rngs), state

    return Stage(init, apply, name or type(module).__name__)


def from_nnx(make: Callable[[nnx.Rngs], nnx.Module], name: str | None = None) -> Stage:
    """Wraps an NNX module factory `make(rngs) -> module` as a Stage (via split/merge).

    `params` is the module's `nnx.Param` state and `state` everything else (batch
    statistics, RNG counters), both as pure dicts of arrays so that they travel through
    jit, optax and checkpoints like Linen variables. `train` switches the module with
    `.train()`/`.eval()`; the step's rng reseeds the module's RNG streams.
    """

    def init(rng: jax.Array, x: jax.Array) -> tuple[Params, State]:
        del x  # NNX modules know their shapes at construction.
        _, params, state = nnx.split(make(nnx.Rngs(rng)), nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(state)

    def apply(params, state, x, rng, train):
        # A fresh abstract module per call: NNX variables must be created in the trace
        # that mutates them (jit, vjp and vmap each trace anew).
        graphdef, params_tmpl, state_tmpl = nnx.split(
            nnx.eval_shape(lambda: make(nnx.Rngs(0))), nnx.Param, ...
        )
        nnx.replace_by_pure_dict(params_tmpl, params)
        nnx.replace_by_pure_dict(state_tmpl, state)
        module = nnx.merge(graphdef, params_tmpl, state_tmpl)
        if train:
            module.train()
            if rng is not None:
                _reseed(module, rng)
        else:
            module.eval()
        y = module(x)
        return y, nnx.to_pure_dict(nnx.split(module, nnx.Param, ...)[2])

    return Stage(init, apply, name or "nnx")


def _reseed(module: nnx.Module, rng: jax.Array) -> None:
    streams = {v.tag for _, v in nnx.iter_graph(module) if isinstance(v, nnx.RngStream)}
    if streams:
        nnx.reseed(module, **{s: rng for s in streams})


@dataclasses.dataclass(frozen=True, eq=False)
class HomogeneousStages:
    """`stages` and `heads` of a StagedModel written as one program every stage runs:

      prologue  tokens -> h_0 on stage 0 only (e.g. the embedding),
      body      h_{k-1} -> h_k, the same function on every stage k (e.g. its blocks),
      head      h_k -> logits on every stage: aux head k for k < K - 1, and for the last
                stage its output layer, which must have an aux head's parameter structure.

    Per stage, parameters take one *uniform* layout {PROLOGUE, BODY, HEAD} with the same
    shapes for every k, so that they stack on a leading stage axis; the prologue slot of
    stages k > 0 is padding, filled with NaN so that any use of it fails loudly. The
    functions take no rng and no state: they describe stages that use neither in training.
    `ilbp.pipeline.homogeneous.check_homogeneous` checks all of this against the model.

    Attributes:
      stages, heads: the model's stages and heads that this describes (the very objects).
      example: an abstract input the stages take (for checks that trace them).
      prologue: apply(params, tokens_BxT) -> h_BxTxD.
      body: apply(params, h_BxTxD) -> h_BxTxD (params: one stage's stacked blocks).
      head: apply(params, h_BxTxD) -> logits_BxTxV.
      to_uniform: (stage k's {"stage", "head"} params, k) -> uniform params.
      from_uniform: (uniform params, k) -> stage k's {"stage", "head"} params.
    """

    stages: tuple[Stage, ...]
    heads: tuple[Stage, ...]
    example: jax.ShapeDtypeStruct
    prologue: Callable[[Params, jax.Array], jax.Array]
    body: Callable[[Params, jax.Array], jax.Array]
    head: Callable[[Params, jax.Array], jax.Array]
    to_uniform: Callable[[Params, int], Params]
    from_uniform: Callable[[Params, int], Params]


@dataclasses.dataclass(frozen=True)
class StagedModel:
    """K stages, K - 1 auxiliary heads and the losses.

    Attributes:
      stages: f_1..f_K; stage k maps h_{k-1} to h_k, the last one to logits.
      heads: g_1..g_{K-1}; head k maps h_k to auxiliary logits.
      loss: ℓ(logits, batch) for the final output.
      aux_loss: ℓ for the auxiliary heads (defaults to `loss`).
      input_key: the batch entry that is h_0.
      homogeneous: the stages as one program (`HomogeneousStages`), if they are; the
        spmd executor runs only models that carry one.
    """

    stages: tuple[Stage, ...]
    heads: tuple[Stage, ...]
    loss: LossFn
    aux_loss: LossFn | None = None
    input_key: str = "inputs"
    homogeneous: HomogeneousStages | None = None

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "heads", tuple(self.heads))
        if not self.stages:
            raise ValueError("A StagedModel needs at least one stage.")
        if len(self.heads) != len(self.stages) - 1:
            raise ValueError(
                f"A StagedModel with K={len(self.stages)} stages needs K - 1 = "
                f"{len(self.stages) - 1} auxiliary heads (one after every stage but the "
                f"last); got {len(self.heads)}."
            )

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def head_loss(self, k: int) -> LossFn:
        """The loss applied to the output of head k (k < K - 1) or of the last stage."""
        if k == self.num_stages - 1:
            return self.loss
        return self.aux_loss or self.loss

    def check_shapes(self, x: jax.Array) -> list[jax.ShapeDtypeStruct]:
        """Traces the stage chain abstractly; returns the shape of every h_k.

        Raises ValueError naming the stage or head that cannot take its input. Costs
        no compilation and no FLOPs.
        """
        rng = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
        h = jax.ShapeDtypeStruct(x.shape, x.dtype)
        shapes = []
        for k, stage in enumerate(self.stages):
            h = _abstract_forward(stage, rng, h, f"stage {k} ({stage.name})", k, "stage")
            shapes.append(h)
            if k < len(self.heads):
                head = self.heads[k]
                _abstract_forward(head, rng, h, f"aux head {k} ({head.name})", k, "head")
        return shapes

    def init(self, rng: jax.Array, x: jax.Array) -> tuple[tuple[Params, ...], tuple[State, ...]]:
        """Initialises every stage and head for inputs shaped like `x` (shape-checked).

        Returns (params, state), each a K-tuple of {"stage": ..., "head": ...} dicts
        ("head" absent on the last stage).
        """
        shapes = self.check_shapes(x)
        params, state = [], []
        for k, stage in enumerate(self.stages):
            rng_stage, rng_head = stage_rngs(rng, k)
            p, s = stage.init(rng_stage, x)
            params.append({"stage": p})
            state.append({"stage": s})
            # Later stages and heads are initialised on zeros of the right shape: init
            # needs shapes, not values, and a forward chain here would double the work.
            x = jax.numpy.zeros(shapes[k].shape, shapes[k].dtype)
            if k < len(self.heads):
                ph, sh = self.heads[k].init(rng_head, x)
                params[k]["head"], state[k]["head"] = ph, sh
        return tuple(params), tuple(state)


def _abstract_forward(stage: Stage, rng, h, what: str, k: int, kind: str):
    try:
        p, s = jax.eval_shape(stage.init, rng, h)
        y, _ = jax.eval_shape(lambda p, s, h, r: stage.apply(p, s, h, r, True), p, s, h, rng)
    except Exception as e:
        source = (
            "the model input" if k == 0 and kind == "stage" else f"stage {k - (kind == 'stage')}"
        )
        raise ValueError(
            f"{what} cannot take the output of {source}, of shape {h.shape} and dtype "
            f"{h.dtype}: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(y, jax.ShapeDtypeStruct):
        raise ValueError(f"{what} must return one array, got {jax.tree.structure(y)}.")
    return y


def stage_rngs(rng: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The rngs of stage k and of its aux head, derived from the step's rng.

    Every engine and executor uses these, so that they all draw the same randomness.
    """
    rng = jax.random.fold_in(rng, k)
    return jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)
