"""Normalisation layers and convolutional auxiliary heads described by a token string.

Aux-head grammar: a spec is tokens joined by "_", applied left to right to the stage
output h_BxHxWxC:

  convC   3x3 convolution, stride 1, SAME padding, to C channels (C a positive integer).
          Without bias when the next token is `bn` (the norm's shift makes it redundant).
  bn      the trunk's normalisation (BatchNorm or GroupNorm, as the model's `norm`),
          then ReLU.
  relu    ReLU alone.
  gbpl    global average pool over H and W: BxHxWxC -> BxC.
  fcN     dense layer to N units (N a positive integer), then ReLU.
  fc      dense layer to the number of classes: the logits. Must be the last token,
          and appears exactly once.

`fc`/`fcN` on an input of rank > 2 flatten every non-batch axis first. `conv`, `bn` need
a BxHxWxC input, so they cannot follow `gbpl` or `fc...`.

Examples: "conv128_bn_conv64_bn_gbpl_fc" (the authors' ResNet head), "gbpl_fc" (cheap,
linear on pooled features), "gbpl_fc256_fc".
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Norm = Literal["batch", "group"]
NORMS: tuple[str, ...] = ("batch", "group")
# BatchNorm settings of the usual PyTorch ResNets (momentum 0.1 there = 0.9 here).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
HEAD_TOKENS: tuple[str, ...] = ("convC", "bn", "relu", "gbpl", "fcN", "fc")


def norm_layer(
    kind: str, channels: int, groups: int, dtype: Any, train: bool, name: str | None = None
) -> nn.Module:
    """A BatchNorm or GroupNorm for `channels` channels, made inside a compact method.

    GroupNorm uses gcd(groups, channels) groups, so any channel count works; it keeps no
    batch statistics, so it is safe under microbatching (BatchNorm's statistics are per
    microbatch and its running averages are updated once per microbatch).
    """
    if kind == "batch":
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=dtype,
            name=name,
        )
    if kind == "group":
        return nn.GroupNorm(num_groups=math.gcd(groups, channels), dtype=dtype, name=name)
    raise ValueError(f"Unknown norm {kind!r}; choose one of {NORMS}.")


@dataclasses.dataclass(frozen=True)
class HeadToken:
    """One parsed token: kind in {"conv", "bn", "relu", "gbpl", "fc"}; size or None."""

    kind: str
    size: int | None = None


_TOKEN_RE = re.compile(r"^(conv|fc)([1-9][0-9]*)?$|^(bn|relu|gbpl)$")


def parse_head(spec: str) -> tuple[HeadToken, ...]:
    """Parses an aux-head spec (see the module docstring); raises ValueError if invalid."""
    tokens = []
    for raw in spec.split("_"):
        m = _TOKEN_RE.match(raw)
        if m is None or (m.group(1) == "conv" and m.group(2) is None):
            raise ValueError(
                f"Unknown aux-head token {raw!r} in {spec!r}; valid tokens are "
                f"{', '.join(HEAD_TOKENS)} (C, N positive integers), joined by '_'."
            )
        kind = m.group(1) or m.group(3)
        tokens.append(HeadToken(kind, int(m.group(2)) if m.group(2) else None))
    if tokens[-1] != HeadToken("fc"):
        raise ValueError(f"Aux-head spec {spec!r} must end with 'fc' (the logits layer).")
    if tokens.count(HeadToken("fc")) != 1:
        raise ValueError(f"Aux-head spec {spec!r} has more than one 'fc' (logits) token.")
    flat = False
    for t in tokens:
        if t.kind in ("conv", "bn") and flat:
            raise ValueError(
                f"Aux-head spec {spec!r}: {t.kind!r} needs a BxHxWxC input; it cannot "
                "follow 'gbpl' or 'fc'."
            )
        flat = flat or t.kind in ("gbpl", "fc")
    return tuple(tokens)


class ConvHead(nn.Module):
    """An auxiliary head built from a parsed spec: h_BxHxWxC -> logits_BxN.

    Attributes:
      spec: the token string (module docstring).
      num_classes: N, the width of the final `fc`.
      norm: "batch" or "group", used by `bn` tokens.
      groups: GroupNorm's group count.
      dtype: compute dtype (parameters stay float32).
    """

    spec: str
    num_classes: int
    norm: str = "batch"
    groups: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
        tokens = parse_head(self.spec)
        h = h.astype(self.dtype)
        for i, t in enumerate(tokens):
            name = f"{i}_{t.kind}{t.size or ''}"
            if t.kind == "conv":
                next_is_bn = i + 1 < len(tokens) and tokens[i + 1].kind == "bn"
                h = nn.Conv(
                    t.size,
                    (3, 3),
                    padding="SAME",
                    use_bias=not next_is_bn,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=name,
                )(h)
            elif t.kind == "bn":
                layer = norm_layer(self.norm, h.shape[-1], self.groups, self.dtype, train, name)
                h = nn.relu(layer(h))
            elif t.kind == "relu":
                h = nn.relu(h)
            elif t.kind == "gbpl":
                h = jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))
            else:  # fc / fcN
                h = h.reshape(h.shape[0], -1)
                width = self.num_classes if t.size is None else t.size
                h = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(h)
                if t.size is not None:
                    h = nn.relu(h)
        return h
