"""LM1B (One Billion Word), a byte-level GPT-style Transformer cut into K=4 stages, via TFDS.

Needs the prepared TFDS `lm1b` (`tfds build lm1b --file_format=array_record` on a
machine with internet, then TFDS_DATA_DIR or --config.data_dir). One sentence per
example, bytes as tokens (a leading newline marks the sentence start), padded to 256
with per-token weights. Model: 8 blocks, d_model 512, 8 heads, two blocks per stage;
AdamW lr 1e-3 with warmup and cosine decay, batch 64, 100k steps.

    python -m experiments.train --config=experiments/configs/lm1b_transformer.py:pairwise,k=4 \
        --workdir=runs/lm1b_pairwise

Expected result: not measured on this project's machines (no lm1b data offline).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; `arg` selects a variant, e.g. "nwise=3,k=4" (see configs/common.py)."""
    c = common.base_config()
    c.name = "lm1b_transformer"
    c.dataset = "lm1b"
    c.seq_len = 256
    c.model = common.transformer_model(num_layers=8, d_model=512, num_heads=8)
    c.num_stages = 4
    c.batch_size = 64
    c.num_train_steps = 100_000
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.1
    c.optimizer.warmup_steps = 2_000
    c.optimizer.grad_clip_norm = 1.0
    c.eval_batch_size = 128
    c.eval_every_steps = 5_000
    c.eval_examples = 10_000
    c.checkpoint_every_steps = 5_000
    return common.apply_arg(c, arg)
