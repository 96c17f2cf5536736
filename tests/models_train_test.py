"""A few train steps with each strategy on each model family lower the loss."""

import jax
import jax.numpy as jnp
import optax
import pytest

import ilbp
from ilbp import models

STRATEGIES = ["global", "local", "pairwise", "pairwise:sum"]
STEPS = 6


def _resnet_batch(shape, n=16):
    k1, k2 = jax.random.split(jax.random.key(0, impl="rbg"))
    return {
        "inputs": jax.random.normal(k1, (n, *shape)),
        "label": jax.random.randint(k2, (n,), 0, 10),
    }


def _lm_batch(config, n=4):
    tokens = jax.random.randint(jax.random.key(0, impl="rbg"), (n, 9), 0, config.vocab_size)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


LM = models.TransformerConfig(vocab_size=23, max_len=8, num_layers=3, d_model=16, num_heads=2)
FAMILIES = {
    "cifar-resnet": lambda: (
        models.resnet(models.ResNetConfig.cifar(8), 3, balance="units"),
        _resnet_batch((8, 8, 3)),
    ),
    "imagenet-resnet-groupnorm": lambda: (
        models.resnet(
            models.ResNetConfig.from_layout("4,1/8,1", block="bottleneck", norm="group"),
            blocks_per_stage="2,rest",
            aux_head="conv8_bn_gbpl_fc",
            input_shape=(12, 12, 1),
        ),
        _resnet_batch((12, 12, 1)),
    ),
    "transformer": lambda: (models.transformer_lm(LM, 3), _lm_batch(LM)),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model, batch = FAMILIES[request.param]()
    optimizer = optax.adam(1e-2)
    # rbg keys: CPU compiles of threefry sampling cost ~1 s per parameter shape.
    state = ilbp.init_train_state(model, optimizer, jax.random.key(0, impl="rbg"), batch)
    return model, optimizer, batch, state


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_train_steps_lower_the_loss(family, strategy):
    model, optimizer, batch, state = family
    step = ilbp.make_train_step(model, ilbp.Strategy.parse(strategy), optimizer)
    state = jax.tree.map(jnp.copy, state)  # The step donates its input.
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(jnp.isfinite(jnp.array(losses)))
    assert losses[-1] < losses[0], losses
