"""Dataset specs (`--config.dataset=...`), source metadata, and the missing-data error.

Spec strings:
  idx:DIR     MNIST-format IDX files in DIR (gzip or raw); `idx` alone is Fashion-MNIST at
              /usr/share/datasets/fashion-mnist (Debian package `dataset-fashion-mnist`).
  text:GLOB   byte-level LM over local files matching GLOB (`**` spans directories).
  stdlib      text: the running interpreter's standard-library `.py` sources.
  tfds:NAME   a prepared TFDS dataset read through `tfds.data_source` (array_record).
  NAME        same as tfds:NAME (e.g. cifar10, cifar100, imagenet2012, lm1b).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sysconfig
from typing import Literal

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
# Directories left out of the stdlib corpus: installed third-party packages are neither
# the standard library nor the same from one machine to the next.
STDLIB_EXCLUDE = ("site-packages", "dist-packages", "__pycache__")

Kind = Literal["idx", "text", "tfds"]


class DataMissingError(FileNotFoundError):
    """The data a spec names is not on this machine; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec.

    Attributes:
      kind: "idx", "text" or "tfds".
      name: "idx", "text", "stdlib", or the TFDS name (with optional "/config:version").
      path: the IDX directory or the text glob; None for TFDS.
      exclude: directory names skipped while matching a text glob.
    """

    kind: Kind
    name: str
    path: str | None = None
    exclude: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a split's examples.

    Attributes:
      kind: "image" (examples {"inputs": f32 HxWxC, "label": i32}) or "text" (examples
        {"inputs": i32 T, "targets": i32 T}, plus "weights": f32 T where padding exists).
      num_classes: label count (image) or 0.
      vocab_size: token count (text) or 0.
      example_shape: shape of one example's "inputs".
      default_augment: augmentation the dataset is usually trained with (see
        `ilbp.data.augment.get_augment`), or None.
      token_bytes: bytes of text per token (1.0 for byte-level text), for bits per
        byte; 0.0 where unknown (images, subword tokenizers).
    """

    kind: Literal["image", "text"]
    example_shape: tuple[int, ...]
    num_classes: int = 0
    vocab_size: int = 0
    default_augment: str | None = None
    token_bytes: float = 0.0


def stdlib_dir() -> str:
    """The running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_glob() -> str:
    """Glob of the default text corpus: every `.py` file of the standard library.

    Use with `exclude=STDLIB_EXCLUDE` (as `parse_dataset("stdlib")` does) so installed
    packages under site-packages are not part of it.
    """
    return os.path.join(stdlib_dir(), "**", "*.py")


_TFDS_NAME = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9.*]+)?$")


def parse_dataset(spec: str | DatasetSpec) -> DatasetSpec:
    """Parses a `--config.dataset` string (see the module docstring); cheap, no I/O."""
    if isinstance(spec, DatasetSpec):
        return spec
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    if spec in ("idx", "idx:"):
        return DatasetSpec("idx", "idx", DEFAULT_IDX_DIR)
    if sep and prefix == "idx":
        return DatasetSpec("idx", "idx", os.path.expanduser(rest))
    if sep and prefix == "text":
        if not rest:
            raise ValueError("text:GLOB needs a glob, e.g. text:'~/corpus/**/*.txt'")
        return DatasetSpec("text", "text", os.path.expanduser(rest))
    if spec == "stdlib":
        return DatasetSpec("text", "stdlib", stdlib_glob(), STDLIB_EXCLUDE)
    name = rest if sep and prefix == "tfds" else spec
    if not _TFDS_NAME.match(name):
        raise ValueError(
            f"Unknown dataset spec {spec!r}: expected idx:DIR, text:GLOB, stdlib, "
            "or a TFDS name such as cifar10 (optionally tfds:NAME)."
        )
    return DatasetSpec("tfds", name)
