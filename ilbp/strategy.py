"""Strategies: which loss trains which stage, and which cotangents must travel.

A strategy is a window n ≥ 1 and a combine rule (DESIGN.md §1). With 0-based stages
k = 0..K-1 and j(k) = min(k + n - 1, K - 1):

  last: θ_k ← ∂L_{j(k)}/∂θ_k
  sum:  θ_k ← ∂(Σ_{i=k}^{j(k)} L_i)/∂θ_k
  mean: the `sum` gradient divided by its number of terms

θ_{K-1} ← ∂L_{K-1}/∂θ_{K-1} and φ_k ← ∂L_k/∂φ_k under every rule. L_k for k < K - 1 is
the auxiliary loss times its weight (default 1).

`Strategy.e2e()` is end-to-end training of the plain network: global backprop with
`aux_heads=False`, so no aux head runs forward or backward and no head is updated.

`Strategy.plan(K)` turns this into a `Plan`: per stage, the (loss, coefficient) terms
of its parameter cotangent and the losses whose cotangent it must send to the previous
stage. Engines, executors and the schedule model all read the plan; nothing else
re-derives the credit map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

Combine = Literal["last", "sum", "mean"]
COMBINE_RULES: tuple[str, ...] = ("last", "sum", "mean")


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """What stage k does in the backward pass.

    Attributes:
      train_on: (j, c) pairs: θ_k's cotangent is Σ c · ∂L_j/∂h_k.
      sends: losses j, ascending, whose ∂L_j/∂h_{k-1} stage k computes and sends to
        stage k - 1 (empty for stage 0). Stage k receives `plan[k + 1].sends`.
    """

    train_on: tuple[tuple[int, float], ...]
    sends: tuple[int, ...]

    @property
    def shared_cotangent(self) -> int | None:
        """The loss j if θ_k trains on exactly ∂L_j/∂h_k and j is also sent back.

        Then one VJP yields both the parameter gradient and that input gradient.
        """
        if len(self.train_on) == 1:
            j, c = self.train_on[0]
            if c == 1.0 and j in self.sends:
                return j
        return None

    @property
    def input_vjps(self) -> tuple[int, ...]:
        """Losses needing an input-only VJP (sent back, not shared with training)."""
        return tuple(j for j in self.sends if j != self.shared_cotangent)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A strategy applied to K stages; `plan[k]` is stage k's StagePlan.

    Attributes:
      stages: stage k's StagePlan.
      aux_heads: whether the aux heads run at all. False (e2e): no head forward, backward,
        loss or update; only L_{K-1} exists. Readers skip head work on this flag alone.
    """

    stages: tuple[StagePlan, ...]
    aux_heads: bool = True

    def __getitem__(self, k: int) -> StagePlan:
        return self.stages[k]

    def __len__(self) -> int:
        return len(self.stages)

    def coefficient(self, k: int, j: int) -> float:
        """How much of ∂L_j/∂θ_k goes into θ_k's update (0 if none)."""
        return dict(self.stages[k].train_on).get(j, 0.0)

    def credit_matrix(self) -> list[list[float]]:
        """K×K matrix M[k][j] = coefficient of L_j in θ_k's update."""
        K = len(self.stages)
        return [[self.coefficient(k, j) for j in range(K)] for k in range(K)]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Window size n and combine rule; plus per-head aux-loss weights.

    Attributes:
      window: n ≥ 1: each gradient crosses at most n - 1 stage boundaries.
        1 = local, 2 = pairwise, ≥ K = global.
      combine: "last" (default), "sum" or "mean".
      aux_weights: weight of each auxiliary loss L_k, k < K - 1 (None: all 1).
      aux_heads: False trains the plain network end to end: no aux head runs. Only valid
        with a global window, the "last" rule and no aux_weights (see `check`).
    """

    window: int
    combine: Combine = "last"
    aux_weights: tuple[float, ...] | None = None
    aux_heads: bool = True

    def __post_init__(self):
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(
                f"Strategy window n must be an integer ≥ 1 (1 = local, 2 = pairwise, "
                f"≥ K = global); got {self.window!r}."
            )
        if self.combine not in COMBINE_RULES:
            raise ValueError(
                f"Unknown combine rule {self.combine!r}; choose one of {COMBINE_RULES}."
            )
        if not isinstance(self.aux_heads, bool):
            raise ValueError(f"Strategy aux_heads must be True or False; got {self.aux_heads!r}.")
        if self.aux_weights is not None:
            object.__setattr__(self, "aux_weights", tuple(float(w) for w in self.aux_weights))

    # Constructors -------------------------------------------------------------------
    @classmethod
    def global_(cls, **kwargs) -> Strategy:
        """Global backprop: every θ_k trains on the final loss (n = ∞)."""
        return cls(window=GLOBAL_WINDOW, **kwargs)

    @classmethod
    def e2e(cls) -> Strategy:
        """End-to-end training of the plain network: global backprop, no aux heads."""
        return cls(window=GLOBAL_WINDOW, aux_heads=False)

    @classmethod
    def local(cls, **kwargs) -> Strategy:
        """Local learning: θ_k trains on its own aux loss (n = 1)."""
        return cls(window=1, **kwargs)

    @classmethod
    def pairwise(cls, combine: Combine = "last", **kwargs) -> Strategy:
        """Pairwise interlocking backprop (n = 2)."""
        return cls(window=2, combine=combine, **kwargs)

    @classmethod
    def nwise(cls, n: int, combine: Combine = "last", **kwargs) -> Strategy:
        """n-wise interlocking backprop."""
        return cls(window=n, combine=combine, **kwargs)

    @classmethod
    def parse(cls, spec: str) -> Strategy:
        """Parses "e2e", "global", "local", "pairwise", "nwise=3", optionally ":sum"/":mean".

        e.g. "pairwise:sum", "3wise", "nwise=3:mean". "e2e" takes no combine rule.
        """
        name, _, combine = spec.partition(":")
        combine = combine or "last"
        name = name.strip().lower()
        if name == "e2e":
            if combine != "last":
                raise ValueError(
                    f"Strategy {spec!r}: e2e trains only on the final loss, so it takes no "
                    "combine rule; write plain 'e2e'."
                )
            return cls.e2e()
        named = {"global": GLOBAL_WINDOW, "local": 1, "pairwise": 2}
        if name in named:
            return cls(window=named[name], combine=combine)
        digits = name.removeprefix("nwise=").removesuffix("wise").removeprefix("n=")
        if digits.isdigit():
            return cls(window=int(digits), combine=combine)
        raise ValueError(
            f"Unknown strategy {spec!r}; use e2e, global, local, pairwise, nwise=N or Nwise, "
            "optionally followed by :last, :sum or :mean."
        )

    # Semantics ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        if not self.aux_heads:
            return "e2e"
        base = {1: "local", 2: "pairwise", GLOBAL_WINDOW: "global"}.get(
            self.window, f"{self.window}wise"
        )
        return base if self.combine == "last" else f"{base}:{self.combine}"

    def aux_weight(self, k: int) -> float:
        if self.aux_weights is None:
            return 1.0
        return self.aux_weights[k]

    def check(self, num_stages: int) -> None:
        """Raises ValueError if this strategy cannot apply to `num_stages` stages."""
        if self.aux_weights is not None and len(self.aux_weights) != num_stages - 1:
            raise ValueError(
                f"aux_weights has {len(self.aux_weights)} entries; a model with "
                f"K={num_stages} stages has {num_stages - 1} auxiliary heads."
            )
        if not self.aux_heads:
            self._check_headless(num_stages)

    def _check_headless(self, num_stages: int) -> None:
        """Without aux heads only L_{K-1} exists: every stage must train on it alone."""
        if self.window < num_stages:
            raise ValueError(
                f"aux_heads=False trains every stage on the final loss, which needs a global "
                f"window (n ≥ K={num_stages}); got n={self.window}. Use Strategy.e2e()."
            )
        if self.combine != "last":
            raise ValueError(
                f"aux_heads=False leaves only the final loss to combine; use combine='last', "
                f"not {self.combine!r} (Strategy.e2e())."
            )
        if self.aux_weights is not None:
            raise ValueError(
                "aux_heads=False has no auxiliary losses to weight; drop aux_weights "
                "(Strategy.e2e())."
            )

    def last_loss(self, k: int, num_stages: int) -> int:
        """j(k) = min(k + n - 1, K - 1): the farthest loss that trains stage k."""
        return min(k + self.window - 1, num_stages - 1)

    def plan(self, num_stages: int) -> Plan:
        """The per-stage training terms and cotangent routing for K = num_stages."""
        self.check(num_stages)
        K = num_stages
        train_on = []
        for k in range(K):
            last = self.last_loss(k, K)
            if self.combine == "last" or k == K - 1:
                terms = [(last, 1.0)]
            else:
                losses = range(k, last + 1)
                coeff = 1.0 if self.combine == "sum" else 1.0 / len(losses)
                terms = [(j, coeff) for j in losses]
            train_on.append(tuple(terms))
        # Stage k sends ∂L_j/∂h_{k-1} iff some earlier stage trains on L_j with j ≥ k.
        needed = [set() for _ in range(K)]
        for k in range(1, K):
            needed[k] = {j for kk in range(k) for j, _ in train_on[kk] if j >= k}
        stages = tuple(StagePlan(train_on[k], tuple(sorted(needed[k]))) for k in range(K))
        return Plan(stages, aux_heads=self.aux_heads)


# Large enough to be ≥ any K; plans clip windows to the model's depth.
GLOBAL_WINDOW = 1 << 20


def as_strategies(specs: Sequence[str | Strategy]) -> list[Strategy]:
    """Parses a list of strategy names (leaving Strategy objects as they are)."""
    return [s if isinstance(s, Strategy) else Strategy.parse(s) for s in specs]
