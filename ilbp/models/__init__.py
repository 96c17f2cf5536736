"""Staged models: ResNets and GPT-style Transformer LMs with auxiliary heads.

Builders return an `ilbp.StagedModel`:

    resnet(ResNetConfig.cifar(20), num_stages=4, aux_head="gbpl_fc", num_classes=10)
    resnet(ResNetConfig.from_layout("64,3/128,4/256,6/512,3"), blocks_per_stage="2,1,1,rest")
    transformer_lm(TransformerConfig(...), num_stages=4)

The unsplit Linen modules `ResNetUnits(config, num_classes)` and `TransformerLM(config)`
are the oracles a staged model must agree with; `unsplit_variables(params, state)` turns
a staged model's variables into theirs. Aux-head grammar: `ilbp.models.heads`.
"""

from ilbp.models.heads import ConvHead, parse_head
from ilbp.models.resnet_stages import resnet, resnet_split, resnet_unit_flops
from ilbp.models.resnets import ResNetConfig, ResNetUnits
from ilbp.models.splitting import balance_split, parse_blocks_per_stage, unsplit_variables
from ilbp.models.transformer import (
    LM_HEADS,
    LMHead,
    TransformerConfig,
    TransformerLM,
    TransformerStage,
    transformer_lm,
)

__all__ = [
    "LM_HEADS",
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
