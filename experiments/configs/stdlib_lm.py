"""Byte-level Transformer LM on the running interpreter's standard-library sources.

The embedded LM default: every `.py` file of the CPython standard library that runs
this command (sysconfig's stdlib directory, site-packages excluded), bytes as tokens;
about 1/20 of the files (chosen by a hash of their path) are held out as validation.
Other interpreters' standard libraries give somewhat different numbers.
Model: 4 pre-LN blocks, d_model 128, 4 heads, context 128, one block per stage (K=4)
with a LayerNorm + unembedding aux head after each of the first three. AdamW,
lr 3e-3 with 50 warmup steps and cosine decay, weight decay 0.01 on kernels and
embeddings, per-stage gradient clipping at 1.0, batch 32 windows (4,096 bytes).

    python -m experiments.train --config=experiments/configs/stdlib_lm.py:pairwise,k=4 \
        --workdir=runs/stdlib_pairwise
    python -m experiments.compare --config=experiments/configs/stdlib_lm.py

The comparisons behind the README's LM tables (variants below; every strategy under
the `last` and the `sum` rule; hours on 2 CPU cores, faster with two
processes sharing the runs through --shard):

    python -m experiments.compare --config=experiments/configs/stdlib_lm.py:long \
        --workdir=docs/results/stdlib_lm_k4
    python -m experiments.compare --config=experiments/configs/stdlib_lm.py:long_deep \
        --workdir=docs/results/stdlib_lm_k8
    python -m experiments.compare --config=experiments/configs/stdlib_lm.py:long_block_heads \
        --workdir=docs/results/stdlib_lm_k4_block_heads

Why pairwise and 3-wise under the default `last` rule stall on this model, and neither
`sum` nor `last` with a Transformer block in each aux head
(`--config.model.aux_head=block_norm_unembed`) does: docs/results/lm_last_rule/README.md.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; `arg` selects a variant, e.g. "global,k=2" (see configs/common.py)."""
    c = common.base_config()
    c.name = "stdlib_lm"
    c.dataset = "stdlib"
    c.seq_len = 128
    c.model = common.transformer_model(num_layers=4, d_model=128, num_heads=4)
    c.num_stages = 4
    c.batch_size = 32
    c.num_train_steps = 500
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = 50
    c.optimizer.grad_clip_norm = 1.0
    c.eval_batch_size = 64
    c.eval_every_steps = 100
    c.eval_examples = 512
    c.checkpoint_every_steps = 250
    return common.apply_arg(c, arg, VARIANTS)


def long_comparison(c: ml_collections.ConfigDict) -> None:
    """`:long`: the K=4 comparison of docs/results/stdlib_lm_k4, 1,000 steps (4M tokens)
    per run, every strategy under the `last` and `sum` rules, e2e as the reference."""
    c.num_train_steps = 1000
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 250
    c.progress_bar = False
    c.compare.strategies = "e2e,global,local,pairwise,3wise,pairwise:sum,3wise:sum"
    c.compare.seeds = "0,1,2"


def long_deep_comparison(c: ml_collections.ConfigDict) -> None:
    """`:long_deep`: the K=8 comparison of docs/results/stdlib_lm_k8, as `:long` but
    8 blocks, one per stage, and two seeds."""
    long_comparison(c)
    c.model.num_layers = 8
    c.num_stages = 8
    c.compare.strategies = "e2e,local,pairwise,3wise,pairwise:sum,3wise:sum"
    c.compare.seeds = "0,1"


def long_block_heads_comparison(c: ml_collections.ConfigDict) -> None:
    """`:long_block_heads`: as `:long` with a Transformer block in every aux head
    (`block_norm_unembed`), docs/results/stdlib_lm_k4_block_heads: whether the heads
    that removed the `last` rule's stall at 200 steps (docs/results/lm_last_rule) keep
    it away over 1,000. Two seeds; no global (its trunk trains as e2e's does)."""
    long_comparison(c)
    c.model.aux_head = "block_norm_unembed"
    c.compare.strategies = "e2e,local,pairwise,3wise,pairwise:sum,3wise:sum"
    c.compare.seeds = "0,1"


VARIANTS: dict[str, common.Variant] = {
    "long": long_comparison,
    "long_deep": long_deep_comparison,
    "long_block_heads": long_block_heads_comparison,
}
