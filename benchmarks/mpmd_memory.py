"""Per-device peak memory of the MPMD step, before and after the hot-path changes.

    python -m benchmarks.mpmd_memory [--models cnn,transformer] [--microbatches 4]
    python -m benchmarks.mpmd_memory --tiny          # test sizes

For each workload (`benchmarks.step_cost.WORKLOADS`, its batch cut into M microbatches)
and strategy, every stage's MPMD ops are compiled on abstract inputs (nothing runs) and
XLA's compiled memory analysis of each is read. Two forms of each op:

  before  the forward returns `jax.vjp`'s whole residual pytree: copies of the
          parameters (the kernels an input VJP needs, their casts) and constants
          (masks, the zeros some derivative rules broadcast) included; no op donates;
  after   the executor's ops (`ilbp.pipeline.mpmd_ops`): residuals without what the
          parameters alone (or nothing) determine, and donation of what each op
          consumes.

Per stage the model of its peak is

  state + gradient sums + held × residuals + the largest transient of F, A, V and W,
  or, at the update, state + gradient sums + U's transient, whichever is larger,

where `held` is the most microbatches whose residuals the stage holds at once in the
schedule the executor issues (`ilbp.schedule.simulate`, window cap: `Schedule.in_flight`),
`residuals` the bytes of one microbatch's forward residuals (outputs of the compiled F;
"θ-shaped": those shaped like one of θ_k's leaves, in any dtype), and an op's transient its
compiled temporaries plus the outputs it does not write into a donated input (less the
residuals F returns, counted in `held`). Activations and cotangents in transit are left
out. XLA:CPU's temporaries differ from an accelerator's; the residual bytes do not.

What recomputing costs: the compiled FLOPs of the stage's V and W (XLA's cost analysis),
after against before. V and W rebuild only what θ_k alone determines (XLA removes the
rest of the retraced forward), so the difference is elementwise work on θ_k-sized or
constant arrays, independent of the batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

import ilbp
from benchmarks.step_cost import WORKLOADS, Workload
from ilbp.engine import head_forward_backward, stage_backward, stage_forward
from ilbp.pipeline import mpmd_ops
from ilbp.pipeline.mpmd_ops import microbatch_rngs
from ilbp.schedule import simulate
from ilbp.strategy import StagePlan, Strategy
from ilbp.train import init_train_state, per_stage_optimizers

FORMS = ("before", "after")
OPTIMIZER = optax.sgd(0.1, momentum=0.9)


@dataclasses.dataclass(frozen=True)
class OpMemory:
    """One compiled op: XLA's memory analysis, and the outputs counted elsewhere."""

    output: int
    alias: int
    temp: int
    flops: float  # XLA's cost analysis of the compiled op
    residuals: int = 0  # F's residual outputs (held across ops)
    param_shaped: int = 0  # those shaped like one of θ_k's leaves (copies, casts)

    @property
    def transient(self) -> int:
        return self.temp + self.output - self.alias - self.residuals


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """One stage's bytes: its state, its gradient sums (with aux heads or without, e2e)
    and per form each op's memory ("U_e2e": the update without the head)."""

    params: int  # θ_k
    state: int  # θ_k, φ_k, model and optimizer state
    grads: dict[bool, int]
    ops: dict[str, dict[str, OpMemory]]  # form -> kind ("F", "A", "V", "W", "U") -> op

    def residuals(self, form: str) -> int:
        return self.ops[form]["F"].residuals

    def backward_flops(self, form: str) -> float:
        """The compiled FLOPs of one V (if the stage sends back) and one W."""
        return sum(self.ops[form][kind].flops for kind in ("V", "W") if kind in self.ops[form])

    def peak(self, form: str, held: int, heads: bool) -> int:
        ops = self.ops[form]
        kinds = ("F", "V", "W", "A") if heads else ("F", "V", "W")
        during = max(ops[kind].transient for kind in kinds if kind in ops)
        base = self.state + self.grads[heads]
        update = ops["U" if heads else "U_e2e"]
        return max(base + held * self.residuals(form) + during, base + update.transient)


@dataclasses.dataclass(frozen=True)
class PeakRow:
    """One stage of one strategy's step, both forms (bytes)."""

    workload: str
    strategy: str
    microbatches: int
    stage: int
    held: int
    params: int
    state: int
    residuals: dict[str, int]
    param_shaped: dict[str, int]
    peak: dict[str, int]
    backward_flops: dict[str, float]


