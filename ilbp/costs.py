"""Per-stage op costs of an actual staged model, and the throughput they predict.

`stage_costs(model, optimizer, batch)` takes each stage's ops as the MPMD executor runs
them (`ilbp.pipeline.mpmd_ops`: forward F, aux head A, input VJP V, parameter VJP W,
both VJPs as one op B, update U) for `batch` as one microbatch, and returns their costs
with the bytes each stage boundary sends and each stage holds per example:
- method="cost_analysis" (default): XLA's FLOPs and bytes accessed of each op as
  lowered, from abstract shapes: nothing runs or compiles, so it is fast and the same on
  every backend; bytes are those of the unfused program (an upper bound);
- method="compiled": the same analysis of each op compiled for the default backend
  (fused; FLOPs within a few percent of the lowered count, bytes lower; slower);
- method="measured": the median wall time of each op on the default device.

`StageCosts.cost_model(M, hardware)` turns them into the schedule model's `CostModel`
in seconds for M microbatches of the batch: op costs scale with the microbatch size
(exact for FLOPs; an approximation for measured times, which small microbatches use
less efficiently), updates do not, and a boundary's transfer takes its bytes over the
hardware's link bandwidth. `predict_throughput` then places a strategy against the
baselines a user would pick: e2e with split backward at M = 1 and the best e2e
pipeline (`ilbp.schedule.PIPELINE_SCHEDULES`, any M ≤ 16 dividing the batch) whose peak
per-device activation memory does not exceed the strategy's. `time_to_quality` turns
an eval curve and a predicted step time into the wall-clock to reach a target.

Activation memory of a schedule: per device, the microbatches it holds in flight
(`Schedule.in_flight`) times the bytes of one microbatch's forward residuals on that
stage; the peak over devices. Parameters, optimizer state and the transient memory of
one op are not counted (they do not depend on the schedule).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

from ilbp.pipeline import mpmd_ops
from ilbp.schedule import PIPELINE_SCHEDULES, CostModel, Schedule, simulate, simulate_e2e
from ilbp.schedule_graph import OpKind
from ilbp.stage import Batch, StagedModel
from ilbp.strategy import StagePlan, Strategy
from ilbp.train import Optimizer, init_train_state, per_stage_optimizers

__all__ = [
    "DEFAULT_HARDWARE",
    "PEAK_FLOPS",
    "Baseline",
    "Hardware",
    "StageCosts",
    "Throughput",
    "activation_memory",
    "peak_flops",
    "pipeline_baselines",
    "predict_throughput",
    "stage_costs",
    "time_to_quality",
]

Method = Literal["cost_analysis", "compiled", "measured"]
METHODS: tuple[str, ...] = ("cost_analysis", "compiled", "measured")

# Dense peak FLOP/s per chip, bf16, by a substring of jax's `device_kind`.
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The PEAK_FLOPS entry whose key `device_kind` contains (None if no entry does)."""
    for key, flops in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return flops
    return None


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One device per stage and the link between neighbours.

    Attributes:
      flops_per_s: the device's peak; a FLOP count costs flops / flops_per_s seconds.
      link_bytes_per_s: one direction of a neighbour link.
      memory_bytes_per_s: if set, a cost-analysed op costs the larger of its FLOP time
        and its bytes accessed over this bandwidth (a roofline); None: FLOPs alone.
    """

    name: str
    flops_per_s: float
    link_bytes_per_s: float
    memory_bytes_per_s: float | None = None


# H100 SXM: 989 TFLOP/s dense bf16, NVLink 4 at 450 GB/s per direction.
DEFAULT_HARDWARE = Hardware("H100 SXM, NVLink", 989e12, 450e9)


@dataclasses.dataclass(frozen=True)
class StageCosts:
    """Per-stage op costs of one staged model for `batch_size` examples as one microbatch.

    Attributes:
      ops: per OpKind (F, A, V, W, B, U), K costs in `unit`; 0 where a stage has no
        such op (A on the last stage; V and B on stage 0, which sends nothing).
      unit: "flop" (cost analysis, lowered or compiled) or "s" (measured).
      bytes_accessed: per OpKind, K values of XLA's bytes accessed (cost analysis
        only; else empty).
      residual_bytes: per stage, the bytes of forward residuals one example leaves on
        it until its last VJP (batch-independent residuals such as weights excluded).
      boundary_bytes: per boundary k (K - 1 entries), the bytes of h_k one example sends
        to stage k + 1; its cotangent comes back with the same size.
      batch_size: the examples the costs are for.
    """

    ops: Mapping[OpKind, tuple[float, ...]]
    unit: Literal["flop", "s"]
    bytes_accessed: Mapping[OpKind, tuple[float, ...]]
    residual_bytes: tuple[float, ...]
    boundary_bytes: tuple[float, ...]
    batch_size: int

    @property
    def num_stages(self) -> int:
        return len(self.residual_bytes)

    def seconds(self, kind: OpKind, k: int, hardware: Hardware) -> float:
        """Op `kind` of stage k on the whole batch, in seconds."""
        cost = self.ops[kind][k]
        if self.unit == "s":
            return cost
        t = cost / hardware.flops_per_s
        if hardware.memory_bytes_per_s and self.bytes_accessed:
            t = max(t, self.bytes_accessed[kind][k] / hardware.memory_bytes_per_s)
        return t

    def send_seconds(self, k: int, hardware: Hardware, examples: float | None = None) -> float:
        """Sending h_k (boundary k) for `examples` (default: the whole batch) to stage
        k + 1 over the hardware's link, in seconds."""
        examples = self.batch_size if examples is None else examples
        return self.boundary_bytes[k] * examples / hardware.link_bytes_per_s

    def cost_model(self, microbatches: int, hardware: Hardware = DEFAULT_HARDWARE) -> CostModel:
        """The schedule model's costs (seconds) for M microbatches of the batch."""
        if self.batch_size % microbatches:
            raise ValueError(
                f"{microbatches} microbatches do not divide the batch of {self.batch_size}."
            )
        share = 1.0 / microbatches
        per_mb = lambda kind: tuple(
            share * self.seconds(kind, k, hardware) for k in range(self.num_stages)
        )
        examples = self.batch_size * share
        return CostModel.from_measured(
            per_mb(OpKind.FORWARD),
            per_mb(OpKind.INPUT_VJP),
            per_mb(OpKind.PARAM_VJP),
            fused_vjp=per_mb(OpKind.BACKWARD),
            aux=per_mb(OpKind.AUX),
            update=tuple(self.seconds(OpKind.UPDATE, k, hardware) for k in range(self.num_stages)),
            transfer=tuple(
                self.send_seconds(k, hardware, examples) for k in range(self.num_stages - 1)
            ),
        )


