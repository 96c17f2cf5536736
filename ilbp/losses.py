"""Loss functions with the `LossFn` signature: (logits, batch) -> (mean loss, metrics).

Both losses average over the entries that batch["weights"] counts (every example if the
batch has no weights). `loss_count` is that number; microbatch accumulation weights each
microbatch's mean by it, so that M microbatches give the full batch's mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ilbp.stage import Batch, LossFn

WEIGHTS_KEY = "weights"


def loss_count(batch: Batch) -> jax.Array | None:
    """Σ batch["weights"]: the entries (examples or tokens) a loss on `batch` averages over.

    None if the batch has no weights: every example counts, so equal microbatches count
    equally. Losses with another weight_key are not seen here (their microbatches count
    equally).
    """
    weights = batch.get(WEIGHTS_KEY)
    if weights is None:
        return None
    return jnp.sum(weights.astype(jnp.promote_types(weights.dtype, jnp.float32)))


def classification_loss(label_key: str = "label", weight_key: str = WEIGHTS_KEY) -> LossFn:
    """Softmax cross-entropy against integer labels.

    logits_BxC, batch[label_key]_B (and optional 0/1 batch[weight_key]_B marking padded
    examples) -> (mean loss over counted examples, {"accuracy"}).
    """

    def loss_fn(logits_BxC: jax.Array, batch: Batch):
        labels_B = batch[label_key]
        logits_BxC = logits_BxC.astype(jnp.promote_types(logits_BxC.dtype, jnp.float32))
        loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
        correct_B = jnp.argmax(logits_BxC, -1) == labels_B
        return _weighted_mean(loss_B, correct_B, batch.get(weight_key))

    return loss_fn


def _weighted_mean(loss, correct, weights):
    """(mean loss, {"accuracy"}) over the entries whose weight is non-zero."""
    if weights is None:
        return jnp.mean(loss), {"accuracy": jnp.mean(correct)}
    weights = weights.astype(loss.dtype)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    accuracy = jnp.sum(correct * weights) / count
    return jnp.sum(loss * weights) / count, {"accuracy": accuracy}


def next_token_loss(target_key: str = "targets", weight_key: str = WEIGHTS_KEY) -> LossFn:
    """Token-level cross-entropy for language models.

    logits_BxTxV, batch[target_key]_BxT (and optional 0/1 batch[weight_key]_BxT for
    padding) -> (mean loss per counted token, {"accuracy"}). Perplexity is exp(loss).
    """

    def loss_fn(logits_BxTxV: jax.Array, batch: Batch):
        targets_BxT = batch[target_key]
        logits_BxTxV = logits_BxTxV.astype(jnp.promote_types(logits_BxTxV.dtype, jnp.float32))
        loss_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
        correct_BxT = jnp.argmax(logits_BxTxV, -1) == targets_BxT
        return _weighted_mean(loss_BxT, correct_BxT, batch.get(weight_key))

    return loss_fn
