"""Deterministic, resumable, process-sharded batching over random-access sources (grain).

Global step s of an iterator with global batch size B over N examples:
  epoch e = s // steps_per_epoch, position j = s % steps_per_epoch;
  the global batch is order_e[j*B : (j+1)*B], where order_e is arange(N) or, when
  shuffling, grain's seeded permutation of epoch e (a new one every epoch);
  shard p of P takes rows [p*B/P, (p+1)*B/P) of it; split into M microbatches
  (`microbatches`, consecutive blocks of b = B/M rows), shard p takes rows
  [p*b/P, (p+1)*b/P) of every microbatch, microbatch after microbatch (the rows that
  data shard p holds after a B -> M × b reshape; M = 1 is the contiguous block).
So batch s is a pure function of (seed, s): any step is computed directly (`batch_at`),
a run resumed at `start_step` sees exactly the batches an uninterrupted run would, and
the P shards of a step are disjoint and, interleaved back (concatenated when M = 1),
are the single-process batch, row order included, so microbatches are the same whatever
the process count.
Augmentation draws from hash(seed, e, example index), so it is unaffected by resuming,
by prefetching or by the number of processes.

drop_remainder=True: steps_per_epoch = N // B, every batch full, no extra keys.
drop_remainder=False: steps_per_epoch = ceil(N / B); the last batch of an epoch is
zero-padded, and every batch carries "mask" float32 [rows] (1 = real example) and
"weights" (the source's weights times the mask, broadcast over per-token axes; created from the
mask if the source has none) so losses ignore padding. Keys are the same in every batch.

The batches are a grain map dataset (element s = this shard's batch of step s):
  MapDataset.range(N).shuffle(seed')   example order; grain carries the epoch in the index
  [:L] or concatenate(padding)         L = steps_per_epoch * B slots per epoch
  .batch(B/(M·P))[p::P].batch(M)       rows [p*b/P, (p+1)*b/P) of each microbatch,
  .map(np.ravel)                       as one array of keys [B/P]
  .repeat(num_epochs)                  epoch after epoch, each reshuffled
  .map_with_index(fetch, augment, pad)
Only this shard's rows are fetched from the source. Iteration reads ahead with grain's
thread prefetch (`prefetch`) or worker processes (`mp_prefetch`, `worker_count`).

Kept by hand, because grain's versions would break a guarantee above:
- Where the shard is cut. grain's samplers and `ShardByJaxProcess` slicing split the
  *examples* (contiguous or strided ranges), which makes the global batch and its row
  order depend on the process count. Here the `[p::P]` slice of pieces of b/P rows
  selects rows of each global batch instead.
- The shuffle seed: grain seeds epoch e with seed + e, so seed s's epoch 1 would be seed
  s+1's epoch 0; seed' = hash(seed) decorrelates runs with consecutive seeds.
- Augmentation randomness (`hash_words`) instead of `random_map`: augmentations are
  vectorized over a batch and keyed by the example, not by its position in a dataset.
- The padding mask (`_pad_with_mask`): grain's padded batching has no mask and does not
  know per-token weights.
- The resume state is the step (`dataset[step:]`), not grain's iterator state: it is the
  same on every process and independent of the prefetch workers and the process count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from absl import flags

from ilbp.data.augment import AugmentFn, get_augment, hash_words

_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 2
_PAD = -1  # key of a padding row


def _fetch(source: Any, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Stacked examples; uses the source's vectorized `getitems` when it has one."""
    if hasattr(source, "getitems"):
        return source.getitems(indices)
    examples = [source[int(i)] for i in indices]
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def _shard(shard_by_process: bool, index: int | None, count: int | None) -> tuple[int, int]:
    """(index, count) of this process's shard of every global batch; grain's
    ShardByJaxProcess (jax.process_index(), jax.process_count()) fills what is not given."""
    if not shard_by_process:
        return 0, 1
    if index is None or count is None:
        by_process = grain.sharding.ShardByJaxProcess()
        index = by_process.shard_index if index is None else index
        count = by_process.shard_count if count is None else count
    return index, count


@dataclasses.dataclass(frozen=True)
class _LoadBatch:
    """(global step, example keys [b] with _PAD for padding) -> the batch dict."""

    source: Any
    seed: int
    steps_per_epoch: int
    augment: AugmentFn | None
    pad: bool

    def __call__(self, step: int, keys_b: np.ndarray) -> dict[str, np.ndarray]:
        real_b = keys_b != _PAD
        indices = keys_b[real_b]
        # A shard whose rows are all padding still needs arrays of the right shapes.
        batch = _fetch(self.source, indices if len(indices) else np.zeros(1, np.int64))
        if self.augment is not None and len(indices):
            epoch = step // self.steps_per_epoch
            batch = self.augment(batch, hash_words(self.seed, _AUGMENT_STREAM, epoch, indices))
        return _pad_with_mask(batch, real_b) if self.pad else batch


