"""TFDS datasets through `tfds.data_source` (array_record; works without TensorFlow).

Nothing here downloads: the builder is opened with the given (or default) data_dir and
`as_data_source` only reads prepared files. An unprepared dataset raises
DataMissingError saying how to prepare it.

Images: {"inputs": float32 HxWxC, "label": int32}, pixels /255 then standardized per
channel with the dataset's usual mean/std (`IMAGE_STATS`; 0.5/0.5 for unknown sets).
Variable-size images (ImageNet) are resized (shorter side to image_size/0.875) and center-cropped to
image_size in the source, so the pipeline's augmentations only see fixed-size arrays.

Text (lm1b and any dataset with a "text" feature): one example per record, tokens =
"\\n" + the UTF-8 bytes (the newline stands for "start of sentence", so the first byte
is predicted too), truncated or zero-padded to T + 1, inputs = [:-1], targets = [1:],
"weights" float32 T = 1 on real targets. With tokenizer="spm:MODEL" a SentencePiece
model is used instead (BOS id prepended), if the `sentencepiece` package is installed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ilbp.data.spec import DataMissingError, DatasetInfo
from ilbp.data.text import BYTE_VOCAB

IMAGE_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}
# ImageNet gets flips only: its random-resized crops would need the undecoded image.
DEFAULT_AUGMENT = {"cifar10": "crop_flip", "cifar100": "crop_flip", "imagenet2012": "flip"}
# Our split names -> TFDS split names where they differ.
SPLIT_NAMES = {"imagenet2012": {"test": "validation"}}
LARGE_IMAGE_SIZE = 224


def _base_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


def not_prepared_message(name: str, data_dir: str | None) -> str:
    """How to prepare a TFDS dataset that is not on this machine."""
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return (
        f"TFDS dataset {name!r} is not prepared in {where!r} (nothing is downloaded at run "
        f"time). Prepare it on a machine with internet: `tfds build {_base_name(name)} "
        f"--file_format=array_record`, copy the data directory here, and set TFDS_DATA_DIR "
        "(or pass data_dir). Offline alternatives: --config.dataset=idx:DIR or text:GLOB."
    )


def open_tfds(name: str, split: str, data_dir: str | None = None) -> tuple[Any, Any]:
    """(builder, random-access source) for a prepared TFDS split; fails fast if missing."""
    import tensorflow_datasets as tfds  # heavy import, only when a TFDS set is asked for

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"{name!r} is neither a TFDS dataset nor a local spec (idx:DIR, text:GLOB, stdlib)."
        ) from e
    tfds_split = SPLIT_NAMES.get(_base_name(name), {}).get(split, split)
    try:
        # as_data_source reads prepared files only; it never downloads.
        return builder, builder.as_data_source(split=tfds_split)
    except Exception as e:
        if not builder.is_prepared():
            raise DataMissingError(not_prepared_message(name, data_dir)) from e
        raise


def _resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to size/0.875 (bicubic), then the central size x size crop."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / 0.875 / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((nw, nh), Image.BICUBIC)).reshape(nh, nw, -1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[top : top + size, left : left + size]


class TfdsImages:
    """Image classification examples from a TFDS data source (see the module docstring)."""

    def __init__(
        self,
        source: Any,
        name: str,
        num_classes: int,
        image_shape: tuple[int | None, ...],
        image_size: int | None = None,
    ):
        self.source = source
        channels = int(image_shape[-1] or 3)
        stats = IMAGE_STATS.get(_base_name(name))
        self.mean, self.std = stats or ((0.5,) * channels, (0.5,) * channels)
        if image_size is None and None in image_shape[:2]:
            image_size = LARGE_IMAGE_SIZE  # variable-size images must be made uniform
        self.image_size = image_size
        shape = (image_size, image_size, channels) if image_size else image_shape
        self.info = DatasetInfo(
            kind="image",
            example_shape=tuple(int(d) for d in shape),
            num_classes=num_classes,
            default_augment=DEFAULT_AUGMENT.get(_base_name(name)),
        )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        example = self.source[int(index)]
        image = np.asarray(example["image"], np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if self.image_size and image.shape[:2] != (self.image_size, self.image_size):
            image = _resize_center_crop(image, self.image_size)
        x = (image.astype(np.float32) / 255.0 - np.float32(self.mean)) / np.float32(self.std)
        return {"inputs": x.astype(np.float32), "label": np.int32(example["label"])}


def make_tokenizer(tokenizer: str) -> tuple[Any, int]:
    """(encode: str|bytes -> int array, vocab size) for "byte" or "spm:MODEL_PATH"."""
    if tokenizer == "byte":
        return (lambda text: np.frombuffer(b"\n" + _as_bytes(text), np.uint8)), BYTE_VOCAB
    if tokenizer.startswith("spm:"):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(
                "tokenizer='spm:...' needs the optional `sentencepiece` package "
                "(pip install sentencepiece); the default tokenizer='byte' needs nothing."
            ) from e
        sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer[4:])
        bos = max(sp.bos_id(), 0)
        encode = lambda text: np.asarray([bos, *sp.encode(_as_bytes(text).decode())], np.int32)
        return encode, int(sp.get_piece_size())
    raise ValueError(f"Unknown tokenizer {tokenizer!r}: use 'byte' or 'spm:MODEL_PATH'")


def _as_bytes(text: str | bytes | np.ndarray) -> bytes:
    if isinstance(text, np.ndarray):
        text = text.item()
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


class TfdsText:
    """Per-record LM examples from a TFDS text data source (see the module docstring)."""

    def __init__(self, source: Any, seq_len: int, tokenizer: str = "byte", key: str = "text"):
        self.source = source
        self.seq_len = seq_len
        self.key = key
        self._encode, vocab_size = make_tokenizer(tokenizer)
        self.info = DatasetInfo(kind="text", example_shape=(seq_len,), vocab_size=vocab_size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        tokens = self._encode(self.source[int(index)][self.key])[: self.seq_len + 1]
        window = np.zeros(self.seq_len + 1, np.int32)
        window[: len(tokens)] = tokens
        weights = (np.arange(self.seq_len) < len(tokens) - 1).astype(np.float32)
        return {"inputs": window[:-1], "targets": window[1:], "weights": weights}


def tfds_split(
    name: str,
    split: str = "train",
    *,
    data_dir: str | None = None,
    seq_len: int = 256,
    image_size: int | None = None,
    tokenizer: str = "byte",
) -> TfdsImages | TfdsText:
    """Source for a TFDS split: text if the dataset has a "text" feature, else images.

    `split` is "train", "test" (mapped to "validation" for imagenet2012) or any TFDS split
    string such as "train[:90%]".
    """
    builder, source = open_tfds(name, split, data_dir)
    features = builder.info.features
    if "text" in features:
        return TfdsText(source, seq_len, tokenizer)
    if "image" not in features or "label" not in features:
        raise ValueError(f"TFDS {name!r} has neither 'text' nor 'image'+'label' features")
    num_classes = int(features["label"].num_classes)
    return TfdsImages(source, name, num_classes, tuple(features["image"].shape), image_size)
