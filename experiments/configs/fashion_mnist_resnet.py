"""Fashion-MNIST, a narrow CIFAR-stem ResNet-14 cut into K=4 stages (embedded image default).

Data: the full 60k/10k Fashion-MNIST IDX files of Debian's `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist; `--config.dataset=idx:DIR` for another copy).
Model: layout "8,2/16,2/32,2" (3x3 stem, 6 basic blocks, option-A shortcuts; 0.02M
parameters), split at FLOP-balanced unit boundaries, a "gbpl_fc" aux head (global
average pool + linear) after every stage but the last. Sized so the comparison below
(4 strategies x 2 seeds) runs within 15 minutes on 2 CPU cores: 150 steps of batch 128
(0.32 epochs), SGD+momentum with warmup and cosine decay; the curve uses the first
1,000 test examples every 25 steps, the final numbers all 10,000.

One run:

    python -m experiments.train --config=experiments/configs/fashion_mnist_resnet.py:pairwise,k=4 \
        --workdir=runs/fmnist_pairwise

The comparison:

    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py

Expected result (its table, printed and written to runs/compare/fashion_mnist_resnet):

    RESULTS_TABLE
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; `arg` selects a variant, e.g. "pairwise,k=4" (see configs/common.py)."""
    c = common.base_config()
    c.name = "fashion_mnist_resnet"
    c.dataset = "idx"
    c.model = common.resnet_model("8,2/16,2/32,2")
    c.num_stages = 4
    c.strategy = "pairwise"
    c.batch_size = 128
    c.num_train_steps = 150
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.warmup_steps = 15
    c.eval_batch_size = 1000
    c.eval_every_steps = 25
    c.eval_examples = 1000
    c.checkpoint_every_steps = 100
    return common.apply_arg(c, arg)
