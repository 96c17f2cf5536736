"""A GPT-style decoder-only Transformer LM, cut into K stages of equal numbers of blocks.

Pre-LayerNorm blocks: h += attn(LN(h)); h += mlp(LN(h)), with causal multi-head
self-attention and a GELU MLP; learned absolute or rotary positions.

Shape letters, declared here once (array names end in them, e.g. `q_BxTxHxE`):

  B  batch size
  T  sequence length (≤ L)
  L  max_len, the longest sequence the model takes
  D  d_model, the residual width
  F  d_ff, the MLP's hidden width
  V  vocab_size
  H  num_heads
  E  head_dim = D / H
  K  number of stages, as everywhere in ilbp (num_layers has no letter)

Parameter layout (every stage, and the unsplit `TransformerLM`, use these names):

  "embed":      {"tokens": {"embedding": VxD}, "positions": {"embedding": LxD}}
                (stage 0 only; "positions" only with learned positions)
  "blocks":     the stage's blocks, every leaf stacked on a leading axis of length
                num_layers / K (one `nn.scan` over `Block`). Its pytree structure is
                identical in every stage, so the K stages' "blocks" stack to
                K x (num_layers / K) x ... for pipelining, and concatenate to the
                unsplit model's num_layers x ...
  "final_norm": {"scale", "bias"}  (stage K-1 only)
  "unembed":    {"kernel": DxV}    (stage K-1 only; absent with tied embeddings)

`ilbp.models.unsplit_variables` merges a staged model's variables into this layout.

Tied embeddings: with `tie_embeddings=True` the logits are h @ embedding.T. Under the
stage contract each stage owns its parameters, so the last stage cannot read stage 0's
embedding: tying is only allowed for K = 1 (ValueError otherwise). Aux heads (LayerNorm +
unembedding DxV) are never tied, for the same reason: each head has its own unembedding,
initialised independently. (An "initialised equal" copy would stop being tied after
the first update, so we do not pretend to offer it.)

Compute dtype `dtype` (float32 or bfloat16); parameters `param_dtype` (float32);
attention softmax and LayerNorm statistics are computed in at least float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from ilbp.losses import next_token_loss
from ilbp.models.splitting import check_num_stages
from ilbp.stage import (
    BODY,
    HEAD,
    PROLOGUE,
    HomogeneousStages,
    LossFn,
    Params,
    Stage,
    StagedModel,
    from_linen,
)

_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of a decoder-only Transformer LM.

    Attributes:
      vocab_size: V.
      max_len: L, the longest sequence the model accepts (size of the learned position
        table; for rotary positions, the longest context it is meant for).
      num_layers: number of blocks.
      d_model: D.
      num_heads: H; D must be divisible by H (head dim E = D/H, even for rotary).
      d_ff: MLP hidden width F (default 4D).
      positions: "learned" or "rotary".
      tie_embeddings: logits use the token embedding transposed (K = 1 only).
      rope_base: rotary frequency base.
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    vocab_size: int
    max_len: int
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int | None = None
    positions: Literal["learned", "rotary"] = "learned"
    tie_embeddings: bool = False
    rope_base: float = 10_000.0
    ln_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}."
            )
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"Unknown positions {self.positions!r}; choose 'learned' or 'rotary'.")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"Rotary positions need an even head dim; got {self.head_dim}.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    def num_params(self, num_stages: int = 1, aux_head: str = "norm_unembed") -> int:
        """Closed-form parameter count of the model with K - 1 aux heads (none if K = 1)
        of design `aux_head` (see LM_HEADS)."""
        V, L, D, F = self.vocab_size, self.max_len, self.d_model, self.ff_dim
        embed = V * D + (L * D if self.positions == "learned" else 0)
        # 2 LayerNorms (2D each), q/k/v/out projections with biases, MLP with biases.
        block = 4 * D + 4 * (D * D + D) + (D * F + F) + (F * D + D)
        final = 2 * D + (0 if self.tie_embeddings else D * V)
        head = {"norm_unembed": 2 * D, "unembed": 0, "block_norm_unembed": block + 2 * D}
        return embed + self.num_layers * block + final + (num_stages - 1) * (head[aux_head] + D * V)


def _dense(
    c: TransformerConfig, features, name: str, std: float = _INIT_STD, axis=-1, bias=True
) -> nn.DenseGeneral:
    return nn.DenseGeneral(
        features,
        axis=axis,
        use_bias=bias,
        kernel_init=nn.initializers.normal(std),
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        name=name,
    )


def _layer_norm(c: TransformerConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=c.ln_epsilon, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


def _rotary(x_BxTxHxE: jax.Array, base: float) -> jax.Array:
    """Rotates pairs (x_i, x_{i+E/2}) by angle t * base^(-2i/E) at position t."""
    T, E = x_BxTxHxE.shape[1], x_BxTxHxE.shape[-1]
    freq_E2 = base ** (-jnp.arange(0, E // 2, dtype=jnp.float32) * 2 / E)  # E2 = E/2
    angle_TxE2 = jnp.arange(T, dtype=jnp.float32)[:, None] * freq_E2[None, :]
    cos, sin = jnp.cos(angle_TxE2)[:, None, :], jnp.sin(angle_TxE2)[:, None, :]
    x1, x2 = jnp.split(x_BxTxHxE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxE.dtype)


class Block(nn.Module):
    """One pre-LN Transformer block; (h_BxTxD, None) -> (h_BxTxD, None) for `nn.scan`."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, h_BxTxD: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        c = self.config
        T = h_BxTxD.shape[1]
        H, E = c.num_heads, c.head_dim
        out_std = _INIT_STD / (2 * c.num_layers) ** 0.5  # GPT-2's residual scaling.

        x_BxTxD = _layer_norm(c, "attn_norm")(h_BxTxD)
        q_BxTxHxE = _dense(c, (H, E), "query")(x_BxTxD)
        k_BxTxHxE = _dense(c, (H, E), "key")(x_BxTxD)
        v_BxTxHxE = _dense(c, (H, E), "value")(x_BxTxD)
        if c.positions == "rotary":
            q_BxTxHxE = _rotary(q_BxTxHxE, c.rope_base)
            k_BxTxHxE = _rotary(k_BxTxHxE, c.rope_base)
        logits_BxHxTxT = jnp.einsum("bthe,bshe->bhts", q_BxTxHxE, k_BxTxHxE) / E**0.5
        # Softmax in ≥ float32 even with bfloat16 compute.
        logits_BxHxTxT = logits_BxHxTxT.astype(jnp.promote_types(c.dtype, jnp.float32))
        causal_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
        logits_BxHxTxT = jnp.where(causal_TxT, logits_BxHxTxT, jnp.finfo(logits_BxHxTxT.dtype).min)
        probs_BxHxTxT = jax.nn.softmax(logits_BxHxTxT, axis=-1).astype(v_BxTxHxE.dtype)
        o_BxTxHxE = jnp.einsum("bhts,bshe->bthe", probs_BxHxTxT, v_BxTxHxE)
        h_BxTxD = h_BxTxD + _dense(c, c.d_model, "out", out_std, axis=(-2, -1))(o_BxTxHxE)

        x_BxTxD = _layer_norm(c, "mlp_norm")(h_BxTxD)
        x_BxTxF = nn.gelu(_dense(c, c.ff_dim, "mlp_in")(x_BxTxD))
        h_BxTxD = h_BxTxD + _dense(c, c.d_model, "mlp_out", out_std)(x_BxTxF)
        return h_BxTxD, None


