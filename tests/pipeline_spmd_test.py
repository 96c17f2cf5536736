"""SPMD executor: a tiny Transformer's stacked stages match the single-program step."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

import ilbp
from ilbp.models import TransformerConfig, transformer_lm
from ilbp.pipeline import make_executor
from ilbp.pipeline.homogeneous import PROLOGUE
from tests import toy_models
from tests.tree_asserts import assert_trees_close

STRATEGIES = ("e2e", "global", "local", "pairwise", "3wise", "pairwise:sum")
K = 4
STEPS = 5
OPT = optax.sgd(0.1, momentum=0.9)
CONFIG = TransformerConfig(vocab_size=32, max_len=8, num_layers=4, d_model=16, num_heads=2)
MODEL = transformer_lm(CONFIG, K)


def lm_batch(seed: int, size: int = 8) -> dict[str, jax.Array]:
    tokens = jax.random.randint(jax.random.key(seed), (size, CONFIG.max_len + 1), 0, 32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


BATCHES = [lm_batch(t) for t in range(STEPS)]


@functools.cache
def initial_state() -> ilbp.TrainState:
    return ilbp.init_train_state(MODEL, OPT, jax.random.key(0), BATCHES[0])


@pytest.fixture(scope="module")
def initial() -> ilbp.TrainState:
    return initial_state()


def stacked(batches):
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


@functools.cache
def spmd_run(spec: str, microbatches: int, data: int):
    """(executor, final state, last step's metrics) of STEPS SPMD steps in one overlapped
    `steps` call; cached so that the multi-process test (which calls `step` STEPS times)
    compares against this run without compiling it again."""
    mesh = ilbp.make_mesh(stage=K, data=data)
    ex = make_executor("spmd", MODEL, spec, OPT, microbatches=microbatches, mesh=mesh)
    st = ex.from_train_state(initial_state())
    st, metrics = ex.steps(st, stacked(BATCHES))
    assert all(v.shape[0] == STEPS for v in metrics.values())
    return ex, st, jax.tree.map(lambda v: v[-1], metrics)


def _assert_placed(ex, st) -> None:
    """Stacked leaves split over `stage` (replicated over `data`); step/rng replicated."""
    for tree in (st.params, st.opt_state):
        for leaf in jax.tree.leaves(tree):
            assert leaf.shape[0] == K
            assert leaf.sharding.is_equivalent_to(ex.stacked, leaf.ndim)
    for leaf in (st.step, st.rng):
        assert leaf.sharding.is_fully_replicated
    # Padding (stage 0's embedding slot on stages k > 0) is NaN and stayed NaN.
    for leaf in jax.tree.leaves(st.params[PROLOGUE]):
        assert np.all(np.isnan(np.asarray(leaf)[1:])) and np.all(np.isfinite(np.asarray(leaf)[0]))


def run_both(spec: str, microbatches: int, initial, data: int = 1):
    ref = make_executor("simulated", MODEL, spec, OPT, microbatches=microbatches)
    rs = initial
    for batch in BATCHES:
        rs, ref_metrics = ref.step(rs, batch)
    return (*spmd_run(spec, microbatches, data), rs, ref_metrics)


def assert_same(ts: ilbp.TrainState, rs: ilbp.TrainState) -> None:
    for field in ("params", "opt_state"):
        assert_trees_close(getattr(ts, field), getattr(rs, field), 1e-5, 1e-7, field)
    assert int(ts.step) == int(rs.step) == STEPS


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("spec", STRATEGIES)
def test_matches_single_program(spec, microbatches, initial):
    # One case composes with data parallelism: stage=4 × data=2, the batch split over
    # `data` inside the program that is manual over `stage` only.
    data = 2 if (spec, microbatches) == ("pairwise:sum", 2) else 1
    ex, st, metrics, rs, ref_metrics = run_both(spec, microbatches, initial, data)
    assert ex.mesh.shape["data"] == data
    _assert_placed(ex, st)
    assert sorted(metrics) == sorted(ref_metrics)
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
    assert_same(ex.to_train_state(st), rs)


def test_steps_overlap_as_the_strategy_allows():
    # Ticks of T steps: (T - 1) P + the drained step, P = M + 2 i*_max.
    M, T = 2, STEPS
    expect = {"local": (M, M + K - 1), "pairwise": (M + 2, M + K), "global": (M + 2 * (K - 1),) * 2}
    for spec, (period, drain) in expect.items():
        ex = make_executor("spmd", MODEL, spec, OPT, microbatches=M)
        assert (ex.period, ex.ticks(1), ex.ticks(T)) == (period, drain, (T - 1) * period + drain)


def test_step_and_steps_continue_each_other(initial):
    # Two single steps, then the other three in one overlapped call: the same run.
    ex = make_executor("spmd", MODEL, "pairwise", OPT)
    st = ex.from_train_state(initial)
    for batch in BATCHES[:2]:
        st, metrics = ex.step(st, batch)
    assert all(np.ndim(v) == 0 for v in metrics.values())
    st, _ = ex.steps(st, stacked(BATCHES[2:]))
    reference = run_both("pairwise", 1, initial)[3]
    assert_same(ex.to_train_state(st), reference)


def test_microbatches_of_padded_text_give_the_full_batch_steps(initial):
    """Microbatches (and data shards) count by tokens: M = 4 on stage=4 × data=2 runs the
    single program's full-batch steps."""
    padded = [toy_models.padded_text_batch(lengths, seed=t) for t, lengths in enumerate(LENGTHS)]
    ref = make_executor("simulated", MODEL, "pairwise", OPT)
    rs = initial
    for batch in padded:
        rs, ref_metrics = ref.step(rs, batch)
    mesh = ilbp.make_mesh(stage=K, data=2)
    ex = make_executor("spmd", MODEL, "pairwise", OPT, microbatches=4, mesh=mesh)
    st, metrics = ex.steps(ex.from_train_state(initial), stacked(padded))
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name][-1], ref_metrics[name], 1e-5, err_msg=name)
    for field in ("params", "opt_state"):
        assert_trees_close(getattr(ex.to_train_state(st), field), getattr(rs, field), 1e-5, 1e-7)


LENGTHS = [(8, 8, 1, 0, 3, 8, 2, 5), (0, 1, 2, 3, 8, 8, 8, 8)]


def test_bad_input():
    with pytest.raises(ValueError, match="`stage` of size K=4"):
        make_executor("spmd", MODEL, "pairwise", OPT, mesh=ilbp.make_mesh(stage=2, data=1))
    with pytest.raises(ValueError, match="K=16 stages but only 8 devices"):
        make_executor("spmd", transformer_lm(CONFIG.__class__(32, 8, 16, 16, 2), 16), "local", OPT)
    with pytest.raises(ValueError, match="homogeneous stages"):
        from tests.pipeline_mpmd_test import MODEL as HETEROGENEOUS

        make_executor("spmd", HETEROGENEOUS, "pairwise", OPT)
    ex = make_executor("spmd", MODEL, "pairwise", OPT, microbatches=3)
    with pytest.raises(ValueError, match="multiple of 6"):  # data=2 × M=3
        ex.init(jax.random.key(0), BATCHES[0])
    with pytest.raises(ValueError, match="stacked T × B"):
        ex.steps(None, {"inputs": np.zeros(8), "targets": np.zeros(8)})
