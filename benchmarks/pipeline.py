"""Pipeline benchmark: measured MPMD throughput vs the schedule model, and predictions.

    python -m benchmarks.pipeline                 # K = 2
    python -m benchmarks.pipeline --stages 4      # where there are ≥ 4 cores

Stage k runs on XLA CPU device k. The benchmark asks XLA for single-threaded devices
(`--xla_cpu_multi_thread_eigen=false`), but XLA:CPU in jax 0.10 does not honour that:
all CPU devices share one intra-op thread pool with a thread per core, so an op alone
uses more than one core and slows down when other devices run. Section 1 therefore
measures how concurrently the devices run: every stage's forward issued at once, against
the slowest one alone (1.00 = fully concurrent; sum / max of the forwards = serialised).
Prints:
  1. per-op costs (ms) of each stage, measured one op at a time
     (`ilbp.costs.stage_costs(method="measured")`), and that concurrency;
  2. per strategy and M: the MPMD executor's measured period per step, beside the
     schedule model's prediction from the per-op costs measured alone (target within
     15%, which presumes devices that do not slow each other down); then a traced run
     (`ilbp.pipeline.trace.record_timeline`): its period, the model's prediction from
     the costs the ops had in that run (`in_run_costs`: this tests the executor's order
     and dependencies, not the costs), and per device the traced busy fraction beside
     that model's; each device's peak memory: state + compiled temporaries + the
     residuals of the microbatches the schedule says it holds in flight;
  3. the model's predicted throughput relative to global for K = 4, 8, 16, 32 (docs/design.md
     §2.2 units, cheap aux heads), and the checks pairwise ≥ 0.9 (2K+1)/5 × split global at
     M = 1 and pairwise busy ≥ 0.85 at M = 4;
  4. the throughput-versus-memory frontier for K ∈ {4, 8, 16, 32}, M ∈ {1, ..., 16},
     with where a microbatched e2e pipeline overtakes interlocking.
Each section is measured (or predicted) as data and formatted by its own function.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ilbp
from benchmarks.common import median_seconds, use_cpu_devices
from ilbp.costs import Hardware, StageCosts, stage_costs
from ilbp.pipeline import make_executor, mpmd_ops
from ilbp.pipeline.trace import in_run_costs, record_timeline
from ilbp.schedule import (
    CostModel,
    OpKind,
    Prediction,
    Schedule,
    render_table,
    simulate,
    simulate_e2e,
    stage_work,
    steady_state,
    throughput_table,
)
from ilbp.strategy import Strategy

CLASSES = 10


class MLPStage(nn.Module):
    width: int
    layers: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        for _ in range(self.layers):
            x = jnp.tanh(nn.Dense(self.width)(x))
        return x


def mlp_model(K: int, width: int, layers: int) -> ilbp.StagedModel:
    """K equal MLP stages; cheap aux heads (one dense layer to the classes)."""
    stages = [ilbp.from_linen(MLPStage(width, layers), f"mlp{k}") for k in range(K - 1)]
    last = nn.Sequential([MLPStage(width, layers - 1), nn.Dense(CLASSES)])
    stages.append(ilbp.from_linen(last, "logits", train_kwarg=None))
    heads = [ilbp.from_linen(nn.Dense(CLASSES), f"head{k}", train_kwarg=None) for k in range(K - 1)]
    return ilbp.StagedModel(stages, heads, ilbp.classification_loss())


def mlp_batch(examples: int, width: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Random inputs and labels, as host arrays (the executor slices them on the host)."""
    kx, ky = jax.random.split(jax.random.key(seed))
    return {
        "inputs": np.asarray(jax.random.normal(kx, (examples, width))),
        "label": np.asarray(jax.random.randint(ky, (examples,), 0, CLASSES)),
    }


