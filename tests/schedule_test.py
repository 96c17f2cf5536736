"""Schedule model: docs/design.md §4's closed forms, schedule validity, memory, bad input."""

import itertools
import random

import pytest

from ilbp.schedule import (
    CostModel,
    Op,
    OpKind,
    render_table,
    simulate,
    simulate_e2e,
    stage_work,
    throughput_table,
)
from ilbp.strategy import Strategy

EPS = 1e-9


def span(path: list[Op]) -> float:
    return path[-1].end - path[0].start


# Closed forms -------------------------------------------------------------------------
@pytest.mark.parametrize("K", range(1, 9))
def test_global_period_split_and_fused(K):
    # Forward chain K·F, input-gradient chain (K-1)·F, stage 0's W 2F.
    assert simulate("global", K).period == 2 * K + 1
    # Each backward one 2F op: K·F forward + K·2F backward chain.
    assert simulate("global", K, fused_backward=True).period == 3 * K
    assert simulate("global", K).busy == pytest.approx([3 / (2 * K + 1)] * K)


@pytest.mark.parametrize("K", range(1, 9))
@pytest.mark.parametrize("M", [1, 3])
def test_local_period_is_one_stages_work(K, M):
    s = simulate("local", K, M)
    assert s.period == 3 * M  # F + W(2F), free aux head, nothing to wait for
    assert s.busy == pytest.approx([1.0] * K)
    with_aux = simulate("local", K, M, costs=CostModel(aux=0.5))
    assert with_aux.period == pytest.approx(3.5 * M if K > 1 else 3 * M)


def test_local_heterogeneous_period_is_slowest_stage():
    fwd = [1.0, 2.5, 1.5, 0.5]
    costs = CostModel.from_measured(fwd, fwd, [2 * f for f in fwd])
    s = simulate("local", 4, 2, costs=costs)
    assert s.period == pytest.approx(2 * 3 * max(fwd))
    assert s.busy[1] == pytest.approx(1.0)


@pytest.mark.parametrize("K", [2, 4, 8, 16])
def test_pairwise_period_is_5F_whatever_K(K):
    # Exactly 5F: stage k's W (2F) waits for F and V (F each) of stage k + 1 after its
    # own F; its own aux cotangent is sent back at once, so nothing else is waited for.
    s = simulate("pairwise", K)
    assert s.period == 5
    assert simulate("global", K).period / s.period == pytest.approx((2 * K + 1) / 5)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_nwise_critical_path_grows_with_n_not_K(n):
    spans, lengths = set(), set()
    for K in range(n, 17, 3):
        s = simulate(Strategy.nwise(n), K)
        path = s.critical_path()
        assert s.period == 2 * n + 1
        spans.add(span(path))
        lengths.add(len([o for o in path if o.cost > 0]))
        # The path is a chain: each op starts when its predecessor ends (or arrives).
        for a, b in itertools.pairwise(path):
            assert b.start >= a.end - EPS
            assert a in [d for d, _ in b.deps] or a.stage == b.stage
    # n forwards, n - 1 input VJPs back, stage 0's W (2F).
    assert spans == {2 * n + 1}
    assert lengths == {2 * n + 1 - 1}


def test_global_critical_path_is_the_whole_chain():
    for K in (2, 5, 8):
        path = simulate("global", K).critical_path()
        assert span(path) == 2 * K + 1
        F, V, W = OpKind.FORWARD, OpKind.INPUT_VJP, OpKind.PARAM_VJP
        assert [o.kind for o in path if o.cost > 0] == [F] * K + [V] * (K - 1) + [W]


