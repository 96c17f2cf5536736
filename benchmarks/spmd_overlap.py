"""SPMD executor: steps overlapped in one program against one drained step per call.

    python benchmarks/spmd_overlap.py                 # K = 4 stages on 4 CPU devices
    python benchmarks/spmd_overlap.py --stages 8 --microbatches 1,4

A small Transformer LM (one block per stage) runs on the `spmd` executor. Per strategy
and M it prints the clock ticks per step of `step` (the pipeline drains every step) and
of `steps(T)` (stage k starts step s + 1 once its own update for step s is done), their
ratio, and the measured time per step of each with their ratio, side by side in one
run, and the time per tick of each. The stages run in lockstep, so the tick ratio is
the speed-up of overlapping where every tick costs the same; but a stage skips the ops
it has no work for, so ticks differ (a drained step has more idle ones), and a program
call has a fixed cost (launch, buffers) that T steps per call amortise: the measured
ratio can differ from the tick ratio (the ms/tick columns show how). Both runs give
the same parameters (tests/pipeline_spmd_test.py).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", default="1,4")
    p.add_argument("--strategies", default="global,local,pairwise,3wise")
    p.add_argument("--steps", type=int, default=8, help="T: steps per overlapped call")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="microbatch size")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before jax is imported: one CPU device per stage
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.stages}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")  # faster init on XLA:CPU
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ilbp  # noqa: E402
from ilbp.models import TransformerConfig, transformer_lm  # noqa: E402
from ilbp.pipeline import make_executor  # noqa: E402

VOCAB = 256


def _median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of fn() (which blocks), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(args: argparse.Namespace) -> None:
    K, T = args.stages, args.steps
    config = TransformerConfig(
        vocab_size=VOCAB,
        max_len=args.seq_len,
        num_layers=K,
        d_model=args.d_model,
        num_heads=4,
    )
    model = transformer_lm(config, K)
    opt = optax.sgd(0.01)
    mesh = ilbp.make_mesh(stage=K, data=1)
    print(
        f"# SPMD, {K} stages (one Transformer block each, D={args.d_model}, "
        f"T_seq={args.seq_len}), microbatch {args.batch}, {T} steps per overlapped call, "
        f"{os.cpu_count()} cores\n"
    )
    header = (
        f"{'strategy':9} {'M':>2} {'ticks/step drained':>18} {'overlapped':>10} {'ratio':>6}  "
        f"{'ms/step drained':>15} {'overlapped':>10} {'ratio':>6}  "
        f"{'ms/tick drained':>15} {'overlapped':>10}"
    )
    print(header)
    rng = np.random.default_rng(0)
    for M in (int(m) for m in args.microbatches.split(",")):
        size = args.batch * M
        tokens = rng.integers(0, VOCAB, (T, size, args.seq_len + 1))
        batches = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
        first = {name: x[0] for name, x in batches.items()}
        ts = ilbp.init_train_state(model, opt, jax.random.key(0), first)
        for spec in args.strategies.split(","):
            ex = make_executor("spmd", model, spec, opt, microbatches=M, mesh=mesh)
            st = ex.from_train_state(ts)

            def drained(st=st, ex=ex, batches=batches):
                for t in range(T):
                    st, _ = ex.step(st, {name: x[t] for name, x in batches.items()})
                jax.block_until_ready(st)

            def overlapped(st=st, ex=ex, batches=batches):
                jax.block_until_ready(ex.steps(st, batches)[0])

            t_drained = _median_seconds(drained, args.repeats) / T * 1e3
            t_overlap = _median_seconds(overlapped, args.repeats) / T * 1e3
            ticks_drained, ticks_overlap = ex.ticks(1), ex.ticks(T) / T
            print(
                f"{ilbp.Strategy.parse(spec).name:9} {M:>2} {ticks_drained:18.2f} "
                f"{ticks_overlap:10.2f} {ticks_drained / ticks_overlap:6.2f}  "
                f"{t_drained:15.2f} {t_overlap:10.2f} {t_drained / t_overlap:6.2f}  "
                f"{t_drained / ticks_drained:15.2f} {t_overlap / ticks_overlap:10.2f}"
            )
    print(
        "\n(ratio = drained / overlapped: the speed-up from overlapping steps; overlapped "
        f"ticks/step include the last step's drain, (T - 1)·P + drained over T = {T})"
    )


if __name__ == "__main__":
    run(ARGS)
