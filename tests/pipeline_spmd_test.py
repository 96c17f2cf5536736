"""SPMD executor: a tiny Transformer's stacked stages match the single-program step."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ilbp
from ilbp.models import LMHead, TransformerConfig, TransformerStage, transformer_lm
from ilbp.models.transformer import transformer_homogeneous
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
def model_for(num_stages: int = K) -> ilbp.StagedModel:
    """MODEL, or the same blocks one per stage for another K."""
    if num_stages == K:
        return MODEL
    return transformer_lm(dataclasses.replace(CONFIG, num_layers=num_stages), num_stages)


@functools.cache
def initial_state(num_stages: int = K) -> ilbp.TrainState:
    return ilbp.init_train_state(model_for(num_stages), OPT, jax.random.key(0), BATCHES[0])


@pytest.fixture(scope="module")
def initial() -> ilbp.TrainState:
    return initial_state()


def stacked(batches):
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


@functools.cache
def spmd_run(spec, microbatches: int, data: int, num_stages: int = K):
    """(executor, final state, every step's metrics [STEPS]) of STEPS SPMD steps in one
    overlapped `steps` call; cached so that the multi-process test (which calls `step`
    STEPS times) compares against this run without compiling it again."""
    mesh = ilbp.make_mesh(stage=num_stages, data=data)
    ex = make_executor(
        "spmd", model_for(num_stages), spec, OPT, microbatches=microbatches, mesh=mesh
    )
    st = ex.from_train_state(initial_state(num_stages))
    st, metrics = ex.steps(st, stacked(BATCHES))
    assert all(v.shape[0] == STEPS for v in metrics.values())
    return ex, st, metrics


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


def run_both(spec, microbatches: int, data: int = 1, num_stages: int = K):
    """The SPMD run and STEPS single-program steps from the same state, their metrics
    compared at every step; returns (executor, SPMD state, reference state)."""
    ref = make_executor("simulated", model_for(num_stages), spec, OPT, microbatches=microbatches)
    ex, st, metrics = spmd_run(spec, microbatches, data, num_stages)
    rs = initial_state(num_stages)
    for t, batch in enumerate(BATCHES):
        rs, ref_metrics = ref.step(rs, batch)
        assert sorted(metrics) == sorted(ref_metrics)
        for name, want in ref_metrics.items():
            np.testing.assert_allclose(
                metrics[name][t], want, rtol=1e-5, err_msg=f"step {t}: {name}"
            )
    return ex, st, rs


def assert_same(ts: ilbp.TrainState, rs: ilbp.TrainState) -> None:
    for field in ("params", "opt_state"):
        assert_trees_close(getattr(ts, field), getattr(rs, field), 1e-5, 1e-7, field)
    assert int(ts.step) == int(rs.step) == STEPS


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("spec", STRATEGIES)
def test_matches_single_program(spec, microbatches):
    # One case composes with data parallelism: stage=4 × data=2, the batch split over
    # `data` inside the program that is manual over `stage` only.
    data = 2 if (spec, microbatches) == ("pairwise:sum", 2) else 1
    ex, st, rs = run_both(spec, microbatches, data)
    assert ex.mesh.shape["data"] == data
    _assert_placed(ex, st)
    assert_same(ex.to_train_state(st), rs)


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
def test_more_strategies_match_single_program(num_stages, strategy, microbatches):
    ex, st, rs = run_both(strategy, microbatches, num_stages=num_stages)
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
    reference = run_both("pairwise", 1)[2]
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


def test_one_optimizer_per_stage():
    """Each stage its own optax transformation (here its own learning rate), as the other
    executors take them; transformations whose states cannot stack are refused."""
    model, opts = model_for(2), [optax.sgd(0.1, momentum=0.9), optax.sgd(0.03, momentum=0.5)]
    ts = ilbp.init_train_state(model, opts, jax.random.key(0), BATCHES[0])
    ref = make_executor("simulated", model, "pairwise", opts)
    rs = ts
    for batch in BATCHES[:3]:
        rs, _ = ref.step(rs, batch)
    ex = make_executor("spmd", model, "pairwise", opts)
    st, _ = ex.steps(ex.from_train_state(ts), stacked(BATCHES[:3]))
    for field in ("params", "opt_state"):
        assert_trees_close(getattr(ex.to_train_state(st), field), getattr(rs, field), 1e-5, 1e-7)
    mixed = make_executor("spmd", model, "pairwise", [optax.sgd(0.1), optax.adam(0.1)])
    with pytest.raises(ValueError, match="stage 1's optimizer state differs from stage 0's"):
        mixed.init(jax.random.key(0), BATCHES[0])


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


def _described(stages, heads, config=CONFIG) -> ilbp.StagedModel:
    """A StagedModel of these stages and heads carrying the Transformer's description."""
    stages, heads = tuple(stages), tuple(heads)
    hom = transformer_homogeneous(config, stages, heads)
    return ilbp.StagedModel(stages, heads, MODEL.loss, homogeneous=hom)


def _with_dropout(stage: ilbp.Stage) -> ilbp.Stage:
    def apply(params, state, x, rng, train):
        y, state = stage.apply(params, state, x, rng, train)
        if train and rng is not None:
            y = y * jax.random.bernoulli(rng, 0.9, y.shape) / 0.9
        return y, state

    return ilbp.Stage(stage.init, apply, stage.name)


def _with_state(stage: ilbp.Stage) -> ilbp.Stage:
    def init(rng, x):
        params, _ = stage.init(rng, x)
        return params, {"batch_stats": {"count": jnp.zeros(())}}

    def apply(params, state, x, rng, train):
        y, _ = stage.apply(params, {}, x, rng, train)
        return y, jax.tree.map(lambda c: c + 1, state)

    return ilbp.Stage(init, apply, stage.name)


def test_refuses_what_it_cannot_run():
    # Each refusal names what is unsupported and the mpmd executor, before any work.
    other_heads = [ilbp.from_linen(LMHead(CONFIG), "another head") for _ in MODEL.heads]
    uneven = [
        ilbp.from_linen(TransformerStage(CONFIG, n, embed=k == 0, unembed=k == 1))
        for k, n in enumerate((1, 3))
    ]
    cases = {
        "heads are not the ones": dataclasses.replace(MODEL, heads=tuple(other_heads)),
        "stages are not the ones": dataclasses.replace(MODEL, stages=MODEL.stages[::-1]),
        "randomness in training": _described([_with_dropout(s) for s in MODEL.stages], MODEL.heads),
        "does not support model state": _described(
            MODEL.stages, [*MODEL.heads[:-1], _with_state(MODEL.heads[-1])]
        ),
        "stage 1's differ": _described(uneven, [ilbp.from_linen(LMHead(CONFIG))]),
        "differ from stage 0's": _described(  # aux heads not shaped like the output layer
            MODEL.stages, [ilbp.from_linen(nn.Dense(32), train_kwarg=None) for _ in MODEL.heads]
        ),
        "homogeneous stages": transformer_lm(CONFIG, 1),
    }
    for message, model in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            make_executor("spmd", model, "pairwise", OPT)
        assert "mpmd executor" in str(error.value), message


# The hot path: donation, data lanes only, cheap branches as `where` ---------------------------
def _ppermuted_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every array a ppermute sends, anywhere in `jaxpr` (loops, conds, ...)."""
    shapes = [v.aval.shape for e in jaxpr.eqns if e.primitive.name == "ppermute" for v in e.invars]
    for sub in jax.extend.core.subjaxprs(jaxpr):
        shapes += _ppermuted_shapes(sub)
    return shapes


def _split(ex, batches):
    M = ex.M
    return jax.tree.map(lambda x: x.reshape(x.shape[0], M, x.shape[1] // M, *x.shape[2:]), batches)


@pytest.mark.parametrize("spec, sent", [("global", 1), ("3wise", 2), ("pairwise", 1), ("local", 0)])
def test_only_lanes_that_carry_data_travel(spec, sent, initial):
    """Per tick, the activation and only the cotangents a stage sends (global: 1 of the
    K - 1 lanes of its list) go through ppermute; local sends none."""
    ex = make_executor("spmd", MODEL, spec, OPT)
    assert ex.clock.send_lanes.shape[1] == sent
    st = ex.from_train_state(initial)
    jaxpr = jax.make_jaxpr(ex._step_fn, static_argnums=2)(st, _split(ex, stacked(BATCHES)), False)
    h = (BATCHES[0]["inputs"].shape[0], CONFIG.max_len, CONFIG.d_model)
    expected = [h] + ([(sent, *h)] if sent else [])
    assert sorted(_ppermuted_shapes(jaxpr.jaxpr)) == sorted(expected)


def test_steps_donate_the_state_and_an_aux_loss_of_its_own_matches(initial):
    """`steps` reuses the state's buffers; with an aux loss unlike the final one (picked
    per stage by `where`), global still matches the single program step for step."""

    def aux_loss(logits, batch):
        loss, metrics = ilbp.next_token_loss()(logits, batch)
        return 3.0 * loss + 1.0, metrics

    model = transformer_lm(CONFIG, K, aux_loss=aux_loss)
    ts = ilbp.init_train_state(model, OPT, jax.random.key(0), BATCHES[0])
    ref = make_executor("simulated", model, "global", OPT)
    ex = make_executor("spmd", model, "global", OPT)
    st = ex.from_train_state(ts)
    new, metrics = ex.steps(st, stacked(BATCHES[:2]))
    assert all(x.is_deleted() for x in jax.tree.leaves((st.params, st.opt_state, st.step)))
    rs = ts
    for t, batch in enumerate(BATCHES[:2]):
        rs, ref_metrics = ref.step(rs, batch)
        for name, want in ref_metrics.items():
            np.testing.assert_allclose(metrics[name][t], want, rtol=1e-5, err_msg=name)
    assert_trees_close(ex.to_train_state(new).params, rs.params, 1e-5, 1e-7)
