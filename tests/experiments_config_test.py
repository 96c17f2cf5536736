"""Experiment configs: every file loads, the `:arg` grammar, and its errors (no training)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from experiments.configs import common, validation
from experiments.lib import models, optim
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
    validation.validate(c)
    assert c.name == name and c.executor == "simulated" and c.microbatches == 1
    assert f"--config=experiments/configs/{name}.py" in module.__doc__
    # What it should give: measured (its result directory) or expected (typed).
    assert "docs/results/" in module.__doc__ or "Expected result" in module.__doc__
    variant = module.get_config("nwise=3,k=2,combine=sum")
    assert (variant.strategy, variant.num_stages, variant.combine) == ("nwise=3", 2, "sum")
    assert models.build_strategy(variant).name == "3wise:sum"
    assert models.build_strategy(module.get_config("pairwise:sum")).name == "pairwise:sum"


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("pairwise,k=4", {"strategy": "pairwise", "num_stages": 4}),
        ("nwise=3,k=8,combine=sum", {"strategy": "nwise=3", "num_stages": 8, "combine": "sum"}),
        ("global", {"strategy": "global"}),
        ("e2e,k=4", {"strategy": "e2e", "num_stages": 4}),
        ("3wise, k=2", {"strategy": "3wise", "num_stages": 2}),
        ("local,executor=mpmd,m=4", {"strategy": "local", "executor": "mpmd", "microbatches": 4}),
        ("pairwise:sum,k=4", {"strategy": "pairwise", "combine": "sum", "num_stages": 4}),
        ("nwise=3:mean", {"strategy": "nwise=3", "combine": "mean"}),
        ("3wise:sum,combine=sum", {"strategy": "3wise", "combine": "sum"}),
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
        ("pairwise:sum,combine=mean", "two combine rules, 'sum' and 'mean'"),
        ("pairwise:max", "Unknown combine rule 'max'"),
    ],
)
def test_bad_arg_is_a_clear_error(arg, match):
    with pytest.raises(ValueError, match=match):
        common.parse_arg(arg)


BAD_OVERRIDES = [
    # (config arg, overrides, the error's words); fashion_mnist_resnet unless "lm:" prefixed.
    ("", {"strategy": "twowise"}, "Unknown strategy"),
    ("", {"strategy": "pairwise:sum"}, "carries a combine rule.*--config.combine=sum"),
    ("", {"executor": "tpu"}, r"Unknown config\.executor"),
    ("", {"batch_size": 0}, "batch_size must be ≥ 1"),
    ("", {"dataset": "Not A Dataset!"}, "Unknown dataset spec"),
    ("", {"optimizer.name": "lion"}, r"Unknown config\.optimizer\.name"),
    ("", {"optimizer.schedule": "linear"}, r"Unknown config\.optimizer\.schedule"),
    ("", {"model.balance": "time"}, r"Unknown config\.model\.balance"),
    ("executor=mpmd", {"steps_per_call": 3}, "eval_every_steps=50 is not a multiple"),
    ("executor=spmd", {"steps_per_call": 2, "checkpoint_every_steps": 5}, "not a multiple"),
    ("executor=spmd", {"max_in_flight": 3}, "for executor=mpmd only"),
    # Counts and cadences.
    ("", {"log_every_steps": 0}, r"config\.log_every_steps must be ≥ 1"),
    ("", {"checkpoint_every_steps": 0}, r"config\.checkpoint_every_steps must be ≥ 1"),
    ("", {"eval_batch_size": 0}, r"config\.eval_batch_size must be ≥ 1"),
    ("", {"max_to_keep": 0}, r"config\.max_to_keep must be ≥ 1"),
    ("lm:", {"seq_len": 0}, r"config\.seq_len must be ≥ 1"),
    ("", {"eval_every_steps": -1}, r"config\.eval_every_steps must be ≥ 0"),
    ("", {"eval_examples": -5}, r"config\.eval_examples must be ≥ 0"),
    ("", {"max_in_flight": -1}, r"config\.max_in_flight must be ≥ 0"),
    ("", {"aux_weight": -0.5}, r"config\.aux_weight must be finite and ≥ 0"),
    ("", {"image_size": 0}, r"config\.image_size must be ≥ 1"),
    # Indivisible sizes.
    ("m=4", {"batch_size": 6}, r"batch_size=6 must be divisible by .* 1 × 4 = 4"),
    (
        "",
        {"data_parallel": 3, "batch_size": 96, "eval_batch_size": 500},
        r"eval_batch_size=500 .* data_parallel=3",
    ),
    # The mesh against the job's devices (the 8 of tests/conftest.py).
    ("executor=mpmd", {"data_parallel": 4}, r"4 stage row\(s\) × config.data_parallel=4 needs 16"),
    ("", {"data_parallel": 16, "eval_batch_size": 32}, "needs 16 devices; the job has 8 devices"),
    # Optimizer values.
    ("", {"optimizer.learning_rate": 0.0}, r"optimizer\.learning_rate must be > 0"),
    ("", {"optimizer.momentum": 1.5}, r"optimizer\.momentum must be in \[0, 1\)"),
    ("lm:", {"optimizer.b2": 1.0}, r"optimizer\.b2 must be in \[0, 1\)"),
    ("", {"optimizer.weight_decay": -1e-4}, r"optimizer\.weight_decay must be ≥ 0"),
    ("lm:", {"optimizer.grad_clip_norm": -1.0}, r"optimizer\.grad_clip_norm must be ≥ 0"),
    # The model against K, without building it.
    ("k=9", {"model.layout": "4,1/8,1"}, r"config\.model \(K=9\): num_stages=9 .* 4"),
    ("", {"model.layout": "16x2"}, r"config\.model .*Bad ResNet layout"),
    ("", {"model.aux_head": "fc_conv"}, r"config\.model"),
    ("lm:k=3", {}, r"config\.model \(K=3\): num_layers=4 is not divisible"),
    ("lm:", {"model.num_heads": 3}, r"config\.model .*not divisible by num_heads=3"),
    # Data options the dataset does not use.
    ("", {"augment": "rotate"}, "Unknown augmentation 'rotate'"),
    ("lm:", {"augment": "crop_flip"}, r"config\.augment='crop_flip' augments images"),
    ("", {"image_size": 32}, r"config\.image_size=32 resizes TFDS images only.*IDX"),
    ("lm:", {"image_size": 32}, r"config\.image_size=32 .* is text"),
    ("lm:", {"dataset": "idx"}, r"config\.model\.kind='transformer' needs text data"),
    ("", {"dataset": "stdlib"}, r"config\.model\.kind='resnet' needs image data"),
]


def config_with(arg: str, overrides: dict):
    from experiments.configs import fashion_mnist_resnet, stdlib_lm

    module = stdlib_lm if arg.startswith("lm:") else fashion_mnist_resnet
    c = module.get_config(arg.removeprefix("lm:"))
    for field, value in overrides.items():
        *parents, name = field.split(".")
        node = c
        for parent in parents:
            node = node[parent]
        node[name] = value
    return c


@pytest.mark.parametrize("arg, overrides, match", BAD_OVERRIDES)
def test_validate_catches_bad_overrides(arg, overrides, match):
    c = config_with(arg, overrides)
    with pytest.raises(ValueError, match=match):
        validation.validate(c)


def test_work_balance_cuts_per_strategy():
    from experiments.configs import fashion_mnist_resnet

    info = data.DatasetInfo(kind="image", num_classes=10, example_shape=(28, 28, 1))
    cuts = {}
    for spec in ("global", "pairwise"):
        c = fashion_mnist_resnet.get_config(f"{spec},k=4")
        c.model.balance = "work"
        cuts[spec] = [stage.name for stage in models.build_model(c, info).stages]
    c = fashion_mnist_resnet.get_config("pairwise,k=4")
    flops = [stage.name for stage in models.build_model(c, info).stages]
    assert cuts["global"] == flops != cuts["pairwise"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_spares_biases_and_norm_scales(optimizer):
    """On a Transformer (nn.scan gives every block parameter a leading layer axis) and on
    the same tree with a leading stage axis (the spmd layout): only kernels and
    embeddings decay."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.configs import stdlib_lm
    from ilbp.models import TransformerConfig, transformer_lm

    c = stdlib_lm.get_config()
    c.optimizer.update(
        name=optimizer, learning_rate=1.0, momentum=0.0, weight_decay=0.1,
        schedule="constant", warmup_steps=0, grad_clip_norm=0.0,
    )  # fmt: skip
    lm = TransformerConfig(vocab_size=32, max_len=8, num_layers=4, d_model=16, num_heads=2)
    tokens = jnp.zeros((2, 8), jnp.int32)
    shapes, _ = jax.eval_shape(transformer_lm(lm, 2).init, jax.random.key(0), tokens)
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    opt = optim.build_optimizer(c)

    @jax.jit
    def decay(params):  # the update of a zero gradient: weight decay alone
        zeros = jax.tree.map(jnp.zeros_like, params)
        return opt.update(zeros, opt.init(params), params)[0]

    for tree in (params, jax.tree.map(lambda p: p[None], params)):
        leaves = jax.tree_util.tree_leaves_with_path(decay(tree))
        names = {path[-1].key for path, _ in leaves}
        assert names == {"kernel", "embedding", "bias", "scale"}
        for path, update in leaves:
            decayed = bool(np.any(np.asarray(update) != 0))
            assert decayed == (path[-1].key in ("kernel", "embedding")), jax.tree_util.keystr(path)
    stacked_scales = [p for path, p in jax.tree_util.tree_leaves_with_path(params)
                      if path[-1].key == "scale" and p.ndim > 1]  # fmt: skip
    assert stacked_scales  # what `ndim > 1` took for kernels


