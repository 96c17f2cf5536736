"""The benchmarks run end to end on tiny sizes (their numbers are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "pipeline": [
        "--width=16", "--layers=1", "--batch=8", "--steps=2", "--microbatches=1",
        "--strategies=pairwise",
    ],
    "spmd_overlap": [
        "--stages=2", "--microbatches=1", "--strategies=pairwise", "--steps=2",
        "--d-model=16", "--seq-len=8", "--batch=2", "--repeats=1",
    ],
    "trainer_overhead": ["--executors=simulated", "--steps=5", "--log-every=2", "--repeats=1"],
}  # fmt: skip


def _run(cmd: list[str], **env: str) -> str:
    # Each benchmark sets its own device count before JAX starts: a fresh process.
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(cmd, cwd=ROOT, env=base | env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("module, expected", [
    ("pipeline", "in-run model in"),
    ("spmd_overlap", "pairwise"),
    ("trainer_overhead", "| simulated |"),
])  # fmt: skip
def test_benchmark_module_runs(module, expected):
    assert expected in _run([sys.executable, "-m", f"benchmarks.{module}", *TINY[module]])


def test_gpu_script_cpu_form():
    out = _run(["bash", "benchmarks/gpu.sh", "--cpu"], PYTHON=sys.executable)
    assert "| MFU | FLOP util. |" in out
    assert "| e2e |" in out and "| pairwise |" in out


def test_committed_schedule_model_output_is_current():
    """docs/results/schedule_model/output.txt (quoted by the README) is what the
    schedule model prints today."""
    from benchmarks import pipeline

    with open(os.path.join(ROOT, "docs", "results", "schedule_model", "output.txt")) as f:
        committed = f.read()
    assert committed == pipeline.predictions() + "\n", "rerun its command.txt"


def test_mpmd_memory_drops_the_parameter_copies():
    """Every stage's residuals per microbatch and modelled peak shrink (tiny CNN), and
    recomputing θ_k's residuals in V and W adds under 1% to their FLOPs."""
    from benchmarks import mpmd_memory, step_cost

    rows = mpmd_memory.measure(step_cost.cnn_workload(tiny=True), ["pairwise"], 2)
    assert len(rows) == 4
    for r in rows:
        assert r.residuals["after"] < r.residuals["before"], r
        assert r.peak["after"] < r.peak["before"], r
        assert 0 < r.backward_flops["after"] <= 1.01 * r.backward_flops["before"], r
    assert "| pairwise | 2 | 0 |" in mpmd_memory.format_rows(rows)


def test_trainer_overhead_skips_what_does_not_fit_one_accelerator():
    from benchmarks import trainer_overhead

    assert trainer_overhead.runnable_executors("simulated,mpmd,spmd", 1) == (
        ["simulated"],
        ["mpmd", "spmd"],
    )
    assert trainer_overhead.runnable_executors("mpmd,spmd", 2) == (["mpmd", "spmd"], [])
