"""IDX (MNIST-format) files: a small numpy reader/writer and an image source.

IDX layout: two zero bytes, a dtype code, the number of dims D, then D big-endian uint32
sizes and the big-endian data. Images are magic 0x00000803 (uint8 NxHxW), labels
0x00000801 (uint8 N). Files may be gzip-compressed (detected by content, not by name).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from ilbp.data.spec import DEFAULT_IDX_DIR, DataMissingError, DatasetInfo

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}
# File stems per split; some distributions write "train-images.idx3-ubyte".
_STEMS = {"train": ("train",), "test": ("t10k", "test")}


def parse_idx(raw: bytes) -> np.ndarray:
    """Decodes IDX bytes (raw or gzip) to a native-endian array of the stored shape."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _DTYPES:
        raise ValueError(f"not an IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    dtype = np.dtype(_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"IDX size mismatch: header {shape} vs {len(raw) - offset} data bytes")
    return np.frombuffer(raw, dtype, count, offset).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (gzip or raw); ValueError naming `path` if it is not one."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return parse_idx(raw)
    except (ValueError, OSError, EOFError) as e:  # gzip raises OSError/EOFError
        raise ValueError(f"{path}: {e}") from e


def write_idx(path: str, array: np.ndarray, compress: bool | None = None) -> None:
    """Writes `array` as IDX; gzip when `compress`, or by default when path ends in .gz."""
    array = np.asarray(array)
    code = _CODES[array.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + array.astype(_DTYPES[code]).tobytes()
    if compress if compress is not None else path.endswith(".gz"):
        raw = gzip.compress(raw, mtime=0)
    with open(path, "wb") as f:
        f.write(raw)


def find_idx_files(directory: str, split: str) -> tuple[str, str] | None:
    """(images path, labels path) for split "train"/"test" in directory, or None."""
    found = []
    for kind, ndim in (("images", 3), ("labels", 1)):
        names = [
            f"{stem}-{kind}{sep}idx{ndim}-ubyte{ext}"
            for stem in _STEMS[split]
            for sep in ("-", ".")
            for ext in (".gz", "")
        ]
        paths = [
            os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))
        ]
        if not paths:
            return None
        found.append(paths[0])
    return found[0], found[1]


def missing_message(directory: str, split: str) -> str:
    """How to get the IDX files that are not in `directory`."""
    want = (
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
    )
    msg = f"No IDX {split} split in {directory!r} (expected {want})."
    if os.path.normpath(directory) == os.path.normpath(DEFAULT_IDX_DIR):
        msg += (
            " Install Fashion-MNIST with `sudo apt-get update && sudo apt-get install "
            "dataset-fashion-mnist`, or point --config.dataset=idx:DIR at another directory."
        )
    else:
        msg += " Copy an MNIST-format data set there, or use --config.dataset=idx:DIR."
    return msg


class ArraySource:
    """Random-access source over in-memory arrays sharing a leading axis N.

    Grain-compatible (`__len__`, `__getitem__`); `getitems(indices)` is the vectorized
    batch path the pipeline prefers. `transform` maps a stacked batch dict to the
    example format (e.g. uint8 -> normalized float32), so memory holds the compact form.
    """

    def __init__(self, arrays: dict[str, np.ndarray], info: DatasetInfo, transform=None):
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"arrays disagree on length: {sizes}")
        self.arrays = arrays
        self.info = info
        self._transform = transform or (lambda b: b)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def getitems(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Batch of examples at `indices` (shape [B]) as a dict of [B, ...] arrays."""
        indices = np.asarray(indices, np.int64)
        return self._transform({k: a[indices] for k, a in self.arrays.items()})

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.getitems(np.asarray([index])).items()}


def idx_images(directory: str, split: str = "train") -> ArraySource:
    """Image source over an IDX directory.

    Examples: {"inputs": float32 HxWx1, "label": int32}. Pixels are scaled to [0, 1] and
    standardized with the mean and std of the directory's *training* images (one scalar
    each; for Fashion-MNIST ≈ 0.286 and 0.353), so both splits share one normalization.
    Raises DataMissingError naming the fix when the files are absent.
    """
    if split not in _STEMS:
        raise ValueError(f"IDX split must be 'train' or 'test', got {split!r}")
    paths = find_idx_files(directory, split)
    train_paths = find_idx_files(directory, "train")
    if paths is None or train_paths is None:
        raise DataMissingError(missing_message(directory, split if paths is None else "train"))
    images = read_idx(paths[0])
    labels = read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"IDX shapes {images.shape} / {labels.shape} of {paths[0]} / {paths[1]} are "
            "not NxHxW / N"
        )
    train_images = images if split == "train" else read_idx(train_paths[0])
    train_labels = labels if split == "train" else read_idx(train_paths[1])
    mean, std = _pixel_stats(train_images)

    def transform(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = (batch["inputs"].astype(np.float32) / 255.0 - mean) / std
        return {"inputs": x[..., None], "label": batch["label"].astype(np.int32)}

    info = DatasetInfo(
        kind="image",
        example_shape=(*images.shape[1:], 1),
        num_classes=int(train_labels.max(initial=0)) + 1,
    )
    return ArraySource({"inputs": images, "label": labels}, info, transform)


def _pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of images/255 from a byte histogram (exact, no float copy of the set)."""
    counts = np.zeros(256, np.int64)
    flat = images.reshape(len(images), -1)
    for start in range(0, len(flat), 4096):
        counts += np.bincount(flat[start : start + 4096].ravel(), minlength=256)
    values = np.arange(256) / 255.0
    mean = float(counts @ values / counts.sum())
    std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    return mean, std or 1.0
