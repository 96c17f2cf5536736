"""Program cache: runs that compile the same program share it; the cache is explicit."""

from __future__ import annotations

import jax
import numpy as np

from experiments.lib import builders, datasets
from ilbp import data
from tests import experiments_fixtures as fx


def test_frozen_is_hashable_and_ignores_key_order():
    a = builders.frozen({"b": [1, [2, 3]], "a": {"c": 1.0, "d": None}})
    b = builders.frozen({"a": {"d": None, "c": 1.0}, "b": (1, (2, 3))})
    assert a == b and hash(a) == hash(b)
    assert a != builders.frozen({"a": {"d": None, "c": 2.0}, "b": (1, (2, 3))})


def test_program_cache_shares_programs_and_initial_states(tmp_path):
    c = fx.tiny_image_config(f"idx:{fx.write_idx_dir(str(tmp_path))}", "pairwise,k=2")
    src = datasets.build_data(c, "train")
    cache = builders.ProgramCache()
    built = builders.build(c, src.info, cache)
    seed1, other = c.copy_and_resolve_references(), c.copy_and_resolve_references()
    seed1.seed, other.strategy = 1, "global"
    assert builders.build(seed1, src.info, cache) is built  # seeds share one compilation
    built_global = builders.build(other, src.info, cache)
    assert built_global is not built and len(cache.programs) == 2
    assert builders.build(c, src.info) is not built  # the process's PROGRAMS is another

    batch = data.batches(src, int(c.batch_size), seed=0).batch_at(0)
    first = built.executor.to_train_state(builders.initial_state(built, c, batch, cache))
    # The init program ignores the strategy: the global run reuses the host copy.
    again = builders.initial_state(built_global, other, batch, cache)
    assert len(cache.initial_states) == 1
    again = built_global.executor.to_train_state(again)
    for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(x, y)

    cache.clear()
    assert not cache.programs and not cache.initial_states
    assert builders.build(c, src.info, cache) is not built
