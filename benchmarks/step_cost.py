"""Cost of one training step per strategy: time, XLA FLOPs, temp memory and MFU.

    python -m benchmarks.step_cost [--repeats 20] [--models cnn,transformer]
    python -m benchmarks.step_cost --models resnet50,transformer_large --engines routed

Per workload (a K = 4 staged model and one batch; `WORKLOADS`) it prints, relative to
global backprop in the same run: median step time, XLA's compiled FLOPs and temp memory
of e2e (the plain network, no aux heads), local, pairwise, 3-wise and `sum`-pairwise
(routed engine), and the routed engine relative to the spec engine. It predicts each
strategy's FLOPs from the plan and per-stage op costs measured by XLA (docs/design.md §2.2:
forward + aux head + input VJPs + one parameter VJP per stage, one backward where the
trained and sent cotangents coincide) and checks the targets of issue 2: compiled FLOPs
within 5% of that count, measured time ratio within 10% of the FLOP ratio, temp memory
no more than global's plus the aux heads' share.

Model-FLOPs utilisation: e2e's FLOPs per step (XLA's count of the lowered step: the work
the plain network needs) over a strategy's step time and the device's peak
(`ilbp.costs.PEAK_FLOPS` by device kind, or --peak-tflops); "FLOP util." uses the
strategy's own compiled FLOPs instead (aux heads included). All stages run in one
program on one device: this is a step's cost, not a pipeline's.

`--tiny` shrinks every workload to a few units (the form the tests run).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ilbp
from benchmarks.common import interleaved_median_seconds
from ilbp import engine, models
from ilbp.costs import peak_flops
from ilbp.stage import stage_rngs

STRATEGIES = ("e2e", "global", "local", "pairwise", "3wise", "pairwise:sum")
ENGINES = ("routed", "spec")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: ilbp.StagedModel
    batch: dict


def _images(shape: tuple[int, ...], classes: int, dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(0)
    return {
        "inputs": jnp.asarray(rng.normal(size=shape), dtype),
        "label": jnp.asarray(rng.integers(0, classes, shape[0]), jnp.int32),
    }


def _tokens(batch_size: int, seq_len: int, vocab: int) -> dict:
    tokens = np.random.default_rng(0).integers(0, vocab, (batch_size, seq_len + 1))
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


def cnn_workload(tiny: bool = False) -> Workload:
    layout, size, batch = ("4,1/8,1", 8, 4) if tiny else ("16,2/32,2/64,2", 28, 32)
    config = models.ResNetConfig.from_layout(layout, shortcut="B")
    split = "1,1,1,rest" if tiny else "2,2,2,rest"
    model = models.resnet(config, 4, blocks_per_stage=split, aux_head="gbpl_fc")
    name = f"CNN (ResNet, layout {layout}, 4 stages, {size}x{size}, B={batch})"
    return Workload(name, model, _images((batch, size, size, 1), 10))


def transformer_workload(tiny: bool = False) -> Workload:
    d, T, layers, batch = (16, 16, 4, 2) if tiny else (128, 128, 8, 16)
    config = models.TransformerConfig(
        vocab_size=256, max_len=T, num_layers=layers, d_model=d, num_heads=4
    )
    name = f"Transformer LM ({layers} blocks, 4 stages, D={d}, T={T}, B={batch})"
    return Workload(name, models.transformer_lm(config, 4), _tokens(batch, T, 256))


def resnet50_workload(tiny: bool = False) -> Workload:
    """ResNet-50 at 224x224 (bf16 compute), 1000 classes, 4 stages."""
    size, batch = (32, 2) if tiny else (224, 64)
    config = models.ResNetConfig.imagenet(50, dtype=jnp.bfloat16)
    model = models.resnet(
        config, 4, aux_head="gbpl_fc", num_classes=1000, input_shape=(size, size, 3)
    )
    name = f"ResNet-50 (bf16, 4 stages, {size}x{size}, B={batch})"
    return Workload(name, model, _images((batch, size, size, 3), 1000))


def transformer_large_workload(tiny: bool = False) -> Workload:
    """A GPT-style LM with D = 1024 and T = 1024 (bf16 compute), 4 stages."""
    d, T, layers, heads, batch = (32, 32, 4, 4, 2) if tiny else (1024, 1024, 8, 16, 8)
    config = models.TransformerConfig(
        vocab_size=32768 if not tiny else 256,
        max_len=T,
        num_layers=layers,
        d_model=d,
        num_heads=heads,
        dtype=jnp.bfloat16,
    )
    name = f"Transformer LM (bf16, {layers} blocks, 4 stages, D={d}, T={T}, B={batch})"
    return Workload(name, models.transformer_lm(config, 4), _tokens(batch, T, config.vocab_size))


WORKLOADS: dict[str, Callable[[bool], Workload]] = {
    "cnn": cnn_workload,
    "transformer": transformer_workload,
    "resnet50": resnet50_workload,
    "transformer_large": transformer_large_workload,
}


# Measuring ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StrategyCost:
    """One strategy's step: median seconds, compiled FLOPs and temp bytes (routed engine),
    the FLOPs the plan predicts, and the spec engine's seconds and FLOPs (if run)."""

    strategy: str
    seconds: float
    flops: float
    temp_bytes: float
    plan_flops: float | None
    unit_flops: float | None
    spec_seconds: float | None = None
    spec_flops: float | None = None