def activation_memory(schedule: Schedule, costs: StageCosts) -> float:
    """Peak per-device bytes of held forward residuals under `schedule` (module doc)."""
    examples = costs.batch_size / schedule.microbatches
    return max(
        n * examples * b for n, b in zip(schedule.in_flight, costs.residual_bytes, strict=True)
    )


# Measuring ---------------------------------------------------------------------------------
Call = tuple[Callable, tuple]  # a jitted op and its arguments


def stage_costs(
    model: StagedModel,
    optimizer: Optimizer,
    batch: Batch,
    *,
    method: Method = "cost_analysis",
    repeats: int = 10,
) -> StageCosts:
    """The costs of every stage's ops on `batch` as one microbatch (module docstring).

    `batch` may hold arrays or jax.ShapeDtypeStructs (cost analysis only). Aux heads
    are costed with weight 1; `repeats` is the number of timed calls per op (measured).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown cost method {method!r}; choose one of {METHODS}.")
    if method == "measured" and any(
        isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(batch)
    ):
        raise ValueError("method='measured' runs the ops: pass a batch of arrays, not shapes.")
    size = _batch_size(batch)
    optimizers = per_stage_optimizers(optimizer, model.num_stages)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), batch)
    doubled = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((2 * size, *x.shape[1:]), x.dtype), shapes
    )
    calls, outputs, residuals = _stage_calls(model, optimizers, shapes, abstract=True)
    _, _, residuals_2x = _stage_calls(model, optimizers, doubled, abstract=True)
    # Twice the examples minus once: what one batch adds, without weights and constants.
    residual_bytes = tuple(
        (_nbytes(b) - _nbytes(a)) / size for a, b in zip(residuals, residuals_2x)
    )
    boundary_bytes = tuple(_nbytes(h) / size for h in outputs[:-1])
    if method != "measured":
        compiled = method == "compiled"
        analysed = [{kind: _analyse(*c, compiled) for kind, c in row.items()} for row in calls]
        ops = _per_kind(analysed, lambda a: a[0])
        return StageCosts(
            ops, "flop", _per_kind(analysed, lambda a: a[1]), residual_bytes, boundary_bytes, size
        )
    concrete, _, _ = _stage_calls(model, optimizers, batch, abstract=False)
    timed = [{kind: _median_time(*call, repeats) for kind, call in row.items()} for row in concrete]
    return StageCosts(_per_kind(timed, float), "s", {}, residual_bytes, boundary_bytes, size)


def _stage_calls(
    model: StagedModel, optimizers: Sequence[Any], batch: Batch, *, abstract: bool
) -> tuple[list[dict[OpKind, Call]], list[Any], list[Any]]:
    """Per stage: its ops as {kind: (jitted op, args)}, its output h_k and its forward
    residuals; from shapes alone (`abstract`, nothing runs) or from a real state."""
    K = model.num_stages
    init = lambda b: init_train_state(model, optimizers, jax.random.key(0), b)
    ts = jax.eval_shape(init, batch) if abstract else init(batch)
    evaluate = jax.eval_shape if abstract else (lambda op, *args: op(*args))
    run = lambda call: evaluate(call[0], *call[1])
    rng, step, m = ts.rng, ts.step, 0
    x = batch[model.input_key]
    calls, outputs, residuals = [], [], []
    for k, stage in enumerate(model.stages):
        p, s = ts.params[k], ts.state[k]
        row: dict[OpKind, Call] = {}
        if k < K - 1:
            row[OpKind.FORWARD] = (
                mpmd_ops.forward_op(stage, k, k == 0, False),
                (p["stage"], s["stage"], x, rng, step, m),
            )
            h, res, _ = run(row[OpKind.FORWARD])
            head = mpmd_ops.head_op(model.heads[k], model.head_loss(k), 1.0, k, K, False)
            row[OpKind.AUX] = (head, (p["head"], s["head"], h, batch, rng, step, m, None))
            dphi, _, cot, metrics = run(row[OpKind.AUX])
            grads = {"head": dphi}
        else:
            forward = mpmd_ops.last_forward_op(stage, model.loss, k, k == 0, False)
            row[OpKind.FORWARD] = (forward, (p["stage"], s["stage"], x, batch, rng, step, m))
            res, _, cot, metrics = run(row[OpKind.FORWARD])
            h, grads = None, {}
        cotangent = {k: cot}
        if k > 0:  # stage 0 sends nothing back
            row[OpKind.INPUT_VJP] = (mpmd_ops.input_vjp_op, (p["stage"], res, cot))
            both = mpmd_ops.backward_op(StagePlan(((k, 1.0),), (k,)), False)
            row[OpKind.BACKWARD] = (both, (p["stage"], res, cotangent, None))
        param_only = mpmd_ops.backward_op(StagePlan(((k, 1.0),), ()), False)
        row[OpKind.PARAM_VJP] = (param_only, (p["stage"], res, cotangent, None))
        grads["stage"] = run(row[OpKind.PARAM_VJP])[0]
        update = mpmd_ops.update_op(optimizers[k], k, 1, False)
        row[OpKind.UPDATE] = (update, (p, ts.opt_state[k], grads, step, [metrics]))
        calls.append(row)
        outputs.append(h)
        residuals.append(res)
        x = h
    return calls, outputs, residuals


def _per_kind(rows: list[dict[OpKind, Any]], value: Callable) -> dict[OpKind, tuple[float, ...]]:
    """{kind: one value per stage}, 0 where a stage has no such op."""
    return {
        kind: tuple(value(row[kind]) if kind in row else 0.0 for row in rows) for kind in OpKind
    }


def _analyse(op: Callable, args: tuple, compiled: bool) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of the lowered or compiled op, as XLA reports them."""
    lowered = op.lower(*args)
    analysis = (lowered.compile() if compiled else lowered).cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def _median_time(op: Callable, args: tuple, repeats: int) -> float:
    jax.block_until_ready(op(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(op(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _batch_size(batch: Batch) -> int:
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"Every array of the batch needs the same leading size; got {sizes}.")
    return sizes.pop()


# Predicting --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Baseline:
    """e2e on a pipeline: its schedule (PIPELINE_SCHEDULES), M, step time and memory."""

    schedule: str
    microbatches: int
    step_time: float
    memory: float


@dataclasses.dataclass(frozen=True)
class Throughput:
    """A strategy's predicted step on K devices against the e2e baselines.

    Attributes:
      step_time: seconds per step of the whole batch (steady state).
      memory: peak per-device activation bytes.
      vs_e2e: its throughput over e2e with split backward at M = 1.
      pipeline: the fastest e2e pipeline whose memory does not exceed `memory`
        (None if none fits); vs_pipeline its throughput ratio (the strategy's over it).
    """

    strategy: str
    microbatches: int
    step_time: float
    memory: float
    vs_e2e: float
    pipeline: Baseline | None
    vs_pipeline: float | None


def pipeline_baselines(
    costs: StageCosts,
    hardware: Hardware = DEFAULT_HARDWARE,
    max_microbatches: int = 16,
    steps: int = 6,
) -> list[Baseline]:
    """e2e under every PIPELINE_SCHEDULES entry and every M ≤ max_microbatches that
    divides the batch."""
    K = costs.num_stages
    out = []
    for M in range(1, max_microbatches + 1):
        if costs.batch_size % M:
            continue
        model = costs.cost_model(M, hardware)
        for name in PIPELINE_SCHEDULES:
            s = simulate_e2e(K, M, name, model, steps)
            out.append(Baseline(name, M, s.period, activation_memory(s, costs)))
    return out


def predict_throughput(
    strategy: Strategy | str,
    costs: StageCosts,
    microbatches: int = 1,
    *,
    e2e_costs: StageCosts | None = None,
    baselines: Sequence[Baseline] | None = None,
    hardware: Hardware = DEFAULT_HARDWARE,
    steps: int = 6,
) -> Throughput:
    """`strategy` at M microbatches (split backward, its window's in-flight cap)
    against e2e split backward at M = 1 and the best e2e pipeline within its memory.

    `e2e_costs`: the plain network's costs, if its stages are cut differently (default:
    `costs`). `baselines` (default: pipeline_baselines(e2e_costs, hardware)) may be
    passed to share them between strategies; they must come from the same costs and
    hardware.
    """
    strategy = Strategy.parse(strategy) if isinstance(strategy, str) else strategy
    K, e2e_costs = costs.num_stages, costs if e2e_costs is None else e2e_costs
    s = simulate(strategy, K, microbatches, steps, costs.cost_model(microbatches, hardware))
    memory = activation_memory(s, costs)
    e2e = simulate(Strategy.e2e(), K, 1, steps, e2e_costs.cost_model(1, hardware))
    if baselines is None:
        baselines = pipeline_baselines(e2e_costs, hardware, steps=steps)
    fitting = [b for b in baselines if b.memory <= memory * (1 + 1e-9)]
    best = min(fitting, key=lambda b: (b.step_time, b.memory)) if fitting else None
    return Throughput(
        strategy=strategy.name,
        microbatches=microbatches,
        step_time=s.period,
        memory=memory,
        vs_e2e=e2e.period / s.period,
        pipeline=best,
        vs_pipeline=None if best is None else best.step_time / s.period,
    )


# Time to quality -----------------------------------------------------------------------------
def time_to_quality(
    curve: Sequence[tuple[int, float]],
    step_time: float,
    target: float,
    *,
    higher_is_better: bool,
) -> float | None:
    """Predicted wall-clock to reach `target`: the first step of the eval `curve`
    ((step, value) pairs) whose value reaches it, times the predicted `step_time`.

    None if the curve never reaches the target. The time is as fine as the evals are
    frequent: the target may have been reached between the previous eval and this one.
    """
    for step, value in sorted(curve):
        if (value >= target) if higher_is_better else (value <= target):
            return step * step_time
    return None
