"""Assertions on pytrees shared by the tests."""

import jax
import numpy as np


def assert_trees_close(a, b, rtol: float, atol: float, what: str = "") -> None:
    """Every pair of leaves of `a` and `b` is allclose (same structure required)."""
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=what
        ),
        a,
        b,
    )
