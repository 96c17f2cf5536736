"""Staged ResNets: equivalence with the unsplit model, parameter counts, splits, errors."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilbp import models

RNG = jax.random.key(0)


def _n_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def _unsplit_count(config, num_classes, shape) -> int:
    module = models.ResNetUnits(config, num_classes)
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    return _n_params(jax.eval_shape(module.init, RNG, x)["params"])


@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (56, 0.85), (110, 1.7)])
def test_cifar_param_counts_match_he_et_al(depth, millions):
    n = _unsplit_count(models.ResNetConfig.cifar(depth), 10, (32, 32, 3))
    assert round(n / 1e6, 2 if depth < 110 else 1) == millions


@pytest.mark.parametrize("depth, count", [(18, 11_689_512), (50, 25_557_032)])
def test_imagenet_param_counts_match_torchvision(depth, count):
    assert _unsplit_count(models.ResNetConfig.imagenet(depth), 1000, (224, 224, 3)) == count


def test_staged_params_are_the_unsplit_ones_plus_heads():
    config = models.ResNetConfig.cifar(20)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    model = models.resnet(config, 3, aux_head="gbpl_fc", balance="units")
    params, _ = jax.eval_shape(model.init, RNG, x)
    trunk = _n_params([p["stage"] for p in params])
    heads = _n_params([p["head"] for p in params[:-1]])
    assert trunk == _unsplit_count(config, 10, (32, 32, 3))
    # Units split (4, 4, 3): gbpl_fc after block_2 (16 channels) and block_6 (64).
    assert heads == (16 + 1) * 10 + (64 + 1) * 10


def _random_init(model, x, seed=0):
    """(params, state) of `model` filled with random numbers, without XLA compilation.

    Faster than `model.init` (CPU compiles of threefry sampling take ~1 s per shape),
    and gives BatchNorm non-trivial running statistics.
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(model.init, RNG, jax.ShapeDtypeStruct(x.shape, x.dtype))

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = rng.normal(0.0, 0.3, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _staged_forward(model, params, state, x, train):
    h = x
    for k, stage in enumerate(model.stages):
        h, _ = stage.apply(params[k]["stage"], state[k]["stage"], h, None, train)
    return h


# (config, input shape, splits for K = 2 and 4); tiny so that eager float64 is quick.
TINY = {
    "cifar-A-batchnorm": (models.ResNetConfig.cifar(8), (8, 8, 3)),
    "imagenet-bottleneck": (
        models.ResNetConfig.from_layout("4,1/8,1", block="bottleneck", stem="imagenet"),
        (16, 16, 3),
    ),
    "layout-groupnorm-fmnist": (
        models.ResNetConfig.from_layout("8,2/16,1", norm="group", group_norm_groups=4),
        (28, 28, 1),
    ),
}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("train", [False, True])
def test_staged_forward_equals_unsplit(name, train):
    config, shape = TINY[name]
    with jax.enable_x64(True):
        config = dataclasses.replace(config, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (2, *shape), jnp.float64)
        unsplit = models.ResNetUnits(config, 10)
        for K in (1, 2, 4):
            model = models.resnet(config, K, aux_head="conv8_bn_gbpl_fc", balance="units")
            params, state = _random_init(model, x)
            variables = models.unsplit_variables(params, state)
            if train and "batch_stats" in variables:
                expected, _ = unsplit.apply(variables, x, train=True, mutable=["batch_stats"])
            else:
                expected = unsplit.apply(variables, x, train=train)
            got = _staged_forward(model, params, state, x, train)
            assert got.shape == (2, 10) and got.dtype == jnp.float64
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_authors_layout_and_blocks_per_stage():
    config = models.ResNetConfig.from_layout("64,3/128,4/256,6/512,3")
    assert config.num_units == 18  # stem + 16 blocks + classifier
    model = models.resnet(config, blocks_per_stage="2,1,1,rest")
    assert [s.name for s in model.stages] == [
        "stem..block_0",
        "block_1..block_1",
        "block_2..block_2",
        "block_3..classifier",
    ]
    assert models.resnet_split(config, blocks_per_stage=[2, 1, 1, "rest"]) == (2, 1, 1, 14)
    shapes = model.check_shapes(jnp.zeros((2, 32, 32, 3)))
    assert [s.shape for s in shapes] == [(2, 32, 32, 64)] * 3 + [(2, 10)]


def test_fashion_mnist_shapes():
    x = jnp.zeros((2, 28, 28, 1))
    for config in (
        models.ResNetConfig.cifar(20),
        models.ResNetConfig.imagenet(18, stem="cifar"),
        models.ResNetConfig.imagenet(18),
    ):
        model = models.resnet(config, 4, balance="units", aux_head="conv128_bn_conv64_bn_gbpl_fc")
        assert model.check_shapes(x)[-1].shape == (2, 10)


@pytest.mark.parametrize("weighted", [False, True])
def test_balance_split_is_optimal(weighted):
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, K = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        if n < K:
            continue
        units, heads = rng.uniform(0, 10, n), rng.uniform(0, 3, n)
        weights = rng.uniform(0.5, 4, K) if weighted else np.ones(K)
        split = models.balance_split(units, K, heads, stage_weights=weights if weighted else None)
        assert sum(split) == n and len(split) == K and min(split) >= 1

        def worst(counts, units=units, heads=heads, K=K, weights=weights):
            ends = np.cumsum(counts)
            starts = ends - counts
            return max(
                weights[k] * units[a:b].sum() + (heads[b - 1] if k < K - 1 else 0)
                for k, (a, b) in enumerate(zip(starts, ends))
            )

        best = min(
            worst(np.diff([0, *cuts, n])) for cuts in itertools.combinations(range(1, n), K - 1)
        )
        assert worst(np.array(split)) == pytest.approx(best)


def test_balance_split_evens_out_the_other_stages():
    # Stage 0 is 5 whatever the split; the rest are split as evenly as they can be.
    assert models.balance_split([5, 1, 1, 1, 1, 1], 3) in {(1, 2, 3), (1, 3, 2)}
    assert models.balance_split([1] * 6, 3) == (2, 2, 2)
    assert models.balance_split([1] * 6, 3, head_costs=[0, 0, 0, 0, 3, 0]) == (2, 2, 2)


def test_flops_balanced_split_of_resnet20():
    config = models.ResNetConfig.cifar(20)
    units, _ = models.resnet_unit_flops(config, 10, (32, 32, 3), "gbpl_fc")
    assert len(units) == 11 and units[-1] < units[0] < units[1]
    # Basic blocks cost about the same in every group (channels x2, area /4).
    assert max(units[1:-1]) / min(units[1:-1]) < 1.6
    for K in (2, 3, 11):
        split = models.resnet_split(config, K)
        assert sum(split) == 11 and len(split) == K
    assert models.resnet_split(config, 2, aux_head="gbpl_fc") == (5, 6)
    # The authors' head costs 2.4x the whole trunk at 32x32x16 and 0.2x at 8x8x64, so
    # the cut moves to where the head is cheap (after block_6, in the 64-channel group).
    assert models.resnet_split(config, 2, aux_head="conv128_bn_conv64_bn_gbpl_fc") == (8, 3)


def test_work_balanced_split_gives_pairwise_end_stages_more_units():
    # Pairwise work per forward unit is 3, 4, 4, 3 (ilbp.schedule.stage_work): on 12
    # equal units the work-balanced cut gives the end stages 4 units, the middle ones 2.
    assert models.balance_split([1.0] * 12, 4, stage_weights=(3, 4, 4, 3)) == (4, 2, 2, 4)
    config = models.ResNetConfig.cifar(32)  # 17 units
    by_flops = models.resnet_split(config, 4)
    by_work = models.resnet_split(config, 4, balance="work", strategy="pairwise")
    assert by_work != by_flops and by_work[0] > by_flops[0]
    # Global's work is 3F on every stage: the same cut as balancing forward FLOPs
    # (heads weigh 3x in both, being fwd + bwd, so nothing moves).
    assert models.resnet_split(config, 4, balance="work", strategy="global") == by_flops
    with pytest.raises(ValueError, match="needs the strategy"):
        models.resnet_split(config, 4, balance="work")
    with pytest.raises(ValueError, match="Unknown balance"):
        models.resnet_split(config, 4, balance="time")
    with pytest.raises(ValueError, match="stage_weights needs K=2 positive"):
        models.balance_split([1.0] * 4, 2, stage_weights=(1.0, 0.0))


def test_bfloat16_compute_float32_params():
    config = models.ResNetConfig.cifar(8, dtype=jnp.bfloat16)
    model = models.resnet(config, 2, balance="units")
    x = jnp.ones((2, 8, 8, 3))
    params, state = _random_init(model, x)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    h, _ = model.stages[0].apply(params[0]["stage"], state[0]["stage"], x, None, True)
    assert h.dtype == jnp.bfloat16


def test_bad_splits_raise():
    config = models.ResNetConfig.cifar(8)  # 5 units
    with pytest.raises(ValueError, match="between 1 and the number of units"):
        models.resnet(config, 6)
    with pytest.raises(ValueError, match="adds up to 4 units, but the model has 5"):
        models.resnet(config, blocks_per_stage="2,1,1")
    with pytest.raises(ValueError, match="leaves 0 units"):
        models.resnet(config, blocks_per_stage="2,2,1,rest")
    with pytest.raises(ValueError, match="at most one 'rest'"):
        models.resnet(config, blocks_per_stage="rest,1,rest")
    with pytest.raises(ValueError, match="neither a positive integer"):
        models.resnet(config, blocks_per_stage="2,0,rest")
    with pytest.raises(ValueError, match="has 2 entries"):
        models.resnet(config, 3, blocks_per_stage="2,rest")
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.ResNetConfig.cifar(21)
    with pytest.raises(ValueError, match="Bad ResNet layout"):
        models.ResNetConfig.from_layout("64,3/128")
    with pytest.raises(ValueError, match="Unknown aux-head token 'pool'"):
        models.resnet(config, 2, aux_head="pool_fc")
    with pytest.raises(ValueError, match="NHWC"):
        models.resnet(config, 2).check_shapes(jnp.zeros((2, 32, 32)))
