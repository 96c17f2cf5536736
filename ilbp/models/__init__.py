"""Staged models: ResNets and GPT-style Transformer LMs with auxiliary heads.

Builders return an `ilbp.StagedModel`; the unsplit Linen modules (`ResNetUnits`,
`TransformerLM`) are the oracles that a staged model must agree with.
"""

from ilbp.models.heads import ConvHead, parse_head
from ilbp.models.resnet_stages import resnet, resnet_split, resnet_unit_flops
from ilbp.models.resnets import ResNetConfig, ResNetUnits
from ilbp.models.splitting import balance_split, parse_blocks_per_stage, unsplit_variables
from ilbp.models.transformer import (
    LMHead,
    TransformerConfig,
    TransformerLM,
    TransformerStage,
    transformer_lm,
)

__all__ = [
    "ConvHead",
    "LMHead",
    "ResNetConfig",
    "ResNetUnits",
    "TransformerConfig",
    "TransformerLM",
    "TransformerStage",
    "balance_split",
    "parse_blocks_per_stage",
    "parse_head",
    "resnet",
    "resnet_split",
    "resnet_unit_flops",
    "transformer_lm",
    "unsplit_variables",
]
