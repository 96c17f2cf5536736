"""MPMD executor: same parameters as the single-program step, state placed per stage."""

from __future__ import annotations

import collections
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ilbp
from ilbp.pipeline import make_executor
from ilbp.pipeline import mpmd_ops as ops
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
    # atol: float32 rounding of momenta that cancel to ~1e-3 among entries ~0.1.
    for field in ("params", "state", "opt_state"):
        assert_trees_close(getattr(a, field), getattr(b, field), 1e-5, 1e-6, field)
    assert int(a.step) == int(b.step) == STEPS


def run_both(model, strategy, microbatches, initial, mesh=None):
    """STEPS steps of the single-program and mpmd executors from `initial`, their
    metrics compared at every step; returns (mpmd executor, its state, reference state)."""
    ref = make_executor("simulated", model, strategy, OPT, microbatches=microbatches)
    ex = make_executor("mpmd", model, strategy, OPT, microbatches=microbatches, mesh=mesh)
    rs, st = initial, ex.from_train_state(initial)
    for t, batch in enumerate(BATCHES):
        rs, ref_metrics = ref.step(rs, batch)
        st, metrics = ex.step(st, batch)
        assert sorted(metrics) == sorted(ref_metrics)
        for name in ref_metrics:
            np.testing.assert_allclose(
                metrics[name], ref_metrics[name], rtol=1e-5, err_msg=f"step {t}: {name}"
            )
    return ex, st, rs


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("spec", STRATEGIES)
def test_matches_single_program(spec, microbatches, initial):
    # One case runs on device groups: stage k on row k of a (stage=4, data=2) mesh, its
    # microbatches split over `data` (a separate case would cost another compilation).
    data = 2 if (spec, microbatches) == ("pairwise:sum", 2) else 1
    mesh = ilbp.make_mesh(stage=K, data=2) if data == 2 else None
    ex, st, rs = run_both(MODEL, spec, microbatches, initial, mesh)
    assert [len(m.devices.flat) for m in ex.meshes] == [data] * K
    _assert_placed(ex, st)
    _assert_same(ex.to_train_state(st), rs)


# Two programs cover the rest: the sum of three losses with aux weights (0.5, 2, 1) on
# both a stage's own and its received losses; the mean rule at K = 6 with n = 3
# (3 ≤ n ≤ K - 2: inner stages receive two cotangents and send two).
MORE = [
    (K, ilbp.Strategy.nwise(3, "sum", aux_weights=(0.5, 2.0, 1.0)), 2),
    (6, ilbp.Strategy.nwise(3, "mean"), 1),
]


@pytest.mark.parametrize(
    "num_stages, strategy, microbatches",
    MORE,
    ids=["3wise:sum-aux_weights-K4", "3wise:mean-K6"],
)
def test_more_strategies_match_single_program(num_stages, strategy, microbatches, initial):
    model = MODEL if num_stages == K else _model(num_stages)
    if num_stages != K:
        initial = ilbp.init_train_state(model, OPT, jax.random.key(0), BATCHES[0])
    ex, st, rs = run_both(model, strategy, microbatches, initial)
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


# Compilation: each per-stage op traces once per stage and shape ----------------------------
FACTORIES = ("forward_op", "last_forward_op", "head_op", "backward_op", "update_op")


def test_each_stage_op_compiles_once_per_stage_and_shape(monkeypatch):
    """Three steps of M = 2 microbatches trace each op of each stage once: nothing the
    executor passes (step, microbatch index, rngs, the gradient sums, zeros at
    microbatch 0) retraces."""
    K3, M = 3, 2
    real_jit = jax.jit
    # Fresh ops for these executors only: the factories' caches bypassed.
    for name in FACTORIES:
        monkeypatch.setattr(ops, name, getattr(ops, name).__wrapped__)

    def build(jit):
        with monkeypatch.context() as building:
            building.setattr(jax, "jit", jit)
            return make_executor("mpmd", _model(K3), "pairwise", optax.sgd(0.1), microbatches=M)

    # chex counts the traces of one function's code over all the ops made from it (every
    # stage's F, say), so each kind may trace once per op; since every op runs, a total
    # of at most that means exactly once each.
    per_kind = collections.Counter()
    build(lambda fn, **kwargs: per_kind.update([fn.__qualname__]) or real_jit(fn, **kwargs))
    assert sum(per_kind.values()) == K3 + (K3 - 1) + K3 + K3  # F, A, W/B, U per stage

    def jit_traced_at_most_once(fn, **kwargs):
        return real_jit(chex.assert_max_traces(fn, n=per_kind[fn.__qualname__]), **kwargs)

    chex.clear_trace_counter()
    ex = build(jit_traced_at_most_once)
    # V is one jitted function shared by every stage: once per stage that issues it.
    senders = {k for kind, k, _, _ in ex.order if kind == "V"}
    assert senders
    input_vjp = chex.assert_max_traces(ops.input_vjp_op.__wrapped__, n=len(senders))
    monkeypatch.setattr(ops, "input_vjp_op", real_jit(input_vjp))

    st = ex.init(jax.random.key(0), BATCHES[0])
    for batch in BATCHES[:3]:
        st, metrics = ex.step(st, batch)
    jax.block_until_ready(metrics)


# The hot path: placement, donation, residuals, no implicit transfers --------------------------
def _stage_of(ex, sharding) -> int | None:
    devices = getattr(sharding, "device_set", None)
    return next((k for k, m in enumerate(ex.meshes) if set(m.devices.flat) == devices), None)


