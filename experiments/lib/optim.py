"""Config -> optimizer: the learning-rate schedule, the weight-decay mask and the optax chain.

`config.optimizer.name` picks the optimizer; `OPTIMIZER_FIELDS` says which of the
`config.optimizer` fields it reads (the checkpoint fingerprint records those only).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

# The config.optimizer fields each optimizer reads; it ignores the others.
OPTIMIZER_FIELDS: dict[str, tuple[str, ...]] = {
    "sgd": ("learning_rate", "momentum", "nesterov", "weight_decay", "warmup_steps",
            "schedule", "grad_clip_norm"),
    "adam": ("learning_rate", "b1", "b2", "weight_decay", "warmup_steps", "schedule",
             "grad_clip_norm"),
}  # fmt: skip
OPTIMIZERS: tuple[str, ...] = tuple(OPTIMIZER_FIELDS)
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


def schedule_steps(config: ml_collections.ConfigDict) -> int | None:
    """The num_train_steps the learning-rate schedule depends on (None: it does not)."""
    return int(config.num_train_steps) if config.optimizer.schedule == "cosine" else None


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup then cosine decay to 0 at num_train_steps (or constant)."""
    opt = config.optimizer
    lr, warmup, total = float(opt.learning_rate), int(opt.warmup_steps), int(config.num_train_steps)
    if opt.schedule == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.linear_schedule(0.0, lr, warmup)
    if opt.schedule != "cosine":
        raise ValueError(f"Unknown schedule {opt.schedule!r}; choose 'cosine' or 'constant'.")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))


# Parameters that weight decay applies to, by leaf name: weight matrices (dense and conv
# kernels, embeddings), never biases or normalisation scales. By name, not by ndim:
# nn.scan gives every Transformer block parameter a leading layer axis and stacked SPMD
# stages add another, so a LayerNorm scale can have any rank.
DECAYED_PARAMS: tuple[str, ...] = ("kernel", "embedding")


def decay_mask(params: Any) -> Any:
    """A tree like `params` (any executor's layout) of bools: True where weight decay applies."""

    def decayed(path: tuple, _) -> bool:
        last = path[-1] if path else None
        return getattr(last, "key", getattr(last, "name", None)) in DECAYED_PARAMS

    return jax.tree_util.tree_map_with_path(decayed, params)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD+momentum or AdamW with the config's schedule; weight decay on `DECAYED_PARAMS`."""
    opt = config.optimizer
    schedule = learning_rate_schedule(config)
    parts = []
    if opt.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    if opt.name == "sgd":
        if opt.weight_decay:
            parts.append(optax.add_decayed_weights(float(opt.weight_decay), mask=decay_mask))
        parts.append(optax.sgd(schedule, float(opt.momentum) or None, bool(opt.nesterov)))
    elif opt.name == "adam":
        parts.append(
            optax.adamw(
                schedule,
                float(opt.b1),
                float(opt.b2),
                weight_decay=float(opt.weight_decay),
                mask=decay_mask,
            )
        )
    else:
        raise ValueError(f"Unknown optimizer {opt.name!r}; choose one of {OPTIMIZERS}.")
    return optax.chain(*parts)
