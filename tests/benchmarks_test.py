"""The benchmark scripts run end to end on tiny sizes (their numbers are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "pipeline.py": [
        "--width=16", "--layers=1", "--batch=8", "--steps=2", "--microbatches=1",
        "--strategies=pairwise",
    ],
    "spmd_overlap.py": [
        "--stages=2", "--microbatches=1", "--strategies=pairwise", "--steps=2",
        "--d-model=16", "--seq-len=8", "--batch=2", "--repeats=1",
    ],
}  # fmt: skip


@pytest.mark.parametrize("script, expected", [
    ("pipeline.py", "in-run model in"),
    ("spmd_overlap.py", "pairwise"),
])  # fmt: skip
def test_benchmark_script_runs(script, expected):
    # Each script sets its own device count before importing jax: a fresh process.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), *TINY[script]]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expected in out.stdout
