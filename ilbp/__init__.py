"""ilbp: interlocking backpropagation in JAX/Flax."""

from ilbp.engine import grads, routed_grads, spec_grads
from ilbp.losses import classification_loss, next_token_loss
from ilbp.mesh import make_mesh
from ilbp.stage import HomogeneousStages, Stage, StagedModel, from_linen, from_nnx
from ilbp.strategy import Plan, StagePlan, Strategy
from ilbp.train import (
    TrainState,
    init_train_state,
    make_eval_step,
    make_train_step,
)

__all__ = [
    "HomogeneousStages",
    "Plan",
    "Stage",
    "StagePlan",
    "StagedModel",
    "Strategy",
    "TrainState",
    "classification_loss",
    "from_linen",
    "from_nnx",
    "grads",
    "init_train_state",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "next_token_loss",
    "routed_grads",
    "spec_grads",
]
