"""Runs a multi-process experiment on this machine, for trying multi-host runs on CPU.

    python -m experiments.launch --num_processes=2 -- \
        --config=experiments/configs/fashion_mnist_resnet.py --workdir=runs/two_procs
    python -m experiments.launch --num_processes=2 --module=experiments.compare -- --config=...

Starts `python -m MODULE ARGS --coordinator_address=localhost:PORT --num_processes=N
--process_id=I` for I = 0..N-1, each on --devices_per_process CPU devices (JAX_PLATFORMS=cpu),
with a free localhost port for the coordinator. Every output line is prefixed "[I] ".
When a process fails, the others are stopped (SIGTERM, then SIGKILL after --grace_s: JAX
takes SIGTERM for a preemption notice, so a process blocked in a collective waits for the
SIGKILL) and the launcher exits with the failed process's status; 0 when all succeed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import BinaryIO

_POLL_S = 0.1


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
    """This environment with JAX on `devices` CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    kept = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])
    return env


def _forward(stream: BinaryIO, prefix: bytes, lock: threading.Lock) -> None:
    """Copies `stream` to stdout line by line, each line after `prefix`."""
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.buffer.write(prefix + line)
            sys.stdout.buffer.flush()


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to every process group still running, SIGKILL to those left after grace_s."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        running = [p for p in procs if p.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + wait_s
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            time.sleep(_POLL_S)


def _status(returncode: int) -> int:
    """A shell-style exit status (128 + signal for a process killed by a signal)."""
    return 128 - returncode if returncode < 0 else returncode


def launch(module: str, args: list[str], num_processes: int, devices: int, grace_s: float) -> int:
    """Runs the processes (see the module docstring); returns the exit status."""
    address = f"localhost:{free_port()}"
    lock = threading.Lock()
    procs, threads = [], []
    for i in range(num_processes):
        flags = [f"--coordinator_address={address}", f"--num_processes={num_processes}"]
        p = subprocess.Popen(
            [sys.executable, "-u", "-m", module, *args, *flags, f"--process_id={i}"],
            env=child_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops its workers
        )
        procs.append(p)
        threads.append(threading.Thread(target=_forward, args=(p.stdout, b"[%d] " % i, lock)))
        threads[-1].start()
    status = 0
    try:
        while status == 0 and any(p.poll() is None for p in procs):
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.poll()]
            if failed:
                i, code = failed[0]
                print(f"[launch] process {i} exited with status {_status(code)}; stopping the "
                      "others.", file=sys.stderr, flush=True)  # fmt: skip
                status = _status(code)
            time.sleep(_POLL_S)
        status = status or next((_status(p.returncode) for p in procs if p.returncode), 0)
    except KeyboardInterrupt:
        status = 130
    finally:
        _stop(procs, grace_s)
        for t in threads:
            t.join(timeout=grace_s)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.launch",
        description="Run N local processes of a multi-host experiment (see the module doc).",
    )
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4, help="CPU devices each.")
    parser.add_argument("--module", default="experiments.train", help="python -m MODULE.")
    parser.add_argument("--grace_s", type=float, default=5.0, help="SIGTERM-to-SIGKILL wait.")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the module's flags.")
    opts = parser.parse_args(argv)
    # A launcher stopped by SIGTERM stops its processes too (through `launch`'s finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    if opts.num_processes < 1 or opts.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be ≥ 1.")
    return launch(opts.module, args, opts.num_processes, opts.devices_per_process, opts.grace_s)


if __name__ == "__main__":
    sys.exit(main())
