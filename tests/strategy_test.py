"""Strategy parsing, validation and plans; the e2e (no aux heads) strategy."""

import pytest

import ilbp
from ilbp.strategy import COMBINE_RULES, GLOBAL_WINDOW


def test_e2e_plans_the_global_terms_without_aux_heads():
    for K in range(1, 6):
        e2e, global_ = ilbp.Strategy.e2e().plan(K), ilbp.Strategy.global_().plan(K)
        assert e2e.stages == global_.stages
        assert (e2e.aux_heads, global_.aux_heads) == (False, True)
        assert e2e != global_
    assert ilbp.Strategy(window=4, aux_heads=False).plan(4) == ilbp.Strategy.e2e().plan(4)


def test_e2e_parses_and_names_itself():
    e2e = ilbp.Strategy.parse("e2e")
    assert e2e == ilbp.Strategy.e2e() == ilbp.Strategy(GLOBAL_WINDOW, aux_heads=False)
    assert ilbp.Strategy.parse(" E2E:last") == e2e
    assert e2e.name == "e2e" and ilbp.Strategy.parse(e2e.name) == e2e
    assert e2e != ilbp.Strategy.global_() and ilbp.Strategy.global_().name == "global"
    with pytest.raises(ValueError, match="no combine rule"):
        ilbp.Strategy.parse("e2e:sum")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=2), "global window"),
        (dict(window=GLOBAL_WINDOW, combine="sum"), "combine='last'"),
        (dict(window=GLOBAL_WINDOW, aux_weights=(0.5, 0.5, 0.5)), "drop aux_weights"),
    ],
)
def test_headless_strategies_that_are_not_e2e_are_refused(kwargs, match):
    strategy = ilbp.Strategy(aux_heads=False, **kwargs)
    with pytest.raises(ValueError, match=match):
        strategy.check(4)
    with pytest.raises(ValueError, match=match):
        strategy.plan(4)


def test_headless_window_only_needs_to_reach_K():
    ilbp.Strategy(window=3, aux_heads=False).check(3)
    with pytest.raises(ValueError, match="n ≥ K=4"):
        ilbp.Strategy(window=3, aux_heads=False).check(4)
    with pytest.raises(ValueError, match="True or False"):
        ilbp.Strategy(window=1, aux_heads=0)


def test_window_below_one_is_refused():
    with pytest.raises(ValueError, match="window n must be an integer ≥ 1"):
        ilbp.Strategy(0)


def test_unknown_combine_rule_is_refused():
    with pytest.raises(ValueError, match="Unknown combine rule 'max'"):
        ilbp.Strategy(2, "max")
    with pytest.raises(ValueError, match="Unknown strategy"):
        ilbp.Strategy.parse("twowise")


def test_plans_for_windows_at_least_K_are_global():
    for K in range(1, 7):
        for rule in COMBINE_RULES:
            assert ilbp.Strategy(K, rule).plan(K) == ilbp.Strategy(K + 3, rule).plan(K)
        assert ilbp.Strategy(K).plan(K) == ilbp.Strategy.global_().plan(K)


def test_routed_sends_only_what_earlier_stages_use():
    K = 6
    assert all(p.sends == () for p in ilbp.Strategy.local().plan(K).stages)
    assert [p.sends for p in ilbp.Strategy.global_().plan(K)][1:] == [(K - 1,)] * (K - 1)
    pairwise = ilbp.Strategy.pairwise().plan(K)
    assert [len(p.input_vjps) for p in pairwise][1:-1] == [1] * (K - 2)
    three = ilbp.Strategy.nwise(3).plan(K)
    assert max(len(p.sends) for p in three) == 2
