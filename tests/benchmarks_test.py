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