class TransformerStage(nn.Module):
    """`num_blocks` consecutive blocks of the LM (one `nn.scan`), preceded by the
    embedding if `embed` and followed by the final norm and unembedding if `unembed`.

    Input: tokens_BxT int32 if `embed`, else h_BxTxD. Output: logits_BxTxV if `unembed`,
    else h_BxTxD. Raises ValueError if T > max_len or integer tokens are missing.
    """

    config: TransformerConfig
    num_blocks: int
    embed: bool = True
    unembed: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # No dropout: training and evaluation forwards are the same.
        c = self.config
        if x.ndim < 2 or x.shape[1] > c.max_len:
            raise ValueError(
                f"Sequence length {x.shape[1] if x.ndim >= 2 else '?'} (input shape "
                f"{x.shape}) exceeds the model's max_len={c.max_len}, or the input is not "
                "BxT tokens / BxTxD activations."
            )
        embedder = None
        if self.embed:
            if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(
                    f"The first stage takes integer tokens BxT; got {x.dtype} {x.shape}."
                )
            embedder = _Embed(c, name="embed")
            h_BxTxD = embedder(x)
        else:
            h_BxTxD = x.astype(c.dtype)
        if self.num_blocks:
            blocks = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.num_blocks,
            )(c, name="blocks")
            h_BxTxD, _ = blocks(h_BxTxD, None)
        if not self.unembed:
            return h_BxTxD
        h_BxTxD = _layer_norm(c, "final_norm")(h_BxTxD)
        if c.tie_embeddings:
            if embedder is None:
                raise ValueError("tie_embeddings needs the embedding in the last stage (K = 1).")
            return embedder.attend(h_BxTxD)
        return _dense(c, c.vocab_size, "unembed", bias=False)(h_BxTxD)


class _Embed(nn.Module):
    config: TransformerConfig

    def setup(self):
        c = self.config
        init = nn.initializers.normal(_INIT_STD)
        self.tokens = nn.Embed(
            c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype, embedding_init=init
        )
        if c.positions == "learned":
            self.positions = nn.Embed(
                c.max_len, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype, embedding_init=init
            )

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        h_BxTxD = self.tokens(tokens_BxT)
        if self.config.positions == "learned":
            h_BxTxD = h_BxTxD + self.positions(jnp.arange(tokens_BxT.shape[1]))[None]
        return h_BxTxD

    def attend(self, h_BxTxD: jax.Array) -> jax.Array:
        return self.tokens.attend(h_BxTxD)


