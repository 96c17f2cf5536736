"""Homogeneous stages: a StagedModel as one program that every pipeline stage runs.

The SPMD executor runs the same code on every stage, so a model must be described as

  prologue  tokens -> h_0 on stage 0 only (the embedding),
  body      h_{k-1} -> h_k, the same function on every stage k (the blocks),
  head      h_k -> logits on every stage: the aux head for k < K-1, and for the last
            stage the model's own output layer (final norm + unembedding), which for the
            Transformer has exactly an aux head's structure (LayerNorm + unembedding).

Per stage, parameters take one *uniform* layout {"prologue", "body", "head"} with the
same shapes for every k, so they stack on a leading stage axis; the prologue slot of
stages k > 0 is padding, filled with NaN so that any use of it fails loudly.
`to_uniform`/`from_uniform` convert stage k's StagedModel parameters ({"stage", "head"})
to and from that layout.

`transformer_stages(model)` recognises a StagedModel built by
`ilbp.models.transformer_lm` (it reads the Linen module each stage wraps).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ilbp.models.transformer import LMHead, TransformerConfig, TransformerStage
from ilbp.stage import LossFn, Params, StagedModel

PROLOGUE, BODY, HEAD = "prologue", "body", "head"


@dataclasses.dataclass(frozen=True)
class HomogeneousStages:
    """A StagedModel whose K stages are prologue + K × body + head (module docstring).

    Attributes:
      model: the StagedModel it describes (for the single-program layout).
      prologue: apply(params, tokens_BxT) -> h_BxTxD.
      body: apply(params, h_BxTxD) -> h_BxTxD (params: one stage's stacked blocks).
      head: apply(params, h_BxTxD) -> logits_BxTxV.
      to_uniform: (stage k's {"stage", "head"} params, k) -> uniform params.
      from_uniform: (uniform params, k) -> stage k's {"stage", "head"} params.
    """

    model: StagedModel
    prologue: Callable[[Params, jax.Array], jax.Array]
    body: Callable[[Params, jax.Array], jax.Array]
    head: Callable[[Params, jax.Array], jax.Array]
    to_uniform: Callable[[Params, int], Params]
    from_uniform: Callable[[Params, int], Params]

    @property
    def num_stages(self) -> int:
        return self.model.num_stages

    @property
    def loss(self) -> LossFn:
        return self.model.loss

    @property
    def aux_loss(self) -> LossFn:
        return self.model.aux_loss or self.model.loss


def _module(stage) -> Any:
    return inspect.getclosurevars(stage.apply).nonlocals.get("module")


def transformer_stages(model: StagedModel | HomogeneousStages) -> HomogeneousStages:
    """The homogeneous description of a `transformer_lm` StagedModel (K ≥ 2).

    ValueError if the model's stages are not Transformer stages of equal depth.
    """
    if isinstance(model, HomogeneousStages):
        return model
    modules = [_module(s) for s in model.stages]
    if not all(isinstance(m, TransformerStage) for m in modules) or model.num_stages < 2:
        raise ValueError(
            "The spmd executor needs homogeneous stages: a Transformer StagedModel from "
            "ilbp.models.transformer_lm with K ≥ 2 stages (or a HomogeneousStages). Use the "
            "mpmd executor for heterogeneous models such as the ResNets."
        )
    config: TransformerConfig = modules[0].config
    n = modules[0].num_blocks
    K = model.num_stages
    prologue_m = TransformerStage(config, 0, embed=True, unembed=False)
    body_m = TransformerStage(config, n, embed=False, unembed=False)
    head_m = LMHead(config)

    def to_uniform(p: Params, k: int) -> Params:
        stage = p["stage"]
        if k == K - 1:
            head = {"norm": stage["final_norm"], "unembed": stage["unembed"]}
        else:
            head = p["head"]
        if k == 0:
            prologue = stage["embed"]
        else:  # padding with the embedding's shapes
            shapes = jax.eval_shape(
                lambda: prologue_m.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
            )["params"]["embed"]
            prologue = jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)
        return {PROLOGUE: prologue, BODY: stage["blocks"], HEAD: head}

    def from_uniform(u: Params, k: int) -> Params:
        stage: dict[str, Any] = {"blocks": u[BODY]}
        if k == 0:
            stage = {"embed": u[PROLOGUE], **stage}
        if k == K - 1:
            stage.update(final_norm=u[HEAD]["norm"], unembed=u[HEAD]["unembed"])
            return {"stage": stage}
        return {"stage": stage, "head": u[HEAD]}

    return HomogeneousStages(
        model=model,
        prologue=lambda p, tokens: prologue_m.apply({"params": {"embed": p}}, tokens),
        body=lambda p, h: body_m.apply({"params": {"blocks": p}}, h),
        head=lambda p, h: head_m.apply({"params": p}, h),
        to_uniform=to_uniform,
        from_uniform=from_uniform,
    )
