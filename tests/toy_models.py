"""Small heterogeneous staged models shared by the tests (dense, conv, BatchNorm, dropout)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import ilbp


class ConvStage(nn.Module):
    """3×3 conv + BatchNorm + ReLU: NxHxWxC -> NxHxWxfeatures."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        # No bias: BatchNorm removes it, and its exactly-zero gradient is pure noise.
        x = nn.Conv(self.features, (3, 3), use_bias=False, param_dtype=x.dtype, dtype=x.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, dtype=x.dtype, param_dtype=x.dtype)(x)
        return nn.relu(x)


class DenseStage(nn.Module):
    """Flatten + dense + tanh + dropout: Nx... -> Nxfeatures."""

    features: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1)
        x = jnp.tanh(nn.Dense(self.features, param_dtype=x.dtype, dtype=x.dtype)(x))
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class Head(nn.Module):
    """Global pool (for images) + dense to classes."""

    classes: int

    @nn.compact
    def __call__(self, x, train: bool):
        if x.ndim == 4:
            x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.classes, param_dtype=x.dtype, dtype=x.dtype)(x)


class NNXDense(nnx.Module):
    """An NNX stage: dense + BatchNorm + ReLU, to exercise the NNX adapter."""

    def __init__(self, din: int, dout: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.linear = nnx.Linear(
            din, dout, use_bias=False, rngs=rngs, param_dtype=dtype, dtype=dtype
        )
        self.norm = nnx.BatchNorm(dout, rngs=rngs, param_dtype=dtype, dtype=dtype)
        # nnx.BatchNorm keeps float32 statistics whatever param_dtype says; float64 tests
        # need them in the stage's dtype.
        self.norm.mean = nnx.BatchStat(jnp.zeros(dout, dtype))
        self.norm.var = nnx.BatchStat(jnp.ones(dout, dtype))

    def __call__(self, x):
        return nnx.relu(self.norm(self.linear(x.reshape(x.shape[0], -1))))


CLASSES = 5


def heterogeneous(K: int, dtype=jnp.float32, dropout: float = 0.1) -> ilbp.StagedModel:
    """K stages alternating conv (with BatchNorm) and dense (with dropout) layers; an
    NNX stage sits in the middle when K ≥ 3; the last stage outputs CLASSES logits."""
    stages = []
    for k in range(K - 1):
        if k < (K - 1) // 2:
            stages.append(ilbp.from_linen(ConvStage(4 + k), f"conv{k}"))
        elif k == (K - 1) // 2 and K >= 3 and k > 0:
            din = 4 + k - 1 if k - 1 < (K - 1) // 2 else 6
            stages.append(_nnx_after_conv(k, din, dtype))
        else:
            stages.append(ilbp.from_linen(DenseStage(6, dropout), f"dense{k}"))
    stages.append(ilbp.from_linen(DenseStage(CLASSES), "logits"))
    heads = [ilbp.from_linen(Head(CLASSES), f"head{k}") for k in range(K - 1)]
    return ilbp.StagedModel(stages, heads, ilbp.classification_loss())


def _nnx_after_conv(k: int, channels: int, dtype) -> ilbp.Stage:
    din = channels * IMAGE * IMAGE
    return ilbp.from_nnx(lambda rngs: NNXDense(din, 6, rngs, dtype), f"nnx{k}")


IMAGE = 6


def batch(size: int = 8, dtype=jnp.float32, seed: int = 0) -> dict[str, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(seed))
    return {
        "inputs": jax.random.normal(kx, (size, IMAGE, IMAGE, 2), dtype),
        "label": jax.random.randint(ky, (size,), 0, CLASSES),
    }


class TokenStage(nn.Module):
    """Embedding (on token ids) or per-token dense + tanh: BxT(xD) -> BxTxfeatures."""

    features: int
    vocab: int = 0  # > 0: embed token ids

    @nn.compact
    def __call__(self, x, train: bool):
        if self.vocab:
            x = nn.Embed(self.vocab, self.features)(x)
        return jnp.tanh(nn.Dense(self.features)(x))


def text(K: int, vocab: int = 32) -> ilbp.StagedModel:
    """A per-token LM of K ≥ 2 cheap stages (embedding first, vocab logits last), dense
    heads to vocab logits and `next_token_loss`: cheap to compile for every executor."""
    stages = [ilbp.from_linen(TokenStage(8, vocab), "embed")]
    stages += [ilbp.from_linen(TokenStage(8), f"dense{k}") for k in range(1, K - 1)]
    stages.append(ilbp.from_linen(nn.Dense(vocab), "logits", train_kwarg=None))
    heads = [ilbp.from_linen(nn.Dense(vocab), f"head{k}", train_kwarg=None) for k in range(K - 1)]
    return ilbp.StagedModel(stages, heads, ilbp.next_token_loss())


def padded_text_batch(
    lengths=(8, 8, 1, 0, 3, 8, 2, 5), seq_len: int = 8, vocab: int = 32, seed: int = 0
) -> dict[str, jax.Array]:
    """Next-token batch whose row i has lengths[i] real targets ("weights" 1) and padding
    after them ("weights" 0): slices of it count very different numbers of tokens."""
    tokens = jax.random.randint(jax.random.key(seed), (len(lengths), seq_len + 1), 0, vocab)
    weights = jnp.arange(seq_len)[None, :] < jnp.asarray(lengths)[:, None]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights.astype(float)}
