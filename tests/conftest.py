"""Test session set-up, before jax is imported anywhere.

- 8 fake CPU devices, for the data-parallel and pipeline tests.
- Non-partitionable threefry: on XLA:CPU it compiles random initialisers about 3x
  faster (compilation dominates these tiny tests); it changes which random numbers are
  drawn, not what any test checks.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
