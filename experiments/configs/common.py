"""Shared pieces of the experiment configs: the `:arg` variant grammar and base configs.

A config file's `get_config(arg)` receives what follows ":" in `--config=FILE.py:ARG`.
ARG is comma-separated tokens:

  global | local | pairwise | Nwise | nwise=N    the strategy (window n), optionally
                                                 with its rule (pairwise:sum)
  e2e                                            or the plain network, end to end (no heads)
  k=K                                            number of stages
  combine=last|sum|mean                          the n-wise combine rule
  executor=simulated|mpmd|spmd                   how the stages run
  m=M                                            microbatches per step
  <variant>                                      a variant the config file names
                                                 (e.g. `long`: its long comparison)

e.g. `:pairwise,k=4`, `:nwise=3,k=8,combine=sum` (or `:3wise:sum,k=8`),
`:global,executor=mpmd,m=4`, `:e2e,k=4`.
Everything can also be overridden with `--config.FIELD=VALUE`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import ml_collections

from ilbp.pipeline import EXECUTORS
from ilbp.strategy import COMBINE_RULES, Strategy

ARG_KEYS: tuple[str, ...] = ("k", "combine", "executor", "m")


def parse_arg(arg: str | None, variants: Sequence[str] = ()) -> dict[str, object]:
    """Parses a config ARG into {"strategy", "num_stages", "combine", "executor",
    "microbatches"} (only the keys it sets). Raises ValueError naming a bad token;
    `variants` (the config's named variants, handled by `apply_arg`) are skipped."""
    out: dict[str, object] = {}
    for token in (arg or "").split(","):
        token = token.strip()
        if not token:
            continue
        key, eq, value = token.partition("=")
        key = key.strip().lower()
        if token.lower() in variants:
            continue
        if not eq or key in ("nwise", "n"):
            strategy = token if key != "n" else f"nwise={value}"
            try:
                Strategy.parse(strategy)
            except ValueError as e:  # it names the accepted strategies
                hint = f" This config's variants: {', '.join(variants)}." if variants else ""
                raise ValueError(f"Config arg {token!r}: {e}{hint}") from None
            strategy, _, rule = strategy.lower().partition(":")  # ":pairwise:sum"
            out["strategy"] = strategy
            if rule:
                _set_combine(out, rule, arg)
        elif key == "k":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"Config arg {token!r}: k must be an integer ≥ 1.")
            out["num_stages"] = int(value)
        elif key == "combine":
            if value not in COMBINE_RULES:
                raise ValueError(f"Config arg {token!r}: combine must be one of {COMBINE_RULES}.")
            _set_combine(out, value, arg)
        elif key == "executor":
            if value not in EXECUTORS:
                raise ValueError(f"Config arg {token!r}: executor must be one of {EXECUTORS}.")
            out["executor"] = value
        elif key == "m":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"Config arg {token!r}: m (microbatches) must be an integer ≥ 1.")
            out["microbatches"] = int(value)
        else:
            raise ValueError(
                f"Unknown config arg {token!r}. Use a strategy (e2e, global, local, pairwise, "
                f"Nwise, nwise=N), key=value with keys {ARG_KEYS}"
                + (f", or a variant of this config ({', '.join(variants)})" if variants else "")
                + ", e.g. ':pairwise,k=4' or ':nwise=3,k=8,combine=sum'."
            )
    return out


def _set_combine(out: dict[str, object], rule: str, arg: str | None) -> None:
    if out.setdefault("combine", rule) != rule:
        raise ValueError(
            f"Config arg {arg!r} gives two combine rules, {out['combine']!r} and {rule!r}; "
            "keep one."
        )


Variant = Callable[[ml_collections.ConfigDict], None]


def apply_arg(
    config: ml_collections.ConfigDict,
    arg: str | None,
    variants: Mapping[str, Variant] | None = None,
) -> ml_collections.ConfigDict:
    """Applies ARG to `config` (in place) and returns it: first every named variant
    it lists (e.g. "long": a config's long comparison), then the other tokens, so
    `:long,k=8` is the long variant at K=8."""
    variants = variants or {}
    tokens = [t.strip().lower() for t in (arg or "").split(",")]
    for token in tokens:
        if token in variants:
            variants[token](config)
    for key, value in parse_arg(arg, tuple(variants)).items():
        config[key] = value
    return config