@dataclasses.dataclass(frozen=True)
class WorkloadCost:
    """Every strategy's step on one workload, and what MFU needs."""

    name: str
    rows: list[StrategyCost]
    model_flops: float  # e2e's lowered-step FLOPs: the plain network's work per step
    aux_flops: float | None  # the aux heads' FLOPs (forward + backward), if counted
    aux_bytes: float | None  # the aux heads' scratch + cotangent bytes, if counted
    device: str
    peak_flops: float | None


def compiled_costs(jitted, *args) -> tuple[float, float, object]:
    """(FLOPs, temp bytes, compiled executable) as XLA reports them."""
    compiled = jitted.lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    memory = compiled.memory_analysis()
    return float(analysis.get("flops", 0.0)), float(memory.temp_size_in_bytes), compiled


def flops_of(fn, *args) -> float:
    return compiled_costs(jax.jit(fn), *args)[0]


def per_stage_op_flops(model, params, state, batch) -> list[dict[str, float]]:
    """XLA FLOPs of each stage's pieces: forward F, forward+param VJP, forward+input VJP,
    forward+both (one backward), and the aux head's forward+backward."""
    rng = jax.random.key(0)
    h = batch[model.input_key]
    costs = []
    for k, stage in enumerate(model.stages):
        rng_stage = stage_rngs(rng, k)[0]
        row, h = stage_op_flops(stage, params[k]["stage"], state[k]["stage"], h, rng_stage, k)
        row["head"] = 0.0
        if k < model.num_stages - 1:
            head_loss = functools.partial(
                engine.head_forward_backward,
                model.heads[k],
                model.head_loss(k),
                1.0,
                state=state[k]["head"],
                batch=batch,
                rng=rng,
            )
            dphi_and_dh = lambda hp, y: head_loss(params=hp, h=y)[2:4]  # noqa: B023
            flops, temp, compiled = compiled_costs(jax.jit(dphi_and_dh), params[k]["head"], h)
            row["head"] = flops
            # What the head adds to a step's working set: its scratch space and the
            # activation-sized cotangent ∂L_k/∂h_k it produces.
            row["head_bytes"] = temp + float(compiled.memory_analysis().output_size_in_bytes)
        costs.append(row)
    return costs


def stage_op_flops(stage, p, s, h, rng, k: int) -> tuple[dict[str, float], jax.Array]:
    """FLOPs of one stage's forward and VJPs; also returns its output."""
    fwd = lambda p, h: stage.apply(p, s, h, rng, True)[0]
    y = fwd(p, h)
    ct = jnp.ones_like(y)

    def vjp(p, h, want_param: bool, want_input: bool):
        dp, dh = jax.vjp(fwd, p, h)[1](ct)
        return (dp if want_param else None), (dh if want_input else None)

    row = {"forward": flops_of(fwd, p, h)}
    if k == 0:  # The input is data: only a parameter VJP exists.
        row["param"] = flops_of(lambda p: jax.vjp(lambda p: fwd(p, h), p)[1](ct), p)
    else:
        row["param"] = flops_of(lambda p, h: vjp(p, h, True, False), p, h)
        row["input"] = flops_of(lambda p, h: vjp(p, h, False, True), p, h)
        row["both"] = flops_of(lambda p, h: vjp(p, h, True, True), p, h)
    return row, y


