"""Cutting a ResNet into stages: the `resnet` builder and its FLOP-balanced splits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from ilbp.losses import classification_loss
from ilbp.models.heads import ConvHead, parse_head
from ilbp.models.resnets import ResNetConfig, ResNetUnits
from ilbp.models.splitting import balance_split, check_num_stages, flops, parse_blocks_per_stage
from ilbp.schedule import stage_work
from ilbp.stage import LossFn, StagedModel, from_linen
from ilbp.strategy import Strategy

Balance = Literal["flops", "work", "units"]
BALANCES: tuple[str, ...] = ("flops", "work", "units")


def resnet_unit_flops(
    config: ResNetConfig,
    num_classes: int,
    input_shape: tuple[int, int, int],
    aux_head: str | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Forward FLOPs per image of every unit and of an aux head after every unit.

    From XLA's cost analysis of each unit lowered alone at batch 1 (abstract arguments:
    nothing is initialised or run). Units with the same description and input shape are
    analysed once. Head costs are 0 where there is no aux head (after the classifier).
    """
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    cache: dict[tuple, tuple[float, jax.ShapeDtypeStruct]] = {}
    unit_costs, head_costs = [], []
    for i in range(config.num_units):
        key = (config.unit_key(i), x.shape)
        if key not in cache:
            module = ResNetUnits(config, num_classes, i, i + 1)
            variables = jax.eval_shape(module.init, rng, x)
            y = jax.eval_shape(module.apply, variables, x)
            cache[key] = (flops(module.apply, variables, x), y)
        cost, y = cache[key]
        unit_costs.append(cost)
        if aux_head is None or i == config.num_units - 1:
            head_costs.append(0.0)
        else:
            hkey = ("head", aux_head, y.shape)
            if hkey not in cache:
                head = ConvHead(aux_head, num_classes, config.norm, config.group_norm_groups)
                variables = jax.eval_shape(head.init, rng, y)
                cache[hkey] = (flops(head.apply, variables, y), y)
            head_costs.append(cache[hkey][0])
        x = y
    return tuple(unit_costs), tuple(head_costs)


def resnet_split(
    config: ResNetConfig,
    num_stages: int | None = None,
    *,
    blocks_per_stage: str | Sequence[int | str] | None = None,
    balance: Balance = "flops",
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    aux_head: str | None = "gbpl_fc",
    strategy: Strategy | str | None = None,
) -> tuple[int, ...]:
    """Units per stage: `blocks_per_stage` if given, else balanced for `num_stages`.

    balance="flops" minimises the largest stage's forward FLOPs (its units plus its aux
    head; see `resnet_unit_flops`). "work" minimises the largest stage's training work
    per microbatch under `strategy` (required): its forward FLOPs times
    `ilbp.schedule.stage_work` in forward units (e.g. 3, 4, 4, 3 for pairwise at K = 4)
    plus three times its head's (forward and backward); the split then depends on the
    strategy, so aux heads sit at different depths for different strategies. "units"
    gives every stage the same number of units (± 1). Raises ValueError for an
    impossible split.
    """
    n = config.num_units
    if blocks_per_stage is not None:
        counts = parse_blocks_per_stage(blocks_per_stage, n)
        if num_stages is not None and num_stages != len(counts):
            raise ValueError(
                f"num_stages={num_stages} but blocks_per_stage {blocks_per_stage!r} has "
                f"{len(counts)} entries."
            )
        return counts
    num_stages = 1 if num_stages is None else num_stages
    check_num_stages(num_stages, n, "units (stem + blocks + classifier)")
    if balance == "units":
        return tuple(n // num_stages + (k < n % num_stages) for k in range(num_stages))
    if balance not in BALANCES:
        raise ValueError(f"Unknown balance {balance!r}; choose one of {BALANCES}.")
    if balance == "work" and strategy is None:
        raise ValueError("balance='work' needs the strategy whose work it balances.")
    if num_stages == 1:
        return (n,)
    units, heads = resnet_unit_flops(config, num_classes, input_shape, aux_head)
    if balance == "flops":
        return balance_split(units, num_stages, heads)
    weights = stage_work(strategy, num_stages)
    return balance_split(units, num_stages, [3.0 * h for h in heads], stage_weights=weights)


def resnet(
    config: ResNetConfig,
    num_stages: int | None = None,
    *,
    blocks_per_stage: str | Sequence[int | str] | None = None,
    aux_head: str = "gbpl_fc",
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    balance: Balance = "flops",
    strategy: Strategy | str | None = None,
    loss: LossFn | None = None,
    aux_loss: LossFn | None = None,
    input_key: str = "inputs",
) -> StagedModel:
    """A ResNet cut into K stages at unit boundaries (see `resnet_split`).

    Stage k is `ResNetUnits(config, num_classes, start_k, stop_k)`; its aux head is
    `ConvHead(aux_head, ...)` (grammar in `ilbp.models.heads`). Input: x_BxHxWxC float
    images (`input_shape` = (H, W, C) is used only to balance FLOPs); final output:
    logits_BxN. Loss defaults to `classification_loss()` on batch["label"].
    """
    parse_head(aux_head)  # Fail early on a bad spec, even if K = 1 uses no head.
    counts = resnet_split(
        config,
        num_stages,
        blocks_per_stage=blocks_per_stage,
        balance=balance,
        num_classes=num_classes,
        input_shape=input_shape,
        aux_head=aux_head,
        strategy=strategy,
    )
    names = config.unit_names()
    stages, heads, start = [], [], 0
    for k, count in enumerate(counts):
        stop = start + count
        module = ResNetUnits(config, num_classes, start, stop)
        stages.append(from_linen(module, f"{names[start]}..{names[stop - 1]}"))
        if k < len(counts) - 1:
            head = ConvHead(
                aux_head,
                num_classes,
                config.norm,
                config.group_norm_groups,
                config.dtype,
                config.param_dtype,
            )
            heads.append(from_linen(head, f"head({aux_head}) after {names[stop - 1]}"))
        start = stop
    return StagedModel(
        tuple(stages),
        tuple(heads),
        loss or classification_loss(),
        aux_loss=aux_loss,
        input_key=input_key,
    )
