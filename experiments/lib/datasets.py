"""Config -> data: the dataset's splits and the augmentation of training batches."""

from __future__ import annotations

from typing import Any

import ml_collections

from ilbp import data


def build_data(config: ml_collections.ConfigDict, split: str) -> Any:
    """A random-access source of `split`; raises ilbp.data.DataMissingError if absent and
    ValueError naming the dataset (and seq_len for text) if it cannot be used."""
    try:
        return data.make_split(
            config.dataset,
            split,
            seq_len=int(config.seq_len),
            image_size=config.image_size,
            data_dir=config.data_dir,
        )
    except ValueError as e:
        text = data.parse_dataset(config.dataset).kind == "text"
        seq_len = f", seq_len={config.seq_len}" if text else ""
        raise ValueError(f"config.dataset={config.dataset!r}{seq_len} ({split}): {e}") from e


def train_augment(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> str | None:
    """The augmentation of training batches ("default": the dataset's usual one)."""
    if config.augment == "default":
        return info.default_augment
    return None if config.augment in ("none", "", None) else config.augment