def predicted_flops(plan: ilbp.Plan, ops: list[dict[str, float]]) -> float:
    """Σ_k forward + head + backward work that the plan asks of stage k (docs/design.md §2.2)."""
    total = 0.0
    for k, row in enumerate(ops):
        sp = plan[k]
        forward_and_param = row["both"] if sp.shared_cotangent is not None else row["param"]
        input_only = row.get("input", 0.0) - row["forward"]
        head = row["head"] if plan.aux_heads else 0.0
        total += forward_and_param + head + len(sp.input_vjps) * input_only
    # The final loss's gradient w.r.t. the logits is negligible and not counted.
    return total


def unit_flops(plan: ilbp.Plan, ops: list[dict[str, float]]) -> float:
    """docs/design.md §2.2's unit count: F + 2F backward (+F per extra input VJP) + heads."""
    return sum(
        3 * row["forward"]
        + (row["head"] if plan.aux_heads else 0.0)
        + len(plan[k].input_vjps) * row["forward"]
        for k, row in enumerate(ops)
    )


def measure(
    workload: Workload,
    strategies: Sequence[str] = STRATEGIES,
    engines: Sequence[str] = ENGINES,
    repeats: int = 20,
    plan_count: bool = True,
    budget_s: float | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> WorkloadCost:
    """Compiles and times every strategy's step on `workload` (interleaved timing).

    `budget_s`: compile no further strategy once this many seconds have passed (the
    ones compiled are still timed), so that a time-limited run reports something.
    """
    start = time.perf_counter()
    model, batch, optimizer = workload.model, workload.batch, optax.sgd(0.01)
    ts = ilbp.init_train_state(model, optimizer, jax.random.key(0), batch)
    ops = per_stage_op_flops(model, ts.params, ts.state, batch) if plan_count else None
    compiled, calls = {}, {}
    for i, spec in enumerate(strategies):
        if i and budget_s is not None and time.perf_counter() - start > budget_s:
            log(f"time budget spent: skipping {', '.join(strategies[i:])}")
            strategies = strategies[:i]
            break
        strategy = ilbp.Strategy.parse(spec)
        for name in engines:
            step = ilbp.make_train_step(model, strategy, optimizer, engine=name, donate=False)
            flops, temp, executable = compiled_costs(step.jitted, ts, batch)
            compiled[spec, name] = (flops, temp)
            calls[spec, name] = lambda executable=executable: executable(ts, batch)
            log(f"compiled {strategy.name} ({name}): {flops / 1e9:.3f} GFLOPs")
    seconds = interleaved_median_seconds(calls, repeats)
    e2e_step = ilbp.make_train_step(model, ilbp.Strategy.e2e(), optimizer, donate=False)
    lowered = e2e_step.jitted.lower(ts, batch).cost_analysis()
    rows = []
    for spec in strategies:
        plan = ilbp.Strategy.parse(spec).plan(model.num_stages)
        (flops, temp), routed = compiled[spec, engines[0]], (spec, engines[0])
        spec_run = (spec, "spec") in compiled
        rows.append(
            StrategyCost(
                strategy=ilbp.Strategy.parse(spec).name,
                seconds=seconds[routed],
                flops=flops,
                temp_bytes=temp,
                plan_flops=predicted_flops(plan, ops) if ops else None,
                unit_flops=unit_flops(plan, ops) if ops else None,
                spec_seconds=seconds[spec, "spec"] if spec_run else None,
                spec_flops=compiled[spec, "spec"][0] if spec_run else None,
            )
        )
    device = jax.devices()[0].device_kind
    return WorkloadCost(
        workload.name,
        rows,
        float(lowered.get("flops", 0.0)),
        sum(r["head"] for r in ops) if ops else None,
        sum(r.get("head_bytes", 0.0) for r in ops) if ops else None,
        device,
        peak_flops(device),
    )


# Formatting --------------------------------------------------------------------------------
def render(result: WorkloadCost, peak: float | None = None) -> list[str]:
    """The workload's table and target checks; `peak` (FLOP/s) overrides the table's."""
    peak = peak or result.peak_flops
    base = next((r for r in result.rows if r.strategy == "global"), result.rows[0])
    mfu = lambda flops, r: f"{flops / r.seconds / peak:.3f}" if peak else "n/a"
    lines = [f"### {result.name}"]
    if result.aux_flops is not None:
        lines.append(
            f"aux heads' share of {base.strategy}'s FLOPs: {result.aux_flops / base.flops:.3f}; "
            f"of its temp memory: {result.aux_bytes / base.temp_bytes:.3f}"
        )
    lines.append(
        f"device {result.device}, peak "
        + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (pass --peak-tflops)")
        + f"; model FLOPs per step (e2e) {result.model_flops / 1e9:.3f} G"
    )
    lines += [
        "",
        f"| strategy | step ms | time / {base.strategy} | MFU | FLOP util. | GFLOPs "
        f"| FLOPs / {base.strategy} | FLOPs / plan count | FLOPs / unit count | temp MiB "
        f"| temp / {base.strategy} | routed/spec time | routed/spec FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratio = lambda a, b: f"{a / b:.3f}" if a is not None and b else "–"
    for r in result.rows:
        lines.append(
            f"| {r.strategy} | {r.seconds * 1e3:.1f} | {r.seconds / base.seconds:.3f} "
            f"| {mfu(result.model_flops, r)} | {mfu(r.flops, r)} | {r.flops / 1e9:.3f} "
            f"| {r.flops / base.flops:.3f} | {ratio(r.flops, r.plan_flops)} "
            f"| {ratio(r.flops, r.unit_flops)} | {r.temp_bytes / 2**20:.2f} "
            f"| {r.temp_bytes / base.temp_bytes:.3f} | {ratio(r.seconds, r.spec_seconds)} "
            f"| {ratio(r.flops, r.spec_flops)} |"
        )
    if result.aux_flops is not None:
        lines += ["", "Targets:"] + [_targets(r, base, result) for r in result.rows]
    return lines


def _targets(r: StrategyCost, base: StrategyCost, result: WorkloadCost) -> str:
    ok = lambda flag: "yes" if flag else "NO"
    predicted = r.flops / r.plan_flops
    time_ratio, flop_ratio = r.seconds / base.seconds, r.flops / base.flops
    temp_ratio = r.temp_bytes / base.temp_bytes
    aux_share = result.aux_bytes / base.temp_bytes
    return (
        f"- {r.strategy}: FLOPs within 5% of plan count: {ok(abs(predicted - 1) <= 0.05)} "
        f"({predicted:.3f}); time ratio within 10% of FLOP ratio: "
        f"{ok(abs(time_ratio / flop_ratio - 1) <= 0.10)} ({time_ratio:.3f} vs "
        f"{flop_ratio:.3f}); temp ≤ global + aux share: {ok(temp_ratio <= 1 + aux_share + 1e-9)}"
        f" ({temp_ratio:.3f})"
    )


# Entry point -------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--models", default="cnn,transformer", help=f"of {sorted(WORKLOADS)}")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--engines", default=",".join(ENGINES), help="routed first")
    p.add_argument("--no-plan-count", action="store_true", help="skip the per-stage FLOPs")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--tiny", action="store_true", help="test-sized workloads")
    p.add_argument("--budget-s", type=float, default=None, help="stop compiling after this")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown --models {sorted(unknown)}; choose from {sorted(WORKLOADS)}")
    if args.engines.split(",")[0] != "routed":
        p.error("--engines must start with routed (the engine the table reports)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    for key in args.models.split(","):
        result = measure(
            WORKLOADS[key](args.tiny),
            strategies=args.strategies.split(","),
            engines=args.engines.split(","),
            repeats=args.repeats,
            plan_count=not args.no_plan_count,
            budget_s=args.budget_s,
            log=lambda line: print(line, flush=True),
        )
        print("\n".join(render(result, peak)), flush=True)
        print()


if __name__ == "__main__":
    main()
