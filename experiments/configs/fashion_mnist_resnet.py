"""Fashion-MNIST, a narrow CIFAR-stem ResNet-14 cut into K=4 stages (embedded image default).

Data: the full 60k/10k Fashion-MNIST IDX files of Debian's `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist; `--config.dataset=idx:DIR` for another copy).
Model: layout "8,2/16,2/32,2" (3x3 stem, 6 basic blocks, option-A shortcuts; 44k
parameters), split at FLOP-balanced unit boundaries (stem..block_0 | block_1 | block_2..3 |
block_4..classifier), a "gbpl_fc" aux head (global average pool + linear) after every
stage but the last. Sized so the comparison below (4 strategies x 2 seeds) runs within
15 minutes on 2 CPU cores: 400 steps of batch 128 (0.85 epochs), SGD+momentum with
40 warmup steps and cosine decay; the curve uses the first 1,000 test examples every 50
steps, the final numbers all 10,000.

One run:

    python -m experiments.train --config=experiments/configs/fashion_mnist_resnet.py:pairwise,k=4 \
        --workdir=runs/fmnist_pairwise

The comparison:

    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py

Expected result (its table, printed and written to runs/compare/fashion_mnist_resnet):

    | strategy | test accuracy (mean ± std) | aux acc (k=0..2) | step (ms) | pred. ×global (K=4) |
    |---|---|---|---|---|
    | global | 0.8529 ± 0.0016 | 0.493 / 0.535 / 0.738 | 106 | 1.00 |
    | local | 0.7989 ± 0.0146 | 0.690 / 0.698 / 0.752 | 91 | 3.00 |
    | pairwise | 0.8141 ± 0.0004 | 0.637 / 0.715 / 0.725 | 109 | 1.80 |
    | 3wise | 0.8351 ± 0.0019 | 0.508 / 0.547 / 0.710 | 112 | 1.29 |

    Ranking by mean test accuracy: global > 3wise > pairwise > local; global − 3wise = +0.0179
    (beyond the sum of their stds); 3wise − pairwise = +0.0209 (beyond the sum of their stds);
    pairwise − local = +0.0152 (beyond the sum of their stds).

It took 6 min 55 s on 2 CPU cores. What it says: after 400 steps global backprop is
best; 3-wise is 1.8 points behind it, pairwise 2.1 behind 3-wise, local 1.5 behind
pairwise, each gap beyond the spread of 2 seeds (a small sample: more seeds would
tighten it). This is the paper's ordering on task performance (interlocking between
local and global, improving with n). Local learning's early aux heads are the most
accurate (each stage trains only for its own head); under global they lag. An earlier
150-step version of this config gave the same ranking, with the gaps below global
within the seed spread. Step times are one single-program step on the CPU; the last
column is the schedule model's throughput on 4 devices relative to global.
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
