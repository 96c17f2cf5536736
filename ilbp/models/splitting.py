"""Where to cut a chain of units into K stages: given counts, or balanced by FLOPs.

A split is a tuple of K positive unit counts that add up to the number of units; stage k
holds units sum(counts[:k]) .. sum(counts[:k+1]) - 1.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

REST = "rest"


def parse_blocks_per_stage(spec: str | Sequence[int | str], num_units: int) -> tuple[int, ...]:
    """Resolves a `blocks_per_stage` list such as "2,1,1,rest" or [2, 1, 1, "rest"].

    Each entry is a positive unit count (stem and classifier count as one unit each);
    at most one entry may be "rest": whatever the others leave, at least one unit.
    Without "rest" the counts must add up to `num_units` exactly. Raises ValueError.
    """
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    counts: list[int | None] = []
    for e in entries:
        e = e.strip() if isinstance(e, str) else e
        if e == REST:
            counts.append(None)
            continue
        try:
            n = int(e)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or str(n) != str(e):
            raise ValueError(
                f"blocks_per_stage {spec!r}: entry {e!r} is neither a positive integer nor "
                f"{REST!r}."
            )
        counts.append(n)
    if not counts:
        raise ValueError("blocks_per_stage is empty.")
    if counts.count(None) > 1:
        raise ValueError(f"blocks_per_stage {spec!r}: at most one {REST!r} entry.")
    given = sum(n for n in counts if n is not None)
    if None in counts:
        left = num_units - given
        if left < 1:
            raise ValueError(
                f"blocks_per_stage {spec!r} leaves {left} units for {REST!r}; the model has "
                f"{num_units} units (stem + blocks + classifier), so 'rest' needs ≥ 1."
            )
        counts = [left if n is None else n for n in counts]
    elif given != num_units:
        raise ValueError(
            f"blocks_per_stage {spec!r} adds up to {given} units, but the model has "
            f"{num_units} (stem + blocks + classifier); fix the counts or end with {REST!r}."
        )
    return tuple(counts)


def check_num_stages(num_stages: int, num_units: int, what: str = "units") -> None:
    """Raises ValueError unless 1 ≤ num_stages ≤ num_units (an integer, not a bool)."""
    integral = isinstance(num_stages, numbers.Integral) and not isinstance(num_stages, bool)
    if not integral or not 1 <= num_stages <= num_units:
        raise ValueError(
            f"num_stages={num_stages!r} must be an integer between 1 and the number of "
            f"{what}, {num_units}: every stage needs at least one."
        )


def balance_split(
    unit_costs: Sequence[float],
    num_stages: int,
    head_costs: Sequence[float] | None = None,
    stage_weights: Sequence[float] | None = None,
) -> tuple[int, ...]:
    """Contiguous split of units into K stages that minimises the most expensive stage.

    The cost of stage k holding units a..b is stage_weights[k] · sum(unit_costs[a..b])
    plus, for every stage but the last, head_costs[b] (its aux head sits on unit b's
    output). Weights (default all 1) say how much work a unit of cost 1 gives stage k:
    e.g. `ilbp.schedule.stage_work`, because under interlocking backprop a middle stage
    does more backward work per forward FLOP than the end stages. Among the splits with
    the least maximum, the one with the least sum of squared stage costs (the other
    stages as even as they can be). Exact dynamic programmes, O(K N²).
    """
    n = len(unit_costs)
    check_num_stages(num_stages, n)
    K = int(num_stages)
    heads = [float(c) for c in head_costs] if head_costs is not None else [0.0] * n
    weights = [1.0] * K if stage_weights is None else [float(w) for w in stage_weights]
    if len(weights) != K or not all(w > 0 for w in weights):
        raise ValueError(
            f"stage_weights needs K={K} positive numbers, one per stage; got {stage_weights!r}."
        )
    prefix = [0.0]
    for c in unit_costs:
        prefix.append(prefix[-1] + float(c))

    def stage_cost(j: int, i: int, k: int) -> float:  # Units j..i-1 as stage k.
        head = 0.0 if k == K - 1 else heads[i - 1]
        return weights[k] * (prefix[i] - prefix[j]) + head

    def solve(combine, cap: float) -> tuple[float, list[int]]:
        # best[k][i]: least combined cost of units 0..i-1 in k stages, each ≤ cap.
        inf = float("inf")
        best = [[inf] * (n + 1) for _ in range(K + 1)]
        cut = [[0] * (n + 1) for _ in range(K + 1)]
        best[0][0] = 0.0
        for k in range(1, K + 1):
            for i in range(n if k == K else k, n + 1):
                for j in range(k - 1, i):
                    cost = stage_cost(j, i, k - 1)
                    if cost <= cap and best[k - 1][j] < inf:
                        value = combine(best[k - 1][j], cost)
                        if value < best[k][i]:
                            best[k][i], cut[k][i] = value, j
        counts, i = [], n
        for k in range(K, 0, -1):
            counts.append(i - cut[k][i])
            i = cut[k][i]
        return best[K][n], counts[::-1]

    worst, _ = solve(max, float("inf"))
    tolerance = 1e-9 * max(worst, 1.0)  # Float sums in another order may differ by ulps.
    _, counts = solve(lambda acc, cost: acc + cost * cost, worst + tolerance)
    return tuple(counts)


def flops(fn: Callable[..., Any], *args: Any) -> float:
    """XLA's FLOP estimate of fn(*args); args may be jax.ShapeDtypeStruct (nothing runs).

    Uses the cost analysis of the lowered (unoptimised) HLO, which needs no compilation,
    falling back to the compiled executable's. In jax 0.10 both return a dict.
    """
    lowered = jax.jit(fn).lower(*args)
    cost = _flops_of(lowered.cost_analysis())
    if cost is None:
        cost = _flops_of(lowered.compile().cost_analysis())
    return cost or 0.0


def _flops_of(analysis: Any) -> float | None:
    if isinstance(analysis, list | tuple):  # Older jax: one dict per computation.
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    value = analysis.get("flops")
    return None if value is None else float(value)


def unsplit_variables(params: Sequence[dict], state: Sequence[dict] | None = None) -> dict:
    """The Linen variables of the unsplit model from a staged model's (params, state).

    `params`/`state` are K-tuples laid out as `StagedModel.init` returns them; aux heads
    are dropped. Per collection, the stages' top-level entries are disjoint names (ResNet
    units, Transformer "embed"/"final_norm"/"unembed") and are merged, except
    "blocks", whose leaves are concatenated along axis 0 in stage order (Transformer
    blocks stacked by `nn.scan`).
    """
    variables = {"params": _merge([p["stage"] for p in params])}
    for collection in sorted({c for s in state or () for c in s["stage"]}):
        variables[collection] = _merge([s["stage"].get(collection, {}) for s in state])
    return variables


def _merge(trees: Sequence[dict]) -> dict:
    merged: dict = {}
    blocks = []
    for tree in trees:
        for key, value in tree.items():
            if key == "blocks":
                blocks.append(value)
            elif key in merged:
                raise ValueError(f"Variable {key!r} appears in two stages.")
            else:
                merged[key] = value
    if blocks:
        merged["blocks"] = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *blocks)
    return merged
