"""docs/design.md §1.3: the authors' single-step numbers, for both engines."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ilbp
from ilbp import engine


def elementwise(name: str) -> ilbp.Stage:
    """w ⊙ x, parameters initialised by the test."""
    return ilbp.Stage(
        init=lambda rng, x: ({"w": jnp.ones(x.shape[-1:])}, {}),
        apply=lambda p, s, x, rng, train: (p["w"] * x, s),
        name=name,
    )


def aux_loss(logits, batch):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.mean(loss), {}


def fake_final_loss(logits, batch):
    return jnp.sum(0.1 * logits), {}


def make_model(K: int) -> ilbp.StagedModel:
    return ilbp.StagedModel(
        stages=[elementwise(f"w{k}") for k in range(K)],
        heads=[elementwise(f"a{k}") for k in range(K - 1)],
        loss=fake_final_loss,
        aux_loss=aux_loss,
    )


def one_step(strategy, ws, x, a=(1.0, 1.0), engine_name="routed"):
    K = len(ws)
    model = make_model(K)
    params = tuple(
        {"stage": {"w": jnp.asarray(w, jnp.float32)}}
        | ({"head": {"w": jnp.asarray(a, jnp.float32)}} if k < K - 1 else {})
        for k, w in enumerate(ws)
    )
    state = tuple({"stage": {}} | ({"head": {}} if k < K - 1 else {}) for k in range(K))
    batch = {"inputs": jnp.asarray([x], jnp.float32), "label": jnp.asarray([1])}
    grads, _, _ = engine.grads(
        model, strategy, params, state, batch, jax.random.key(0), engine=engine_name
    )
    return [np.asarray(params[k]["stage"]["w"] - grads[k]["stage"]["w"]) for k in range(K)]


CASES = [
    ("global", ilbp.Strategy.global_(), [2.0, 3.0, 4.0], [1.0, 0.0], [0.8, 2.2, 3.4]),
    (
        "local",
        ilbp.Strategy.local(),
        [[2, 2], [3, 3], [4, 4]],
        [1, 1],
        [[1.5, 2.5], [2.0, 4.0], [3.4, 3.4]],
    ),
    (
        "pairwise",
        ilbp.Strategy.pairwise(),
        [[2, 2], [3, 3], [4, 4]],
        [1, 1],
        [[0.5, 3.5], [2.2, 2.2], [3.4, 3.4]],
    ),
    (
        "3wise_K4",
        ilbp.Strategy.nwise(3),
        [[2, 2], [3, 3], [4, 4], [5, 5]],
        [1, 1],
        [[-4, 8], [-1, -1], [1, 1], [2.6, 2.6]],
    ),
    (
        "pairwise_sum",
        ilbp.Strategy.pairwise("sum"),
        [[2, 2], [3, 3], [4, 4]],
        [1, 1],
        [[0, 4], [1.2, 3.2], None],
    ),
    (
        "pairwise_mean",
        ilbp.Strategy.pairwise("mean"),
        [[2, 2], [3, 3], [4, 4]],
        [1, 1],
        [[1, 3], [2.1, 3.1], None],
    ),
]


@pytest.mark.parametrize("engine_name", ["routed", "spec"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_authors_single_step_numbers(case, engine_name):
    _, strategy, ws, x, expected = case
    if np.ndim(ws[0]) == 0:  # Scalar weights broadcast over the 2-vector input.
        ws = [[w] for w in ws]
    updated = one_step(strategy, ws, x, engine_name=engine_name)
    for k, want in enumerate(expected):
        if want is not None:
            np.testing.assert_allclose(
                updated[k], np.broadcast_to(want, updated[k].shape), atol=1e-5, err_msg=f"stage {k}"
            )
