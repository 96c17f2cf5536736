"""The SPMD executor across 2 processes × 4 CPU devices equals the single-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each process: 4 local CPU devices of a global (stage=4, data=2) mesh; gloo collectives.
WORKER = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2])
    )
    import numpy as np
    import ilbp
    from ilbp.pipeline import make_executor
    from tests.pipeline_spmd_test import BATCHES, MODEL, OPT
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    ts = ilbp.init_train_state(MODEL, OPT, jax.random.key(0), BATCHES[0])
    mesh = ilbp.make_mesh(stage=4, data=2)
    ex = make_executor("spmd", MODEL, "pairwise:sum", OPT, microbatches=2, mesh=mesh)
    st = ex.from_train_state(ts)
    for batch in BATCHES:  # host (numpy) batches: each process places its own shards
        st, metrics = ex.step(st, jax.tree.map(np.asarray, batch))
    ts = ex.to_train_state(st)  # replicated over the mesh: every process has it all
    # For checkpoints: spread over the mesh, each process holding only its shards, and
    # restacked on the devices.
    spread = ex.to_train_state(st, spread=True)
    for leaf in jax.tree.leaves((spread.params, spread.opt_state)):
        assert not leaf.is_fully_addressable and (leaf.ndim == 0 or not leaf.is_fully_replicated)
    back = ex.to_train_state(ex.from_train_state(spread))
    for a, b in zip(*(jax.tree.leaves((t.step, t.params, t.opt_state)) for t in (back, ts))):
        assert np.array_equal(a, b), (a, b)
    if jax.process_index() == 0:
        np.savez(sys.argv[3], *jax.tree.leaves(ts.params))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    from tests.pipeline_spmd_test import spmd_run

    port, out = _free_port(), tmp_path / "params.npz"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(port), str(i), str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=240)[0].decode()[-3000:] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    # The single-process run of the same case (cached if the SPMD tests ran first).
    ex, st, _ = spmd_run("pairwise:sum", 2, 2)
    got = np.load(out)
    for i, leaf in enumerate(jax.tree.leaves(ex.to_train_state(st).params)):
        np.testing.assert_allclose(got[f"arr_{i}"], np.asarray(leaf), rtol=1e-5, atol=1e-7)