class BatchIterator:
    """Iterator of numpy batch dicts (see the module docstring for the exact semantics).

    Attributes:
      dataset: grain.MapDataset; element s is this shard's batch of global step s.
      step: global step of the next batch `next()` returns (save it to resume; setting
        it moves the iterator).
      steps_per_epoch: global steps in one pass over the source.
      num_steps: total steps, or None when repeating forever.
      local_batch_size: rows per shard (batch_size / shard count).
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
        microbatches: int = 1,
        prefetch: int = 2,
        worker_count: int = 0,
    ):
        index, count = _shard(shard_by_process, process_index, process_count)
        if microbatches < 1 or batch_size % (count * microbatches):
            raise ValueError(
                f"batch_size {batch_size} is not divisible by {count} processes × "
                f"{microbatches} microbatches"
            )
        if not 0 <= index < count:
            raise ValueError(f"process_index {index} not in [0, {count})")
        self.source = source
        self.num_examples = len(source)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // count
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
        keys = _epoch_keys(self.num_examples, self.steps_per_epoch * batch_size, seed, shuffle)
        load = _LoadBatch(
            source, seed, self.steps_per_epoch, get_augment(augment), not drop_remainder
        )
        pieces = keys.batch(self.local_batch_size // microbatches)[index::count]
        self.dataset = (
            pieces.batch(microbatches).map(np.ravel).repeat(num_epochs).map_with_index(load)
        )
        self.num_steps = None if num_epochs is None else len(self.dataset)
        self._read_options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
        self._worker_count = worker_count
        self._iterator = None
        self.step = start_step

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, step: int) -> None:
        if self._iterator is not None:
            self._iterator.close()
        self._step, self._iterator = int(step), None

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This shard's batch of global step `step`: dict of [local_batch_size, ...]."""
        return self.dataset[step]

    def _start(self) -> grain.DatasetIterator:
        ds = self.dataset[self._step :].to_iter_dataset(self._read_options)
        if self._worker_count:
            if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside an app:
                flags.FLAGS.mark_as_parsed()  # their defaults
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
        return iter(ds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_steps is not None and self._step >= self.num_steps:
            raise StopIteration
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self._step += 1
        return batch

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an iterator that repeats forever has no length")
        return max(self.num_steps - self.step, 0)

    def close(self) -> None:
        """Stops the read-ahead threads or workers (also done when garbage-collected)."""
        self.step = self._step


def _epoch_keys(num_examples: int, slots: int, seed: int, shuffle: bool) -> grain.MapDataset:
    """Example index of each of an epoch's `slots` rows: the epoch's order, cut to `slots`
    or followed by _PAD rows. Index e*slots + r is row r of epoch e (grain map datasets
    pass the epoch on to their parents, so the shuffle draws a new order per epoch)."""
    keys = grain.MapDataset.range(num_examples)
    if shuffle:
        keys = keys.shuffle(seed=int(hash_words(seed, _SHUFFLE_STREAM) % np.uint64(2**32)))
    if slots <= num_examples:
        return keys[:slots]
    padding = grain.MapDataset.source(np.full(slots - num_examples, _PAD, np.int64))
    return grain.MapDataset.concatenate([keys, padding])


def _pad_with_mask(batch: dict[str, np.ndarray], real_B: np.ndarray) -> dict[str, np.ndarray]:
    """Zero-pads rows to len(real_B) and adds "mask" [B] and padding-aware "weights"."""
    size, count = len(real_B), int(real_B.sum())
    out = {}
    for key, value in batch.items():  # a shard's rows ascend: its real rows come first
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
    microbatches: int = 1,
    prefetch: int = 2,
    worker_count: int = 0,
) -> BatchIterator:
    """Training batches: a deterministic, resumable iterator over `source`.

    Args:
      source: random-access examples (`__len__`, `__getitem__` -> dict of arrays;
        optional vectorized `getitems(indices)`), e.g. from `make_split`.
      batch_size: *global* batch size B (all shards together); each shard gets
        B / process_count rows.
      seed: shuffling and augmentation seed.
      shuffle: reshuffle every epoch (seeded by (seed, epoch)).
      num_epochs: passes over the data; None repeats forever.
      augment: None, a name ("crop_flip", "crop", "flip") or an `AugmentFn`, drawn per
        (seed, epoch, example index).
      drop_remainder: see the module docstring (False pads and adds "mask"/"weights").
      start_step: global step to start at (resume: the saved `iterator.step`).
      shard_by_process: split each global batch into shards, one per process.
      process_index, process_count: this process's shard and the number of shards
        (default jax.process_index()/process_count(); on a mesh whose stage axis spans
        processes, `ilbp.mesh.process_batch_shard(mesh)`).
      microbatches: M; a shard is its rows of each of the M microbatches (module
        docstring): the rows a data shard holds after the spmd executor's B -> M × b
        split (`SPMDExecutor.place`). No effect with one shard.
      prefetch: batches read ahead by as many background threads (0: on demand).
      worker_count: read in this many worker processes instead (grain `mp_prefetch`;
        the source must be picklable by cloudpickle).

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
        microbatches=microbatches,
        prefetch=prefetch,
        worker_count=worker_count,
    )


def eval_batches(
    source: Any,
    batch_size: int,
    *,
    shard_by_process: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
) -> BatchIterator:
    """One in-order pass over every example; the last batch zero-padded with "mask" 0.

    Every batch has "mask" float32 [b] and "weights" (see the module docstring); sum
    metrics weighted by them for exact totals over the split. Over all steps and shards
    every example appears exactly once (a shard's rows of the last step may all be
    padding), and every shard runs the same number of steps.
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
        prefetch=prefetch,
    )