FASHION = "experiments/configs/fashion_mnist_resnet.py"


MISSING = "error: --config=no_such_config.py: cannot load the config file: [Errno 2] No such"
BAD_ARG = (
    f"error: flag --config={FASHION}:pairwise:sum,combine=mean: Config arg "
    "'pairwise:sum,combine=mean' gives two combine rules, 'sum' and 'mean'; keep one."
)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.batch_sise=3"], "no field batch_sise; did you mean --config.batch_size or"),
        (["--config.optimizer.learning_rat=1"], "did you mean --config.optimizer.learning_rate?"),
        (["--config.optimizer.lr=1"], "no field optimizer.lr; config.optimizer has: b1, b2,"),
        (["--config.foo.bar=1"], "no field foo; the config has: augment, aux_weight,"),
        (["--config.seed.x=1"], "has config.seed = 0, which has no fields."),
        ([f"--config={FASHION}:pairwise:sum,combine=mean"], BAD_ARG),
        (["--config=no_such_config.py"], MISSING),
        (["--config.model.layout=4,1"], None),
    ],
)
def test_command_line_errors_are_one_line(args, expected, monkeypatch):
    """An unknown --config.FIELD is named with the closest fields; a bad config arg or
    file is one line; all without a traceback."""
    from absl import flags
    from ml_collections import config_flags

    from experiments.lib import cli

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    argv = ["prog", *([] if args[0].startswith("--config=") else [f"--config={FASHION}"]), *args]
    monkeypatch.setattr(sys, "argv", argv)  # where ml_collections reads overrides
    if expected is None:
        cli.parse_flags(argv, fv)
        assert fv.config.model.layout == "4,1"
        return
    with pytest.raises(SystemExit) as e:
        cli.parse_flags(argv, fv)
    message = str(e.value)
    if args[0].startswith("--config."):
        prefix = f"error: {args[0].partition('=')[0]}: {FASHION} has "
        assert message.startswith(prefix) and expected in message
    else:
        assert message.startswith(expected) and "Traceback" not in message


