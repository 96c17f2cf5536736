"""ResNets as a chain of *units* that can be cut into stages at any unit boundary.

Units, in order: [stem, block_0, ..., block_{N-1}, classifier]. The stem is a 3x3 conv
(CIFAR stem) or a 7x7/2 conv + 3x3/2 max-pool (ImageNet stem), each followed by norm and
ReLU; blocks are basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1 with 4x expansion);
the classifier is global average pooling and a dense layer to the classes.

`ResNetUnits(config, num_classes, start, stop)` applies units start..stop-1. Its
variables are named by the units' global names ("stem", "block_3", "classifier"), so
the variables of the stages of a split model are disjoint dicts whose union is the
variables of the unsplit model `ResNetUnits(config, num_classes)`.

Shortcuts where a block changes shape: option "A" (He et al. 2016, CIFAR): subsample by
the stride and zero-pad the new channels, no parameters; option "B": 1x1 projection conv
with stride, then norm. The standard parameter counts use A for the CIFAR family and B
for the ImageNet family (ResNet-20 0.27M, ResNet-18 11.7M, ResNet-50 25.6M).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from ilbp.models.heads import NORMS, norm_layer

# He (fan-out) initialisation, as torchvision's ResNets.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

Block = Literal["basic", "bottleneck"]
Stem = Literal["cifar", "imagenet"]

_IMAGENET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Hyper-parameters of a ResNet trunk (the number of classes is the builder's).

    Attributes:
      groups: (planes, blocks) per group; group g > 0 starts with stride 2. A bottleneck
        block outputs 4 * planes channels.
      block: "basic" or "bottleneck".
      stem: "cifar" (3x3 conv, for 32x32 or 28x28 inputs) or "imagenet" (7x7/2 conv and
        3x3/2 max-pool).
      stem_width: channels of the stem conv (default: the first group's planes).
      shortcut: "A" (parameter-free zero-pad) or "B" (1x1 projection) where shape changes.
      norm: "batch" (default) or "group" (no batch statistics: safe under microbatching).
      group_norm_groups: GroupNorm groups (gcd with the channel count is used).
      dtype: compute dtype; parameters are `param_dtype` (float32).
    """

    groups: tuple[tuple[int, int], ...]
    block: Block = "basic"
    stem: Stem = "cifar"
    stem_width: int | None = None
    shortcut: Literal["A", "B"] = "B"
    norm: str = "batch"
    group_norm_groups: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple((int(p), int(b)) for p, b in self.groups))
        if not self.groups or any(p < 1 or b < 1 for p, b in self.groups):
            raise ValueError(f"ResNet groups must be non-empty (planes, blocks ≥ 1): {self.groups}")
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"Unknown block {self.block!r}; choose 'basic' or 'bottleneck'.")
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"Unknown stem {self.stem!r}; choose 'cifar' or 'imagenet'.")
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"Unknown shortcut option {self.shortcut!r}; choose 'A' or 'B'.")
        if self.norm not in NORMS:
            raise ValueError(f"Unknown norm {self.norm!r}; choose one of {NORMS}.")

    # Constructors -------------------------------------------------------------------------
    @classmethod
    def cifar(cls, depth: int, **kwargs) -> ResNetConfig:
        """He et al.'s CIFAR ResNet-(6n+2): 16/32/64 channels, n basic blocks each, option A."""
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n + 2 ≥ 8 (20, 32, 56, 110); got {depth}."
            )
        n = (depth - 2) // 6
        kwargs.setdefault("shortcut", "A")
        return cls(groups=((16, n), (32, n), (64, n)), block="basic", stem="cifar", **kwargs)

    @classmethod
    def imagenet(cls, depth: int, stem: Stem = "imagenet", **kwargs) -> ResNetConfig:
        """ResNet-18/34 (basic) or -50/101/152 (bottleneck), 64..512 planes, option B."""
        if depth not in _IMAGENET_LAYOUTS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(_IMAGENET_LAYOUTS)}.")
        block, blocks = _IMAGENET_LAYOUTS[depth]
        groups = tuple(zip((64, 128, 256, 512), blocks))
        return cls(groups=groups, block=block, stem=stem, **kwargs)

    @classmethod
    def from_layout(
        cls, layout: str, block: Block = "basic", stem: Stem = "cifar", **kwargs
    ) -> ResNetConfig:
        """The authors' layout string "planes,blocks/planes,blocks/...".

        e.g. "64,3/128,4/256,6/512,3" (ResNet-34's groups; basic blocks, CIFAR stem).
        """
        try:
            groups = tuple(
                tuple(int(v) for v in g.split(",", 1)) for g in layout.strip().split("/")
            )
            if any(len(g) != 2 for g in groups):
                raise ValueError
        except ValueError:
            raise ValueError(
                f"Bad ResNet layout {layout!r}; expected 'planes,blocks/planes,blocks/...', "
                "e.g. '64,3/128,4/256,6/512,3'."
            ) from None
        return cls(groups=groups, block=block, stem=stem, **kwargs)

    # Units --------------------------------------------------------------------------------
    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    def block_specs(self) -> tuple[tuple[int, int], ...]:
        """(planes, stride) of every block, in order."""
        return tuple(
            (planes, 2 if g > 0 and i == 0 else 1)
            for g, (planes, blocks) in enumerate(self.groups)
            for i in range(blocks)
        )

    @property
    def num_blocks(self) -> int:
        return sum(b for _, b in self.groups)

    @property
    def num_units(self) -> int:
        """Stem + blocks + classifier."""
        return self.num_blocks + 2

    def unit_names(self) -> tuple[str, ...]:
        return ("stem", *(f"block_{i}" for i in range(self.num_blocks)), "classifier")

    def unit_key(self, i: int) -> tuple:
        """A hashable description of unit i: equal keys + equal input shape = equal cost."""
        if i == 0:
            return ("stem",)
        if i == self.num_units - 1:
            return ("classifier",)
        return ("block", *self.block_specs()[i - 1])


