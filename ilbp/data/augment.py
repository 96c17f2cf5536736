"""Counter-based randomness and per-example image augmentation.

Every random choice in the pipeline is a pure function of integers (seed, stream, epoch,
example index) through a SplitMix64-style hash, computed here in numpy. So it does not
depend on numpy's generator streams, on batch composition, or on how many processes
share the work: a resumed or re-sharded run sees bitwise the same examples.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# An augmentation maps a batch dict (leading axis B) and B uint64 random words, one per
# example, to the augmented batch dict.
AugmentFn = Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


def hash_words(*parts: int | np.ndarray) -> np.ndarray:
    """uint64 hash of integer arguments, broadcast elementwise (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        h = np.zeros((), np.uint64)
        for part in parts:
            h = _mix(h ^ np.asarray(part).astype(np.uint64))
    return np.asarray(h)


def random_crop_flip(pad: int = 4, crop: bool = True, flip: bool = True) -> AugmentFn:
    """Random crop of a zero-padded image (pad pixels per side) and horizontal flip.

    Works on batch["inputs"] of shape BxHxWxC (already normalized, so zero padding is
    padding with the dataset mean). Other keys pass through.
    """
    span = 2 * pad + 1

    def augment(batch: dict[str, np.ndarray], words_B: np.ndarray) -> dict[str, np.ndarray]:
        x_BxHxWxC = batch["inputs"]
        _, h, w, _ = x_BxHxWxC.shape
        out = np.empty_like(x_BxHxWxC)
        dy_B = (words_B % np.uint64(span)).astype(np.int64)
        dx_B = ((words_B >> np.uint64(16)) % np.uint64(span)).astype(np.int64)
        flip_B = ((words_B >> np.uint64(32)) & np.uint64(1)).astype(bool)
        if crop and pad:
            src = np.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        else:
            src, dy_B, dx_B = x_BxHxWxC, np.zeros_like(dy_B), np.zeros_like(dx_B)
        for b in range(x_BxHxWxC.shape[0]):
            img = src[b, dy_B[b] : dy_B[b] + h, dx_B[b] : dx_B[b] + w]
            out[b] = img[:, ::-1] if flip and flip_B[b] else img
        return {**batch, "inputs": out}

    return augment


_NAMED: dict[str, Callable[[], AugmentFn]] = {
    "crop_flip": lambda: random_crop_flip(4),
    "crop": lambda: random_crop_flip(4, flip=False),
    "flip": lambda: random_crop_flip(0, crop=False),
}


def get_augment(augment: str | AugmentFn | None) -> AugmentFn | None:
    """Resolves an augmentation: None/"none", "crop_flip" (pad 4), "crop", "flip", or a fn."""
    if augment is None or callable(augment):
        return augment
    if augment == "none":
        return None
    if augment not in _NAMED:
        raise ValueError(f"Unknown augmentation {augment!r}; known: none, {', '.join(_NAMED)}")
    return _NAMED[augment]()
