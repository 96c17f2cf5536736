"""Measured MPMD timeline: one entry per issued op, consistent times, unchanged results."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import optax
import pytest

import ilbp
from ilbp.pipeline import make_executor
from ilbp.pipeline.trace import MeasuredOp, in_run_costs, record_timeline
from ilbp.schedule import CostModel, OpKind, simulate, steady_state
from tests import toy_models as tm

K, M, STEPS = 3, 2, 2
OPT = optax.sgd(0.1, momentum=0.9)


def _model() -> ilbp.StagedModel:
    """Three dense stages with aux heads: cheap to compile."""
    stages = [ilbp.from_linen(tm.DenseStage(8), f"dense{k}") for k in range(K - 1)]
    stages.append(ilbp.from_linen(tm.DenseStage(tm.CLASSES), "logits"))
    heads = [ilbp.from_linen(tm.Head(tm.CLASSES), f"head{k}") for k in range(K - 1)]
    return ilbp.StagedModel(stages, heads, ilbp.classification_loss())


MODEL = _model()
BATCH = tm.batch(8, seed=0)


@pytest.mark.parametrize(
    "spec, cap", [("pairwise", "window"), ("global", "window"), ("pairwise", None)]
)
def test_timeline_is_consistent_and_state_unchanged(spec, cap):
    ex = make_executor("mpmd", MODEL, spec, OPT, microbatches=M, max_in_flight=cap)
    st = ex.init(jax.random.key(0), BATCH)
    st, _ = ex.step(st, BATCH)  # compile outside the traced steps
    traced, ops = record_timeline(ex, st, BATCH, steps=STEPS)
    plain = st
    for _ in range(STEPS):
        plain, _ = ex.step(plain, BATCH)

    # One entry per issued op, in issue order.
    assert [(o.kind, o.stage, o.microbatch, o.loss) for o in ops] == ex.order * STEPS
    assert [o.step for o in ops] == [t for t in range(STEPS) for _ in ex.order]
    for o in ops:
        assert 0.0 <= o.issued <= o.start <= o.end <= o.completed, o.name
        assert o.dispatch >= 0.0, o.name
        # Every op starts after the ops it depends on end (and they come earlier).
        for d in o.deps:
            assert ops[d].end <= o.start, (ops[d].name, o.name)
    # Ops of one device never overlap.
    for k in range(K):
        on_k = [o for o in ops if o.stage == k]
        assert on_k
        for a, b in itertools.pairwise(on_k):
            assert a.end <= b.start, (a.name, b.name)
    # Cross-device inputs are in the deps: F(t, m, k) waits for F(t, m, k - 1).
    f = next(o for o in ops if o.kind == OpKind.FORWARD and o.stage == 1)
    assert any(ops[d].kind == OpKind.FORWARD and ops[d].stage == 0 for d in f.deps)

    period, busy = steady_state(ops, K)
    assert period > 0 and len(busy) == K and all(b >= 0 for b in busy)

    # Tracing changes nothing that is computed.
    a, b = ex.to_train_state(traced), ex.to_train_state(plain)
    assert int(a.step) == int(b.step)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6),
        (a.params, a.state, a.opt_state),
        (b.params, b.state, b.opt_state),
    )


def test_hook_sees_outputs_on_the_op_stage():
    ex = make_executor("mpmd", MODEL, "local", OPT)
    st = ex.init(jax.random.key(0), BATCH)
    seen = []

    def hook(kind, k, m, loss, index, outputs):
        devices = {d for x in jax.tree.leaves(outputs) for d in x.sharding.device_set}
        seen.append((index, kind, k, devices))

    ex.step(st, BATCH, trace=hook)
    assert [i for i, *_ in seen] == list(range(len(ex.order)))
    for _, _, k, devices in seen:
        assert devices == set(ex.meshes[k].devices.flat)


def test_steps_must_be_positive():
    ex = make_executor("mpmd", MODEL, "local", OPT)
    with pytest.raises(ValueError, match="steps"):
        record_timeline(ex, None, BATCH, steps=0)


@pytest.mark.parametrize("spec", ["global", "local", "pairwise", "3wise"])
def test_in_run_costs_recover_the_costs_a_timeline_ran_with(spec):
    # A model timeline, read as if measured: its op costs and its period come back.
    costs = CostModel(
        forward=(1.0, 2.0, 1.5),
        aux=(0.3, 0.2, 0.0),
        input_vjp=(0.0, 1.1, 0.9),
        param_vjp=(2.5, 3.0, 2.0),
        param_vjp_shared=(1.2, 1.4, 1.0),
        update=(0.1, 0.2, 0.1),
    )
    truth = simulate(spec, K, M, steps=4, costs=costs, fused_backward=True)
    as_measured = [
        MeasuredOp(
            o.kind, o.stage, o.step, o.microbatch, o.loss, o.start, 0.0, o.end, o.start, o.end, ()
        )
        for o in truth.timeline
    ]
    recovered = in_run_costs(as_measured, K)
    again = simulate(spec, K, M, steps=4, costs=recovered, fused_backward=True)
    assert again.period == pytest.approx(truth.period)
    assert again.busy == pytest.approx(truth.busy)
    for kind in (OpKind.FORWARD, OpKind.AUX, OpKind.UPDATE):
        assert [recovered.of(kind, k) for k in range(K)] == pytest.approx(
            [costs.of(kind, k) if kind != OpKind.AUX or k < K - 1 else 0.0 for k in range(K)]
        )
    with pytest.raises(ValueError, match="record more steps"):
        in_run_costs(as_measured, K, skip_steps=4)
