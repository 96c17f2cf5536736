"""Per-stage op costs of a real staged model, and the throughput they predict."""

from __future__ import annotations

import jax
import optax
import pytest

import ilbp
from ilbp.costs import (
    Hardware,
    StageCosts,
    activation_memory,
    peak_flops,
    pipeline_baselines,
    predict_throughput,
    stage_costs,
    time_to_quality,
)
from ilbp.schedule import OpKind, simulate
from tests import toy_models as tm

K, B, WIDTH = 3, 8, 16
IN = 6 * 6 * 2  # tm.batch's flattened image
OPT = optax.adam(1e-3)
HW = Hardware("test", flops_per_s=1e9, link_bytes_per_s=1e6)


def _model() -> ilbp.StagedModel:
    stages = [ilbp.from_linen(tm.DenseStage(WIDTH), f"dense{k}") for k in range(K - 1)]
    stages.append(ilbp.from_linen(tm.DenseStage(tm.CLASSES), "logits"))
    heads = [ilbp.from_linen(tm.Head(tm.CLASSES), f"head{k}") for k in range(K - 1)]
    return ilbp.StagedModel(stages, heads, ilbp.classification_loss())


MODEL = _model()
BATCH = tm.batch(B, seed=0)


@pytest.fixture(scope="module")
def costs() -> StageCosts:
    return stage_costs(MODEL, OPT, BATCH)


def test_cost_analysis_counts_each_stage_op(costs):
    assert costs.unit == "flop" and costs.batch_size == B and costs.num_stages == K
    F, V, W = costs.ops[OpKind.FORWARD], costs.ops[OpKind.INPUT_VJP], costs.ops[OpKind.PARAM_VJP]
    # A dense layer's matmul is 2·B·in·out FLOPs; bias and tanh add little. The last
    # stage's forward also takes the loss and its gradient.
    for k, (fan_in, fan_out) in enumerate([(IN, WIDTH), (WIDTH, WIDTH), (WIDTH, tm.CLASSES)]):
        matmul = 2 * B * fan_in * fan_out
        assert matmul <= F[k] <= (1.5 if k < K - 1 else 2.0) * matmul, k
        assert matmul <= W[k] <= 1.5 * matmul, k  # ∂W = xᵀ·δ: one more matmul
    # Stage 0 sends nothing back; the last stage has no aux head.
    assert V[0] == costs.ops[OpKind.BACKWARD][0] == 0.0 and V[1] > 0
    assert costs.ops[OpKind.AUX][K - 1] == 0.0 and costs.ops[OpKind.AUX][0] > 0
    assert all(u > 0 for u in costs.ops[OpKind.UPDATE])
    assert all(b > 0 for b in costs.bytes_accessed[OpKind.FORWARD])
    # h_k of one example: WIDTH float32s.
    assert costs.boundary_bytes == (4.0 * WIDTH,) * (K - 1)
    # Stage 0 keeps at least its input (the dense layer's ∂W needs it), per example.
    assert costs.residual_bytes[0] >= 4.0 * IN


def test_compiled_cost_analysis_agrees_on_flops(costs):
    compiled = stage_costs(MODEL, OPT, BATCH, method="compiled")
    for kind, values in compiled.ops.items():
        assert values == pytest.approx(costs.ops[kind], rel=0.2), kind


def test_measured_costs_time_the_same_ops(costs):
    measured = stage_costs(MODEL, OPT, BATCH, method="measured", repeats=2)
    assert measured.unit == "s" and not measured.bytes_accessed
    for kind, values in measured.ops.items():
        assert [v > 0 for v in values] == [v > 0 for v in costs.ops[kind]], kind
    assert measured.residual_bytes == costs.residual_bytes
    assert measured.seconds(OpKind.FORWARD, 0, HW) == measured.ops[OpKind.FORWARD][0]


def test_cost_model_scales_with_microbatches(costs):
    one, four = costs.cost_model(1, HW), costs.cost_model(4, HW)
    for kind in (OpKind.FORWARD, OpKind.AUX, OpKind.INPUT_VJP, OpKind.PARAM_VJP):
        for k in range(K):
            assert one.of(kind, k) == pytest.approx(costs.ops[kind][k] / HW.flops_per_s)
            assert four.of(kind, k) == pytest.approx(one.of(kind, k) / 4)
    assert four.of(OpKind.UPDATE, 1) == one.of(OpKind.UPDATE, 1)  # once per step
    assert four.transfer_after(0) == pytest.approx(B / 4 * 4.0 * WIDTH / HW.link_bytes_per_s)
    with pytest.raises(ValueError, match="divide"):
        costs.cost_model(3, HW)


@pytest.mark.parametrize("M", [1, 2])
def test_cost_fed_local_period_is_the_slowest_stage(costs, M):
    # Local learning never waits on another stage: its period is the slowest stage's
    # work, F + A + W per microbatch plus the update, in the model's own seconds.
    work = [
        sum(costs.seconds(kind, k, HW) for kind in (OpKind.FORWARD, OpKind.AUX, OpKind.PARAM_VJP))
        + costs.seconds(OpKind.UPDATE, k, HW)
        for k in range(K)
    ]
    got = predict_throughput("local", costs, M, hardware=HW)
    assert got.step_time == pytest.approx(max(work))


def test_prediction_against_both_baselines(costs):
    baselines = pipeline_baselines(costs, HW)
    assert {b.microbatches for b in baselines} == {1, 2, 4, 8}  # the divisors of B ≤ 16
    assert {b.schedule for b in baselines} == {"1f1b", "zb"}
    e2e = predict_throughput("e2e", costs, 1, baselines=baselines, hardware=HW)
    assert e2e.vs_e2e == 1.0
    for spec, M in [("pairwise", 2), ("local", 1), ("global", 4)]:
        p = predict_throughput(spec, costs, M, baselines=baselines, hardware=HW)
        s = simulate(spec, K, M, costs=costs.cost_model(M, HW))
        assert p.step_time == s.period
        assert (
            p.memory
            == max(n * B / M * r for n, r in zip(s.in_flight, costs.residual_bytes))
            == activation_memory(s, costs)
        )
        assert p.vs_e2e == pytest.approx(e2e.step_time / p.step_time)
        # The best e2e pipeline within the strategy's memory, by brute force.
        fitting = [b for b in baselines if b.memory <= p.memory]
        assert p.pipeline == min(fitting, key=lambda b: (b.step_time, b.memory))
        assert p.vs_pipeline == pytest.approx(p.pipeline.step_time / p.step_time)


def test_bad_input():
    with pytest.raises(ValueError, match="method"):
        stage_costs(MODEL, OPT, BATCH, method="guess")
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), BATCH)
    with pytest.raises(ValueError, match="arrays"):
        stage_costs(MODEL, OPT, shapes, method="measured")


def test_peak_flops_table():
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("TPU v4") == 275e12
    assert peak_flops("cpu") is None


def test_time_to_quality():
    curve = [(6, 0.9), (2, 0.5), (4, 0.8)]
    assert time_to_quality(curve, 0.5, 0.8, higher_is_better=True) == 2.0
    assert time_to_quality(curve, 0.5, 0.95, higher_is_better=True) is None
    losses = [(2, 3.0), (4, 2.5), (6, 2.4)]
    assert time_to_quality(losses, 2.0, 2.5, higher_is_better=False) == 8.0
