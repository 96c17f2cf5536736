"""Multi-process start-up: `jax.distributed.initialize()` before any other JAX call.

The same command runs on every host. Which processes make up the job comes from
- the flags --coordinator_address=HOST:PORT --num_processes=N --process_id=I (all three,
  on every process; process 0 serves the coordinator at HOST:PORT), or else
- the cluster environment JAX detects (Cloud TPU pod slice, SLURM `srun`, Open MPI
  `mpirun`), or else
- nothing: one process, and nothing is initialized.

Failures are bounded. At start-up, by --coordinator_timeout_s: JAX aborts the whole
process when it times out waiting for the coordinator, so a process other than 0 first
checks that the coordinator's port answers and otherwise raises DistributedError with the
reason; process 0 says what it waits for before it waits. Later, by
--heartbeat_timeout_s: when a process dies, JAX's coordination service stops every other
process once the dead one has missed its heartbeats for that long ("Terminating process
because the JAX distributed service detected fatal errors ... another task died").
"""

from __future__ import annotations

import socket
import sys
import time

import jax
import numpy as np
from absl import flags
from jax._src import clusters
from jax.experimental import multihost_utils

from experiments.lib.checkpoints import ExperimentError

COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT where process 0 serves the JAX coordinator (multi-process runs; give "
    "--num_processes and --process_id too). Default: detected on Cloud TPU, SLURM, Open MPI.",
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1.")
COORDINATOR_TIMEOUT_S = flags.DEFINE_integer(
    "coordinator_timeout_s", 300, "Seconds to wait for every process to reach the coordinator."
)
HEARTBEAT_TIMEOUT_S = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    100,
    "Seconds after which a process that stopped sending heartbeats (died) is declared "
    "dead and every other process of the job exits.",
)

_PROBE_INTERVAL_S = 0.5


class DistributedError(ExperimentError):
    """The processes of a multi-process job could not find each other."""


def detected_cluster() -> type[clusters.ClusterEnv] | None:
    """The cluster environment `jax.distributed.initialize()` would auto-detect, if any.

    JAX keeps its detectors (Cloud TPU, SLURM, Open MPI, Kubernetes) in a registry with no
    public accessor; this reads it so that a one-process run never initializes.
    """
    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env
    return None


def _parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"--coordinator_address={address!r} is not HOST:PORT (e.g. 10.0.0.2:1234: process "
            "0's address as the other processes reach it, and a free port)."
        )
    return host.strip("[]"), int(port)


def _check_explicit(address: str | None, num_processes: int | None, process_id: int | None):
    names = ("coordinator_address", "num_processes", "process_id")
    given = (address, num_processes, process_id)
    missing = [f"--{name}" for name, value in zip(names, given) if value is None]
    if missing:
        raise ValueError(
            f"A multi-process run needs --coordinator_address, --num_processes and "
            f"--process_id together; {', '.join(missing)} missing (or give none of them to "
            "auto-detect a Cloud TPU, SLURM or Open MPI job)."
        )
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be ≥ 1.")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id={process_id} is out of range: with --num_processes={num_processes} "
            f"the ids are 0..{num_processes - 1}, one per process."
        )
    _parse_address(address)


def _wait_for_coordinator(address: str, timeout_s: float) -> float:
    """Seconds spent until the coordinator's port accepts a connection (≤ timeout_s)."""
    host, port = _parse_address(address)
    start = time.monotonic()
    while True:
        try:
            with socket.create_connection((host, port), timeout=_PROBE_INTERVAL_S):
                return time.monotonic() - start
        except OSError as e:
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise DistributedError(
                    f"No coordinator answered at {address} within {timeout_s:g} s ({e}). "
                    "Start process 0 (--process_id=0) with the same --coordinator_address, "
                    "check that HOST is process 0's address as this host reaches it and that "
                    "the port is open, or raise --coordinator_timeout_s."
                ) from e
            time.sleep(_PROBE_INTERVAL_S)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
) -> bool:
    """Joins the multi-process job, if this is one; returns whether it is.

    Call before any other JAX call. With no arguments the job is what JAX detects from the
    cluster environment (one process when there is none, or when it has one task).
    `timeout_s` bounds the wait for every process to join; `heartbeat_timeout_s` how
    long the others run on once one has died.

    Raises:
      ValueError: incomplete or inconsistent arguments (before anything starts).
      DistributedError: a process other than 0 found no coordinator within timeout_s.
    """
    if heartbeat_timeout_s < 1:
        raise ValueError(f"--heartbeat_timeout_s={heartbeat_timeout_s} must be ≥ 1 (seconds).")
    if (coordinator_address, num_processes, process_id) == (None, None, None):
        env = detected_cluster()
        if env is None or env.get_process_count() == 1:
            return False
        jax.distributed.initialize(
            initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s
        )
        return True
    _check_explicit(coordinator_address, num_processes, process_id)
    if num_processes == 1:
        return False
    if process_id == 0:
        print(
            f"Process 0 of {num_processes}: serving the coordinator at {coordinator_address}; "
            f"waiting up to {timeout_s} s for processes 1..{num_processes - 1} (JAX aborts "
            "with DEADLINE_EXCEEDED if they do not come).",
            file=sys.stderr,
        )
    else:
        timeout_s -= int(_wait_for_coordinator(coordinator_address, timeout_s))
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=max(timeout_s, 1),
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    return True


def is_primary() -> bool:
    """Whether this process writes the job's files and console output (process 0)."""
    return jax.process_index() == 0


def agreed(value: int, what: str) -> int:
    """`value` (an int or bool), checked to be the same on every process of the job (a
    collective: every process calls it, in the same order). DistributedError on every
    process if they differ, e.g. when the workdir is not on a filesystem that all of
    them see: a process that went its own way would wait forever in the next collective."""
    if jax.process_count() == 1:
        return value
    values = multihost_utils.process_allgather(np.asarray(int(value), np.int32))
    if values.min() != values.max():
        raise DistributedError(
            f"The processes disagree on {what} (process i says {values.tolist()}[i]). Put "
            "--workdir on a filesystem that every process reads and writes (for Orbax's "
            "multi-host checkpoints too), e.g. NFS or a GCS bucket."
        )
    return value


def initialize_from_flags() -> bool:
    """`initialize` with --coordinator_address, --num_processes, --process_id,
    --coordinator_timeout_s and --heartbeat_timeout_s."""
    return initialize(
        COORDINATOR_ADDRESS.value,
        NUM_PROCESSES.value,
        PROCESS_ID.value,
        timeout_s=COORDINATOR_TIMEOUT_S.value,
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S.value,
    )