@pytest.mark.parametrize("spec, loss_stages", [("e2e", {K - 1}), ("pairwise", set(range(K)))])
def test_stages_receive_only_the_batch_entries_they_read(spec, loss_stages, initial, monkeypatch):
    """The inputs go to stage 0 only, the labels only to the stages with a loss."""
    M = 2
    ex = make_executor("mpmd", MODEL, spec, OPT, microbatches=M)
    st = ex.from_train_state(initial)
    placed = []
    real_put = jax.device_put

    def spy(x, device=None, **kwargs):
        if isinstance(x, dict):  # a microbatch (activations and cotangents are arrays)
            placed.append((tuple(sorted(x)), _stage_of(ex, device)))
        return real_put(x, device, **kwargs)

    monkeypatch.setattr(jax, "device_put", spy)
    ex.step(st, BATCHES[0])
    reads = {k: {"label"} for k in loss_stages}
    reads[0] = reads.get(0, set()) | {"inputs"}
    expected = [(tuple(sorted(keys)), k) for k, keys in reads.items()]
    assert sorted(placed) == sorted(expected * M)


def test_step_donates_what_it_consumes(initial):
    """After a step, the old state's buffers are gone (the ops reused them), except the
    rng it returns; the TrainState it came from stays valid (even on device groups)."""
    mesh = ilbp.make_mesh(stage=K, data=2)
    ex = make_executor("mpmd", MODEL, "pairwise:sum", OPT, microbatches=2, mesh=mesh)
    st = ex.from_train_state(initial)
    new, metrics = ex.step(st, BATCHES[0])
    for field in ("step", "params", "opt_state", "state"):
        leaves = jax.tree.leaves(getattr(st, field))
        assert leaves and all(x.is_deleted() for x in leaves), field
    assert not any(x.is_deleted() for x in jax.tree.leaves(initial))
    assert not any(x.is_deleted() for x in jax.tree.leaves((new, metrics)))
    # Checkpoints fetch every stage's state to the host, not onto stage 0's device.
    ts = ex.to_train_state(new)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves((ts.params, ts.opt_state)))


def test_accumulating_ops_donate_their_sums(initial, monkeypatch):
    """W/B and A add each microbatch's gradient into the sum in place (from zeros)."""
    ex = make_executor("mpmd", MODEL, "pairwise", OPT, microbatches=2)
    sums = []

    def spying(op, position):
        def call(*args):
            sums.append(args[position])
            return op(*args)

        return call

    ex._ops[True] = [
        dataclasses.replace(o, backward=spying(o.backward, 3), head=o.head and spying(o.head, 7))
        for o in ex.stage_ops()
    ]
    ex.step(ex.from_train_state(initial), BATCHES[0])
    assert len(sums) == 2 * (K + (K - 1))  # each microbatch's W/B per stage, A per head
    assert all(x.is_deleted() for x in jax.tree.leaves(sums))


def test_forward_residuals_hold_no_parameter_copy(initial):
    """No residual a forward returns is one of its stage's parameters; the backward ops
    recompute those, and the step's result is unchanged (the equivalence tests)."""
    ex = make_executor("mpmd", MODEL, "pairwise", OPT)
    # Random parameters: no residual can equal one by chance (as BatchNorm's ones could).
    leaves, tree = jax.tree.flatten(initial.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    rand = [jax.random.normal(key, x.shape, x.dtype) for key, x in zip(keys, leaves)]
    initial = initial.replace(params=jax.tree.unflatten(tree, rand))
    st = ex.from_train_state(initial)
    seen = []
    hook = lambda kind, k, m, j, i, out: seen.append((k, out)) if kind == OpKind.FORWARD else None
    ex.step(st, BATCHES[0], trace=hook)
    for k, out in seen:
        res = out[1] if k < K - 1 else out[0]
        params = jax.tree.leaves(initial.params[k]["stage"])
        assert jax.tree.leaves(res), k
        for r in jax.tree.leaves(res):
            for p in params:
                same = r.shape == p.shape and np.array_equal(np.asarray(r), np.asarray(p))
                assert not same, (k, r.shape)


def test_step_makes_no_implicit_host_transfer(initial):
    """Nothing the step passes to an op (microbatch index, step, counts) is a host value
    that each call would transfer: only the batch is put, explicitly; nor does `steps`
    (its batches sliced on their device)."""
    ex = make_executor("mpmd", tm.text(3), "pairwise", optax.sgd(1.0), microbatches=4)
    batch = tm.padded_text_batch()
    st = ex.init(jax.random.key(0), batch)
    st, _ = ex.step(st, batch)  # compile (constants may be transferred then)
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), batch, batch)
    with jax.transfer_guard_host_to_device("disallow"):
        st, metrics = ex.step(st, batch)
        st, stacked = ex.steps(st, batches)
    assert all(v.shape[:1] == (2,) for v in jax.tree.leaves(stacked))
    jax.block_until_ready(metrics)


@pytest.mark.parametrize("kind", ["simulated", "mpmd"])
def test_steps_are_step_calls(kind, initial):
    """`steps` on stacked batches: the state and (stacked) metrics of as many `step`s."""
    ex = make_executor(kind, MODEL, "pairwise", OPT)
    one, metrics = ex.from_train_state(initial), []
    for batch in BATCHES[:2]:
        one, m = ex.step(one, batch)
        metrics.append(m)
    both, stacked = ex.steps(ex.from_train_state(initial), stacked_batches(BATCHES[:2]))
    assert sorted(stacked) == sorted(metrics[0])
    for name, values in stacked.items():
        np.testing.assert_array_equal(values, [m[name] for m in metrics], err_msg=name)
    a, b = ex.to_train_state(one), ex.to_train_state(both)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    with pytest.raises(ValueError, match="stacked T × B"):
        ex.steps(both, BATCHES[0]["label"])


def stacked_batches(batches):
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)
