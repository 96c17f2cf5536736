"""Stage k inside the SPMD clock program: its constants (`StageContext`), what it
carries from tick to tick (`Carry`), and the per-stage math every tick uses (forward
with its VJP, head loss, token weighting, the optimizer update), all through the
uniform `HomogeneousStages` layout (`ilbp.pipeline.spmd_clock` has the tick steps).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ilbp.losses import loss_count
from ilbp.mesh import STAGE_AXIS
from ilbp.pipeline.spmd_ticks import Clock
from ilbp.stage import BODY, HEAD, PROLOGUE, Batch, HomogeneousStages, Params, StagedModel


def masked(mask: jax.Array, tree: Any, fill: float) -> Any:
    """tree where mask holds, else fill (of each leaf's dtype)."""
    return jax.tree.map(lambda x: jnp.where(mask, x, jnp.asarray(fill, x.dtype)), tree)


def nan_like(proto, *lead: int) -> jax.Array:
    """NaN (0 for integer dtypes) of proto's shape, with leading axes `lead`."""
    fill = jnp.nan if jnp.issubdtype(proto.dtype, jnp.floating) else 0
    return jnp.full((*lead, *proto.shape), fill, proto.dtype)


def zeros_tree(tree: Any) -> Any:
    """Zeros of every leaf's shape and dtype."""
    return jax.tree.map(jnp.zeros_like, tree)


def trunk_params(params: Params) -> Params:
    """The parameters a stage's forward uses: prologue and body (not the head)."""
    return {PROLOGUE: params[PROLOGUE], BODY: params[BODY]}


def stage_forward(hom: HomogeneousStages, k: jax.Array, trunk: Params, x_in, tokens) -> jax.Array:
    """h_k of stage k (traced k) on its input x_in, or on its embedding of tokens if k = 0."""
    h0 = hom.prologue(trunk[PROLOGUE], tokens)
    x = jnp.where(k == 0, h0, x_in)  # stage 0 starts from its embedding
    return hom.body(trunk[BODY], x)


def stage_forward_vjp(hom: HomogeneousStages, k: jax.Array, trunk: Params, x_in, tokens):
    """(h_k, the VJP of h_k with respect to (trunk, x_in))."""
    return jax.vjp(lambda p, x: stage_forward(hom, k, p, x, tokens), trunk, x_in)


@flax.struct.dataclass
class Carry:
    """What stage k carries from one clock tick to the next (h: the shape of one
    microbatch's activation h_k; S slots, n_ lanes as in `Clock`).

    Attributes:
      params, opt_state: θ_k in the uniform layout, and its optimizer state.
      x_in: h, the activation received from stage k - 1 at the last tick.
      cot_in: (n_ - 1) × h, lanes 1..n_-1 of the cotangent list received from stage k + 1
        (0 × h when n_ = 1).
      res: per VJP residual, S × ...: a microbatch's residuals in slot u mod S.
      cots: S × n_ × h, the cotangent lists buffered by their microbatch's slot.
      grads, hgrads: the trunk's and the head's gradient sums over the step's microbatches.
      sums: per step (T), the sums of loss and loss_fn over microbatches, and the gradient
        and parameter norms at the step's update.
    """

    params: Params
    opt_state: Any
    x_in: jax.Array
    cot_in: jax.Array
    res: list[jax.Array]
    cots: jax.Array
    grads: Params
    hgrads: Params
    sums: dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class StageContext:
    """Stage k's constants inside the program (built by `of`, inside `jax.shard_map`).

    split: T × M × b × ... microbatches; reach, coef, weight, has_head: stage k's row of
    the clock's; counts: T × M `loss_count`s of the microbatches when they are
    token-weighted (M > 1 and the batch has weights), else None (`ilbp.train`'s rule);
    h: one activation's shape; res_protos/res_treedef: its forward VJP's residuals.
    """

    clock: Clock
    model: StagedModel
    hom: HomogeneousStages
    tx: optax.GradientTransformation
    split: Batch
    k: jax.Array
    reach: jax.Array
    coef: jax.Array
    weight: jax.Array
    has_head: jax.Array
    counts: jax.Array | None
    h: jax.ShapeDtypeStruct
    res_protos: list[jax.ShapeDtypeStruct]
    res_treedef: Any

    @classmethod
    def of(cls, clock, model, tx, params0: Params, split: Batch) -> StageContext:
        k = jax.lax.axis_index(STAGE_AXIS)
        hom = model.homogeneous
        tokens0 = split[model.input_key][0, 0]
        trunk0 = trunk_params(params0)
        h = jax.eval_shape(lambda: stage_forward(hom, k, trunk0, jnp.zeros(()), tokens0))
        zeros_h = jnp.zeros(h.shape, h.dtype)
        _, vjp_proto = jax.eval_shape(lambda: stage_forward_vjp(hom, k, trunk0, zeros_h, tokens0))
        res_protos, res_treedef = jax.tree.flatten(vjp_proto)
        counts = None
        if clock.microbatches > 1 and loss_count(split) is not None:
            counts = jax.vmap(jax.vmap(loss_count))(split)  # over every data shard
        return cls(
            clock=clock,
            model=model,
            hom=hom,
            tx=tx,
            split=split,
            k=k,
            reach=jnp.asarray(clock.reach)[k],
            coef=jnp.asarray(clock.coef)[k],
            weight=jnp.asarray(clock.weights)[k],
            has_head=jnp.asarray(clock.heads)[k],
            counts=counts,
            h=h,
            res_protos=res_protos,
            res_treedef=res_treedef,
        )

    @property
    def num_steps(self) -> int:
        return jax.tree.leaves(self.split)[0].shape[0]

    def microbatch(self, s: jax.Array, m: jax.Array) -> Batch:
        """Microbatch m of step s (indices clipped into range: bubbles read a real one)."""
        T, M = self.num_steps, self.clock.microbatches
        return jax.tree.map(lambda x: x[jnp.clip(s, 0, T - 1), jnp.clip(m, 0, M - 1)], self.split)

    def weighted(self, s: jax.Array, m: jax.Array, tree: Any) -> Any:
        """Microbatch m of step s's contribution to a sum: its count × tree if token-
        weighted, else tree (then sums are divided by M)."""
        if self.counts is None:
            return tree
        T, M = self.num_steps, self.clock.microbatches
        count = self.counts[jnp.clip(s, 0, T - 1), jnp.clip(m, 0, M - 1)]
        return jax.tree.map(lambda x: count.astype(x.dtype) * x, tree)

    def step_divisor(self, s: jax.Array) -> jax.Array | int:
        """What step s's sums are divided by to be the full batch's means."""
        if self.counts is None:
            return self.clock.microbatches
        return jnp.maximum(jnp.sum(self.counts[s], -1), 1.0)

    def forward_vjp(self, trunk: Params, x_in: jax.Array, s: jax.Array, m: jax.Array):
        tokens = self.microbatch(s, m)[self.model.input_key]
        return stage_forward_vjp(self.hom, self.k, trunk, x_in, tokens)

    def vjp(self, res: list[jax.Array], slot: jax.Array, cotangent: jax.Array):
        """(∂trunk, ∂x_in) of the forward whose residuals are in `slot`."""
        return jax.tree.unflatten(self.res_treedef, [r[slot] for r in res])(cotangent)

    def head_loss(self, p_head: Params, h: jax.Array, batch: Batch):
        """(w_k L_k, (L_k, loss_fn metrics)): the aux loss on k < K - 1, the model's on K - 1."""
        model, K = self.model, self.clock.num_stages
        logits = self.hom.head(p_head, h)
        aux_loss = model.head_loss(0)  # the aux heads' loss
        loss, m = model.loss(logits, batch)
        if aux_loss is not model.loss:  # both are cheap next to the head: no branch
            pick = lambda final, aux: jnp.where(self.k == K - 1, final, aux)
            loss, m = jax.tree.map(pick, (loss, m), aux_loss(logits, batch))
        return self.weight * loss, (loss, m)

    def norm(self, tree: Params) -> jax.Array:
        """The norm of θ_k as the single program sees it (its head slot is θ_{K-1}'s
        output layer; the prologue is stage 0's only)."""
        k, K = self.k, self.clock.num_stages

        def sq(t):
            return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t))

        total = sq(tree[BODY]) + jnp.where(k == 0, sq(masked(k == 0, tree[PROLOGUE], 0)), 0)
        return jnp.sqrt(total + jnp.where(k == K - 1, sq(tree[HEAD]), 0))

    def update(self, params, opt_state, grads, hgrads, s):
        """Step s's mean gradient; padding slots get zero gradient and stay NaN. A head
        that does not run (e2e) gets zero gradient and keeps its parameters, as
        `ilbp.train.apply_gradients` does."""
        k, M = self.k, self.clock.microbatches
        grads = {PROLOGUE: grads[PROLOGUE], BODY: grads[BODY], HEAD: hgrads}
        if M > 1:
            divisor = self.step_divisor(s)
            grads = jax.tree.map(lambda g: g / jnp.asarray(divisor, g.dtype), grads)
        grads[PROLOGUE] = masked(k == 0, grads[PROLOGUE], 0)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        new[PROLOGUE] = masked(k == 0, new[PROLOGUE], jnp.nan)
        keep = lambda a, b: jnp.where(self.has_head, a, b)
        new[HEAD] = jax.tree.map(keep, new[HEAD], params[HEAD])
        change = jax.tree.map(jnp.subtract, new, params)
        return new, opt_state, self.norm(grads), self.norm(change), self.norm(new)
