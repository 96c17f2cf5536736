"""Data for ilbp experiments: offline sources and a deterministic, resumable pipeline.

    spec = parse_dataset("idx")                 # or "idx:DIR", "text:GLOB", "stdlib", "cifar10"
    train = make_split(spec, "train")           # random access: len(train), train[i] -> dict
    it = batches(train, 128, seed=0, augment=train.info.default_augment, start_step=step)
    for batch in eval_batches(make_split(spec, "test"), 1000): ...   # padded, with "mask"

Examples are dicts of numpy arrays:
  images: {"inputs": float32 HxWxC (standardized), "label": int32}
  text:   {"inputs": int32 T, "targets": int32 T} (+ "weights" float32 T for lm1b)
Every source has `.info` (an `ilbp.data.DatasetInfo`). Missing data raises
`DataMissingError` (a FileNotFoundError) whose message says how to get it; nothing ever
downloads.
"""

from __future__ import annotations

from typing import Any

from ilbp.data.augment import get_augment, hash_words, random_crop_flip
from ilbp.data.idx import ArraySource, idx_images, read_idx, write_idx
from ilbp.data.pipeline import BatchIterator, batches, eval_batches
from ilbp.data.spec import (
    DEFAULT_IDX_DIR,
    DataMissingError,
    DatasetInfo,
    DatasetSpec,
    parse_dataset,
    stdlib_glob,
)
from ilbp.data.text import BYTE_VOCAB, TextWindows, text_windows


def make_split(
    spec: str | DatasetSpec,
    split: str = "train",
    *,
    seq_len: int = 256,
    image_size: int | None = None,
    data_dir: str | None = None,
    holdout_mod: int = 20,
    tokenizer: str = "byte",
) -> Any:
    """Random-access source of one split ("train" or "test") of a dataset spec.

    Args:
      spec: a `parse_dataset` string or DatasetSpec.
      split: "train" or "test" (TFDS also takes its own split strings).
      seq_len: T for text examples.
      image_size: resize TFDS images to this square size (default: native; 224 for
        variable-size sets such as imagenet2012).
      data_dir: TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
      holdout_mod: text files with crc32(path) % holdout_mod == 0 are the test split.
      tokenizer: "byte" or "spm:MODEL_PATH" (TFDS text only; needs `sentencepiece`).

    Returns:
      A grain-compatible source (`__len__`, `__getitem__` -> example dict) with `.info`.

    Raises:
      DataMissingError: the data is not on this machine (message says how to get it).
    """
    spec = parse_dataset(spec)
    if spec.kind == "idx":
        return idx_images(spec.path, split)
    if spec.kind == "text":
        return text_windows(spec.path, split, seq_len, spec.exclude, holdout_mod)
    from ilbp.data.tfds_sources import tfds_split

    return tfds_split(
        spec.name,
        split,
        data_dir=data_dir,
        seq_len=seq_len,
        image_size=image_size,
        tokenizer=tokenizer,
    )


__all__ = [
    "BYTE_VOCAB",
    "DEFAULT_IDX_DIR",
    "ArraySource",
    "BatchIterator",
    "DataMissingError",
    "DatasetInfo",
    "DatasetSpec",
    "TextWindows",
    "batches",
    "eval_batches",
    "get_augment",
    "hash_words",
    "idx_images",
    "make_split",
    "parse_dataset",
    "random_crop_flip",
    "read_idx",
    "stdlib_glob",
    "text_windows",
    "write_idx",
]
