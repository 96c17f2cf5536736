"""Forward residuals without parameter copies: the same VJP, nothing recomputed."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ilbp
from ilbp.pipeline import residuals


class _Block(nn.Module):
    """Dense (bf16 compute on float32 parameters: the kernel is cast) + tanh + dropout."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = jnp.tanh(nn.Dense(8, dtype=jnp.bfloat16)(x))
        return nn.Dropout(0.5, deterministic=not train)(x).astype(jnp.float32)


def _layer_stack(params, state, x, rng, train):
    """Three layers by `lax.scan` over stacked float32 kernels cast to bf16 in the body
    (as a Transformer's scanned blocks do): the casts are scan outputs."""

    def layer(h, kernel):
        return jnp.tanh(h @ kernel.astype(jnp.bfloat16)).astype(jnp.float32), None

    return jax.lax.scan(layer, x, params["kernels"])[0], state


STAGES = {
    "dense": ilbp.from_linen(_Block()),
    "scan": ilbp.Stage(
        lambda rng, x: ({"kernels": jax.random.normal(rng, (3, 8, 8))}, {}), _layer_stack
    ),
}
X = jax.random.normal(jax.random.key(0), (4, 8))
RNG = jax.random.key(2)
COT = jax.random.normal(jax.random.key(3), (4, 8))


@pytest.mark.parametrize("wrt_x", [True, False])
@pytest.mark.parametrize("name", sorted(STAGES))
def test_same_vjp_without_parameter_residuals(name, wrt_x):
    stage = STAGES[name]
    params, state = stage.init(jax.random.key(1), X)
    apply = lambda p, x, s, rng: stage.apply(p, s, x, rng, True)

    def reference(params, x):
        if wrt_x:
            return jax.vjp(lambda p, x: apply(p, x, state, RNG), params, x, has_aux=True)[1]
        return jax.vjp(lambda p: apply(p, x, state, RNG), params, has_aux=True)[1]

    forward = jax.jit(lambda p, x: residuals.vjp(apply, p, x, state, RNG, wrt_x=wrt_x))
    backward = jax.jit(lambda p, res, cot: res.vjp_fn(p)(cot))
    h, res, _ = forward(params, X)
    got = backward(params, res, COT)
    full = jax.jit(reference)(params, X)
    want = jax.jit(lambda vjp_fn, cot: vjp_fn(cot))(full, COT)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    np.testing.assert_array_equal(h, apply(params, X, state, RNG)[0])

    # The bfloat16 casts of the kernels were residuals (for ∂x, or between scanned
    # layers), and so were constants (zeros); only data-dependent ones are now.
    kernels = {x.shape[-2:] for x in jax.tree.leaves(params)}
    assert not any(r.shape[-2:] in kernels for r in res.leaves)
    assert sum(r.nbytes for r in res.leaves) < sum(r.nbytes for r in jax.tree.leaves(full))
    # Recomputing the casts does not recompute the forward: XLA drops the rest of it
    # (the backward has the reference's matrix products, no more).
    dots = lambda fn, *args: jax.jit(fn).lower(*args).compile().as_text().count(" dot(")
    assert dots(lambda p, r, c: r.vjp_fn(p)(c), params, res, COT) == dots(
        lambda vjp_fn, c: vjp_fn(c), full, COT
    )
