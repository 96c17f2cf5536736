"""ilbp: interlocking backpropagation in JAX/Flax."""

from ilbp.losses import classification_loss, next_token_loss
from ilbp.stage import Stage, StagedModel, from_linen, from_nnx
from ilbp.strategy import Plan, StagePlan, Strategy

__all__ = [
    "Plan",
    "Stage",
    "StagePlan",
    "StagedModel",
    "Strategy",
    "classification_loss",
    "from_linen",
    "from_nnx",
    "next_token_loss",
]