# The ops, abstractly -----------------------------------------------------------------------
def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _compiled(jitted: Callable, *args: Any, **residuals: int) -> OpMemory:
    compiled = jitted.lower(*args).compile()
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0]
    return OpMemory(
        int(memory.output_size_in_bytes),
        int(memory.alias_size_in_bytes),
        int(memory.temp_size_in_bytes),
        float(cost.get("flops", 0.0)),
        **residuals,
    )


def _param_shaped(residuals: Any, params: Any) -> int:
    """Bytes of the residual leaves shaped like a parameter leaf (any dtype: casts)."""
    shapes = {x.shape for x in jax.tree.leaves(params)}
    return _nbytes([r for r in jax.tree.leaves(residuals) if r.shape in shapes])


@functools.cache
def _forward_before(stage: ilbp.Stage, loss_fn, k: int, first: bool, last: bool) -> Callable:
    """The forward as it was: jax.vjp's residuals returned whole, nothing donated."""

    def forward(params, state, x, batch, rng, step, m):
        rng_stage, rng_head = microbatch_rngs(rng, step, m, k)
        h, vjp_fn, new_state = stage_forward(stage, params, state, x, rng_stage, first=first)
        if not last:
            return h, vjp_fn, new_state
        _, _, _, dh, _ = head_forward_backward(None, loss_fn, 1.0, {}, {}, h, batch, rng_head)
        return vjp_fn, new_state, dh

    return jax.jit(forward)


def _stage_ops(model, k, form, p, s, x, batch, rng, step, m) -> tuple[dict, Any, Any]:
    """F, V and W of stage k in `form` on abstract inputs: ({kind: OpMemory}, h, ∂h)."""
    stage, first, last = model.stages[k], k == 0, k == model.num_stages - 1
    donate = form == "after"
    if form == "before":
        forward = _forward_before(stage, model.loss, k, first, last)
        args = (p["stage"], s["stage"], x, batch, rng, step, m)
    elif last:
        forward = mpmd_ops.last_forward_op(stage, model.loss, k, first, donate)
        args = (p["stage"], s["stage"], x, batch, rng, step, m)
    else:
        forward = mpmd_ops.forward_op(stage, k, first, donate)
        args = (p["stage"], s["stage"], x, rng, step, m)
    out = jax.eval_shape(forward, *args)
    res = out[0] if last else out[1]
    copies = _param_shaped(res, p["stage"])
    ops = {"F": _compiled(forward, *args, residuals=_nbytes(res), param_shaped=copies)}
    h = None if last else out[0]
    cot = out[2] if last else h  # ∂L/∂h_k has h_k's shape
    plan = StagePlan(((k, 1.0),), ())  # W on the stage's own loss
    grads = jax.eval_shape(lambda: p["stage"])
    if form == "before":
        add = lambda acc, g: jax.tree.map(jax.numpy.add, acc, g)
        backward = jax.jit(lambda vjp_fn, c, acc: add(acc, stage_backward(plan, vjp_fn, c)[0]))
        ops["W"] = _compiled(backward, res, {k: cot}, grads)
        if not first:
            ops["V"] = _compiled(jax.jit(lambda vjp_fn, c: vjp_fn(c)[1]), res, cot)
    else:
        backward = mpmd_ops.backward_op(plan, donate)
        ops["W"] = _compiled(backward, p["stage"], res, {k: cot}, grads, None)
        if not first:
            ops["V"] = _compiled(mpmd_ops.input_vjp_op, p["stage"], res, cot)
    return ops, h, cot


