"""Experiment configs: every file loads, the `:arg` grammar, and its errors (no training)."""

from __future__ import annotations

import importlib

import pytest

from experiments.configs import common
from experiments.lib import builders
from ilbp import data

CONFIGS = (
    "fashion_mnist_resnet",
    "cifar10_resnet",
    "cifar100_resnet",
    "imagenet_resnet50",
    "stdlib_lm",
    "lm1b_transformer",
)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_validates_and_documents_its_command(name):
    module = importlib.import_module(f"experiments.configs.{name}")
    c = module.get_config()
    builders.validate(c)
    assert c.name == name and c.executor == "simulated" and c.microbatches == 1
    assert f"--config=experiments/configs/{name}.py" in module.__doc__
    assert "Expected result" in module.__doc__
    variant = module.get_config("nwise=3,k=2,combine=sum")
    assert (variant.strategy, variant.num_stages, variant.combine) == ("nwise=3", 2, "sum")
    assert builders.build_strategy(variant).name == "3wise:sum"


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("pairwise,k=4", {"strategy": "pairwise", "num_stages": 4}),
        ("nwise=3,k=8,combine=sum", {"strategy": "nwise=3", "num_stages": 8, "combine": "sum"}),
        ("global", {"strategy": "global"}),
        ("e2e,k=4", {"strategy": "e2e", "num_stages": 4}),
        ("3wise, k=2", {"strategy": "3wise", "num_stages": 2}),
        ("local,executor=mpmd,m=4", {"strategy": "local", "executor": "mpmd", "microbatches": 4}),
        ("", {}),
        (None, {}),
    ],
)
def test_parse_arg(arg, expected):
    assert common.parse_arg(arg) == expected


@pytest.mark.parametrize(
    "arg, match",
    [
        ("fourwise", "Unknown strategy"),
        ("pairwise,k=0", "k must be an integer"),
        ("pairwise,k=two", "k must be an integer"),
        ("combine=max", "combine must be one of"),
        ("executor=gpu", "executor must be one of"),
        ("pairwise,lr=3", "Unknown config arg 'lr=3'"),
    ],
)
def test_bad_arg_is_a_clear_error(arg, match):
    with pytest.raises(ValueError, match=match):
        common.parse_arg(arg)


@pytest.mark.parametrize(
    "arg, overrides, match",
    [
        ("", {"strategy": "twowise"}, "Unknown strategy"),
        ("", {"executor": "tpu"}, "Unknown executor"),
        ("", {"batch_size": 0}, "batch_size must be ≥ 1"),
        ("", {"dataset": "Not A Dataset!"}, "Unknown dataset spec"),
        ("", {"optimizer.name": "lion"}, "Unknown optimizer"),
        ("", {"model.balance": "time"}, r"Unknown model\.balance"),
        ("executor=mpmd", {"steps_per_call": 2}, "needs executor=spmd"),
        ("executor=spmd", {"steps_per_call": 2, "checkpoint_every_steps": 5}, "not a multiple"),
        ("executor=spmd", {"max_in_flight": 3}, "for executor=mpmd only"),
    ],
)
def test_validate_catches_bad_overrides(arg, overrides, match):
    from experiments.configs import fashion_mnist_resnet

    c = fashion_mnist_resnet.get_config(arg)
    for field, value in overrides.items():
        *parents, name = field.split(".")
        node = c
        for parent in parents:
            node = node[parent]
        node[name] = value
    with pytest.raises(ValueError, match=match):
        builders.validate(c)


def test_work_balance_cuts_per_strategy():
    from experiments.configs import fashion_mnist_resnet

    info = data.DatasetInfo(kind="image", num_classes=10, example_shape=(28, 28, 1))
    cuts = {}
    for spec in ("global", "pairwise"):
        c = fashion_mnist_resnet.get_config(f"{spec},k=4")
        c.model.balance = "work"
        cuts[spec] = [stage.name for stage in builders.build_model(c, info).stages]
    c = fashion_mnist_resnet.get_config("pairwise,k=4")
    flops = [stage.name for stage in builders.build_model(c, info).stages]
    assert cuts["global"] == flops != cuts["pairwise"]
