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
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import ilbp
from ilbp import data
from ilbp.models import ResNetConfig, TransformerConfig, resnet, transformer_lm
from ilbp.models.heads import parse_head
from ilbp.models.resnet_stages import BALANCES, resnet_split
from ilbp.models.transformer import LM_HEADS
from ilbp.pipeline import EXECUTORS, make_executor
from ilbp.stage import StagedModel

MODEL_KINDS: tuple[str, ...] = ("resnet", "transformer")
# The config.optimizer fields each optimizer reads; it ignores the others.
OPTIMIZER_FIELDS: dict[str, tuple[str, ...]] = {
    "sgd": ("learning_rate", "momentum", "nesterov", "weight_decay", "warmup_steps",
            "schedule", "grad_clip_norm"),
    "adam": ("learning_rate", "b1", "b2", "weight_decay", "warmup_steps", "schedule",
             "grad_clip_norm"),
}  # fmt: skip
OPTIMIZERS: tuple[str, ...] = tuple(OPTIMIZER_FIELDS)
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def build_strategy(config: ml_collections.ConfigDict) -> ilbp.Strategy:
    """The config's strategy (`strategy`, `combine`, `aux_weight`); ValueError if bad."""
    name, colon, rule = str(config.strategy).partition(":")
    if colon:
        raise ValueError(
            f"config.strategy={config.strategy!r} carries a combine rule; set the rule in "
            f"its own field: --config.strategy={name} --config.combine={rule} (or the config "
            f"arg ':{name},combine={rule}')."
        )
    base = ilbp.Strategy.parse(f"{config.strategy}:{config.combine}")
    K = int(config.num_stages)
    weights = None if float(config.aux_weight) == 1.0 else (float(config.aux_weight),) * (K - 1)
    return dataclasses.replace(base, aux_weights=weights)


def validate(config: ml_collections.ConfigDict) -> None:
    """Cheap checks of a config, before any data is read or file written.

    Raises ValueError naming the field: unknown names, non-positive counts and cadences,
    indivisible batch sizes, optimizer values out of range, K against the model's units,
    and data options the dataset kind does not use. `check_data` checks the rest once
    the data's `DatasetInfo` is known.
    """
    build_strategy(config)
    _check_choices(config)
    _check_counts(config)
    _check_divisible(config)
    _check_optimizer(config)
    _check_model(config)
    _check_data_options(config, data.parse_dataset(config.dataset).kind)
    check_devices(config)


def _check_choices(config: ml_collections.ConfigDict) -> None:
    choices = [
        ("executor", config.executor, EXECUTORS),
        ("model.kind", config.model.kind, MODEL_KINDS),
        ("optimizer.name", config.optimizer.name, OPTIMIZERS),
        ("optimizer.schedule", config.optimizer.schedule, SCHEDULES),
    ]
    if config.model.kind == "resnet":
        choices.append(("model.balance", config.model.balance, BALANCES))
    else:
        choices.append(("model.aux_head", config.model.get("aux_head", LM_HEADS[0]), LM_HEADS))
        choices.append(("model.dtype", config.model.get("dtype", DTYPES[0]), DTYPES))
    for field, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"Unknown config.{field} {value!r}; choose one of {allowed}.")


# Counts and cadences that must be ≥ 1 (0 would divide by zero or never happen), and
# those where 0 means "off" / "all".
POSITIVE_FIELDS: tuple[str, ...] = (
    "num_stages", "microbatches", "batch_size", "num_train_steps", "data_parallel",
    "seq_len", "eval_batch_size", "log_every_steps", "checkpoint_every_steps", "max_to_keep",
)  # fmt: skip
NON_NEGATIVE_FIELDS: tuple[str, ...] = (
    "eval_every_steps", "eval_examples", "max_in_flight", "steps_per_call",
)  # fmt: skip


# What happens between executor calls: their intervals are multiples of steps_per_call.
CALL_CADENCES: tuple[str, ...] = ("eval_every_steps", "checkpoint_every_steps")
# The most steps per call steps_per_call=0 picks (spmd), and the executors it picks > 1 for.
AUTO_STEPS_PER_CALL, OVERLAPPING_EXECUTORS = 10, ("spmd",)


