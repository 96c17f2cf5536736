"""Pipeline benchmark: measured MPMD throughput vs the schedule model, and predictions.

    python benchmarks/pipeline.py                 # K = 2
    python benchmarks/pipeline.py --stages 4      # where there are ≥ 4 cores

Stage k runs on XLA CPU device k. The benchmark asks XLA for single-threaded devices
(`--xla_cpu_multi_thread_eigen=false`), but XLA:CPU in jax 0.10 does not honour that:
all CPU devices share one intra-op thread pool with a thread per core, so an op alone
uses more than one core and slows down when other devices run. Section 1 therefore
measures how concurrently the devices run: every stage's forward issued at once, against
the slowest one alone (1.00 = fully concurrent; sum / max of the forwards = serialised).
Prints:
  1. per-op costs (ms) of each stage, measured one op at a time, and that concurrency;
  2. per strategy and M: the MPMD executor's measured period per step, beside the
     schedule model's prediction from the per-op costs measured alone (target within
     15%, which presumes devices that do not slow each other down); then a traced run
     (`ilbp.pipeline.trace.record_timeline`): its period, the model's prediction from
     the costs the ops had in that run (`in_run_costs`: this tests the executor's order
     and dependencies, not the costs), and per device the traced busy fraction beside
     that model's; each device's peak memory: state + compiled temporaries + the
     residuals of the microbatches the schedule says it holds in flight;
  3. the model's predicted throughput relative to global for K = 4, 8, 16, 32 (DESIGN.md
     units, cheap aux heads), and the checks pairwise ≥ 0.9 (2K+1)/5 × split global at
     M = 1 and pairwise busy ≥ 0.85 at M = 4;
  4. the throughput-versus-memory frontier for K ∈ {4, 8, 16, 32}, M ∈ {1, ..., 16},
     with where a microbatched global overtakes interlocking.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--microbatches", default="1,4")
    p.add_argument("--strategies", default="global,local,pairwise,3wise")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=3, help="dense layers per stage")
    p.add_argument("--batch", type=int, default=512, help="microbatch size")
    p.add_argument("--steps", type=int, default=8)
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before jax is imported: one device per stage
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={ARGS.stages} --xla_cpu_multi_thread_eigen=false"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ilbp  # noqa: E402
from ilbp.pipeline import make_executor  # noqa: E402
from ilbp.pipeline import mpmd_ops as ops  # noqa: E402
from ilbp.pipeline.trace import in_run_costs, record_timeline  # noqa: E402
from ilbp.schedule import (  # noqa: E402
    CostModel,
    render_table,
    simulate,
    stage_work,
    steady_state,
    throughput_table,
)
from ilbp.strategy import StagePlan, Strategy  # noqa: E402

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


def _time(fn, *args, reps: int = 15) -> float:
    """Median wall seconds of fn(*args), blocking on its result."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _slowdown(slowest, forwards, rounds: int = 9) -> float:
    """Median over interleaved rounds of: every stage's forward issued at once over the
    slowest forward alone (timed right before, so that machine noise cancels)."""
    together = lambda: [f() for f in forwards]
    ratios = sorted(_time(together, reps=5) / _time(slowest, reps=5) for _ in range(rounds))
    return ratios[rounds // 2]


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure_ops(
    ex, ts: ilbp.TrainState, batch
) -> tuple[CostModel, dict[str, list[float]], list[dict], float]:
    """Per-stage op times and memory on the stage's own device: (the cost model in
    seconds, the raw per-op seconds by kind, per-stage memory in bytes, the slowdown of
    the slowest forward when every stage's forward runs at once)."""
    model, K = ex.model, ex.model.num_stages
    rng, step = ts.rng, ts.step
    x = batch[model.input_key]
    costs = {n: [] for n in ("F", "A", "V", "W", "B", "U", "T")}
    memory, forwards = [], []
    for k in range(K):
        dev = ex.meshes[k].devices.flat[0]
        p, s, b = jax.device_put((ts.params[k], ts.state[k], batch), dev)
        r, t, x = jax.device_put((rng, step, x), dev)
        if k < K - 1:
            fwd = lambda p=p, s=s, x=x, r=r, t=t, k=k: ex.forward[k](
                p["stage"], s["stage"], x, r, t, 0
            )
            h, vjp, _ = fwd()
            costs["F"].append(_time(fwd))
            head = lambda h=h, p=p, s=s, b=b, r=r, t=t, k=k: ex.head[k](
                p["head"], s["head"], h, b, r, t, 0, None
            )
            costs["A"].append(_time(head))
            cot = head()[2]
            compiled = ex.forward[k].lower(p["stage"], s["stage"], x, r, t, 0).compile()
        else:
            fwd = lambda p=p, s=s, x=x, b=b, r=r, t=t, k=k: ex.forward[k](
                p["stage"], s["stage"], x, b, r, t, 0
            )
            vjp, _, cot, _ = fwd()
            h = cot
            costs["A"].append(0.0)
            costs["F"].append(_time(fwd))
            compiled = ex.forward[k].lower(p["stage"], s["stage"], x, b, r, t, 0).compile()
        forwards.append(fwd)
        cots = {k: cot}
        costs["V"].append(_time(ops.input_vjp_op, vjp, cot) if k > 0 else 0.0)
        w_op = ops.backward_op(StagePlan(((k, 1.0),), ()))
        costs["W"].append(_time(w_op, vjp, cots, None))
        b_op = ops.backward_op(StagePlan(((k, 1.0),), (k,) if k > 0 else ()))
        costs["B"].append(_time(b_op, vjp, cots, None))
        grads = w_op(vjp, cots, None)[0]
        g = {"stage": grads, **({"head": p["head"]} if k < K - 1 else {})}
        costs["U"].append(_time(ex.update[k], p, ts.opt_state[k], g, t, [{"loss": t}]))
        nxt = jax.devices()[(k + 1) % K]
        costs["T"].append(_time(jax.device_put, h, nxt))
        temp = compiled.memory_analysis().temp_size_in_bytes
        state_bytes = _nbytes((ts.params[k], ts.state[k], ts.opt_state[k]))
        memory.append({"state": state_bytes, "residual": _nbytes(vjp), "temp": temp})
        x = h
    slowdown = _slowdown(forwards[costs["F"].index(max(costs["F"]))], forwards)
    model_costs = CostModel.from_measured(
        costs["F"],
        costs["V"],
        costs["W"],
        fused_vjp=costs["B"],
        aux=tuple(costs["A"]),
        update=tuple(costs["U"]),
        transfer=sum(costs["T"]) / K,
    )
    return model_costs, costs, memory, slowdown


def run(args: argparse.Namespace) -> None:
    K = args.stages
    assert jax.device_count() >= K, "set --stages before jax initialises"
    model = mlp_model(K, args.width, args.layers)
    opt = optax.sgd(0.01)
    Ms = [int(m) for m in args.microbatches.split(",")]
    specs = args.strategies.split(",")
    print(
        f"# MPMD on {K} CPU devices: {K} MLP stages of {args.layers} × "
        f"{args.width}, microbatch {args.batch}, {os.cpu_count()} cores\n"
    )

    def make_batch(M: int):
        kx, ky = jax.random.split(jax.random.key(1))
        n = args.batch * M
        # Host arrays: the executor slices microbatches on the host, not on device 0.
        return {
            "inputs": np.asarray(jax.random.normal(kx, (n, args.width))),
            "label": np.asarray(jax.random.randint(ky, (n,), 0, CLASSES)),
        }

    ex0 = make_executor("mpmd", model, "pairwise", opt)
    ts = ilbp.init_train_state(model, opt, jax.random.key(0), make_batch(1))
    costs, raw, memory, slowdown = measure_ops(ex0, ts, make_batch(1))
    print("## 1. Per-op costs (ms)\n")
    print("stage  " + "  ".join(f"{n:>6}" for n in raw))
    for k in range(K):
        print(f"{k:>5}  " + "  ".join(f"{raw[n][k] * 1e3:6.2f}" for n in raw))
    print(
        "(F forward, A aux head fwd+bwd, V input VJP, W parameter VJP, B fused VJP, "
        "U update, T transfer of h_k)"
    )
    print(
        f"every stage's forward at once takes {slowdown:.2f}× the slowest one alone "
        f"(1.00: the {K} devices run concurrently; {sum(raw['F']) / max(raw['F']):.2f}: "
        "one after another)\n"
    )

    print("## 2. Measured vs model (period per step in ms; busy per device)\n")
    header = f"{'strategy':10} {'M':>2} {'measured':>9} {'model':>8} {'ratio':>6}  "
    header += f"{'traced':>8} {'in-run model':>12} {'ratio':>6}  "
    header += "  ".join(f"busy{k} traced/model" for k in range(K))
    header += "  " + "  ".join(f"held{k}" for k in range(K))
    header += "  " + "  ".join(f"peakMB{k}" for k in range(K))
    print(header)
    ratios = []
    for M in Ms:
        batch = make_batch(M)
        for spec in specs:
            ex = make_executor("mpmd", model, spec, opt, microbatches=M)
            st = ex.from_train_state(ts)
            for _ in range(2):  # compile and warm up
                st, _ = ex.step(st, batch)
            jax.block_until_ready(st)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                st, _ = ex.step(st, batch)
            jax.block_until_ready(st)
            period = (time.perf_counter() - t0) / args.steps * 1e3
            sched = simulate(spec, K, M, steps=8, costs=costs, fused_backward=True)
            st, timeline = record_timeline(ex, st, batch, steps=args.steps)
            traced, traced_busy = steady_state(timeline, K)
            in_run = simulate(
                spec, K, M, steps=8, costs=in_run_costs(timeline, K), fused_backward=True
            )
            busy = "  ".join(f"{b:.2f}/{m:.2f}".rjust(19) for b, m in zip(traced_busy, in_run.busy))
            held = "  ".join(f"{h:5d}" for h in sched.in_flight)
            peak = "  ".join(
                f"{(m['state'] + m['temp'] + h * m['residual']) / 2**20:8.2f}"
                for m, h in zip(memory, sched.in_flight)
            )
            model_ms = sched.period * 1e3
            ratios.append((model_ms / period, in_run.period / traced))
            print(
                f"{Strategy.parse(spec).name:10} {M:>2} {period:9.2f} {model_ms:8.2f} "
                f"{model_ms / period:6.2f}  {traced:8.2f} {in_run.period:12.2f} "
                f"{in_run.period / traced:6.2f}  {busy}  {held}  {peak}"
            )
    print(
        "(model: from the per-op costs measured alone, ratio = model / measured; in-run "
        "model: from the traced ops' own durations, ratio = in-run model / traced; target "
        "0.85..1.15; held = microbatches' residuals a device holds at peak)"
    )
    within_alone = sum(0.85 <= r <= 1.15 for r, _ in ratios)
    within_in_run = sum(0.85 <= r <= 1.15 for _, r in ratios)
    print(
        f"within 15%: the model from costs alone in {within_alone} of {len(ratios)} cases, "
        f"the in-run model in {within_in_run} of {len(ratios)}. Ops alone cost less than in the "
        f"pipeline where devices slow each other down (forwards together: {slowdown:.2f}× "
        "the slowest alone; 1.00 would be no interference).\n"
    )
    predictions()


def predictions() -> None:
    print(
        "## 3. Predicted throughput vs split-backward global (DESIGN units, free aux "
        "heads and transfers)\n"
    )
    rows = throughput_table(("global", "local", "pairwise", "3wise"), (4, 8, 16, 32), (1, 4))
    print(render_table(rows))
    print()
    for aux in (0.0, 0.1):
        for K in (4, 8, 16, 32):
            c = CostModel(aux=aux)
            g = simulate("global", K, 1, costs=c).period
            p = simulate("pairwise", K, 1, costs=c).period
            target = 0.9 * (2 * K + 1) / 5
            busy_k = simulate("pairwise", K, 4, costs=c).busy
            busy, low = sum(busy_k) / K, min(busy_k)
            print(
                f"aux={aux}: K={K:2}: pairwise/global throughput at M=1 {g / p:.3f} "
                f"(target ≥ 0.9·(2K+1)/5 = {target:.3f}: {'ok' if g / p >= target else 'MISS'}); "
                f"pairwise busy at M=4 mean {busy:.3f} ({'ok' if busy >= 0.85 else 'MISS'}), "
                f"min {low:.3f} (the end stages do 3F per microbatch, the others 4F)"
            )
    print()
    work_balanced()
    frontier()


def work_balanced() -> None:
    """Pairwise with stages cut by training work (`stage_work`), not by forward cost."""
    print(
        "Pairwise, stages cut to equal training work (forward of stage k ∝ 1/stage_work; "
        "same total forward; balance='work' in ilbp.models.resnet):"
    )
    for K in (4, 8, 16, 32):
        work = stage_work("pairwise", K)
        scale = K / sum(1.0 / w for w in work)
        fwd = [scale / w for w in work]
        costs = CostModel(
            forward=fwd, input_vjp=fwd, param_vjp=[2 * f for f in fwd], param_vjp_shared=fwd
        )
        cells = []
        for M, cap in ((1, "window"), (4, "window"), (4, 3), (8, "window")):
            even = simulate("pairwise", K, M, steps=8)
            cut = simulate("pairwise", K, M, steps=8, costs=costs, max_in_flight=cap)
            cells.append(
                f"M={M}{', hold 3' if cap == 3 else ''}: busy min {min(even.busy):.2f} → "
                f"{min(cut.busy):.2f}, throughput ×{even.period / cut.period:.3f}"
            )
        print(f"  K={K:2}: " + "; ".join(cells))
    print(
        "  (→: from equal forwards, holding 2 microbatches, to work-balanced stages; "
        "'hold 3': the balanced stages may hold 3 microbatches' residuals)\n"
    )


def frontier() -> None:
    """Throughput (microbatches per F) and peak microbatches held, K × M × strategy."""
    print(
        "## 4. Throughput-vs-memory frontier (microbatches per unit F; held = "
        "microbatches of residuals at peak on the busiest-memory device)\n"
    )
    variants = {
        "global-gpipe": ("global", dict(priority="gpipe", fused_backward=True)),
        "global-1f1b": ("global", dict()),
        "pairwise": ("pairwise", dict()),
        "3wise": ("3wise", dict()),
        "local": ("local", dict()),
    }
    Ms = (1, 2, 4, 8, 16)
    for K in (4, 8, 16, 32):
        print(f"K={K}: " + "   ".join(f"M={M:<2}" + " " * 8 for M in Ms))
        results = {}
        for name, (spec, opts) in variants.items():
            cells = []
            for M in Ms:
                s = simulate(spec, K, M, steps=4, **opts)
                results[(name, M)] = (s.throughput, max(s.in_flight))
                cells.append(f"{s.throughput:6.3f}/{max(s.in_flight):<3}")
            print(f"  {name:13}" + "  ".join(cells))
        best_pair = max(results[("pairwise", M)][0] for M in Ms)
        over = [
            (name, M)
            for name in ("global-1f1b", "global-gpipe")
            for M in Ms
            if results[(name, M)][0] > best_pair
        ]
        if over:
            name, M = min(over, key=lambda x: x[1])
            thr, held = results[(name, M)]
            print(
                f"  => at K={K}, {name} with M={M} ({thr:.3f}/F, holding {held} microbatches) "
                f"overtakes pairwise's best throughput ({best_pair:.3f}/F, holding "
                f"{max(results[('pairwise', m)][1] for m in Ms)})."
            )
        else:
            print(f"  => at K={K}, no global with M ≤ 16 reaches pairwise's {best_pair:.3f}/F.")
    print()


if __name__ == "__main__":
    run(ARGS)
