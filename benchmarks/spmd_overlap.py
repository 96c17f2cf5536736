"""SPMD executor: steps overlapped in one program against one drained step per call.

    python -m benchmarks.spmd_overlap                 # K = 4 stages on 4 CPU devices
    python -m benchmarks.spmd_overlap --stages 8 --microbatches 1,4

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
import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np
import optax

import ilbp
from benchmarks.common import median_seconds, use_cpu_devices
from ilbp.models import TransformerConfig, transformer_lm
from ilbp.pipeline import make_executor

VOCAB = 256


@dataclasses.dataclass(frozen=True)
class OverlapRow:
    """One strategy and M: ticks and measured ms per step, drained and overlapped."""

    strategy: str
    microbatches: int
    ticks_drained: float
    ticks_overlapped: float
    ms_drained: float
    ms_overlapped: float


def measure(args: argparse.Namespace) -> list[OverlapRow]:
    """Every strategy at every M: T steps one call each (drained) and in one call."""
    K, T = args.stages, args.steps
    config = TransformerConfig(
        vocab_size=VOCAB, max_len=args.seq_len, num_layers=K, d_model=args.d_model, num_heads=4
    )
    model, opt = transformer_lm(config, K), optax.sgd(0.01)
    mesh = ilbp.make_mesh(stage=K, data=1)
    rng = np.random.default_rng(0)
    rows = []
    for M in (int(m) for m in args.microbatches.split(",")):
        tokens = rng.integers(0, VOCAB, (T, args.batch * M, args.seq_len + 1))
        batches = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
        first = {name: x[0] for name, x in batches.items()}
        ts = ilbp.init_train_state(model, opt, jax.random.key(0), first)
        for spec in args.strategies.split(","):
            ex = make_executor("spmd", model, spec, opt, microbatches=M, mesh=mesh)
            # Calls donate their state: each continues from the state the last returned.
            held = [ex.from_train_state(ts)]

            def drained(ex=ex, batches=batches, held=held):
                for t in range(T):
                    held[0], _ = ex.step(held[0], {name: x[t] for name, x in batches.items()})
                return held[0]

            def overlapped(ex=ex, batches=batches, held=held):
                held[0], _ = ex.steps(held[0], batches)
                return held[0]

            rows.append(
                OverlapRow(
                    ilbp.Strategy.parse(spec).name,
                    M,
                    ex.ticks(1),
                    ex.ticks(T) / T,
                    median_seconds(drained, args.repeats) / T * 1e3,
                    median_seconds(overlapped, args.repeats) / T * 1e3,
                )
            )
    return rows


def format_rows(rows: Sequence[OverlapRow], steps: int) -> str:
    lines = [
        f"{'strategy':9} {'M':>2} {'ticks/step drained':>18} {'overlapped':>10} {'ratio':>6}  "
        f"{'ms/step drained':>15} {'overlapped':>10} {'ratio':>6}  "
        f"{'ms/tick drained':>15} {'overlapped':>10}"
    ]
    for r in rows:
        lines.append(
            f"{r.strategy:9} {r.microbatches:>2} {r.ticks_drained:18.2f} "
            f"{r.ticks_overlapped:10.2f} {r.ticks_drained / r.ticks_overlapped:6.2f}  "
            f"{r.ms_drained:15.2f} {r.ms_overlapped:10.2f} {r.ms_drained / r.ms_overlapped:6.2f}  "
            f"{r.ms_drained / r.ticks_drained:15.2f} {r.ms_overlapped / r.ticks_overlapped:10.2f}"
        )
    lines.append(
        "\n(ratio = drained / overlapped: the speed-up from overlapping steps; overlapped "
        f"ticks/step include the last step's drain, (T - 1)·P + drained over T = {steps})"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", default="1,4")
    p.add_argument("--strategies", default="global,local,pairwise,3wise")
    p.add_argument("--steps", type=int, default=8, help="T: steps per overlapped call")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="microbatch size")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    jax.config.update("jax_threefry_partitionable", False)  # faster init on XLA:CPU
    use_cpu_devices(args.stages)
    print(
        f"# SPMD, {args.stages} stages (one Transformer block each, D={args.d_model}, "
        f"T_seq={args.seq_len}), microbatch {args.batch}, {args.steps} steps per overlapped "
        f"call, {os.cpu_count()} cores\n"
    )
    print(format_rows(measure(args), args.steps))


if __name__ == "__main__":
    main()
