"""ilbp experiments: absl entry points, config files and the trainer behind them.

    python -m experiments.train --config=experiments/configs/fashion_mnist_resnet.py:pairwise,k=4 \
        --workdir=runs/fmnist_pairwise
    python -m experiments.compare --config=experiments/configs/fashion_mnist_resnet.py
    python -m experiments.launch --num_processes=2 -- <experiments.train flags>  # N local processes

The trainer, checkpointing, metrics and the comparison report live in `experiments.lib`.
"""