def test_both_entry_points_report_command_line_errors():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
    cases = {
        ("train", f"--config={FASHION}", "--config.optimizer.learning_rat=0.1"): (
            f"error: --config.optimizer.learning_rat: {FASHION} has no field "
            "optimizer.learning_rat; did you mean --config.optimizer.learning_rate?"
        ),
        ("compare", f"--config={FASHION}:pairwise:sum,combine=mean"): BAD_ARG,
    }
    runs = {
        case: subprocess.Popen(
            [sys.executable, "-m", f"experiments.{case[0]}", *case[1:], "--workdir=unused"],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case in cases
    }
    for case, run in runs.items():
        _, err = run.communicate(timeout=300)
        assert run.returncode == 1, (case, err[-2000:])
        assert err.strip().splitlines()[0] == cases[case], case
    assert not os.path.exists(os.path.join(repo, "unused"))


@pytest.mark.parametrize("field, value", [("aux_head", "mlp"), ("dtype", "float16")])
def test_validate_catches_bad_lm_model_options(field, value):
    from experiments.configs import stdlib_lm

    c = stdlib_lm.get_config("pairwise,k=4")
    c.model[field] = value
    with pytest.raises(ValueError, match=rf"Unknown config\.model\.{field} '{value}'"):
        validation.validate(c)


def test_lm_model_options_reach_the_model():
    import jax

    from experiments.configs import stdlib_lm

    info = data.DatasetInfo(kind="text", vocab_size=17, example_shape=(8,))
    c = stdlib_lm.get_config("pairwise,k=4")
    c.model.update(aux_head="unembed", dtype="bfloat16")
    model = models.build_model(c, info)
    x = jax.ShapeDtypeStruct((2, 8), jax.numpy.int32)
    params, _ = jax.eval_shape(model.init, jax.random.key(0), x)
    assert set(params[0]["head"]) == {"unembed"}
    assert {str(h.dtype) for h in model.check_shapes(x)} == {"bfloat16"}


def test_named_variants_apply_before_the_other_tokens():
    from experiments.configs import fashion_mnist_resnet, stdlib_lm

    c = fashion_mnist_resnet.get_config("long,k=8,pairwise")
    assert (c.num_train_steps, c.num_stages, c.strategy) == (4690, 8, "pairwise")
    assert "e2e" in c.compare.strategies and c.compare.seeds == "0,1,2"
    c = stdlib_lm.get_config("long_deep")
    assert (c.model.num_layers, c.num_stages, c.num_train_steps) == (8, 8, 1000)
    assert "pairwise:sum" in stdlib_lm.get_config("long").compare.strategies
    c = stdlib_lm.get_config("long_block_heads")
    assert (c.model.aux_head, c.num_train_steps, c.compare.seeds) == (
        "block_norm_unembed",
        1000,
        "0,1",
    )
    with pytest.raises(ValueError, match="This config's variants: long, long_deep, long_block"):
        stdlib_lm.get_config("lung")


@pytest.mark.parametrize("executor", ["simulated", "mpmd", "spmd"])
def test_default_steps_per_call_fits_every_config_and_variant(executor):
    """steps_per_call=0 (the default) is valid with every config and its variants: spmd
    gets the largest T ≤ 10 dividing the eval and checkpoint intervals (7 for the
    469-step intervals of fashion_mnist's long run), the others one step per call."""
    from experiments.configs import fashion_mnist_resnet, stdlib_lm

    for name in CONFIGS:
        validation.validate(importlib.import_module(f"experiments.configs.{name}").get_config())
    expected = {"simulated": (1, 1), "mpmd": (1, 1), "spmd": (7, 10)}[executor]
    for module, variant, per_call in zip(
        (fashion_mnist_resnet, stdlib_lm), ("long", "long_deep"), expected, strict=True
    ):
        c = module.get_config(f"{variant},executor={executor}")
        assert c.steps_per_call == 0
        validation.validate(c)
        assert validation.steps_per_call(c) == per_call
    c.steps_per_call = 5
    assert validation.steps_per_call(c) == 5
    c.eval_every_steps, c.checkpoint_every_steps, c.steps_per_call = 0, 12, 0  # eval off
    assert validation.steps_per_call(c) == (6 if executor == "spmd" else 1)
