"""MPMD executor: same parameters as the single-program step, state placed per stage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ilbp
from ilbp.pipeline import make_executor
from ilbp.pipeline.mpmd import issue_order
from ilbp.schedule import OpKind
from tests import toy_models as tm
from tests.tree_asserts import assert_trees_close

STRATEGIES = ("e2e", "global", "local", "pairwise", "3wise", "pairwise:sum")
K = 4
STEPS = 5
OPT = optax.sgd(0.1, momentum=0.9)


def _model(K: int = K) -> ilbp.StagedModel:
    """Conv + BatchNorm, dense + dropout, dense, dense logits: cheap to compile."""
    stages = [ilbp.from_linen(tm.ConvStage(3), "conv")]
    stages += [ilbp.from_linen(tm.DenseStage(6, 0.1), f"dense{k}") for k in range(1, K - 1)]
    stages.append(ilbp.from_linen(tm.DenseStage(tm.CLASSES), "logits"))
    heads = [ilbp.from_linen(tm.Head(tm.CLASSES), f"head{k}") for k in range(K - 1)]
    return ilbp.StagedModel(stages, heads, ilbp.classification_loss())


MODEL = _model()
BATCHES = [tm.batch(8, seed=t) for t in range(STEPS)]


@pytest.fixture(scope="module")
def initial() -> ilbp.TrainState:
    return ilbp.init_train_state(MODEL, OPT, jax.random.key(0), BATCHES[0])


def _assert_placed(ex, st) -> None:
    """Every leaf of stage k is replicated over exactly stage k's device group."""
    for field in ("step", "params", "state", "opt_state", "rng"):
        for k, tree in enumerate(getattr(st, field)):
            group = set(ex.meshes[k].devices.flat)
            for leaf in jax.tree.leaves(tree):
                assert leaf.sharding.device_set == group, (field, k)
                assert leaf.sharding.is_fully_replicated, (field, k)


def _assert_same(a: ilbp.TrainState, b: ilbp.TrainState) -> None:
    for field in ("params", "state", "opt_state"):
        assert_trees_close(getattr(a, field), getattr(b, field), 1e-5, 1e-7, field)
    assert int(a.step) == int(b.step) == STEPS


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("spec", STRATEGIES)
def test_matches_single_program(spec, microbatches, initial):
    # One case runs on device groups: stage k on row k of a (stage=4, data=2) mesh, its
    # microbatches split over `data` (a separate case would cost another compilation).
    data = 2 if (spec, microbatches) == ("pairwise:sum", 2) else 1
    mesh = ilbp.make_mesh(stage=K, data=2) if data == 2 else None
    ref = make_executor("simulated", MODEL, spec, OPT, microbatches=microbatches)
    ex = make_executor("mpmd", MODEL, spec, OPT, microbatches=microbatches, mesh=mesh)
    assert [len(m.devices.flat) for m in ex.meshes] == [data] * K
    rs, st = initial, ex.from_train_state(initial)
    for batch in BATCHES:
        rs, ref_metrics = ref.step(rs, batch)
        st, metrics = ex.step(st, batch)
    _assert_placed(ex, st)
    assert sorted(metrics) == sorted(ref_metrics)
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
    _assert_same(ex.to_train_state(st), rs)


@pytest.mark.parametrize("max_in_flight", [None, 3])
def test_in_flight_cap_changes_the_order_not_the_result(max_in_flight, initial):
    M = 4
    ex = make_executor("mpmd", MODEL, "pairwise", OPT, microbatches=M, max_in_flight=max_in_flight)
    assert ex.order != issue_order(ilbp.Strategy.pairwise(), K, M)
    ref = make_executor("simulated", MODEL, "pairwise", OPT, microbatches=M)
    rs, st = initial, ex.from_train_state(initial)
    for batch in BATCHES:
        rs, _ = ref.step(rs, batch)
        st, _ = ex.step(st, batch)
    _assert_same(ex.to_train_state(st), rs)


def test_issue_order_is_topological_and_eager():
    """Pairwise: stage k's cotangent for stage k - 1 (V) is issued before its own
    parameter VJP (W), which waits for stage k + 1."""
    order = issue_order(ilbp.Strategy.pairwise(), K, 2)
    kinds = [(kind, k, m) for kind, k, m, _ in order]
    for m in range(2):
        for k in range(1, K - 1):
            assert kinds.index((OpKind.INPUT_VJP, k, m)) < kinds.index((OpKind.PARAM_VJP, k, m))
        for k in range(1, K):  # forwards flow right
            F = OpKind.FORWARD
            assert kinds.index((F, k - 1, m)) < kinds.index((F, k, m))


def test_e2e_issues_no_head_ops():
    order = issue_order(ilbp.Strategy.e2e(), K, 2)
    assert {kind for kind, *_ in order} == {"F", "B", "W", "U"}
    assert [o for o in issue_order(ilbp.Strategy.global_(), K, 2) if o[0] != "A"] == order


@pytest.mark.parametrize("spec", ["pairwise", "e2e"])
def test_microbatches_of_padded_text_give_the_full_batch_step(spec):
    """Microbatches count by tokens (on stage device groups of 2), as the full batch."""
    model = tm.text(3)
    batch = tm.padded_text_batch()
    sgd = optax.sgd(1.0)
    ts = ilbp.init_train_state(model, sgd, jax.random.key(0), batch)
    ref, ref_metrics = make_executor("simulated", model, spec, sgd).step(ts, batch)
    mesh = ilbp.make_mesh(stage=3, data=2)
    ex = make_executor("mpmd", model, spec, sgd, microbatches=4, mesh=mesh)
    st, metrics = ex.step(ex.from_train_state(ts), batch)
    assert sorted(metrics) == sorted(ref_metrics)
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=2e-5, err_msg=name)
    gradient = lambda new: jax.tree.map(jnp.subtract, ts.params, new.params)
    assert_trees_close(gradient(ex.to_train_state(st)), gradient(ref), 2e-5, 1e-7)


def test_bad_input():
    with pytest.raises(ValueError, match="K=9 stages but only 8 devices"):
        make_executor("mpmd", _model(9), "pairwise", OPT)
    with pytest.raises(ValueError, match="divide the 8 available devices"):
        ilbp.make_mesh(stage=3)
    with pytest.raises(ValueError, match="`stage` axis of size K=4"):
        make_executor("mpmd", MODEL, "pairwise", OPT, mesh=ilbp.make_mesh(stage=2))
    with pytest.raises(ValueError, match="one per stage"):
        make_executor("mpmd", MODEL, "pairwise", OPT, devices=jax.devices()[:3])
    with pytest.raises(ValueError, match="microbatches must be"):
        make_executor("mpmd", MODEL, "pairwise", OPT, microbatches=0)
    ex = make_executor("mpmd", MODEL, "pairwise", OPT, microbatches=3)
    with pytest.raises(ValueError, match="multiple of 3"):
        ex.init(jax.random.key(0), BATCHES[0])
    with pytest.raises(ValueError, match="Unknown executor"):
        make_executor("gpipe", MODEL, "pairwise", OPT)
    with pytest.raises(ValueError, match="max_in_flight must be"):
        make_executor("mpmd", MODEL, "pairwise", OPT, max_in_flight=0)
    with pytest.raises(ValueError, match="option of the mpmd executor"):
        make_executor("spmd", MODEL, "pairwise", OPT, max_in_flight=3)