# 1. Per-op costs ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageMeasurements:
    """Per-stage op times of one microbatch, measured one op at a time.

    Attributes:
      ops: the measured op times (seconds) and bytes per example (`ilbp.costs`).
      transfer: per boundary, seconds to put h_k on stage k + 1's device.
      state_bytes, temp_bytes: per stage, parameters + model and optimizer state, and
        the compiled forward's temporaries.
      slowdown: every stage's forward issued at once over the slowest one alone.
    """

    ops: StageCosts
    transfer: tuple[float, ...]
    state_bytes: tuple[int, ...]
    temp_bytes: tuple[int, ...]
    slowdown: float

    def cost_model(self, unit_s: float = 1.0) -> CostModel:
        """The schedule model's costs in units of `unit_s` seconds (1e-3: ms), with the
        measured transfers."""
        model = self.ops.cost_model(1, Hardware("measured", 1.0, float("inf")))
        model = dataclasses.replace(model, transfer=self.transfer)
        scale = lambda v: v / unit_s if isinstance(v, float) else tuple(x / unit_s for x in v)
        return CostModel(
            **{f.name: scale(getattr(model, f.name)) for f in dataclasses.fields(model)}
        )

    def peak_bytes(self, in_flight: Sequence[int]) -> list[float]:
        """Per device: state + temporaries + the residuals of `in_flight` microbatches."""
        residual = [r * self.ops.batch_size for r in self.ops.residual_bytes]
        parts = zip(self.state_bytes, self.temp_bytes, in_flight, residual)
        return [state + temp + n * r for state, temp, n, r in parts]


def measure_stages(
    model: ilbp.StagedModel, optimizer: optax.GradientTransformation, batch, repeats: int = 15
) -> StageMeasurements:
    """Section 1: op times (`ilbp.costs`), transfers, memory and the forwards' slowdown."""
    K, devices = model.num_stages, jax.devices()[: model.num_stages]
    ops = stage_costs(model, optimizer, batch, method="measured", repeats=repeats)
    ts = ilbp.init_train_state(model, optimizer, jax.random.key(0), batch)
    forwards, transfer, temp = [], [], []
    x = batch[model.input_key]
    for k, stage in enumerate(model.stages):
        p, s, b, x = jax.device_put((ts.params[k], ts.state[k], batch, x), devices[k])
        rng, step = jax.device_put((ts.rng, ts.step), devices[k])
        if k < K - 1:
            op = mpmd_ops.forward_op(stage, k, k == 0, False)
            args = (p["stage"], s["stage"], x)
            args += (rng, step, 0)
        else:
            op = mpmd_ops.last_forward_op(stage, model.loss, k, k == 0, False)
            args = (p["stage"], s["stage"], x, b, rng, step, 0)
        forwards.append(lambda op=op, args=args: op(*args))
        temp.append(op.lower(*args).compile().memory_analysis().temp_size_in_bytes)
        if k < K - 1:
            x = forwards[-1]()[0]
            nxt = devices[k + 1]
            transfer.append(median_seconds(lambda x=x, nxt=nxt: jax.device_put(x, nxt), repeats))
    F = ops.ops[OpKind.FORWARD]
    state_bytes = tuple(_nbytes((ts.params[k], ts.state[k], ts.opt_state[k])) for k in range(K))
    slowdown = _slowdown(forwards[F.index(max(F))], forwards)
    return StageMeasurements(ops, tuple(transfer), state_bytes, tuple(temp), slowdown)


