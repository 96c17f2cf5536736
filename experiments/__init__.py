"""ilbp experiments: absl entry points, config files and the trainer behind them.

    python -m experiments.train --config=experiments/configs/fashion_mnist_resnet.py:pairwise,k=4 \
        --workdir=runs/fmnist_pairwise
    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py

The trainer, checkpointing, metrics and the comparison report live in `experiments.lib`.
"""