def _check_counts(config: ml_collections.ConfigDict) -> None:
    for name in POSITIVE_FIELDS:
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be ≥ 1; got {config[name]}.")
    for name in NON_NEGATIVE_FIELDS:
        if int(config[name]) < 0:
            raise ValueError(f"config.{name} must be ≥ 0 (0: off or all); got {config[name]}.")
    weight = float(config.aux_weight)
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"config.aux_weight must be finite and ≥ 0; got {weight}.")
    if config.max_in_flight and config.executor != "mpmd":
        raise ValueError(
            f"config.max_in_flight={config.max_in_flight}: 0 (what the window needs) or a "
            "positive cap on the microbatches a stage holds, for executor=mpmd only."
        )
    if config.image_size is not None and int(config.image_size) < 1:
        raise ValueError(f"config.image_size must be ≥ 1 or None; got {config.image_size}.")


def _check_divisible(config: ml_collections.ConfigDict) -> None:
    dp, M, B = int(config.data_parallel), int(config.microbatches), int(config.batch_size)
    if B % (dp * M):
        raise ValueError(
            f"config.batch_size={B} must be divisible by data_parallel × microbatches = "
            f"{dp} × {M} = {dp * M}: each microbatch splits evenly over the data devices."
        )
    if int(config.eval_batch_size) % dp:
        raise ValueError(
            f"config.eval_batch_size={config.eval_batch_size} must be divisible by "
            f"data_parallel={dp}: evaluation batches split evenly over the data devices."
        )
    per_call = int(config.steps_per_call)
    for name in CALL_CADENCES:
        if per_call and int(config[name]) % per_call:
            raise ValueError(
                f"config.{name}={config[name]} is not a multiple of steps_per_call={per_call}; "
                "evaluations and checkpoints happen between calls (steps_per_call=0 picks "
                "one that divides them)."
            )


def steps_per_call(config: ml_collections.ConfigDict) -> int:
    """config.steps_per_call, or for 0 (the default): for spmd, whose `steps` overlaps
    steps in one program (one step per call drains its pipeline), the largest T ≤ 10
    dividing the eval and checkpoint intervals; 1 for simulated and mpmd, whose `steps`
    are T `step` calls anyway (the trainer keeps steps in flight without stacking T
    batches per call). Either way the training math is the same."""
    per_call = int(config.steps_per_call)
    if per_call or config.executor not in OVERLAPPING_EXECUTORS:
        return per_call or 1
    intervals = [int(config[name]) for name in CALL_CADENCES if int(config[name])]
    fits = lambda t: all(interval % t == 0 for interval in intervals)
    return max(t for t in range(1, AUTO_STEPS_PER_CALL + 1) if fits(t))


def mesh_rows(config: ml_collections.ConfigDict) -> int:
    """Rows of the config's (stage, data) mesh: K for the pipelined executors (stage k
    on row k), 1 for the single-program one (every stage replicated)."""
    return 1 if config.executor == "simulated" else int(config.num_stages)


def check_devices(config: ml_collections.ConfigDict) -> None:
    """The mesh (stage rows × data_parallel) against the job's devices, over every
    process: it must fit, and a multi-process job must use every device; mpmd runs in
    one process only. ValueError saying what to set."""
    rows, dp = mesh_rows(config), int(config.data_parallel)
    count, processes = jax.device_count(), jax.process_count()
    job = f"{count} devices" + (
        f" ({processes} processes × {jax.local_device_count()})" if processes > 1 else ""
    )
    if processes > 1 and config.executor == "mpmd":
        raise ValueError(
            f"executor=mpmd drives every stage from one process; this job has {processes}. "
            "Use executor=simulated (data parallel over every device of every process) or "
            "executor=spmd (stages and data across processes), or run mpmd in one process."
        )
    if rows * dp > count:
        raise ValueError(
            f"The mesh of {rows} stage row(s) × config.data_parallel={dp} needs {rows * dp} "
            f"devices; the job has {job}. Lower data_parallel (or num_stages), or run on "
            "more devices (processes)."
        )
    if processes > 1 and rows * dp != count:
        raise ValueError(
            f"A multi-process run uses every device of the job ({job}): set "
            f"config.data_parallel={count // rows} so that {rows} stage row(s) × "
            f"data_parallel = {count}."
        )


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
    opt = config.optimizer
    ranges = {
        "learning_rate": (0.0, math.inf, "> 0"),
        "momentum": (0.0, 1.0, "in [0, 1)"),
        "b1": (0.0, 1.0, "in [0, 1)"),
        "b2": (0.0, 1.0, "in [0, 1)"),
        "weight_decay": (0.0, math.inf, "≥ 0"),
        "grad_clip_norm": (0.0, math.inf, "≥ 0 (0: off)"),
        "warmup_steps": (0.0, math.inf, "≥ 0"),
    }
    for name in OPTIMIZER_FIELDS[opt.name]:
        if name not in ranges:
            continue
        low, high, say = ranges[name]
        value = float(opt[name])
        ok = low < value < high if name == "learning_rate" else low <= value < high
        if not ok:
            raise ValueError(f"config.optimizer.{name} must be {say}; got {opt[name]}.")