def _slowdown(slowest: Callable, forwards: Sequence[Callable], rounds: int = 9) -> float:
    """Median over interleaved rounds of: every stage's forward issued at once over the
    slowest forward alone (timed right before, so that machine noise cancels)."""
    together = lambda: [f() for f in forwards]
    ratios = sorted(median_seconds(together, 5) / median_seconds(slowest, 5) for _ in range(rounds))
    return ratios[rounds // 2]


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def format_stages(m: StageMeasurements) -> str:
    kinds = list(OpKind)
    lines = ["## 1. Per-op costs (ms)", ""]
    lines.append("stage  " + "  ".join(f"{k!s:>6}" for k in kinds) + "       T")
    for k in range(m.ops.num_stages):
        times = [m.ops.ops[kind][k] for kind in kinds]
        times.append(m.transfer[k] if k < len(m.transfer) else 0.0)
        lines.append(f"{k:>5}  " + "  ".join(f"{t * 1e3:6.2f}" for t in times))
    F = m.ops.ops[OpKind.FORWARD]
    lines += [
        "(F forward, A aux head fwd+bwd, V input VJP, W parameter VJP, B fused VJP, "
        "U update, T transfer of h_k)",
        f"every stage's forward at once takes {m.slowdown:.2f}× the slowest one alone "
        f"(1.00: the {len(F)} devices run concurrently; {sum(F) / max(F):.2f}: one after "
        "another)",
        "",
    ]
    return "\n".join(lines)


# 2. Measured vs model ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PeriodRow:
    """One strategy and M: measured and modelled periods (ms) and per-device detail."""

    strategy: str
    microbatches: int
    measured: float
    model: float
    traced: float
    in_run_model: float
    traced_busy: tuple[float, ...]
    in_run_busy: tuple[float, ...]
    held: tuple[int, ...]
    peak_mib: tuple[float, ...]


def measure_periods(
    model: ilbp.StagedModel,
    optimizer: optax.GradientTransformation,
    stages: StageMeasurements,
    make_batch: Callable[[int], dict],
    strategies: Sequence[str],
    microbatch_counts: Sequence[int],
    steps: int,
) -> list[PeriodRow]:
    """Section 2: every strategy at every M, run untraced and traced on the MPMD executor."""
    K, costs = model.num_stages, stages.cost_model()
    ts = ilbp.init_train_state(model, optimizer, jax.random.key(0), make_batch(1))
    rows = []
    for M in microbatch_counts:
        batch = make_batch(M)
        for spec in strategies:
            ex = make_executor("mpmd", model, spec, optimizer, microbatches=M)
            st = ex.from_train_state(ts)
            for _ in range(2):  # compile and warm up
                st, _ = ex.step(st, batch)
            jax.block_until_ready(st)
            t0 = time.perf_counter()
            for _ in range(steps):
                st, _ = ex.step(st, batch)
            jax.block_until_ready(st)
            measured = (time.perf_counter() - t0) / steps * 1e3
            sched = simulate(spec, K, M, steps=8, costs=costs, fused_backward=True)
            st, _ = record_timeline(ex, st, batch)  # compiles the traced (undonated) ops
            st, timeline = record_timeline(ex, st, batch, steps=steps)
            traced, traced_busy = steady_state(timeline, K)
            in_run = simulate(
                spec, K, M, steps=8, costs=in_run_costs(timeline, K), fused_backward=True
            )
            peak = tuple(b / 2**20 for b in stages.peak_bytes(sched.in_flight))
            name, model_ms = Strategy.parse(spec).name, sched.period * 1e3
            periods = (measured, model_ms, traced, in_run.period)
            rows.append(
                PeriodRow(name, M, *periods, traced_busy, in_run.busy, sched.in_flight, peak)
            )
    return rows


def format_periods(rows: Sequence[PeriodRow], slowdown: float) -> str:
    K = len(rows[0].held)
    header = f"{'strategy':10} {'M':>2} {'measured':>9} {'model':>8} {'ratio':>6}  "
    header += f"{'traced':>8} {'in-run model':>12} {'ratio':>6}  "
    header += "  ".join(f"busy{k} traced/model" for k in range(K))
    header += "  " + "  ".join(f"held{k}" for k in range(K))
    header += "  " + "  ".join(f"peakMB{k}" for k in range(K))
    lines = ["## 2. Measured vs model (period per step in ms; busy per device)", "", header]
    for r in rows:
        busy = "  ".join(f"{b:.2f}/{m:.2f}".rjust(19) for b, m in zip(r.traced_busy, r.in_run_busy))
        lines.append(
            f"{r.strategy:10} {r.microbatches:>2} {r.measured:9.2f} {r.model:8.2f} "
            f"{r.model / r.measured:6.2f}  {r.traced:8.2f} {r.in_run_model:12.2f} "
            f"{r.in_run_model / r.traced:6.2f}  {busy}  "
            + "  ".join(f"{h:5d}" for h in r.held)
            + "  "
            + "  ".join(f"{p:8.2f}" for p in r.peak_mib)
        )
    alone = sum(0.85 <= r.model / r.measured <= 1.15 for r in rows)
    in_run = sum(0.85 <= r.in_run_model / r.traced <= 1.15 for r in rows)
    lines += [
        "(model: from the per-op costs measured alone, ratio = model / measured; in-run "
        "model: from the traced ops' own durations, ratio = in-run model / traced; target "
        "0.85..1.15; held = microbatches' residuals a device holds at peak)",
        f"within 15%: the model from costs alone in {alone} of {len(rows)} cases, the "
        f"in-run model in {in_run} of {len(rows)}. Ops alone cost less than in the pipeline "
        f"where devices slow each other down (forwards together: {slowdown:.2f}× the "
        "slowest alone; 1.00 would be no interference).",
        "",
    ]
    return "\n".join(lines)


# 3. and 4. Model predictions ---------------------------------------------------------------
STAGE_COUNTS = (4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class TargetCheck:
    """Pairwise against split global at one aux-head cost and K."""

    aux: float
    num_stages: int
    vs_global: float  # throughput ratio at M = 1
    target: float  # 0.9 (2K + 1)/5
    busy_mean: float  # at M = 4
    busy_min: float


def target_checks() -> list[TargetCheck]:
    checks = []
    for aux in (0.0, 0.1):
        for K in STAGE_COUNTS:
            c = CostModel(aux=aux)
            g, p = simulate("global", K, 1, costs=c).period, simulate("pairwise", K, 1, costs=c)
            busy = simulate("pairwise", K, 4, costs=c).busy
            checks.append(
                TargetCheck(aux, K, g / p.period, 0.9 * (2 * K + 1) / 5, sum(busy) / K, min(busy))
            )
    return checks


def work_balanced() -> dict[int, list[tuple[int, int | str, float, float, float]]]:
    """Pairwise with stages cut by training work (`stage_work`), not by forward cost:
    per K, (M, cap, busy min equal, busy min balanced, throughput gain)."""
    out = {}
    for K in STAGE_COUNTS:
        work = stage_work("pairwise", K)
        scale = K / sum(1.0 / w for w in work)
        fwd = [scale / w for w in work]
        costs = CostModel(
            forward=fwd, input_vjp=fwd, param_vjp=[2 * f for f in fwd], param_vjp_shared=fwd
        )
        out[K] = []
        for M, cap in ((1, "window"), (4, "window"), (4, 3), (8, "window")):
            even = simulate("pairwise", K, M, steps=8)
            cut = simulate("pairwise", K, M, steps=8, costs=costs, max_in_flight=cap)
            out[K].append((M, cap, min(even.busy), min(cut.busy), even.period / cut.period))
    return out


FRONTIER_MICROBATCHES = (1, 2, 4, 8, 16)


def frontier() -> dict[int, dict[str, list[tuple[float, int]]]]:
    """Per K, per variant: (throughput per unit F, microbatches held) for each M."""
    variants: dict[str, Callable[[int, int], Schedule]] = {
        "global-gpipe": lambda K, M: simulate(
            "global", K, M, steps=4, priority="gpipe", fused_backward=True
        ),
        "e2e-1f1b": lambda K, M: simulate_e2e(K, M, "1f1b", steps=4),
        "e2e-zb": lambda K, M: simulate_e2e(K, M, "zb", steps=4),
        "pairwise": lambda K, M: simulate("pairwise", K, M, steps=4),
        "3wise": lambda K, M: simulate("3wise", K, M, steps=4),
        "local": lambda K, M: simulate("local", K, M, steps=4),
    }
    out = {}
    for K in STAGE_COUNTS:
        out[K] = {}
        for name, run in variants.items():
            scheds = [run(K, M) for M in FRONTIER_MICROBATCHES]
            out[K][name] = [(s.throughput, max(s.in_flight)) for s in scheds]
    return out


def format_predictions(
    table: Sequence[Prediction],
    checks: Sequence[TargetCheck],
    balanced: dict[int, list],
    front: dict[int, dict[str, list[tuple[float, int]]]],
) -> str:
    ok = lambda flag: "ok" if flag else "MISS"
    lines = [
        "## 3. Predicted throughput vs split-backward global (DESIGN units, free aux "
        "heads and transfers)",
        "",
        render_table(table),
        "",
    ]
    for c in checks:
        lines.append(
            f"aux={c.aux}: K={c.num_stages:2}: pairwise/global throughput at M=1 "
            f"{c.vs_global:.3f} (target ≥ 0.9·(2K+1)/5 = {c.target:.3f}: "
            f"{ok(c.vs_global >= c.target)}); pairwise busy at M=4 mean {c.busy_mean:.3f} "
            f"({ok(c.busy_mean >= 0.85)}), min {c.busy_min:.3f} (the end stages do 3F per "
            "microbatch, the others 4F)"
        )
    lines += [
        "",
        "Pairwise, stages cut to equal training work (forward of stage k ∝ 1/stage_work; "
        "same total forward; balance='work' in ilbp.models.resnet):",
    ]
    for K, cells in balanced.items():
        text = [
            f"M={M}{', hold 3' if cap == 3 else ''}: busy min {even:.2f} → {cut:.2f}, "
            f"throughput ×{gain:.3f}"
            for M, cap, even, cut, gain in cells
        ]
        lines.append(f"  K={K:2}: " + "; ".join(text))
    lines += [
        "  (→: from equal forwards, holding 2 microbatches, to work-balanced stages; "
        "'hold 3': the balanced stages may hold 3 microbatches' residuals)",
        "",
        "## 4. Throughput-vs-memory frontier (microbatches per unit F; held = "
        "microbatches of residuals at peak on the busiest-memory device)",
        "",
    ]
    for K, variants in front.items():
        lines.append(f"K={K}: " + "   ".join(f"M={M:<2}" + " " * 8 for M in FRONTIER_MICROBATCHES))
        for name, cells in variants.items():
            lines.append(f"  {name:13}" + "  ".join(f"{t:6.3f}/{h:<3}" for t, h in cells))
        lines.append(_overtake(K, variants))
    return "\n".join(lines) + "\n"


def _overtake(K: int, variants: dict[str, list[tuple[float, int]]]) -> str:
    best = max(t for t, _ in variants["pairwise"])
    held = max(h for _, h in variants["pairwise"])
    over = [
        (i, name)
        for name in ("e2e-1f1b", "e2e-zb", "global-gpipe")
        for i, (t, _) in enumerate(variants[name])
        if t > best
    ]
    if not over:
        return (
            f"  => at K={K}, no e2e or global pipeline with M ≤ 16 reaches pairwise's {best:.3f}/F."
        )
    i, name = min(over)
    t, h = variants[name][i]
    return (
        f"  => at K={K}, {name} with M={FRONTIER_MICROBATCHES[i]} ({t:.3f}/F, holding {h} "
        f"microbatches) overtakes pairwise's best throughput ({best:.3f}/F, holding {held})."
    )


# Entry point -------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--microbatches", default="1,4")
    p.add_argument("--strategies", default="global,local,pairwise,3wise")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=3, help="dense layers per stage")
    p.add_argument("--batch", type=int, default=512, help="microbatch size")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument(
        "--model_only",
        action="store_true",
        help="only the schedule model's sections (no measurement; deterministic)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model_only:
        print(predictions())
        return
    use_cpu_devices(args.stages, multi_thread_eigen=False)
    K, opt = args.stages, optax.sgd(0.01)
    model = mlp_model(K, args.width, args.layers)
    make_batch = lambda M: mlp_batch(args.batch * M, args.width)
    print(
        f"# MPMD on {K} CPU devices: {K} MLP stages of {args.layers} × {args.width}, "
        f"microbatch {args.batch}, {os.cpu_count()} cores\n"
    )
    stages = measure_stages(model, opt, make_batch(1))
    print(format_stages(stages))
    strategies = args.strategies.split(",")
    Ms = [int(m) for m in args.microbatches.split(",")]
    rows = measure_periods(model, opt, stages, make_batch, strategies, Ms, args.steps)
    print(format_periods(rows, stages.slowdown))
    print(predictions())


def predictions() -> str:
    """The schedule model's sections: throughput for K = 4..32, the target checks, the
    work-balanced split and the throughput-versus-memory frontier."""
    table = throughput_table(("global", "local", "pairwise", "3wise"), STAGE_COUNTS, (1, 4))
    return format_predictions(table, target_checks(), work_balanced(), frontier())


if __name__ == "__main__":
    main()
