"""Tiny data and configs shared by the experiments tests (2-step runs on small inputs)."""

from __future__ import annotations

import hashlib
import os

import ml_collections
import numpy as np

from experiments.configs import fashion_mnist_resnet, stdlib_lm
from ilbp import data


def write_idx_dir(directory: str, n_train: int = 48, n_test: int = 24, hw: int = 8) -> str:
    """An MNIST-format directory of random hw x hw images in 3 classes."""
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 3, n).astype(np.uint8)
        images = rng.integers(0, 256, (n, hw, hw)).astype(np.uint8)
        images[np.arange(n), labels, :] = 255  # a learnable cue
        data.write_idx(os.path.join(directory, f"{stem}-images-idx3-ubyte.gz"), images)
        data.write_idx(os.path.join(directory, f"{stem}-labels-idx1-ubyte.gz"), labels)
    return directory


def write_text_file(path: str, size: int = 12_000) -> str:
    """A small text corpus with some structure to learn."""
    words = ["def", "return", "self", "import", "class", "None", "(", ")", ":", "\n    "]
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        f.write(" ".join(words[i] for i in rng.integers(0, len(words), size // 4))[:size])
    return path


def tiny(c: ml_collections.ConfigDict, steps: int = 2) -> ml_collections.ConfigDict:
    """Test-sized run settings: few steps, no progress bars, train metrics and a
    checkpoint every step (so one step per executor call)."""
    c.num_train_steps = steps
    c.log_every_steps = 1
    c.optimizer.warmup_steps = 0
    c.eval_every_steps = 0
    c.eval_examples = 0
    c.checkpoint_every_steps = 1
    c.max_to_keep = 10
    c.progress_bar = False
    return c


def tiny_image_config(
    dataset: str, arg: str = "pairwise,k=2", **model
) -> ml_collections.ConfigDict:
    """A 4-unit CIFAR-stem ResNet (stem, 2 blocks, classifier) on `dataset`."""
    c = tiny(fashion_mnist_resnet.get_config(arg))
    c.dataset = dataset
    c.model.layout = "4,1/8,1"
    c.model.update(model)
    c.batch_size = 8
    c.eval_batch_size = 16
    return c


def tiny_text_config(dataset: str, arg: str = "pairwise,k=2") -> ml_collections.ConfigDict:
    """A 2-block, d_model 16 byte-level LM on `dataset`."""
    c = tiny(stdlib_lm.get_config(arg))
    c.dataset = dataset
    c.seq_len = 16
    c.model.update(num_layers=2, d_model=16, num_heads=2)
    c.batch_size = 4
    c.eval_batch_size = 32
    c.eval_examples = 64
    return c


def override(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted fields ("optimizer.learning_rate") as `--config.FIELD=VALUE` would."""
    for field, value in overrides.items():
        *parents, name = field.split(".")
        node = c
        for parent in parents:
            node = node[parent]
        node[name] = value
    return c


def tree_digest(directory: str) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory` (to prove nothing changed)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out
