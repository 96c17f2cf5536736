"""CIFAR-10, He et al.'s ResNet-20 (option-A shortcuts) cut into K=4 stages, via TFDS.

Needs the prepared TFDS dataset (nothing downloads at run time): on a machine with
internet `tfds build cifar10 --file_format=array_record`, copy the data directory here
and set TFDS_DATA_DIR (or --config.data_dir). Training: 64k steps of batch 128 (164
epochs), SGD+momentum 0.9, lr 0.1 with 2-epoch warmup and cosine decay, weight decay
5e-4, random crop + flip. Aux heads: the authors' "conv128_bn_conv64_bn_gbpl_fc".

    python -m experiments.train --config=experiments/configs/cifar10_resnet.py:pairwise,k=4 \
        --workdir=runs/cifar10_pairwise
    python -m experiments.compare --config=experiments/configs/cifar10_resnet.py

Expected result: not measured on this project's machines (no CIFAR data offline, and a
CPU is too slow). For reference, He et al. (2016) report 91.25% test accuracy for
ResNet-20 trained with global backprop; run the compare command above on a GPU to
fill in the table.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; `arg` selects a variant, e.g. "pairwise,k=4" (see configs/common.py)."""
    c = common.base_config()
    c.name = "cifar10_resnet"
    c.dataset = "cifar10"
    c.model = common.resnet_model("16,3/32,3/64,3", aux_head="conv128_bn_conv64_bn_gbpl_fc")
    c.num_stages = 4
    c.batch_size = 128
    c.num_train_steps = 64_000
    c.optimizer.learning_rate = 0.1
    c.optimizer.weight_decay = 5e-4
    c.optimizer.warmup_steps = 780
    c.eval_batch_size = 1000
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 2000
    return common.apply_arg(c, arg)