@pytest.mark.parametrize("K", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("M", [1, 2, 4, 8])
def test_gpipe_bubble(K, M):
    # Fused backward (2F) and forward F: the classic GPipe result, exactly.
    s = simulate("global", K, M, fused_backward=True, priority="gpipe")
    assert s.period == 3 * (M + K - 1)
    assert s.bubble == pytest.approx([(K - 1) / (M + K - 1)] * K)
    assert s.in_flight == (M,) * K
    # Split backward: V chain (K-1)F back, then stage 0's M W's (2F each) after its
    # last forward's cotangent arrives: 3M + 2(K - 1).
    split = simulate("global", K, M, priority="gpipe")
    assert split.period == 3 * M + 2 * (K - 1)


@pytest.mark.parametrize("K", [2, 4, 8])
def test_reference_order_waits_for_the_whole_chain(K):
    # Waiting for the whole cotangent list chains every stage to stage K-1: pairwise
    # then runs at global's pace. Sending eagerly keeps it at 5F.
    assert simulate("pairwise", K, eager_sends=False).period == 2 * K + 1
    assert simulate("pairwise", K, eager_sends=True).period == 5


def test_period_is_steady():
    for spec, K, M in [("pairwise", 6, 4), ("3wise", 8, 3), ("global", 4, 5), ("local", 3, 2)]:
        assert simulate(spec, K, M, steps=6).period == simulate(spec, K, M, steps=10).period


# End to end (no aux heads) and its pipeline baselines ---------------------------------
@pytest.mark.parametrize("K", [1, 2, 4])
def test_e2e_has_no_aux_ops_and_ignores_head_costs(K):
    costly_heads = CostModel(aux=0.7)
    s = simulate("e2e", K, 2, costs=costly_heads)
    assert not [o for o in s.timeline if o.kind == OpKind.AUX]
    assert s.period == simulate("global", K, 2).period  # global with free heads
    assert stage_work("e2e", K, costly_heads) == (3.0,) * K
    assert stage_work("global", K, costly_heads) == (3.7,) * (K - 1) + (3.0,)


@pytest.mark.parametrize("K", [1, 2, 4, 8])
@pytest.mark.parametrize("M", [1, 2, 4, 8, 16])
def test_e2e_pipeline_schedules(K, M):
    one_f_one_b = simulate_e2e(K, M, "1f1b")
    zero_bubble = simulate_e2e(K, M, "zb")
    # 1F1B's classic period; the split backward sends V back first and lets stage 0's
    # parameter VJPs (2F each: it has no input VJP to share) trail the chain.
    assert one_f_one_b.period == 3 * (M + K - 1)
    assert zero_bubble.period == 3 * M + 2 * (K - 1)
    # Both hold 1F1B's K - k microbatches on stage k.
    expected = tuple(min(M, K - k) for k in range(K))
    assert one_f_one_b.in_flight == zero_bubble.in_flight == expected
    with pytest.raises(ValueError, match="pipeline schedule"):
        simulate_e2e(K, M, "interleaved")


# Memory --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3])
def test_interlocking_in_flight_grows_with_n_not_M_or_K(n):
    for K in (4, 8, 12):
        for M in (4, 8, 16):
            s = simulate(Strategy.nwise(n), K, M)
            assert max(s.in_flight) == n
            assert s.in_flight[-1] == 1  # the last stage finishes each microbatch at once


def test_gpipe_global_holds_M():
    for K, M in [(4, 4), (4, 16), (8, 8)]:
        assert simulate("global", K, M, priority="gpipe").in_flight == (M,) * K
        # Without a cap a greedy schedule also holds every microbatch.
        assert max(simulate("pairwise", K, M, max_in_flight=None).in_flight) == M


# Design targets (docs/design.md §4) -----------------------------------------------------
@pytest.mark.parametrize("K", [4, 8, 16])
def test_pairwise_targets(K):
    one = simulate("pairwise", K)
    assert simulate("global", K).period / one.period >= 0.9 * (2 * K + 1) / 5
    four = simulate("pairwise", K, 4)
    assert four.period == 16  # interior stages (4F per microbatch) never wait
    assert min(four.busy[1:-1]) == pytest.approx(1.0)
    # End stages do 3F per microbatch: busy 0.75 < 0.85 from less work, not waiting.
    assert four.busy[0] == pytest.approx(0.75)
    assert sum(four.busy) / K >= 0.85


@pytest.mark.parametrize("K", [2, 4, 8])
def test_stage_work(K):
    for spec in ("global", "local"):
        assert stage_work(spec, K) == (3.0,) * K
    ends = (3.0,) if K > 1 else ()
    assert stage_work("pairwise", K) == (3.0, *(4.0,) * (K - 2), *ends)
    # The cotangents a stage sends are counted once whichever way its backward runs.
    assert stage_work("pairwise", K, fused_backward=True) == stage_work("pairwise", K)
    assert stage_work("local", K, CostModel(aux=0.5))[: K - 1] == (3.5,) * (K - 1)


@pytest.mark.parametrize("K", [4, 8])
def test_work_balanced_stages_keep_every_device_busy(K):
    # Forwards inversely proportional to stage_work make every device's work equal.
    work = stage_work("pairwise", K)
    forward = [1.0 / w for w in work]
    costs = CostModel(
        forward=forward,
        input_vjp=forward,
        param_vjp=[2 * f for f in forward],
        param_vjp_shared=forward,
    )
    assert len(set(stage_work("pairwise", K, costs))) == 1
    busy = simulate("pairwise", K, 4, steps=8, costs=costs).busy
    assert min(busy) >= 0.9 and max(busy) - min(busy) < 1e-9


# Validity on random configurations ------------------------------------------------------
def _ready(op: Op) -> float:
    return max((d.end + (lat if d.stage != op.stage else 0.0) for d, lat in op.deps), default=0)


def _random_config(rng: random.Random) -> dict:
    K = rng.randint(1, 6)
    per_stage = lambda lo, hi: tuple(round(rng.uniform(lo, hi), 2) for _ in range(K))
    costs = CostModel(
        forward=per_stage(0.2, 2),
        aux=per_stage(0, 0.5) if rng.random() < 0.5 else 0.0,
        input_vjp=per_stage(0.2, 2),
        param_vjp=per_stage(0.5, 4),
        param_vjp_shared=per_stage(0, 2),
        update=rng.choice([0.0, 0.3]),
        transfer=rng.choice([0.0, 0.1, 0.7]),
    )
    window = rng.choice([1, 2, 3, 4, 1 << 20])
    combine = rng.choice(["last", "last", "sum", "mean"])
    return dict(
        strategy=Strategy(window, combine),
        num_stages=K,
        microbatches=rng.randint(1, 4),
        steps=rng.randint(1, 4),
        costs=costs,
        fused_backward=rng.random() < 0.3,
        priority=rng.choice(["sends_first", "sends_first", "gpipe"]),
        eager_sends=rng.random() < 0.8,
        max_in_flight=rng.choice(["window", None, 1, 2]),
    )


@pytest.mark.parametrize("seed", range(60))
def test_schedule_is_valid(seed):
    cfg = _random_config(random.Random(seed))
    s = simulate(**cfg)
    K, M, T = cfg["num_stages"], cfg["microbatches"], cfg["steps"]
    ops = s.timeline
    assert sum(o.kind == OpKind.UPDATE for o in ops) == K * T
    assert sum(o.kind == OpKind.FORWARD for o in ops) == K * M * T
    for o in ops:
        assert o.end == pytest.approx(o.start + o.cost)
        assert o.start >= _ready(o) - EPS, o  # never before its inputs (+ transfer)
    for k in range(K):
        mine = sorted((o for o in ops if o.stage == k), key=lambda o: (o.start, o.end))
        for a, b in itertools.pairwise(mine):
            assert b.start >= a.end - EPS, (a, b)  # one op at a time
        # Earliest start: in any idle gap [a, b) of the device, no later op was ready.
        gaps = [(0.0, mine[0].start)] + [(a.end, b.start) for a, b in itertools.pairwise(mine)]
        for i, (lo, hi) in enumerate(gaps):
            if hi - lo > EPS:
                assert all(_ready(o) >= hi - EPS for o in mine[i:]), (lo, hi)
    if T >= 3:  # with two steps the "steady state" can still be a transient
        assert 0 < max(s.busy) <= 1 + EPS
    if cfg["priority"] != "gpipe" and isinstance(cfg["max_in_flight"], int):
        assert max(s.in_flight) <= cfg["max_in_flight"]


def test_per_boundary_transfers():
    # Global waits for every boundary twice (activation right, cotangent left).
    costs = CostModel(transfer=(0.5, 0.25))
    assert simulate("global", 3, costs=costs).period == 7 + 2 * (0.5 + 0.25)
    assert simulate("local", 3, costs=costs).period == 3
    with pytest.raises(ValueError, match="transfer"):
        simulate("global", 4, costs=costs)


def test_from_measured_costs():
    c = CostModel.from_measured([1.0, 2.0], [1.0, 2.5], [3.0, 4.0], fused_vjp=[2.0, 4.0])
    W, B = OpKind.PARAM_VJP, OpKind.BACKWARD
    assert c.of(W, 0, shared=True) == 1.0 and c.of(W, 1, shared=True) == 1.5
    assert c.of(B, 1) == 4.0
    c = CostModel.from_measured([1.0], [1.0], [2.5])
    assert c.of(W, 0, shared=True) == 1.5
    with pytest.raises(ValueError):
        CostModel.from_measured([1.0, 2.0], [1.0], [2.0, 2.0])


# Bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_stages=0),
        dict(num_stages=-2),
        dict(microbatches=0),
        dict(steps=0),
        dict(priority="zigzag"),
        dict(max_in_flight=0),
        dict(max_in_flight=[1, 2]),
        dict(costs=CostModel(forward=-1.0)),
        dict(costs=CostModel(forward=(1.0, 1.0))),
    ],
)
def test_bad_input(kwargs):
    args = dict(strategy="pairwise", num_stages=3) | kwargs
    with pytest.raises(ValueError):
        simulate(**args)


def test_bad_window():
    with pytest.raises(ValueError):
        simulate(Strategy.nwise(0), 4)
    with pytest.raises(ValueError):
        simulate("nwise=0", 4)


# Table -----------------------------------------------------------------------------------
def test_throughput_table():
    rows = throughput_table(stage_counts=(4, 8), microbatch_counts=(1, 4))
    assert len(rows) == 4 * 2 * 2
    by = {(r.strategy, r.num_stages, r.microbatches): r for r in rows}
    assert by["global", 8, 1].speedup == 1.0
    assert by["pairwise", 4, 1].speedup == pytest.approx(1.8)
    assert by["pairwise", 8, 1].speedup == pytest.approx(3.4)
    text = render_table(rows)
    assert "pairwise" in text and len(text.splitlines()) == len(rows) + 2