def measure_stages(model: ilbp.StagedModel, microbatch: dict, microbatches: int) -> list:
    """Every stage's state, gradient sums and ops (both forms) for one microbatch."""
    K = model.num_stages
    optimizers = per_stage_optimizers(OPTIMIZER, K)
    init = lambda b: init_train_state(model, optimizers, jax.random.key(0), b)
    ts = jax.eval_shape(init, microbatch)
    rng, step, m = ts.rng, ts.step, jax.ShapeDtypeStruct((), np.int32)
    x, stages = microbatch[model.input_key], []
    for k in range(K):
        p, s, opt = ts.params[k], ts.state[k], ts.opt_state[k]
        trained = {True: p, False: {"stage": p["stage"]}}
        ops = {}
        for form in FORMS:
            donate = form == "after"
            ops[form], h, _ = _stage_ops(model, k, form, p, s, x, microbatch, rng, step, m)
            if k < K - 1:
                head = mpmd_ops.head_op(model.heads[k], model.head_loss(k), 1.0, k, K, donate)
                args = (p["head"], s["head"], h, microbatch, rng, step, m, p["head"], None)
                ops[form]["A"] = _compiled(head, *args)
            update = mpmd_ops.update_op(optimizers[k], k, microbatches, donate)
            metrics = [{"loss": jax.ShapeDtypeStruct((), np.float32)}]
            for kind, heads in (("U", True), ("U_e2e", False)):
                ops[form][kind] = _compiled(update, p, opt, trained[heads], step, metrics)
        grads = {heads: _nbytes(tree) for heads, tree in trained.items()}
        stages.append(StageMemory(_nbytes(p["stage"]), _nbytes((p, s, opt)), grads, ops))
        x = h
    return stages


def measure(workload: Workload, strategies: Sequence[str], microbatches: int) -> list[PeakRow]:
    """Per strategy and stage: held residuals, state, residuals and peak, both forms."""
    batch = _abstract(workload.batch)
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % microbatches:
        raise ValueError(f"{workload.name}: batch {size} does not split into {microbatches}.")
    b = size // microbatches
    microbatch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype), batch)
    K, rows = workload.model.num_stages, []
    stages = measure_stages(workload.model, microbatch, microbatches)  # shared by strategies
    for spec in strategies:
        strategy = Strategy.parse(spec)
        heads = strategy.plan(K).aux_heads
        held = simulate(strategy, K, microbatches, steps=2, fused_backward=True).in_flight
        for k, stage in enumerate(stages):
            rows.append(
                PeakRow(
                    workload=workload.name,
                    strategy=strategy.name,
                    microbatches=microbatches,
                    stage=k,
                    held=held[k],
                    params=stage.params,
                    state=stage.state,
                    residuals={form: stage.residuals(form) for form in FORMS},
                    param_shaped={form: stage.ops[form]["F"].param_shaped for form in FORMS},
                    peak={form: stage.peak(form, held[k], heads) for form in FORMS},
                    backward_flops={form: stage.backward_flops(form) for form in FORMS},
                )
            )
    return rows


# Reporting ---------------------------------------------------------------------------------
def format_rows(rows: Sequence[PeakRow]) -> str:
    """A markdown table per workload: MiB per stage, before → after."""
    mib = lambda n: f"{n / 2**20:.3g}"
    both = lambda d: f"{mib(d['before'])} → {mib(d['after'])}"
    lines = []
    for name in dict.fromkeys(r.workload for r in rows):
        lines += [f"## {name}", ""]
        lines.append(
            "| strategy | M | stage | held | θ_k | state | residuals/µb before → after "
            "| of which θ-shaped | peak before → after | peak change | V+W FLOPs change |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r.workload == name):
            change = lambda d: f"{d['after'] / d['before'] - 1:+.2%}" if d["before"] else "-"
            lines.append(
                f"| {r.strategy} | {r.microbatches} | {r.stage} | {r.held} | {mib(r.params)} "
                f"| {mib(r.state)} | {both(r.residuals)} | {both(r.param_shaped)} "
                f"| {both(r.peak)} | {change(r.peak)} | {change(r.backward_flops)} |"
            )
        lines += [
            "",
            "(MiB; θ-shaped: residual leaves shaped like a parameter, in any dtype; V+W "
            "FLOPs: XLA's count of the compiled V and W of one microbatch)",
            "",
        ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn,transformer", help=f"of {sorted(WORKLOADS)}")
    p.add_argument("--strategies", default="pairwise,global,e2e")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="test-sized workloads")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown --models {sorted(unknown)}; choose from {sorted(WORKLOADS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    for key in args.models.split(","):
        rows = measure(WORKLOADS[key](args.tiny), args.strategies.split(","), args.microbatches)
        print(format_rows(rows), flush=True)


if __name__ == "__main__":
    main()
