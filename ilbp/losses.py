"""Loss functions with the `LossFn` signature: (logits, batch) -> (mean loss, metrics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ilbp.stage import Batch, LossFn


def classification_loss(label_key: str = "label") -> LossFn:
    """Softmax cross-entropy against integer labels.

    logits_BxC, batch[label_key]_B -> (mean loss, {"accuracy"}).
    """

    def loss_fn(logits_BxC: jax.Array, batch: Batch):
        labels_B = batch[label_key]
        logits_BxC = logits_BxC.astype(jnp.float32)
        loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
        accuracy = jnp.mean(jnp.argmax(logits_BxC, -1) == labels_B)
        return jnp.mean(loss_B), {"accuracy": accuracy}

    return loss_fn


def next_token_loss(target_key: str = "targets", weight_key: str = "weights") -> LossFn:
    """Token-level cross-entropy for language models.

    logits_BxTxV, batch[target_key]_BxT (and optional 0/1 batch[weight_key]_BxT for
    padding) -> (mean loss per counted token, {"accuracy"}). Perplexity is exp(loss).
    """

    def loss_fn(logits_BxTxV: jax.Array, batch: Batch):
        targets_BxT = batch[target_key]
        logits_BxTxV = logits_BxTxV.astype(jnp.float32)
        loss_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
        weights_BxT = batch.get(weight_key, jnp.ones_like(loss_BxT))
        weights_BxT = weights_BxT.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(weights_BxT), 1.0)
        correct_BxT = jnp.argmax(logits_BxTxV, -1) == targets_BxT
        accuracy = jnp.sum(correct_BxT * weights_BxT) / count
        return jnp.sum(loss_BxT * weights_BxT) / count, {"accuracy": accuracy}

    return loss_fn
