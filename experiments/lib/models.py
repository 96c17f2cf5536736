"""Config -> strategy and staged model (a ResNet or a Transformer LM, sized by the data).

The strategy lives here because it shapes the model: it weights the auxiliary losses and,
with `model.balance="work"`, moves the ResNet's cuts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

import ilbp
from ilbp import data
from ilbp.models import ResNetConfig, TransformerConfig, resnet, transformer_lm
from ilbp.models.transformer import LM_HEADS
from ilbp.stage import StagedModel

MODEL_KINDS: tuple[str, ...] = ("resnet", "transformer")
DTYPES: tuple[str, ...] = ("float32", "bfloat16")  # a Transformer's compute dtype


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
