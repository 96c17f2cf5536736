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
        x = jnp.tanh(nn.Dense(16, dtype=jnp.bfloat16)(x))
        return nn.Dropout(0.5, deterministic=not train)(x).astype(jnp.float32)


STAGE = ilbp.from_linen(_Block())
X = jax.random.normal(jax.random.key(0), (4, 8))
PARAMS, STATE = STAGE.init(jax.random.key(1), X)
RNG = jax.random.key(2)
COT = jax.random.normal(jax.random.key(3), (4, 16))


def _apply(params, x, state, rng):
    return STAGE.apply(params, state, x, rng, True)


@pytest.mark.parametrize("wrt_x", [True, False])
def test_same_vjp_without_parameter_residuals(wrt_x):
    def reference(params, x):
        if wrt_x:
            _, vjp_fn, _ = jax.vjp(lambda p, x: _apply(p, x, STATE, RNG), params, x, has_aux=True)
        else:
            _, vjp_fn, _ = jax.vjp(lambda p: _apply(p, x, STATE, RNG), params, has_aux=True)
        return vjp_fn

    forward = jax.jit(lambda p, x: residuals.vjp(_apply, p, x, STATE, RNG, wrt_x=wrt_x))
    backward = jax.jit(lambda p, res, cot: res.vjp_fn(p)(cot))
    h, res, _ = forward(PARAMS, X)
    got = backward(PARAMS, res, COT)
    full = jax.jit(reference)(PARAMS, X)
    want = jax.jit(lambda vjp_fn, cot: vjp_fn(cot))(full, COT)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    np.testing.assert_array_equal(h, _apply(PARAMS, X, STATE, RNG)[0])

    # The bfloat16 cast of the kernel was a residual (for ∂x), and constants (zeros) are;
    # only data-dependent ones are now.
    kernel = PARAMS["Dense_0"]["kernel"].shape
    assert any(r.shape == kernel for r in jax.tree.leaves(full)) == wrt_x
    assert not any(r.shape == kernel for r in res.leaves)
    assert sum(r.nbytes for r in res.leaves) < sum(r.nbytes for r in jax.tree.leaves(full))
    # Recomputing the cast does not recompute the forward (its matmul).
    flops = lambda fn, *args: jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]
    assert flops(lambda p, r, c: r.vjp_fn(p)(c), PARAMS, res, COT) <= flops(
        lambda vjp_fn, c: vjp_fn(c), full, COT
    ) + np.prod(kernel)