def _check_model(config: ml_collections.ConfigDict) -> None:
    """The architecture's own checks and K against its units, without building it."""
    K = int(config.num_stages)
    try:
        if config.model.kind == "resnet":
            parse_head(config.model.aux_head)
            resnet_split(resnet_trunk(config), K, balance="units")  # 1 ≤ K ≤ units
        else:
            vocab = 1  # any: no check depends on it
            transformer_lm(transformer_config(config, vocab, int(config.seq_len)), K)
    except ValueError as e:
        raise ValueError(f"config.model (K={K}): {e}") from e


def _check_data_options(config: ml_collections.ConfigDict, kind: str) -> None:
    """Data options the dataset does not use; `kind` is a spec kind or "image"/"text"."""
    text = kind == "text"
    if config.augment not in ("default", "none", "", None):
        data.get_augment(config.augment)  # ValueError naming the known ones
        if text:
            raise ValueError(
                f"config.augment={config.augment!r} augments images; {config.dataset!r} is "
                "text. Use augment='default' or 'none'."
            )
    if config.image_size is not None and kind in ("idx", "text"):
        raise ValueError(
            f"config.image_size={config.image_size} resizes TFDS images only; "
            f"{config.dataset!r} is {'text' if text else 'IDX data, used at its native size'}. "
            "Leave image_size unset (None)."
        )
    wanted = {"resnet": "image", "transformer": "text"}[config.model.kind]
    found = {"idx": "image"}.get(kind, kind)  # "tfds": not known before reading
    if found in ("image", "text") and found != wanted:
        raise ValueError(
            f"config.model.kind={config.model.kind!r} needs {wanted} data; "
            f"{config.dataset!r} is {found} data."
        )


def check_data(config: ml_collections.ConfigDict, train: Any) -> None:
    """What `validate` cannot know before the data is read: its kind (TFDS names) and
    the number of training examples (`len(train)`). Raises ValueError naming the field."""
    _check_data_options(config, train.info.kind)
    if int(config.batch_size) > len(train):
        raise ValueError(
            f"config.batch_size={config.batch_size} is larger than the {len(train)} "
            f"training examples of {config.dataset!r}."
        )


def schedule_steps(config: ml_collections.ConfigDict) -> int | None:
    """The num_train_steps the learning-rate schedule depends on (None: it does not)."""
    return int(config.num_train_steps) if config.optimizer.schedule == "cosine" else None


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


# Parameters that weight decay applies to, by leaf name: weight matrices (dense and conv
# kernels, embeddings), never biases or normalisation scales. By name, not by ndim:
# nn.scan gives every Transformer block parameter a leading layer axis and stacked SPMD
# stages add another, so a LayerNorm scale can have any rank.
DECAYED_PARAMS: tuple[str, ...] = ("kernel", "embedding")


def decay_mask(params: Any) -> Any:
    """A tree like `params` (any executor's layout) of bools: True where weight decay applies."""

    def decayed(path: tuple, _) -> bool:
        last = path[-1] if path else None
        return getattr(last, "key", getattr(last, "name", None)) in DECAYED_PARAMS

    return jax.tree_util.tree_map_with_path(decayed, params)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD+momentum or AdamW with the config's schedule; weight decay on `DECAYED_PARAMS`."""
    opt = config.optimizer
    schedule = learning_rate_schedule(config)
    parts = []
    if opt.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    if opt.name == "sgd":
        if opt.weight_decay:
            parts.append(optax.add_decayed_weights(float(opt.weight_decay), mask=decay_mask))
        parts.append(optax.sgd(schedule, float(opt.momentum) or None, bool(opt.nesterov)))
    elif opt.name == "adam":
        parts.append(
            optax.adamw(
                schedule,
                float(opt.b1),
                float(opt.b2),
                weight_decay=float(opt.weight_decay),
                mask=decay_mask,
            )
        )
    else:
        raise ValueError(f"Unknown optimizer {opt.name!r}; choose one of {OPTIMIZERS}.")
    return optax.chain(*parts)


