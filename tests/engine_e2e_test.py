"""e2e (no aux heads): both engines are `jax.grad` of the unsplit model, and the compiled
grads do exactly its FLOPs: no head forward or backward."""

import jax
import jax.numpy as jnp
import optax
import pytest

import ilbp
from ilbp.stage import stage_rngs
from tests import toy_models, tree_asserts

E2E = ilbp.Strategy.e2e()


def setup(K: int, dtype=jnp.float64, seed: int = 0):
    model = toy_models.heterogeneous(K, dtype)
    batch = toy_models.batch(dtype=dtype, seed=seed)
    params, state = model.init(jax.random.key(seed), batch["inputs"])
    return model, params, state, batch


def unsplit_grads(model, params, state, batch, rng):
    """`jax.grad` of the final loss of all stages composed, the model as if it had never
    been cut: ([∂θ_k], new stage states, metrics with "loss")."""

    def loss(stage_params):
        h, new_state = batch[model.input_key], []
        for k, stage in enumerate(model.stages):
            h, s = stage.apply(stage_params[k], state[k]["stage"], h, stage_rngs(rng, k)[0], True)
            new_state.append(s)
        value, metrics = model.loss(h, batch)
        return value, (new_state, metrics)

    (value, (new_state, metrics)), grads = jax.value_and_grad(loss, has_aux=True)(
        [p["stage"] for p in params]
    )
    return grads, new_state, {"loss": value, **metrics}


@pytest.mark.parametrize("engine", ["routed", "spec"])
@pytest.mark.parametrize("K", [1, 4])
def test_e2e_is_backprop_through_the_unsplit_model(K, engine):
    with jax.enable_x64(True):
        model, params, state, batch = setup(K, seed=K)
        rng = jax.random.key(3)
        want, want_state, want_metrics = unsplit_grads(model, params, state, batch, rng)
        got, new_state, metrics = ilbp.grads(model, E2E, params, state, batch, rng, engine=engine)
        assert all(set(g) == {"stage"} for g in got), "heads get no gradient at all"
        tree_asserts.assert_trees_close([g["stage"] for g in got], want, 1e-9, 1e-12)
        tree_asserts.assert_trees_close([s["stage"] for s in new_state], want_state, 1e-9, 1e-12)
        assert [s.get("head") for s in new_state] == [s.get("head") for s in state]
        assert metrics.keys() == want_metrics.keys() == {"loss", "accuracy"}
        tree_asserts.assert_trees_close(metrics, want_metrics, 1e-12, 0)


def compiled_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("engine", ["routed", "spec"])
def test_compiled_e2e_does_the_flops_of_the_unsplit_grad(engine):
    model, params, state, batch = setup(2, jnp.float32)
    rng = jax.random.key(0)
    want = compiled_flops(lambda p, s, b: unsplit_grads(model, p, s, b, rng), params, state, batch)
    flops = {
        strategy.name: compiled_flops(
            lambda p, s, b, strategy=strategy: ilbp.grads(
                model, strategy, p, s, b, rng, engine=engine
            ),
            params,
            state,
            batch,
        )
        for strategy in (E2E, ilbp.Strategy.global_())
    }
    assert flops["e2e"] == want
    assert flops["global"] > want  # the heads' work, which e2e does not do


def test_e2e_step_leaves_heads_and_their_optimizer_state_untouched():
    model, _, _, batch = setup(3, jnp.float32)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    ts = ilbp.init_train_state(model, optimizer, jax.random.key(0), batch)
    step = ilbp.make_train_step(model, E2E, optimizer, donate=False)
    new, metrics = step(step(ts, batch)[0], batch)
    assert not any(name.startswith("aux/") for name in metrics)
    for k in range(model.num_stages - 1):
        tree_asserts.assert_trees_close(new.params[k]["head"], ts.params[k]["head"], 0, 0)
        moments = [param_shaped(t, ts.params[k]) for t in (ts.opt_state[k], new.opt_state[k])]
        assert len(moments[0]) == 2  # Adam's mu and nu
        for before, after in zip(*moments):
            tree_asserts.assert_trees_close(after["head"], before["head"], 0, 0)
            assert any(jnp.any(a != b) for a, b in zip(*map(jax.tree.leaves, (after, before))))


def param_shaped(opt_state, params):
    """The subtrees of an optimizer state laid out like `params` (e.g. Adam's moments)."""
    structure = jax.tree.structure(params)
    is_params = lambda t: jax.tree.structure(t) == structure
    return [t for t in jax.tree.leaves(opt_state, is_leaf=is_params) if is_params(t)]
