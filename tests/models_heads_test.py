"""The aux-head grammar: parsing, errors, shapes and parameter counts."""

import jax
import jax.numpy as jnp
import pytest

from ilbp import models
from ilbp.models.heads import HeadToken


def _count(spec, shape, num_classes=10, norm="batch"):
    head = models.ConvHead(spec, num_classes, norm)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(head.init, jax.random.key(0), x)
    out = jax.eval_shape(head.apply, variables, x)
    return sum(v.size for v in jax.tree.leaves(variables["params"])), out.shape


def test_parse():
    assert models.parse_head("conv128_bn_conv64_bn_gbpl_fc") == (
        HeadToken("conv", 128),
        HeadToken("bn"),
        HeadToken("conv", 64),
        HeadToken("bn"),
        HeadToken("gbpl"),
        HeadToken("fc"),
    )
    assert models.parse_head("gbpl_fc32_relu_fc")[1] == HeadToken("fc", 32)


def test_authors_head_params_and_shape():
    count, shape = _count("conv128_bn_conv64_bn_gbpl_fc", (2, 8, 8, 16))
    # convs without bias (each followed by bn), norm scale+bias, dense with bias.
    assert count == 9 * 16 * 128 + 2 * 128 + 9 * 128 * 64 + 2 * 64 + 64 * 10 + 10
    assert shape == (2, 10)
    assert _count("conv128_bn_conv64_bn_gbpl_fc", (2, 8, 8, 16), norm="group")[0] == count


def test_cheap_heads():
    assert _count("gbpl_fc", (2, 8, 8, 16)) == (16 * 10 + 10, (2, 10))
    assert _count("fc", (2, 4, 4, 3)) == (48 * 10 + 10, (2, 10))  # Flattens.
    assert _count("conv8_relu_gbpl_fc20_fc", (3, 4, 4, 3), 7) == (
        9 * 3 * 8 + 8 + 8 * 20 + 20 + 20 * 7 + 7,
        (3, 7),
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("conv128_bn_pool_fc", "Unknown aux-head token 'pool'.*valid tokens are convC, bn"),
        ("conv_bn_gbpl_fc", "Unknown aux-head token 'conv'"),
        ("fc0", "Unknown aux-head token 'fc0'"),
        ("", "Unknown aux-head token ''"),
        ("gbpl", "must end with 'fc'"),
        ("fc_fc", "more than one 'fc'"),
        ("gbpl_conv8_fc", "'conv' needs a BxHxWxC input"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        models.parse_head(spec)