class _ConvNorm(nn.Module):
    """conv -> norm (-> ReLU)."""

    config: ResNetConfig
    features: int
    kernel: int
    stride: int = 1
    relu: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.config
        pad = self.kernel // 2
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            (self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=_conv_init,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name="conv",
        )(x)
        x = norm_layer(c.norm, self.features, c.group_norm_groups, c.dtype, train, "norm")(x)
        return nn.relu(x) if self.relu else x


class _Stem(nn.Module):
    config: ResNetConfig

    @nn.compact
    def __call__(self, x_BxHxWxC, train: bool):
        c = self.config
        if x_BxHxWxC.ndim != 4:
            raise ValueError(f"ResNet expects NHWC images (rank 4); got shape {x_BxHxWxC.shape}.")
        x = x_BxHxWxC.astype(c.dtype)
        width = c.stem_width or c.groups[0][0]
        if c.stem == "cifar":
            return _ConvNorm(c, width, 3, name="conv_norm")(x, train)
        x = _ConvNorm(c, width, 7, 2, name="conv_norm")(x, train)
        return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


class _Block(nn.Module):
    """A basic or bottleneck residual block: relu(branch(x) + shortcut(x))."""

    config: ResNetConfig
    planes: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        c, s = self.config, self.stride
        out = self.planes * c.expansion
        if c.block == "basic":
            y = _ConvNorm(c, self.planes, 3, s, name="a")(x, train)
            y = _ConvNorm(c, out, 3, relu=False, name="b")(y, train)
        else:  # Stride on the 3x3 conv (torchvision's "v1.5"); same parameters as v1.
            y = _ConvNorm(c, self.planes, 1, name="a")(x, train)
            y = _ConvNorm(c, self.planes, 3, s, name="b")(y, train)
            y = _ConvNorm(c, out, 1, relu=False, name="c")(y, train)
        if s == 1 and x.shape[-1] == out:
            shortcut = x
        elif c.shortcut == "B":
            shortcut = _ConvNorm(c, out, 1, s, relu=False, name="proj")(x, train)
        else:
            if x.shape[-1] > out:
                raise ValueError("Option-A shortcuts cannot reduce channels; use shortcut='B'.")
            shortcut = x[:, ::s, ::s, :]
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, out - x.shape[-1])))
        return nn.relu(y + shortcut)


class _Classifier(nn.Module):
    config: ResNetConfig
    num_classes: int

    @nn.compact
    def __call__(self, x_BxHxWxC, train: bool):
        del train
        c = self.config
        h_BxC = jnp.mean(x_BxHxWxC, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=c.dtype, param_dtype=c.param_dtype, name="fc")(
            h_BxC
        )


class ResNetUnits(nn.Module):
    """Units start..stop-1 of a ResNet (all of them by default: the unsplit model).

    Input: x_BxHxWxC float images (the stem's input) or the previous unit's activations.
    Output: activations BxH'xW'xC', or logits BxN if the classifier is included.
    """

    config: ResNetConfig
    num_classes: int
    start: int = 0
    stop: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = self.config
        stop = c.num_units if self.stop is None else self.stop
        names = c.unit_names()
        specs = c.block_specs()
        for i in range(self.start, stop):
            if i == 0:
                x = _Stem(c, name=names[i])(x, train)
            elif i == c.num_units - 1:
                x = _Classifier(c, self.num_classes, name=names[i])(x, train)
            else:
                planes, stride = specs[i - 1]
                x = _Block(c, planes, stride, name=names[i])(x, train)
        return x
