"""Checks of a config built from `common.base_config`, and the values they fix.

`validate(config)` runs before any data is read or file written; `check_data(config,
train)` once the training split is known. Both raise ValueError naming the field and what
to set. `steps_per_call` and `mesh_rows` turn fields the checks constrain into the
numbers the trainer runs with.

The allowed values of each field live with what interprets it: executors in
`ilbp.pipeline`, model kinds and dtypes in `experiments.lib.models`, optimizers and
schedules in `experiments.lib.optim`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

from experiments.lib.models import (
    DTYPES,
    MODEL_KINDS,
    build_strategy,
    resnet_trunk,
    transformer_config,
)
from experiments.lib.optim import OPTIMIZER_FIELDS, OPTIMIZERS, SCHEDULES
from ilbp import data
from ilbp.models import transformer_lm
from ilbp.models.heads import parse_head
from ilbp.models.resnet_stages import BALANCES, resnet_split
from ilbp.models.transformer import LM_HEADS
from ilbp.pipeline import EXECUTORS

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


def check_data(config: ml_collections.ConfigDict, train: Any) -> None:
    """What `validate` cannot know before the data is read: its kind (TFDS names) and
    the number of training examples (`len(train)`). Raises ValueError naming the field."""
    _check_data_options(config, train.info.kind)
    if int(config.batch_size) > len(train):
        raise ValueError(
            f"config.batch_size={config.batch_size} is larger than the {len(train)} "
            f"training examples of {config.dataset!r}."
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
