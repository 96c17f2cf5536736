"""Fashion-MNIST, a narrow CIFAR-stem ResNet-14 cut into K=4 stages (embedded image default).

Data: the full 60k/10k Fashion-MNIST IDX files of Debian's `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist; `--config.dataset=idx:DIR` for another copy).
Model: layout "8,2/16,2/32,2" (3x3 stem, 6 basic blocks, option-A shortcuts; 44k
parameters), split at FLOP-balanced unit boundaries (stem..block_0 | block_1 | block_2..3 |
block_4..classifier), a "gbpl_fc" aux head (global average pool + linear) after every
stage but the last. SGD+momentum 0.9, lr 0.1, weight decay 5e-4, 40 warmup steps then
cosine decay, batch 128.

The default is sized so the comparison (e2e, global, local, pairwise, 3-wise x 2 seeds)
runs within 15 minutes on 2 CPU cores: 400 steps (0.85 epochs), the curve on the first
1,000 test examples every 50 steps, the final numbers on all 10,000. Its result, with
the command, is in docs/results/fmnist_default/ (README, "Results").

    python -m experiments.train --config=experiments/configs/fashion_mnist_resnet.py:pairwise,k=4 \
        --workdir=runs/fmnist_pairwise
    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py

The long comparisons (variant `long`: 10 epochs, 3 seeds, e2e as the reference; hours
on 2 CPU cores, faster with two processes sharing the runs through --shard):

    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py:long \
        --workdir=docs/results/fmnist_k4
    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py:long,k=8 \
        --workdir=docs/results/fmnist_k8

Result at K=4 (docs/results/fmnist_k4, 3 seeds, final test accuracy, mean ± std): e2e =
global 0.9285 ± 0.0011, 3-wise 0.9154 ± 0.0029, pairwise 0.9074 ± 0.0031, local 0.9051 ±
0.0019. At K=8 (docs/results/fmnist_k8, 3 seeds): e2e = global 0.9275 ± 0.0002, 3-wise
0.9000 ± 0.0033, local 0.8942 ± 0.0009, pairwise 0.8735 ± 0.0051.
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
    c.num_train_steps = 400
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.warmup_steps = 40
    c.eval_batch_size = 1000
    c.eval_every_steps = 50
    c.eval_examples = 1000
    c.checkpoint_every_steps = 100
    return common.apply_arg(c, arg, VARIANTS)


def long_comparison(c: ml_collections.ConfigDict) -> None:
    """`:long` (K=4; `:long,k=8` one unit per stage): the comparisons of
    docs/results/fmnist_k4 and fmnist_k8, 10 epochs (4,690 steps) per run, evaluated on
    all 10,000 test images every epoch, e2e as the reference, three seeds."""
    c.num_train_steps = 4690
    c.eval_every_steps = 469
    c.eval_examples = 0
    c.checkpoint_every_steps = 469
    c.progress_bar = False
    c.compare.strategies = "e2e,global,local,pairwise,3wise"
    c.compare.seeds = "0,1,2"


VARIANTS: dict[str, common.Variant] = {"long": long_comparison}
