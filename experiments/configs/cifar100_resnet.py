"""CIFAR-100, a CIFAR-stem ResNet-32 (option A) cut into K=4 stages, via TFDS.

Needs the prepared TFDS dataset (`tfds build cifar100 --file_format=array_record` on a
machine with internet, then TFDS_DATA_DIR or --config.data_dir). Same recipe as
cifar10_resnet: 64k steps of batch 128, SGD+momentum, lr 0.1, warmup + cosine, weight
decay 5e-4, random crop + flip, "conv128_bn_conv64_bn_gbpl_fc" aux heads.

    python -m experiments.train --config=experiments/configs/cifar100_resnet.py:pairwise,k=4 \
        --workdir=runs/cifar100_pairwise
    python -m experiments.compare --config=experiments/configs/cifar100_resnet.py

Expected result: not measured on this project's machines (no CIFAR-100 data offline).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import cifar10_resnet, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; `arg` selects a variant, e.g. "nwise=3,k=4" (see configs/common.py)."""
    c = cifar10_resnet.get_config()
    c.name = "cifar100_resnet"
    c.dataset = "cifar100"
    c.model.layout = "16,5/32,5/64,5"
    return common.apply_arg(c, arg)
