"""The SPMD executor's tick schedule: how many ticks a step takes and what each stage
sends and sums (the numbers; `ilbp.pipeline.spmd_clock` runs them, and its docstring
derives them).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ilbp.strategy import Strategy


@dataclasses.dataclass(frozen=True, eq=False)
class Clock:
    """The tick schedule of `strategy` on K stages with M microbatches per step.

    Attributes:
      lanes: n_ = min(n, K), the length of a stage's cotangent list.
      reach: i*(k) per stage, the farthest loss it trains on (relative to k).
      coef: K × n_ coefficients c_{k,i} of ∂L_{k+i}/∂h_k in stage k's parameter VJP.
      weights: per stage, the weight of its head's loss (1 for the final loss).
      heads: per stage, whether its head runs: every stage's, or without aux heads (e2e)
        only the last stage's (its output layer).
      send_lanes: K × width lanes each stage sends back, padded with the unused lane n_-1.
      slots: S, residual buffer slots per stage (a microbatch's residuals live 2 i* ticks).
      period: P = M + 2 max_k i*(k), ticks per step per stage.
      drain: ticks of one step run alone, M + max_k(k + 2 i*(k)).
    """

    num_stages: int
    microbatches: int
    lanes: int
    reach: tuple[int, ...]
    coef: np.ndarray
    weights: np.ndarray
    heads: np.ndarray
    send_lanes: np.ndarray
    slots: int
    period: int
    drain: int

    @classmethod
    def of(cls, strategy: Strategy, num_stages: int, microbatches: int) -> Clock:
        K, M = num_stages, microbatches
        plan = strategy.plan(K)
        lanes = min(strategy.window, K)
        reach = tuple(max(j - k for j, _ in plan[k].train_on) for k in range(K))
        coef = np.array(
            [[plan.coefficient(k, k + i) for i in range(lanes)] for k in range(K)], np.float32
        )
        weights = np.array([strategy.aux_weight(k) for k in range(K - 1)] + [1.0], np.float32)
        sends = [[j - k for j in plan[k].sends] for k in range(K)]
        width = max(len(x) for x in sends)
        send_lanes = np.array(
            [x + [lanes - 1] * (width - len(x)) for x in sends], np.int32
        ).reshape(K, width)
        return cls(
            num_stages=K,
            microbatches=M,
            lanes=lanes,
            reach=reach,
            coef=coef,
            weights=weights,
            heads=np.array([plan.aux_heads or k == K - 1 for k in range(K)]),
            send_lanes=send_lanes,
            slots=2 * max(reach) + 1,
            period=M + 2 * max(reach),
            drain=M + max(k + 2 * r for k, r in enumerate(reach)),
        )

    def ticks(self, num_steps: int) -> int:
        """Clock ticks of T = num_steps steps in one program."""
        return (num_steps - 1) * self.period + self.drain
