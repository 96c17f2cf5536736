"""Config -> strategy, optimizer, data, model and executor.

Executors (train-state holders with `init`, `step`, `to_train_state`,
`from_train_state`) come from `ilbp.pipeline.make_executor` when it exists; the
"simulated" executor falls back to `ilbp.init_train_state` + `ilbp.make_train_step`.
Executors are cached by the config fields that change the compiled program, so several
runs in one process (seeds in `experiments.compare`, tests) share one compilation.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import ilbp
from ilbp import data
from ilbp.models import ResNetConfig, TransformerConfig, resnet, transformer_lm
from ilbp.models.resnet_stages import BALANCES
from ilbp.models.transformer import LM_HEADS
from ilbp.pipeline import make_executor
from ilbp.stage import StagedModel

EXECUTORS: tuple[str, ...] = ("simulated", "mpmd", "spmd")
MODEL_KINDS: tuple[str, ...] = ("resnet", "transformer")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def build_strategy(config: ml_collections.ConfigDict) -> ilbp.Strategy:
    """The config's strategy (`strategy`, `combine`, `aux_weight`); ValueError if bad."""
    base = ilbp.Strategy.parse(f"{config.strategy}:{config.combine}")
    K = int(config.num_stages)
    weights = None if float(config.aux_weight) == 1.0 else (float(config.aux_weight),) * (K - 1)
    return dataclasses.replace(base, aux_weights=weights)


def validate(config: ml_collections.ConfigDict) -> None:
    """Cheap checks of a config, before any data or compilation. Raises ValueError."""
    build_strategy(config)
    if config.executor not in EXECUTORS:
        raise ValueError(f"Unknown executor {config.executor!r}; choose one of {EXECUTORS}.")
    if config.model.kind not in MODEL_KINDS:
        raise ValueError(f"Unknown model kind {config.model.kind!r}; choose one of {MODEL_KINDS}.")
    if config.model.kind == "resnet" and config.model.balance not in BALANCES:
        raise ValueError(
            f"Unknown model.balance {config.model.balance!r}; choose one of {BALANCES}."
        )
    if config.model.kind == "transformer":
        m = config.model
        if m.get("aux_head", LM_HEADS[0]) not in LM_HEADS:
            raise ValueError(f"Unknown model.aux_head {m.aux_head!r}; choose one of {LM_HEADS}.")
        if m.get("dtype", DTYPES[0]) not in DTYPES:
            raise ValueError(f"Unknown model.dtype {m.dtype!r}; choose one of {DTYPES}.")
    if config.optimizer.name not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {config.optimizer.name!r}; choose one of {OPTIMIZERS}."
        )
    for name in (
        "num_stages",
        "microbatches",
        "batch_size",
        "num_train_steps",
        "data_parallel",
        "steps_per_call",
    ):
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be ≥ 1; got {config[name]}.")
    if int(config.max_in_flight) < 0 or (config.max_in_flight and config.executor != "mpmd"):
        raise ValueError(
            f"config.max_in_flight={config.max_in_flight}: 0 (what the window needs) or a "
            "positive cap on the microbatches a stage holds, for executor=mpmd only."
        )
    per_call = int(config.steps_per_call)
    if per_call > 1 and config.executor != "spmd":
        raise ValueError(
            f"config.steps_per_call={per_call} needs executor=spmd, whose steps() overlaps "
            "steps in one program; mpmd overlaps steps by itself and simulated has no "
            "pipeline. Set steps_per_call=1."
        )
    for name in ("eval_every_steps", "checkpoint_every_steps"):
        if int(config[name]) % per_call:
            raise ValueError(
                f"config.{name}={config[name]} is not a multiple of steps_per_call={per_call}; "
                "evaluations and checkpoints happen between calls."
            )
    data.parse_dataset(config.dataset)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup then cosine decay to 0 at num_train_steps (or constant)."""
    opt = config.optimizer
    lr, warmup, total = float(opt.learning_rate), int(opt.warmup_steps), int(config.num_train_steps)
    if opt.schedule == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.linear_schedule(0.0, lr, warmup)
    if opt.schedule != "cosine":
        raise ValueError(f"Unknown schedule {opt.schedule!r}; choose 'cosine' or 'constant'.")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD+momentum or AdamW with the config's schedule; weight decay on kernels only."""
    opt = config.optimizer
    schedule = learning_rate_schedule(config)
    kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    parts = []
    if opt.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    if opt.name == "sgd":
        if opt.weight_decay:
            parts.append(optax.add_decayed_weights(float(opt.weight_decay), mask=kernels))
        parts.append(optax.sgd(schedule, float(opt.momentum) or None, bool(opt.nesterov)))
    elif opt.name == "adam":
        parts.append(
            optax.adamw(
                schedule,
                float(opt.b1),
                float(opt.b2),
                weight_decay=float(opt.weight_decay),
                mask=kernels,
            )
        )
    else:
        raise ValueError(f"Unknown optimizer {opt.name!r}; choose one of {OPTIMIZERS}.")
    return optax.chain(*parts)


def build_data(config: ml_collections.ConfigDict, split: str) -> Any:
    """A random-access source of `split`; raises ilbp.data.DataMissingError if absent."""
    return data.make_split(
        config.dataset,
        split,
        seq_len=int(config.seq_len),
        image_size=config.image_size,
        data_dir=config.data_dir,
    )


