"""Byte-level language-model data from local text files.

Tokens are raw bytes (vocab 256, nothing reserved). The files of a split are read in
sorted order and concatenated into one token stream; example i is the window
stream[i*T : i*T + T + 1] with inputs = window[:-1], targets = window[1:], so consecutive
windows overlap by one token and every transition in the stream is a target exactly once.

Validation files are chosen by a hash of each file's path relative to the glob's root
(crc32 mod `holdout_mod` == 0, i.e. about 1/20 by default): deterministic, independent of
where the tree lives, and stable when unrelated files are added. A single file is split
by position instead (its last 1/holdout_mod of bytes).
"""

from __future__ import annotations

import functools
import os
import re
import zlib

import numpy as np

from ilbp.data.spec import DataMissingError, DatasetInfo, stdlib_dir

BYTE_VOCAB = 256
_MAGIC = re.compile(r"[*?\[]")


def _glob_root(pattern: str) -> str:
    """The longest leading directory of `pattern` without glob magic."""
    parts = pattern.split("/")
    keep = []
    for part in parts[:-1]:
        if _MAGIC.search(part):
            break
        keep.append(part)
    return "/".join(keep) or ("/" if pattern.startswith("/") else ".")


def _glob_regex(pattern: str) -> re.Pattern:
    """Regex for a glob where `**/` spans zero or more directories, `*` and `?` one name."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def list_files(pattern: str, exclude: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """(root, sorted paths relative to root) of regular files matching `pattern`.

    A directory means every file under it. Hidden files and directories (leading ".")
    and directories named in `exclude` are skipped (pruned, so a large site-packages
    costs nothing).
    """
    pattern = os.path.normpath(os.path.expanduser(pattern))
    if os.path.isfile(pattern):
        return os.path.dirname(pattern) or ".", [os.path.basename(pattern)]
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    root = _glob_root(pattern)
    regex = _glob_regex(pattern)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in exclude and not d.startswith(".")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            path = os.path.normpath(path)
            if not name.startswith(".") and regex.match(path) and os.path.isfile(path):
                found.append(os.path.relpath(path, root))
    return root, sorted(found)


def is_heldout(relpath: str, holdout_mod: int = 20) -> bool:
    """Whether a file belongs to the validation split."""
    return zlib.crc32(relpath.encode("utf-8", "surrogateescape")) % holdout_mod == 0


def missing_message(pattern: str) -> str:
    """How to fix a text glob that matches nothing."""
    if pattern.startswith(stdlib_dir()):
        return (
            f"No standard-library sources match {pattern!r}: this Python was installed "
            "without its .py files. Install them (e.g. `sudo apt-get install "
            "libpython3-stdlib` or a full python.org/pyenv build), or use "
            "--config.dataset=text:GLOB with local text files."
        )
    return (
        f"No files match {pattern!r}. Use --config.dataset=text:GLOB with a glob of local "
        "text files (quote it; `**` spans directories), e.g. text:'~/corpus/**/*.txt', "
        "or the default corpus --config.dataset=stdlib."
    )


@functools.lru_cache(maxsize=4)
def read_split(
    pattern: str, split: str, exclude: tuple[str, ...] = (), holdout_mod: int = 20
) -> tuple[np.ndarray, tuple[str, ...]]:
    """(uint8 token stream, relative file names) of one split of the files matching pattern.

    Raises DataMissingError when nothing matches, ValueError for an unknown split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"text split must be 'train' or 'test', got {split!r}")
    root, files = list_files(pattern, exclude)
    if not files:
        raise DataMissingError(missing_message(pattern))
    if len(files) == 1:
        data = _read(root, files)
        cut = len(data) - len(data) // holdout_mod
        return (data[:cut] if split == "train" else data[cut:]), tuple(files)
    held = [f for f in files if is_heldout(f, holdout_mod)]
    if not held:  # tiny trees: still hold out one file, the one whose hash is smallest
        held = [min(files, key=lambda f: zlib.crc32(f.encode("utf-8", "surrogateescape")))]
    if len(held) == len(files):
        held = held[:1]
    chosen = held if split == "test" else [f for f in files if f not in set(held)]
    return _read(root, chosen), tuple(chosen)


def _read(root: str, files: list[str]) -> np.ndarray:
    chunks = []
    for name in files:
        with open(os.path.join(root, name), "rb") as f:
            chunks.append(f.read())
    return np.frombuffer(b"".join(chunks), np.uint8)


class TextWindows:
    """Random-access LM examples over a token stream (see the module docstring).

    Examples: {"inputs": int32 T, "targets": int32 T}. Grain-compatible.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int = BYTE_VOCAB):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.info = DatasetInfo(
            kind="text",
            example_shape=(seq_len,),
            vocab_size=vocab_size,
            token_bytes=1.0 if vocab_size == BYTE_VOCAB else 0.0,
        )
        if len(self) == 0:
            raise ValueError(f"{len(tokens)} tokens are too few for one window of {seq_len + 1}")

    def __len__(self) -> int:
        return max(len(self.tokens) - 1, 0) // self.seq_len

    def getitems(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Batch of windows at `indices` [B]: inputs and targets int32 [B, T]."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"window index out of range [0, {len(self)})")
        pos_BxT1 = indices[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        window_BxT1 = self.tokens[pos_BxT1].astype(np.int32)
        return {"inputs": window_BxT1[:, :-1], "targets": window_BxT1[:, 1:]}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.getitems(np.asarray([index])).items()}


def text_windows(
    pattern: str,
    split: str = "train",
    seq_len: int = 256,
    exclude: tuple[str, ...] = (),
    holdout_mod: int = 20,
) -> TextWindows:
    """Byte-level LM source over the files matching `pattern` (see the module docstring)."""
    tokens, _ = read_split(pattern, split, tuple(exclude), holdout_mod)
    return TextWindows(tokens, seq_len)
