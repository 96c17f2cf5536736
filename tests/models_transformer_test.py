"""Staged Transformer LM: equivalence, parameter counts, causality, stacking, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilbp import models

RNG = jax.random.key(0)
TINY = models.TransformerConfig(vocab_size=17, max_len=8, num_layers=4, d_model=16, num_heads=2)


def _random_init(model, x, seed=0):
    """Random (params, state) without compiling threefry sampling (slow on CPU)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(model.init, RNG, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), abstract)


def _forward_all(model, params, state, x):
    """Logits of every aux head and of the last stage, in stage order."""
    outputs, h = [], x
    for k, stage in enumerate(model.stages):
        h, _ = stage.apply(params[k]["stage"], state[k]["stage"], h, None, False)
        if k < len(model.heads):
            logits, _ = model.heads[k].apply(params[k]["head"], state[k]["head"], h, None, False)
            outputs.append(logits)
    return [*outputs, h]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"positions": "rotary", "d_ff": 24, "num_heads": 4}],
    ids=["learned", "rotary-ff24-4heads"],
)
def test_staged_forward_equals_unsplit(overrides):
    with jax.enable_x64(True):
        config = dataclasses.replace(TINY, dtype=jnp.float64, param_dtype=jnp.float64, **overrides)
        x = jax.random.randint(jax.random.key(1), (2, 8), 0, config.vocab_size)
        unsplit = models.TransformerLM(config)
        for K in (1, 2, 4):
            model = models.transformer_lm(config, K)
            params, state = _random_init(model, x)
            expected = unsplit.apply(models.unsplit_variables(params, state), x)
            got = _forward_all(model, params, state, x)[-1]
            assert got.shape == (2, 8, 17) and got.dtype == jnp.float64
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_tied_embeddings_use_the_embedding_transpose():
    config = dataclasses.replace(TINY, tie_embeddings=True)
    model = models.transformer_lm(config, 1)
    x = jnp.arange(8)[None] % 17
    params, _ = _random_init(model, x)
    p = params[0]["stage"]
    assert "unembed" not in p
    h = models.TransformerStage(config, config.num_layers, unembed=False).apply(
        {"params": {k: v for k, v in p.items() if k != "final_norm"}}, x
    )
    norm = jax.nn.standardize(h, axis=-1, epsilon=config.ln_epsilon)
    norm = norm * p["final_norm"]["scale"] + p["final_norm"]["bias"]
    expected = norm @ p["embed"]["tokens"]["embedding"].T
    got = model.stages[0].apply(p, {}, x, None, False)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, K",
    [
        ({}, 4),
        ({"positions": "rotary"}, 1),
        ({"tie_embeddings": True}, 1),
        ({"positions": "rotary", "d_ff": 40}, 2),
    ],
)
def test_param_count_matches_closed_form(overrides, K):
    config = dataclasses.replace(TINY, **overrides)
    model = models.transformer_lm(config, K)
    params, _ = jax.eval_shape(model.init, RNG, jax.ShapeDtypeStruct((1, 8), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params(K)


@pytest.mark.parametrize("aux_head", models.LM_HEADS)
def test_aux_head_designs(aux_head):
    model = models.transformer_lm(TINY, 2, aux_head=aux_head)
    x = jnp.zeros((2, 8), jnp.int32)
    params, state = _random_init(model, x)
    assert sum(x.size for x in jax.tree.leaves(params)) == TINY.num_params(2, aux_head)
    parts = {"norm_unembed": {"norm", "unembed"}, "unembed": {"unembed"}}
    assert set(params[0]["head"]) == parts.get(aux_head, {"block", "norm", "unembed"})
    # Without a LayerNorm the logits scale with h; with one they do not.
    h = jax.random.normal(RNG, (2, 8, TINY.d_model))
    logits = lambda h: model.heads[0].apply(params[0]["head"], state[0]["head"], h, None, False)[0]
    scaled = np.allclose(logits(3 * h), 3 * logits(h), rtol=1e-4, atol=1e-5)
    assert scaled == (aux_head == "unembed")


def test_unknown_aux_head_is_refused():
    with pytest.raises(ValueError, match="Unknown aux_head 'mlp'"):
        models.transformer_lm(TINY, 2, aux_head="mlp")


def test_gpt2_small_has_124m_params():
    config = models.TransformerConfig(
        vocab_size=50257, max_len=1024, num_layers=12, d_model=768, num_heads=12,
        tie_embeddings=True,
    )  # fmt: skip
    module = models.TransformerLM(config)
    variables = jax.eval_shape(module.init, RNG, jax.ShapeDtypeStruct((1, 16), jnp.int32))
    count = sum(x.size for x in jax.tree.leaves(variables))
    assert count == config.num_params() == 124_439_808


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_at_every_head(positions):
    config = dataclasses.replace(TINY, positions=positions)
    model = models.transformer_lm(config, 4)
    x = jax.random.randint(jax.random.key(1), (1, 8), 0, 17)
    params, state = _random_init(model, x)
    before = _forward_all(model, params, state, x)
    t = 5
    after = _forward_all(model, params, state, x.at[0, t].set((x[0, t] + 1) % 17))
    assert len(before) == 4
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b[:, :t], a[:, :t])
        assert np.abs(b[:, t:] - a[:, t:]).max() > 1e-4


def test_stage_blocks_stack_and_layout():
    model = models.transformer_lm(TINY, 4)
    params, _ = jax.eval_shape(model.init, RNG, jax.ShapeDtypeStruct((2, 8), jnp.int32))
    blocks = [p["stage"]["blocks"] for p in params]
    assert all(jax.tree.structure(b) == jax.tree.structure(blocks[0]) for b in blocks)
    assert all(jax.tree.map(lambda x: x.shape, b) == jax.tree.map(lambda x: x.shape, blocks[0])
               for b in blocks)  # fmt: skip
    assert blocks[0]["query"]["kernel"].shape == (1, 16, 2, 8)
    assert set(params[0]["stage"]) == {"embed", "blocks"}
    assert set(params[1]["stage"]) == {"blocks"}
    assert set(params[3]["stage"]) == {"blocks", "final_norm", "unembed"}
    assert set(params[0]["head"]) == {"norm", "unembed"}


def test_bfloat16_compute_float32_params():
    config = dataclasses.replace(TINY, dtype=jnp.bfloat16)
    model = models.transformer_lm(config, 2)
    x = jnp.zeros((2, 8), jnp.int32)
    params, state = _random_init(model, x)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    outputs = _forward_all(model, params, state, x)
    assert [o.dtype for o in outputs] == [jnp.bfloat16] * 2
    assert outputs[-1].shape == (2, 8, 17)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="exceeds the model's max_len=8"):
        models.transformer_lm(TINY, 2).check_shapes(jnp.zeros((2, 9), jnp.int32))
    with pytest.raises(ValueError, match="exceeds the model's max_len=8"):
        models.transformer_lm(TINY, 1).init(RNG, jnp.zeros((2, 9), jnp.int32))
    with pytest.raises(ValueError, match="integer tokens"):
        models.transformer_lm(TINY, 2).check_shapes(jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="between 1 and the number of Transformer blocks"):
        models.transformer_lm(TINY, 5)
    with pytest.raises(ValueError, match="not divisible by num_stages=3"):
        models.transformer_lm(TINY, 3)
    with pytest.raises(ValueError, match="tie_embeddings=True needs num_stages=1"):
        models.transformer_lm(dataclasses.replace(TINY, tie_embeddings=True), 2)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        dataclasses.replace(TINY, num_heads=3)
