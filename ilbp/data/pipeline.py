"""Deterministic, resumable, process-sharded batching over random-access sources.

Global step s of an iterator with global batch size B over N examples:
  epoch e = s // steps_per_epoch, position j = s % steps_per_epoch;
  the global batch is order_e[j*B : (j+1)*B], where order_e is arange(N) or, when
  shuffling, arange(N) sorted by hash(seed, e, index) (a seeded per-epoch permutation);
  JAX process p of P takes rows [p*B/P, (p+1)*B/P) of it.
So batch s is a pure function of (seed, s): any step is computed directly (`batch_at`),
a run resumed at `start_step` sees exactly the batches an uninterrupted run would, and
the P process shards of a step are disjoint and together form the single-process batch.
Augmentation draws from hash(seed, e, example index), so it is unaffected by resuming
or by the number of processes.

drop_remainder=True: steps_per_epoch = N // B, every batch full, no extra keys.
drop_remainder=False: steps_per_epoch = ceil(N / B); the last batch of an epoch is
zero-padded, and every batch carries "mask" float32 [b] (1 = real example) and "weights"
(the source's weights times the mask, broadcast over per-token axes; created from the
mask if the source has none) so losses ignore padding. Keys are the same in every batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from ilbp.data.augment import AugmentFn, get_augment, hash_words

_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 2


def _fetch(source: Any, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Stacked examples; uses the source's vectorized `getitems` when it has one."""
    if hasattr(source, "getitems"):
        return source.getitems(indices)
    examples = [source[int(i)] for i in indices]
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


class BatchIterator:
    """Iterator of numpy batch dicts (see the module docstring for the exact semantics).

    Attributes:
      step: global step of the next batch `next()` returns (save it to resume).
      steps_per_epoch: global steps in one pass over the source.
      num_steps: total steps, or None when repeating forever.
      local_batch_size: rows per process (batch_size / process_count).
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        augment: str | AugmentFn | None = None,
        drop_remainder: bool = True,
        start_step: int = 0,
        shard_by_process: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if shard_by_process:
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        else:
            process_index, process_count = 0, 1
        if batch_size % process_count:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by {process_count} processes"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.source = source
        self.num_examples = len(source)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.seed = seed
        self.shuffle = shuffle
        self.augment = get_augment(augment)
        self.drop_remainder = drop_remainder
        self.process_index = process_index
        self.steps_per_epoch = (
            self.num_examples // batch_size
            if drop_remainder
            else -(-self.num_examples // batch_size)
        )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_examples} examples make no batch of {batch_size} "
                "(use drop_remainder=False or a smaller batch)"
            )
        self.num_steps = None if num_epochs is None else num_epochs * self.steps_per_epoch
        self.step = start_step
        self._order_epoch, self._order = -1, np.arange(0)

    def order(self, epoch: int) -> np.ndarray:
        """The example order of `epoch` (int64 [N]); cached for the current epoch."""
        if epoch != self._order_epoch:
            index = np.arange(self.num_examples)
            if self.shuffle:
                keys = hash_words(self.seed, _SHUFFLE_STREAM, epoch, index)
                index = np.argsort(keys, kind="stable")
            self._order_epoch, self._order = epoch, index
        return self._order

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of global step `step`: dict of [local_batch_size, ...]."""
        epoch, j = divmod(step, self.steps_per_epoch)
        rows = np.arange(self.local_batch_size) + (
            j * self.batch_size + self.process_index * self.local_batch_size
        )
        real = rows < self.num_examples
        order = self.order(epoch)
        indices = order[rows[real]]
        # A process whose rows are all padding still needs arrays of the right shapes.
        batch = _fetch(self.source, indices if len(indices) else order[:1])
        if self.augment is not None and len(indices):
            words = hash_words(self.seed, _AUGMENT_STREAM, epoch, indices)
            batch = self.augment(batch, words)
        if self.drop_remainder:
            return batch
        return _pad_with_mask(batch, real)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_steps is not None and self.step >= self.num_steps:
            raise StopIteration
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an iterator that repeats forever has no length")
        return max(self.num_steps - self.step, 0)


def _pad_with_mask(batch: dict[str, np.ndarray], real_B: np.ndarray) -> dict[str, np.ndarray]:
    """Zero-pads rows to len(real_B) and adds "mask" [B] and padding-aware "weights"."""
    size, count = len(real_B), int(real_B.sum())
    out = {}
    for key, value in batch.items():
        padded = np.zeros((size, *value.shape[1:]), value.dtype)
        padded[:count] = value[:count]
        out[key] = padded
    mask_B = real_B.astype(np.float32)
    out["mask"] = mask_B
    if "weights" in out:
        w = out["weights"]
        out["weights"] = (w * mask_B.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
    elif "targets" in out:  # per-token losses: weights over [B, T, ...]
        out["weights"] = np.broadcast_to(
            mask_B.reshape(-1, *([1] * (out["targets"].ndim - 1))), out["targets"].shape
        ).astype(np.float32)
    else:
        out["weights"] = mask_B
    return out


def batches(
    source: Any,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    augment: str | AugmentFn | None = None,
    drop_remainder: bool = True,
    start_step: int = 0,
    shard_by_process: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """Training batches: a deterministic, resumable iterator over `source`.

    Args:
      source: random-access examples (`__len__`, `__getitem__` -> dict of arrays;
        optional vectorized `getitems(indices)`), e.g. from `make_split`.
      batch_size: *global* batch size B (all processes together); each process gets
        B / process_count rows.
      seed: shuffling and augmentation seed.
      shuffle: reshuffle every epoch (seeded by (seed, epoch)).
      num_epochs: passes over the data; None repeats forever.
      augment: None, a name ("crop_flip", "crop", "flip") or an `AugmentFn`, drawn per
        (seed, epoch, example index).
      drop_remainder: see the module docstring (False pads and adds "mask"/"weights").
      start_step: global step to start at (resume: the saved `iterator.step`).
      shard_by_process: split each global batch over JAX processes.
      process_index, process_count: override jax.process_index()/process_count().

    Returns:
      A BatchIterator yielding {key: np.ndarray [B / process_count, ...]}.
    """
    return BatchIterator(
        source,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        augment=augment,
        drop_remainder=drop_remainder,
        start_step=start_step,
        shard_by_process=shard_by_process,
        process_index=process_index,
        process_count=process_count,
    )


def eval_batches(
    source: Any,
    batch_size: int,
    *,
    shard_by_process: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """One in-order pass over every example; the last batch zero-padded with "mask" 0.

    Every batch has "mask" float32 [b] and "weights" (see the module docstring); sum
    metrics weighted by them for exact totals over the split.
    """
    return BatchIterator(
        source,
        batch_size,
        seed=0,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        shard_by_process=shard_by_process,
        process_index=process_index,
        process_count=process_count,
    )
