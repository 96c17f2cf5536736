"""Train step: trajectories of both engines, data parallelism, determinism, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ilbp
from tests import toy_models, tree_asserts


def run(model, strategy, batches, *, engine="routed", mesh=None, microbatches=1, seed=0):
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    state = ilbp.init_train_state(model, optimizer, jax.random.key(seed), batches[0], mesh=mesh)
    step = ilbp.make_train_step(
        model, strategy, optimizer, engine=engine, mesh=mesh, microbatches=microbatches
    )
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


def batches(count, size=8, dtype=jnp.float32):
    return [toy_models.batch(size, dtype, seed=i) for i in range(count)]


@pytest.mark.parametrize("strategy", ["pairwise", "3wise:sum"])
def test_ten_step_trajectories_of_both_engines_are_equal(strategy):
    with jax.enable_x64(True):
        model = toy_models.heterogeneous(4, jnp.float64)
        data = batches(10, dtype=jnp.float64)
        spec, _ = run(model, ilbp.Strategy.parse(strategy), data, engine="spec")
        routed, _ = run(model, ilbp.Strategy.parse(strategy), data, engine="routed")
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
            (spec.params, spec.state),
            (routed.params, routed.state),
        )


def test_data_parallel_on_8_devices_matches_one_device_and_is_deterministic():
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
    model = toy_models.heterogeneous(3, dropout=0.0)
    data = batches(3, size=16)
    strategy = ilbp.Strategy.pairwise()
    single, single_metrics = run(model, strategy, data)
    mesh = ilbp.make_mesh(data=8)
    parallel, parallel_metrics = run(model, strategy, data, mesh=mesh)
    again, _ = run(model, strategy, data, mesh=mesh)
    for leaf in jax.tree.leaves(parallel.params):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        single.params,
        parallel.params,
    )
    np.testing.assert_allclose(single_metrics[-1]["loss"], parallel_metrics[-1]["loss"], 1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), parallel.params, again.params)


def test_training_lowers_the_loss_and_reports_every_metric():
    model = toy_models.heterogeneous(3)
    batch = toy_models.batch(16)
    _, metrics = run(model, ilbp.Strategy.pairwise(), [batch] * 12)
    assert float(metrics[-1]["loss"]) < float(metrics[0]["loss"])
    expected = {"loss", "accuracy", "aux/0/loss", "aux/0/accuracy", "aux/1/accuracy"}
    expected |= {
        f"{name}/{k}" for name in ("grad_norm", "update_norm", "param_norm") for k in range(3)
    }
    assert expected <= set(metrics[0])


def test_update_norm_is_the_norm_of_the_parameter_change():
    model = toy_models.heterogeneous(3)
    data = batches(1)
    optimizer = optax.adam(1e-2)
    state = ilbp.init_train_state(model, optimizer, jax.random.key(0), data[0])
    before = jax.tree.map(np.asarray, state.params)
    step = ilbp.make_train_step(model, ilbp.Strategy.pairwise(), optimizer, donate=False)
    state, metrics = step(state, data[0])
    for k in range(3):
        change = jax.tree.map(lambda a, b: a - b, state.params[k]["stage"], before[k]["stage"])
        expected = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(change)))
        np.testing.assert_allclose(metrics[f"update_norm/{k}"], expected, rtol=1e-4)


def test_microbatches_accumulate_to_the_full_batch_gradient():
    """Without BatchNorm or dropout, M microbatches of a mean loss ≡ one batch."""
    model = ilbp.StagedModel(
        [ilbp.from_linen(toy_models.DenseStage(6), "a"), ilbp.from_linen(toy_models.DenseStage(5))],
        [ilbp.from_linen(toy_models.Head(5))],
        ilbp.classification_loss(),
    )
    data = batches(2)
    full, _ = run(model, ilbp.Strategy.pairwise("sum"), data)
    micro, _ = run(model, ilbp.Strategy.pairwise("sum"), data, microbatches=4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        full.params,
        micro.params,
    )


def test_microbatches_and_data_shards_of_padded_text_give_the_full_batch_step():
    """Microbatch (and data-shard) means count by tokens: M does not change the objective."""
    model = toy_models.text(3)
    batch = toy_models.padded_text_batch()
    sgd = optax.sgd(1.0)  # the update is -gradient
    ts = ilbp.init_train_state(model, sgd, jax.random.key(0), batch)
    gradient = lambda new: jax.tree.map(jnp.subtract, ts.params, new.params)
    results = {}
    for M, data in [(1, 1), (2, 1), (4, 1), (2, 2)]:
        mesh = ilbp.make_mesh(data=data) if data > 1 else None
        step = ilbp.make_train_step(
            model, ilbp.Strategy.pairwise(), sgd, microbatches=M, mesh=mesh, donate=False
        )
        new, metrics = step(ts, batch)
        results[M, data] = gradient(new), metrics
    (want, want_metrics) = results.pop((1, 1))
    for (M, data), (got, metrics) in results.items():
        what = f"M={M} data={data}"
        tree_asserts.assert_trees_close(got, want, rtol=2e-5, atol=1e-7, what=what)
        for name in ("loss", "accuracy", "aux/0/loss", "aux/0/accuracy"):
            np.testing.assert_allclose(metrics[name], want_metrics[name], 1e-6, err_msg=what)


def test_one_optimizer_per_stage():
    model = toy_models.heterogeneous(2)
    data = batches(1)
    frozen = [optax.sgd(0.0), optax.sgd(0.1)]
    state = ilbp.init_train_state(model, frozen, jax.random.key(0), data[0])
    before = jax.tree.map(np.asarray, state.params)
    state, _ = ilbp.make_train_step(model, ilbp.Strategy.local(), frozen)(state, data[0])
    jax.tree.map(np.testing.assert_array_equal, before[0], state.params[0])
    assert not np.allclose(
        before[1]["stage"]["Dense_0"]["kernel"], state.params[1]["stage"]["Dense_0"]["kernel"]
    )


# Bad input: a clear error, raised before anything is compiled. ---------------------------


def test_wrong_number_of_aux_heads_is_refused():
    stage = ilbp.from_linen(toy_models.DenseStage(5))
    with pytest.raises(ValueError, match="needs K - 1 = 2 auxiliary heads"):
        ilbp.StagedModel(
            [stage] * 3, [ilbp.from_linen(toy_models.Head(5))], ilbp.classification_loss()
        )


def test_stage_that_does_not_fit_the_next_is_named():
    conv = ilbp.from_linen(toy_models.ConvStage(4), "conv")
    model = ilbp.StagedModel(
        [ilbp.from_linen(toy_models.DenseStage(6), "dense"), conv],
        [ilbp.from_linen(toy_models.Head(5))],
        ilbp.classification_loss(),
    )
    with pytest.raises(ValueError, match=r"stage 1 \(conv\) cannot take the output of stage 0"):
        model.check_shapes(toy_models.batch()["inputs"])


def test_head_that_does_not_fit_its_stage_is_named():
    bad_head = ilbp.Stage(
        lambda r, x: ({"w": jnp.ones((7, 5))}, {}), lambda p, s, x, r, t: (x @ p["w"], s), "bad"
    )
    model = ilbp.StagedModel(
        [ilbp.from_linen(toy_models.DenseStage(6))] * 2, [bad_head], ilbp.classification_loss()
    )
    with pytest.raises(ValueError, match=r"aux head 0 \(bad\) cannot take the output of stage 0"):
        ilbp.init_train_state(model, optax.sgd(0.1), jax.random.key(0), toy_models.batch())


def test_batch_not_divisible_by_the_data_axis_is_refused_before_compiling():
    model = toy_models.heterogeneous(2)
    mesh = ilbp.make_mesh(data=8)
    state = ilbp.init_train_state(
        model, optax.sgd(0.1), jax.random.key(0), toy_models.batch(8), mesh=mesh
    )
    step = ilbp.make_train_step(model, ilbp.Strategy.pairwise(), optax.sgd(0.1), mesh=mesh)
    with pytest.raises(ValueError, match="Batch size 12 must be divisible by the `data` mesh axis"):
        step(state, toy_models.batch(12))
    assert step.jitted._cache_size() == 0


def test_impossible_mesh_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        ilbp.make_mesh(data=16)
    with pytest.raises(ValueError, match="must be ≥ 1 and divide"):
        ilbp.make_mesh(stage=3)