def TransformerLM(config: TransformerConfig) -> TransformerStage:
    """The unsplit model: tokens_BxT -> logits_BxTxV, every block in one scan."""
    return TransformerStage(config, config.num_layers, embed=True, unembed=True)


# Aux-head designs: what an LMHead applies before its own (untied) unembedding.
LM_HEADS: tuple[str, ...] = ("norm_unembed", "unembed", "block_norm_unembed")


class LMHead(nn.Module):
    """Auxiliary head h_BxTxD -> logits_BxTxV, ending in its own (untied) unembedding.

    `design`: "norm_unembed" (default: LayerNorm + unembedding, like the final head),
    "unembed" (no LayerNorm: logits scale with h), or "block_norm_unembed" (one more
    Transformer block of the model's shape, then LayerNorm + unembedding).
    """

    config: TransformerConfig
    design: str = "norm_unembed"

    @nn.compact
    def __call__(self, h_BxTxD: jax.Array, train: bool = False) -> jax.Array:
        del train
        c = self.config
        h_BxTxD = h_BxTxD.astype(c.dtype)
        if self.design == "block_norm_unembed":
            h_BxTxD, _ = Block(c, name="block")(h_BxTxD)
        if self.design != "unembed":
            h_BxTxD = _layer_norm(c, "norm")(h_BxTxD)
        return _dense(c, c.vocab_size, "unembed", bias=False)(h_BxTxD)


def transformer_lm(
    config: TransformerConfig,
    num_stages: int = 1,
    *,
    aux_head: str = "norm_unembed",
    loss: LossFn | None = None,
    aux_loss: LossFn | None = None,
    input_key: str = "inputs",
) -> StagedModel:
    """The LM cut into K stages of num_layers / K blocks each (module docstring).

    Input: batch[input_key] tokens_BxT int32; output logits_BxTxV; aux head k (an
    `LMHead` of design `aux_head`, see LM_HEADS) gives logits_BxTxV from stage k's
    output. Loss defaults to `next_token_loss()` on batch["targets"]. With the default
    head design the model carries its description as one program per stage
    (`StagedModel.homogeneous`, `transformer_homogeneous`), which the `spmd` executor
    needs: the other designs' heads differ from the last stage's norm + unembedding.
    """
    num_layers = config.num_layers
    if aux_head not in LM_HEADS:
        raise ValueError(f"Unknown aux_head {aux_head!r}; choose one of {LM_HEADS}.")
    check_num_stages(num_stages, num_layers, "Transformer blocks")
    if num_layers % num_stages:
        raise ValueError(
            f"num_layers={num_layers} is not divisible by num_stages={num_stages}; stages "
            "must hold equal numbers of blocks (so their parameters can be stacked)."
        )
    if config.tie_embeddings and num_stages > 1:
        raise ValueError(
            "tie_embeddings=True needs num_stages=1: the last stage cannot share stage 0's "
            "embedding, since every stage owns its parameters. Use tie_embeddings=False."
        )
    n = num_layers // num_stages
    stages, heads = [], []
    for k in range(num_stages):
        first, last = k == 0, k == num_stages - 1
        module = TransformerStage(config, n, embed=first, unembed=last)
        stages.append(from_linen(module, f"blocks {k * n}..{(k + 1) * n - 1}"))
        if not last:
            heads.append(
                from_linen(LMHead(config, aux_head), f"lm head after block {(k + 1) * n - 1}")
            )
    stages, heads = tuple(stages), tuple(heads)
    return StagedModel(
        stages,
        heads,
        loss or next_token_loss(),
        aux_loss=aux_loss,
        input_key=input_key,
        homogeneous=(
            transformer_homogeneous(config, stages, heads)
            if num_stages > 1 and aux_head == LM_HEADS[0]
            else None
        ),
    )


def transformer_homogeneous(
    config: TransformerConfig, stages: tuple[Stage, ...], heads: tuple[Stage, ...]
) -> HomogeneousStages:
    """`transformer_lm`'s K stages and heads as one program (`ilbp.HomogeneousStages`):
    prologue the embedding, body num_layers / K blocks, head LayerNorm + unembedding,
    which is both an `LMHead` and the last stage's final norm + unembedding."""
    K = len(stages)
    prologue_m = TransformerStage(config, 0, embed=True, unembed=False)
    body_m = TransformerStage(config, config.num_layers // K, embed=False, unembed=False)
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
        stages=stages,
        heads=heads,
        example=jax.ShapeDtypeStruct((1, config.max_len), jnp.int32),
        prologue=lambda p, tokens: prologue_m.apply({"params": {"embed": p}}, tokens),
        body=lambda p, h: body_m.apply({"params": {"blocks": p}}, h),
        head=lambda p, h: head_m.apply({"params": p}, h),
        to_uniform=to_uniform,
        from_uniform=from_uniform,
    )
