"""Linear probe: a causal ridge read-out, checked on features with a known lagged relation."""

from __future__ import annotations

import numpy as np
import pytest

from rpnt_core.data.splits import contiguous_splits
from rpnt_core.evaluate.probe import linear_probe_r2


def test_probe_reads_a_lagged_linear_relation_and_only_with_enough_lags():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3000, 6))
    w = rng.normal(size=(6, 2))
    v = np.zeros((3000, 2))
    v[2:] = f[:-2] @ w  # velocity at t is read from the features at t − 2
    sp = contiguous_splits(3000, train_fraction=0.3)
    assert linear_probe_r2(f, v, sp, n_lags=3)["test_r2"] > 0.999
    assert linear_probe_r2(f, v, sp, n_lags=2)["test_r2"] < 0.05  # the future-free window misses lag 2
    noise = rng.normal(size=(3000, 6))
    assert linear_probe_r2(noise, v, sp, n_lags=3)["test_r2"] < 0.05  # unrelated features carry nothing


def test_probe_rejects_bad_inputs():
    sp = contiguous_splits(100, train_fraction=0.3)
    with pytest.raises(ValueError, match="features"):
        linear_probe_r2(np.full((100, 3), np.nan), np.zeros((100, 2)), sp)
    with pytest.raises(ValueError, match="expected"):
        linear_probe_r2(np.zeros((100, 3)), np.zeros((99, 2)), sp)
