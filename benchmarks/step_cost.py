"""Cost of one training step per strategy: time, XLA FLOPs and temp memory, side by side.

    python -m benchmarks.step_cost [--repeats 20] [--models cnn,transformer]

For a 4-stage CNN and a 4-stage Transformer it prints, relative to global backprop in
the same run: median step time, XLA's compiled FLOPs and temp memory of local, pairwise,
3-wise and `sum`-pairwise (routed engine), and the routed engine relative to the spec
engine. It also predicts each strategy's FLOPs from the plan and per-stage op costs
measured by XLA (docs/design.md §2.2: forward + aux head + input VJPs + one parameter VJP per
stage, one backward where the trained and sent cotangents coincide) and checks the
targets of issue 2: compiled FLOPs within 5% of that count, measured time ratio within
10% of the FLOP ratio, temp memory no more than global's plus the aux heads' share.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ilbp
from ilbp import engine, models
from ilbp.stage import stage_rngs

STRATEGIES = ("global", "local", "pairwise", "3wise", "pairwise:sum")


def cnn_workload(batch_size: int = 32):
    config = models.ResNetConfig.from_layout("16,2/32,2/64,2", shortcut="B")
    model = models.resnet(config, 4, blocks_per_stage="2,2,2,rest", aux_head="gbpl_fc")
    rng = np.random.default_rng(0)
    batch = {
        "inputs": jnp.asarray(rng.normal(size=(batch_size, 28, 28, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
    }
    return "CNN (ResNet-14, 4 stages, 28x28, B=32)", model, batch


def transformer_workload(batch_size: int = 16, seq_len: int = 128):
    config = models.TransformerConfig(
        vocab_size=256, max_len=seq_len, num_layers=8, d_model=128, num_heads=4
    )
    model = models.transformer_lm(config, 4)
    tokens = np.random.default_rng(0).integers(0, 256, (batch_size, seq_len + 1))
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    return "Transformer LM (8 blocks, 4 stages, D=128, T=128, B=16)", model, batch


def compiled_costs(jitted, *args) -> tuple[float, float, object]:
    """(FLOPs, temp bytes, compiled executable) as XLA reports them."""
    compiled = jitted.lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    memory = compiled.memory_analysis()
    return float(analysis.get("flops", 0.0)), float(memory.temp_size_in_bytes), compiled


def interleaved_median_times(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each zero-argument call, timed round-robin so that drift in the
    machine's load affects every call alike."""
    for call in calls.values():
        jax.block_until_ready(call())
    times = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


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
            _, _, compiled = compiled_costs(jax.jit(dphi_and_dh), params[k]["head"], h)
            row["head"] = flops_of(dphi_and_dh, params[k]["head"], h)
            memory = compiled.memory_analysis()
            # What the head adds to a step's working set: its scratch space and the
            # activation-sized cotangent ∂L_k/∂h_k it produces.
            row["head_bytes"] = float(memory.temp_size_in_bytes + memory.output_size_in_bytes)
        costs.append(row)
    return costs


def flops_of(fn, *args) -> float:
    return compiled_costs(jax.jit(fn), *args)[0]


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
        total += forward_and_param + row["head"] + len(sp.input_vjps) * input_only
    # The final loss's gradient w.r.t. the logits is negligible and not counted.
    return total


def unit_flops(plan: ilbp.Plan, ops: list[dict[str, float]]) -> float:
    """docs/design.md §2.2's unit count: F + 2F backward (+F per extra input VJP) + heads."""
    return sum(
        3 * row["forward"] + row["head"] + len(plan[k].input_vjps) * row["forward"]
        for k, row in enumerate(ops)
    )


def benchmark(name, model, batch, repeats: int) -> list[str]:
    optimizer = optax.sgd(0.01)
    ts = ilbp.init_train_state(model, optimizer, jax.random.key(0), batch)
    ops = per_stage_op_flops(model, ts.params, ts.state, batch)
    compiled, calls = {}, {}
    for spec in STRATEGIES:
        strategy = ilbp.Strategy.parse(spec)
        for engine_name in ("routed", "spec"):
            step = ilbp.make_train_step(
                model, strategy, optimizer, engine=engine_name, donate=False
            )
            flops, temp, executable = compiled_costs(step.jitted, ts, batch)
            compiled[spec, engine_name] = (flops, temp)
            calls[spec, engine_name] = lambda executable=executable: executable(ts, batch)
    seconds = interleaved_median_times(calls, repeats)
    base_flops, base_temp = compiled["global", "routed"]
    base_time = seconds["global", "routed"]
    rows = []
    for spec in STRATEGIES:
        plan = ilbp.Strategy.parse(spec).plan(model.num_stages)
        (flops, temp), t = compiled[spec, "routed"], seconds[spec, "routed"]
        rows.append(
            dict(
                strategy=ilbp.Strategy.parse(spec).name,
                time=t * 1e3,
                time_ratio=t / base_time,
                flops=flops / 1e9,
                flop_ratio=flops / base_flops,
                predicted=flops / predicted_flops(plan, ops),
                unit=flops / unit_flops(plan, ops),
                temp=temp / 2**20,
                temp_ratio=temp / base_temp,
                vs_spec_time=t / seconds[spec, "spec"],
                vs_spec_flops=flops / compiled[spec, "spec"][0],
            )
        )
    aux_flops = sum(r["head"] for r in ops) / base_flops
    aux_bytes = sum(r.get("head_bytes", 0.0) for r in ops) / base_temp
    return render(name, rows, aux_flops, aux_bytes)


def render(name: str, rows: list[dict], aux_flops: float, aux_bytes: float) -> list[str]:
    lines = [
        f"### {name}",
        f"aux heads' share of global's FLOPs: {aux_flops:.3f}; of its temp memory: {aux_bytes:.3f}",
        "",
        "| strategy | step ms | time / global | GFLOPs | FLOPs / global | FLOPs / plan count "
        "| FLOPs / unit count | temp MiB | temp / global | routed/spec time | routed/spec FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['time']:.1f} | {r['time_ratio']:.3f} | {r['flops']:.3f} | "
            f"{r['flop_ratio']:.3f} | {r['predicted']:.3f} | {r['unit']:.3f} | {r['temp']:.2f} | "
            f"{r['temp_ratio']:.3f} | {r['vs_spec_time']:.3f} | {r['vs_spec_flops']:.3f} |"
        )
    lines.append("")
    lines.append("Targets:")
    for r in rows:
        flops_ok = abs(r["predicted"] - 1) <= 0.05
        time_ok = abs(r["time_ratio"] / r["flop_ratio"] - 1) <= 0.10
        mem_ok = r["temp_ratio"] <= 1 + aux_bytes + 1e-9
        lines.append(
            f"- {r['strategy']}: FLOPs within 5% of plan count: {_ok(flops_ok)} "
            f"({r['predicted']:.3f}); time ratio within 10% of FLOP ratio: {_ok(time_ok)} "
            f"({r['time_ratio']:.3f} vs {r['flop_ratio']:.3f}); temp ≤ global + aux share: "
            f"{_ok(mem_ok)} ({r['temp_ratio']:.3f})"
        )
    return lines


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", default="cnn,transformer")
    args = parser.parse_args()
    workloads = {"cnn": cnn_workload, "transformer": transformer_workload}
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    for key in args.models.split(","):
        print("\n".join(benchmark(*workloads[key](), repeats=args.repeats)))
        print()


if __name__ == "__main__":
    main()