def train_augment(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> str | None:
    """The augmentation of training batches ("default": the dataset's usual one)."""
    if config.augment == "default":
        return info.default_augment
    return None if config.augment in ("none", "", None) else config.augment


def model_fields(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> dict[str, Any]:
    """The architecture as plain JSON: the model config plus what the data fixes."""
    fields = dict(config.model.to_dict())
    if info.kind == "image":
        fields.update(num_classes=info.num_classes, input_shape=list(info.example_shape))
    else:
        fields.update(vocab_size=info.vocab_size, max_len=int(info.example_shape[0]))
    return fields


def build_model(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> StagedModel:
    """The staged ResNet or Transformer LM the config describes, sized by the data."""
    m, K = config.model, int(config.num_stages)
    if m.kind == "resnet":
        if info.kind != "image":
            raise ValueError(f"A ResNet needs image data; {config.dataset!r} is {info.kind}.")
        trunk = ResNetConfig.from_layout(
            m.layout, block=m.block, stem=m.stem, shortcut=m.shortcut, norm=m.norm
        )
        return resnet(
            trunk,
            K,
            aux_head=m.aux_head,
            num_classes=info.num_classes,
            input_shape=tuple(info.example_shape),
            balance=m.balance,
            strategy=build_strategy(config),
        )
    if info.kind != "text":
        raise ValueError(f"A Transformer LM needs text data; {config.dataset!r} is {info.kind}.")
    lm = TransformerConfig(
        vocab_size=info.vocab_size,
        max_len=int(info.example_shape[0]),
        num_layers=int(m.num_layers),
        d_model=int(m.d_model),
        num_heads=int(m.num_heads),
        d_ff=int(m.d_ff) or None,
        positions=m.positions,
        dtype=jnp.dtype(m.get("dtype", "float32")),
    )
    return transformer_lm(lm, K, aux_head=m.get("aux_head", LM_HEADS[0]))


def build_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
    """The (stage, data) mesh for `config.data_parallel` > 1, else None.

    The pipelined executors put stage k on row k, so their mesh has K rows; the
    single-program executor replicates every stage over a one-row mesh.
    """
    data_parallel = int(config.data_parallel)
    if data_parallel <= 1:
        return None
    stages = 1 if config.executor == "simulated" else int(config.num_stages)
    return ilbp.make_mesh(data=data_parallel, stage=stages)


@dataclasses.dataclass
class Built:
    """Everything compiled for one program: model, executor and eval step."""

    model: StagedModel
    model_key: str  # the architecture and K, as JSON
    strategy: ilbp.Strategy
    executor: Any
    eval_step: Callable


_CACHE: dict[str, Built] = {}
# Initial TrainStates on the host, by (model, optimizer, seed, batch shapes): the init
# program is jitted afresh on every call, and it does not depend on the strategy.
_INIT_CACHE: dict[str, Any] = {}
_PROGRAM_FIELDS = (
    "strategy",
    "combine",
    "num_stages",
    "aux_weight",
    "executor",
    "microbatches",
    "max_in_flight",
    "data_parallel",
    "num_train_steps",
)


def program_key(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> str:
    """The config fields that change the compiled train/eval programs."""
    fields = {k: config[k] for k in _PROGRAM_FIELDS}
    fields.update(model=model_fields(config, info), optimizer=config.optimizer.to_dict())
    return json.dumps(fields, sort_keys=True)


def initial_state(built: Built, config: ml_collections.ConfigDict, batch: dict) -> Any:
    """`executor.init(PRNGKey(seed), batch)`, reusing a host copy from an earlier run of
    the same model, optimizer and seed (bitwise the same state)."""
    shapes = {k: (v.shape, str(v.dtype)) for k, v in batch.items()}
    fields = [built.model_key, config.optimizer.to_dict(), int(config.num_train_steps)]
    fields += [int(config.seed), repr(sorted(shapes.items())), int(config.data_parallel)]
    key = json.dumps(fields, sort_keys=True)
    ex = built.executor
    if key not in _INIT_CACHE:
        state = ex.init(jax.random.PRNGKey(int(config.seed)), batch)
        _INIT_CACHE[key] = jax.device_get(ex.to_train_state(state))
        return state
    return ex.from_train_state(jax.device_put(_INIT_CACHE[key]))


def build(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> Built:
    """Model, executor and eval step for `config` (cached per `program_key`)."""
    key = program_key(config, info)
    if key not in _CACHE:
        model = build_model(config, info)
        strategy = build_strategy(config)
        mesh = build_mesh(config)
        executor = make_executor(
            config.executor,
            model,
            strategy,
            build_optimizer(config),
            microbatches=int(config.microbatches),
            mesh=mesh,
            max_in_flight=int(config.max_in_flight) or "window",
        )
        # The stages' names say where the cuts are (balance="work" moves them per strategy).
        cuts = [stage.name for stage in model.stages]
        model_key = json.dumps([model_fields(config, info), cuts], sort_keys=True)
        eval_step = ilbp.make_eval_step(model, mesh=mesh)
        _CACHE[key] = Built(model, model_key, strategy, executor, eval_step)
    return _CACHE[key]