def build_data(config: ml_collections.ConfigDict, split: str) -> Any:
    """A random-access source of `split`; raises ilbp.data.DataMissingError if absent and
    ValueError naming the dataset (and seq_len for text) if it cannot be used."""
    try:
        return data.make_split(
            config.dataset,
            split,
            seq_len=int(config.seq_len),
            image_size=config.image_size,
            data_dir=config.data_dir,
        )
    except ValueError as e:
        text = data.parse_dataset(config.dataset).kind == "text"
        seq_len = f", seq_len={config.seq_len}" if text else ""
        raise ValueError(f"config.dataset={config.dataset!r}{seq_len} ({split}): {e}") from e


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


def resnet_trunk(config: ml_collections.ConfigDict) -> ResNetConfig:
    """The ResNet of `config.model` (ValueError for a bad layout, block, stem, ...)."""
    m = config.model
    return ResNetConfig.from_layout(
        m.layout, block=m.block, stem=m.stem, shortcut=m.shortcut, norm=m.norm
    )


def transformer_config(
    config: ml_collections.ConfigDict, vocab_size: int, max_len: int
) -> TransformerConfig:
    """The Transformer LM of `config.model` for a vocabulary and context length."""
    m = config.model
    return TransformerConfig(
        vocab_size=vocab_size,
        max_len=max_len,
        num_layers=int(m.num_layers),
        d_model=int(m.d_model),
        num_heads=int(m.num_heads),
        d_ff=int(m.d_ff) or None,
        positions=m.positions,
        dtype=jnp.dtype(m.get("dtype", DTYPES[0])),
    )


def build_model(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> StagedModel:
    """The staged ResNet or Transformer LM the config describes, sized by the data."""
    m, K = config.model, int(config.num_stages)
    if m.kind == "resnet":
        if info.kind != "image":
            raise ValueError(f"A ResNet needs image data; {config.dataset!r} is {info.kind}.")
        return resnet(
            resnet_trunk(config),
            K,
            aux_head=m.aux_head,
            num_classes=info.num_classes,
            input_shape=tuple(info.example_shape),
            balance=m.balance,
            strategy=build_strategy(config),
        )
    if info.kind != "text":
        raise ValueError(f"A Transformer LM needs text data; {config.dataset!r} is {info.kind}.")
    lm = transformer_config(config, info.vocab_size, int(info.example_shape[0]))
    return transformer_lm(lm, K, aux_head=m.get("aux_head", LM_HEADS[0]))


def build_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
    """The (stage, data) mesh for `config.data_parallel` > 1 or a multi-process job,
    else None (one device; the pipelined executors then pick theirs).

    The pipelined executors put stage k on row k, so their mesh has K rows; the
    single-program executor replicates every stage over a one-row mesh.
    """
    data_parallel = int(config.data_parallel)
    if data_parallel <= 1 and jax.process_count() == 1:
        return None
    return ilbp.make_mesh(data=data_parallel, stage=mesh_rows(config))


@dataclasses.dataclass
class Built:
    """Everything compiled for one program: model, executor and eval step."""

    model: StagedModel
    model_key: str  # the architecture and K, as JSON
    strategy: ilbp.Strategy
    executor: Any
    eval_step: Callable
    mesh: jax.sharding.Mesh | None  # of eval_step (and of the executor, if it takes one)


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
)


def program_key(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> str:
    """The config fields that change the compiled train/eval programs."""
    fields = {k: config[k] for k in _PROGRAM_FIELDS}
    fields.update(model=model_fields(config, info), optimizer=config.optimizer.to_dict())
    fields.update(schedule_steps=schedule_steps(config))
    return json.dumps(fields, sort_keys=True)


def initial_state(built: Built, config: ml_collections.ConfigDict, batch: dict) -> Any:
    """`executor.init(PRNGKey(seed), batch)`, reusing a host copy from an earlier run of
    the same model, optimizer and seed (bitwise the same state); not across processes,
    where a host copy would not be placed on the global mesh."""
    shapes = {k: (v.shape, str(v.dtype)) for k, v in batch.items()}
    fields = [built.model_key, config.optimizer.to_dict(), schedule_steps(config)]
    fields += [int(config.seed), repr(sorted(shapes.items())), int(config.data_parallel)]
    key = json.dumps(fields, sort_keys=True)
    ex = built.executor
    if key not in _INIT_CACHE:
        state = ex.init(jax.random.PRNGKey(int(config.seed)), batch)
        if jax.process_count() == 1:
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
        _CACHE[key] = Built(model, model_key, strategy, executor, eval_step, mesh)
    return _CACHE[key]
