"""float64 equivalences of the two engines on random heterogeneous stages (docs/design.md §1–2).

Run eagerly: every (K, n, rule) is a different program, and op-by-op execution of these
tiny models is much cheaper than compiling each one.
"""

import jax
import jax.numpy as jnp
import pytest

import ilbp
from tests import toy_models, tree_asserts

RULES = ("last", "sum", "mean")


def assert_trees_close(a, b, what=""):
    tree_asserts.assert_trees_close(a, b, rtol=1e-9, atol=1e-12, what=what)


def setup(K: int, seed: int = 0):
    model = toy_models.heterogeneous(K, jnp.float64)
    batch = toy_models.batch(dtype=jnp.float64, seed=seed)
    params, state = model.init(jax.random.key(seed), batch["inputs"])
    return model, params, state, batch


@pytest.mark.parametrize("K", [2, 3, 4, 5, 6])
def test_spec_equals_routed_for_every_window_and_rule(K):
    with jax.enable_x64(True):
        model, params, state, batch = setup(K, seed=K)
        rng = jax.random.key(1)
        for n in range(1, K + 2):
            for rule in RULES:
                strategy = ilbp.Strategy.nwise(n, rule)
                want = ilbp.spec_grads(model, strategy, params, state, batch, rng)
                got = ilbp.routed_grads(model, strategy, params, state, batch, rng)
                assert_trees_close(got, want, what=f"K={K} n={n} {rule}")


@pytest.mark.parametrize("K", [2, 4, 6])
def test_global_equals_backprop_through_the_unsplit_model(K):
    with jax.enable_x64(True):
        model, params, state, batch = setup(K)
        rng = jax.random.key(2)

        def unsplit_loss(stage_params):
            h = batch["inputs"]
            for k, stage in enumerate(model.stages):
                h, _ = stage.apply(stage_params[k], state[k]["stage"], h, rng_of(k), True)
            return model.loss(h, batch)[0]

        rng_of = lambda k: ilbp.stage.stage_rngs(rng, k)[0]
        want = jax.grad(unsplit_loss)([p["stage"] for p in params])
        for strategy in [ilbp.Strategy.global_(), ilbp.Strategy(K), ilbp.Strategy(K + 1)]:
            got, _, _ = ilbp.routed_grads(model, strategy, params, state, batch, rng)
            assert_trees_close([g["stage"] for g in got], want, what=strategy.name)


@pytest.mark.parametrize("K", [2, 5])
def test_window_one_is_local_learning(K):
    """n = 1 ≡ each stage trained by its own head, its input gradient-stopped."""
    with jax.enable_x64(True):
        model, params, state, batch = setup(K)
        rng = jax.random.key(3)
        got, _, _ = ilbp.routed_grads(model, ilbp.Strategy.local(), params, state, batch, rng)
        h = batch["inputs"]
        for k, stage in enumerate(model.stages):
            rng_stage, rng_head = ilbp.stage.stage_rngs(rng, k)

            def own_loss(p, h=h, k=k, stage=stage, rng_stage=rng_stage, rng_head=rng_head):
                out, _ = stage.apply(p["stage"], state[k]["stage"], h, rng_stage, True)
                if k < K - 1:
                    out, _ = model.heads[k].apply(p["head"], state[k]["head"], out, rng_head, True)
                return model.head_loss(k)(out, batch)[0]

            assert_trees_close(got[k], jax.grad(own_loss)(params[k]), what=f"stage {k}")
            h, _ = stage.apply(params[k]["stage"], state[k]["stage"], h, rng_stage, True)


def test_aux_weights_scale_each_loss_in_both_engines():
    """θ_k's gradient is Σ_j c_kj w_j ∂L_j/∂θ_k and φ_k's is w_k ∂L_k/∂φ_k, with aux
    weights w = (0.5, 2, 1) and w_{K-1} = 1; each ∂L_j by backprop through the stages."""
    K, weights = 4, (0.5, 2.0, 1.0)
    w = [*weights, 1.0]
    with jax.enable_x64(True):
        model, params, state, batch = setup(K, seed=3)
        rng = jax.random.key(4)

        def loss(params, j):
            h = batch["inputs"]
            for k in range(j + 1):
                rng_stage, rng_head = ilbp.stage.stage_rngs(rng, k)
                h, _ = model.stages[k].apply(
                    params[k]["stage"], state[k]["stage"], h, rng_stage, True
                )
            if j < K - 1:
                h, _ = model.heads[j].apply(params[j]["head"], state[j]["head"], h, rng_head, True)
            return model.head_loss(j)(h, batch)[0]

        per_loss = [jax.grad(loss)(params, j) for j in range(K)]  # ∂L_j, all stages
        for spec in ("pairwise", "3wise:sum", "3wise:mean"):
            base = ilbp.Strategy.parse(spec)
            strategy = ilbp.Strategy(base.window, base.combine, aux_weights=weights)
            plan = strategy.plan(K)
            for engine in (ilbp.spec_grads, ilbp.routed_grads):
                got, _, _ = engine(model, strategy, params, state, batch, rng)
                for k in range(K):
                    coeffs = [plan.coefficient(k, j) * w[j] for j in range(K)]
                    want = jax.tree.map(
                        lambda *g, c=coeffs: sum(ci * gi for ci, gi in zip(c, g)),
                        *[per_loss[j][k]["stage"] for j in range(K)],
                    )
                    assert_trees_close(got[k]["stage"], want, what=f"{spec} θ_{k}")
                    if k < K - 1:
                        head = jax.tree.map(lambda g, k=k: w[k] * g, per_loss[k][k]["head"])
                        assert_trees_close(got[k]["head"], head, what=f"{spec} φ_{k}")
