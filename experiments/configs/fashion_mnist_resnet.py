"""Fashion-MNIST, a narrow CIFAR-stem ResNet-14 cut into K=4 stages (embedded image default).

Data: the full 60k/10k Fashion-MNIST IDX files of Debian's `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist; `--config.dataset=idx:DIR` for another copy).
Model: layout "8,2/16,2/32,2" (3x3 stem, 6 basic blocks, option-A shortcuts; 44k
parameters), split at FLOP-balanced unit boundaries (stem..block_0 | block_1 | block_2..3 |
block_4..classifier), a "gbpl_fc" aux head (global average pool + linear) after every
stage but the last. Sized so the comparison below (4 strategies x 2 seeds) runs within
15 minutes on 2 CPU cores: 150 steps of batch 128 (0.32 epochs), SGD+momentum with
warmup and cosine decay; the curve uses the first 1,000 test examples every 25 steps,
the final numbers all 10,000.

One run:

    python -m experiments.train --config=experiments/configs/fashion_mnist_resnet.py:pairwise,k=4 \
        --workdir=runs/fmnist_pairwise

The comparison:

    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py

Expected result (its table, printed and written to runs/compare/fashion_mnist_resnet):

    | strategy | test accuracy (mean ± std) | aux acc (k=0..2) | step (ms) | pred. ×global (K=4) |
    |---|---|---|---|---|
    | global | 0.7919 ± 0.0165 | 0.392 / 0.406 / 0.659 | 186 | 1.00 |
    | local | 0.7341 ± 0.0075 | 0.582 / 0.595 / 0.692 | 102 | 3.00 |
    | pairwise | 0.7483 ± 0.0101 | 0.491 / 0.591 / 0.638 | 121 | 1.80 |
    | 3wise | 0.7577 ± 0.0066 | 0.400 / 0.424 / 0.611 | 116 | 1.29 |

    Ranking by mean test accuracy: global > 3wise > pairwise > local; global − 3wise = +0.0342
    (beyond the sum of their stds); 3wise − pairwise = +0.0094 (within the sum of their stds);
    pairwise − local = +0.0142 (within the sum of their stds).

It took 4 min 3 s on 2 CPU cores (12 min 55 s while other jobs shared them); the
accuracies were identical in three fresh runs. What it says: after 150 steps global
backprop is best, 3.4 points above 3-wise, a gap beyond the seed spread; 3-wise,
pairwise and local follow in that order, but each of those gaps (0.9 and 1.4 points)
is within the spread of 2 seeds. Local learning's early aux heads are the most accurate
(each stage trains only for its own head); under global they lag. Step times are one
single-program step on the CPU (noisy on a shared machine); the last column is the
schedule model's throughput on 4 devices relative to global.
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