def base_config() -> ml_collections.ConfigDict:
    """Fields every experiment has; the config files fill in data, model and optimizer."""
    c = ml_collections.ConfigDict()
    c.name = ""
    # Data (see ilbp.data.parse_dataset). data_dir: TFDS data directory (None: default).
    c.dataset = ""
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.seq_len = 256  # text only
    c.image_size = ml_collections.FieldReference(None, field_type=int)  # TFDS images only
    c.augment = "default"  # "default" (the dataset's usual), "none", or a name
    # Strategy and stages.
    c.strategy = "pairwise"
    c.combine = "last"
    c.num_stages = 4
    c.aux_weight = 1.0  # weight of every auxiliary loss
    c.executor = "simulated"
    c.microbatches = 1
    c.data_parallel = 1  # devices on the mesh axis `data` (1: no mesh)
    # Steps per executor call (`steps`): spmd runs them in one program, overlapped as the
    # strategy allows (one step per call drains its pipeline every step); the others
    # issue them back to back. The eval and checkpoint intervals must be multiples of it.
    # 0: spmd the largest T ≤ 10 that divides them, the others 1
    # (`experiments.configs.validation.steps_per_call`).
    c.steps_per_call = 0
    # mpmd: the most microbatches whose residuals a stage holds; 0: what the window needs.
    c.max_in_flight = 0
    # Training.
    c.seed = 0
    c.batch_size = 128
    c.num_train_steps = 1000
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="sgd",  # "sgd" (with momentum) or "adam" (AdamW)
            learning_rate=0.1,
            momentum=0.9,
            nesterov=False,
            b1=0.9,
            b2=0.999,
            weight_decay=5e-4,  # on kernels and embeddings only
            warmup_steps=0,
            schedule="cosine",  # "cosine" (to 0 after warmup) or "constant"
            grad_clip_norm=0.0,  # per stage; 0 = off
        )
    )
    # Evaluation, logging, checkpoints.
    c.eval_batch_size = 500
    c.eval_every_steps = 0  # 0: only the final evaluation
    c.eval_examples = 0  # intermediate evals use the first N test examples (0: all)
    c.final_eval_examples = 0  # the final eval uses the first N test examples (0: all)
    # JSONL/TensorBoard train metrics; the host looks at the devices only then (and at
    # evaluations and checkpoints), so steps in between queue up without waiting.
    c.log_every_steps = 50
    c.checkpoint_every_steps = 100
    c.max_to_keep = 2
    c.progress_bar = True
    # experiments.compare: strategies and seeds to run.
    c.compare = ml_collections.ConfigDict(
        dict(strategies="e2e,global,local,pairwise,3wise", seeds="0,1")
    )
    return c


def resnet_model(
    layout: str,
    *,
    block: str = "basic",
    stem: str = "cifar",
    shortcut: str = "A",
    aux_head: str = "gbpl_fc",
) -> ml_collections.ConfigDict:
    """A staged ResNet (ilbp.models.resnet) from an authors'-style layout string."""
    return ml_collections.ConfigDict(
        dict(
            kind="resnet",
            layout=layout,
            block=block,
            stem=stem,
            shortcut=shortcut,
            norm="batch",
            aux_head=aux_head,
            # Split into K stages of equal forward FLOPs; "work": of equal training work
            # under the config's strategy (moves the aux heads per strategy).
            balance="flops",
        )
    )


def transformer_model(
    num_layers: int, d_model: int, num_heads: int, d_ff: int = 0
) -> ml_collections.ConfigDict:
    """A GPT-style LM (ilbp.models.transformer_lm); num_layers must divide by K."""
    return ml_collections.ConfigDict(
        dict(
            kind="transformer",
            num_layers=num_layers,
            d_model=d_model,
            num_heads=num_heads,
            d_ff=d_ff,  # 0: 4 * d_model
            positions="learned",
            aux_head="norm_unembed",  # ilbp.models.transformer.LM_HEADS
            dtype="float32",  # compute dtype: "float32" or "bfloat16" (parameters: float32)
        )
    )
