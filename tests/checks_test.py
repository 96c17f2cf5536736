"""ilbp.checks: the batch, microbatch and device checks the train step and executors share."""

import numpy as np
import pytest

from ilbp.checks import check_batch_split, check_microbatches, check_stage_devices


def test_batch_split():
    batch = {"inputs": np.zeros((12, 3)), "label": np.zeros(12)}
    assert check_batch_split(batch, data=2, microbatches=3) == 12
    with pytest.raises(ValueError, match=r"\(2\) times the number of microbatches \(4\).*of 8"):
        check_batch_split(batch, data=2, microbatches=4)
    with pytest.raises(ValueError, match=r"same leading size; got \[11, 12\]"):
        check_batch_split({**batch, "label": np.zeros(11)}, data=1, microbatches=1)


@pytest.mark.parametrize("bad", [0, -1, 2.0, None])
def test_microbatches(bad):
    check_microbatches(3)
    with pytest.raises(ValueError, match="microbatches must be an integer ≥ 1"):
        check_microbatches(bad)


def test_stage_devices():
    check_stage_devices(4, 4, "mpmd")
    with pytest.raises(ValueError, match=r"K=5 stages but only 4 devices.*device_count=5"):
        check_stage_devices(5, 4, "mpmd")
