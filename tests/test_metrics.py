"""R² (rpnt_core.evaluate.metrics) against closed-form cases, in the spirit of nlb_tools' tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rpnt_core.evaluate.metrics import r2_per_dim, r2_score


def _direct_r2(y: np.ndarray, yhat: np.ndarray) -> float:
    """The convention written out once more in float64: 1 − ΣΣ(y−ŷ)² / ΣΣ(y−ȳ_d)²."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    yhat = np.asarray(yhat, dtype=np.float64).reshape(len(yhat), -1)
    return 1.0 - np.sum((y - yhat) ** 2) / np.sum((y - y.mean(axis=0)) ** 2)


# --- closed-form cases ---------------------------------------------------------------------------


def test_perfect_prediction_is_one() -> None:
    y = np.random.default_rng(0).normal(size=(50, 3))  # (T, D)
    assert r2_score(y, y) == 1.0
    np.testing.assert_array_equal(r2_per_dim(y, y), np.ones(3))


def test_predicting_the_mean_is_zero() -> None:
    y = np.random.default_rng(1).normal(size=(40, 2)) * [1.0, 7.0] + [3.0, -2.0]  # (T, D)
    yhat = np.broadcast_to(y.mean(axis=0), y.shape)
    assert r2_score(y, yhat) == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(r2_per_dim(y, yhat), 0.0, atol=1e-15)


def test_known_offset_by_hand() -> None:
    # dim 0: mean 2, SST_0 = 1 + 0 + 1 = 2; dim 1: mean 2, SST_1 = 4 + 0 + 4 = 8; SST = 10.
    y = np.array([[1.0, 0.0], [2.0, 2.0], [3.0, 4.0]])
    c = 0.5
    # SSE = D · T · c² = 2 · 3 · 0.25 = 1.5 → R² = 1 − 1.5 / 10 = 0.85
    assert r2_score(y, y + c) == pytest.approx(0.85, abs=1e-15)
    # per dim: 1 − 3·0.25/2 = 0.625 and 1 − 3·0.25/8 = 0.90625
    np.testing.assert_allclose(r2_per_dim(y, y + c), [0.625, 0.90625], atol=1e-15)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    t=st.integers(2, 60),
    d=st.integers(1, 4),
    c=st.floats(-3, 3, allow_nan=False),
)
def test_offset_formula_random(seed: int, t: int, d: int, c: float) -> None:
    y = np.random.default_rng(seed).normal(size=(t, d)) * np.arange(1, d + 1)  # (T, D)
    sst = np.sum((y - y.mean(axis=0)) ** 2)
    assert r2_score(y, y + c) == pytest.approx(1.0 - d * c**2 * t / sst, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("a", [0.0, 0.5, 0.9, 1.0, 1.5, -1.0])
def test_scaling_of_zero_mean_target(a: float) -> None:
    # For a target with zero mean in every dim, SSE = (1−a)² Σy² = (1−a)² SST.
    y = np.random.default_rng(2).normal(size=(100, 3)) * [0.1, 1.0, 10.0]  # (T, D)
    y = y - y.mean(axis=0)
    assert r2_score(y, a * y) == pytest.approx(1.0 - (1.0 - a) ** 2, abs=1e-12)
    np.testing.assert_allclose(r2_per_dim(y, a * y), 1.0 - (1.0 - a) ** 2, atol=1e-12)


def test_variance_weighting_differs_from_mean_of_dims() -> None:
    # dim 0: SST = 2, predicted by its mean → R²_0 = 0; dim 1: SST = 200, perfect → R²_1 = 1.
    y = np.array([[-1.0, -10.0], [1.0, 10.0]])
    yhat = np.array([[0.0, -10.0], [0.0, 10.0]])
    np.testing.assert_allclose(r2_per_dim(y, yhat), [0.0, 1.0], atol=1e-15)
    assert r2_score(y, yhat) == pytest.approx(1.0 - 2.0 / 202.0, abs=1e-15)  # = 0.990099...
    assert np.mean(r2_per_dim(y, yhat)) == pytest.approx(0.5)
    # Swap which dim is predicted well: the pooled score now favours the other dim.
    yhat2 = np.array([[-1.0, 0.0], [1.0, 0.0]])
    assert r2_score(y, yhat2) == pytest.approx(1.0 - 200.0 / 202.0, abs=1e-15)


def test_one_d_input_equals_single_column() -> None:
    rng = np.random.default_rng(3)
    y, yhat = rng.normal(size=30), rng.normal(size=30)  # (T,)
    assert r2_score(y, yhat) == r2_score(y[:, None], yhat[:, None])
    assert r2_per_dim(y, yhat).shape == (1,)
    assert r2_per_dim(y, yhat)[0] == pytest.approx(r2_score(y, yhat), abs=1e-15)


def test_float32_input_is_accumulated_in_float64() -> None:
    rng = np.random.default_rng(4)
    y = rng.normal(size=(1000, 2)).astype(np.float32)
    yhat = (y + rng.normal(size=y.shape) * 0.3).astype(np.float32)
    assert r2_score(y, yhat) == pytest.approx(_direct_r2(y, yhat), rel=1e-12)


# --- random inputs against the direct formula ----------------------------------------------------

_finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def _pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    t = draw(st.integers(2, 40))
    d = draw(st.integers(1, 4))
    y = draw(arrays(np.float64, (t, d), elements=_finite))
    yhat = draw(arrays(np.float64, (t, d), elements=_finite))
    return y, yhat


@settings(max_examples=200, deadline=None)
@given(_pairs())
def test_matches_direct_formula(pair: tuple[np.ndarray, np.ndarray]) -> None:
    y, yhat = pair
    sst_d = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
    if np.any(np.ptp(y, axis=0) == 0) or np.any(sst_d == 0):
        with pytest.raises(ValueError, match="zero variance"):
            r2_score(y, yhat)
        return
    expected = _direct_r2(y, yhat)
    assert r2_score(y, yhat) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # variance weighting: pooled R² is the SST-weighted average of the per-dim R².
    per_dim = r2_per_dim(y, yhat)
    np.testing.assert_allclose(per_dim, 1.0 - np.sum((y - yhat) ** 2, axis=0) / sst_d, rtol=1e-9, atol=1e-9)
    assert r2_score(y, yhat) == pytest.approx(np.sum(sst_d * per_dim) / np.sum(sst_d), rel=1e-9, abs=1e-9)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [r2_score, r2_per_dim])
def test_shape_mismatch_raises(fn) -> None:
    with pytest.raises(ValueError, match="shape"):
        fn(np.zeros((10, 2)) + np.arange(10)[:, None], np.zeros((10, 3)))
    with pytest.raises(ValueError, match="shape"):
        fn(np.arange(10.0), np.arange(10.0)[:, None])  # (T,) vs (T, 1): no broadcasting
    with pytest.raises(ValueError, match="shape"):
        fn(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))


@pytest.mark.parametrize("fn", [r2_score, r2_per_dim])
def test_empty_raises(fn) -> None:
    with pytest.raises(ValueError, match="empty"):
        fn(np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="empty"):
        fn(np.zeros((5, 0)), np.zeros((5, 0)))


@pytest.mark.parametrize("fn", [r2_score, r2_per_dim])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(fn, bad: float) -> None:
    y = np.arange(12.0).reshape(6, 2)
    y_bad = y.copy()
    y_bad[3, 1] = bad
    with pytest.raises(ValueError, match="y_true"):
        fn(y_bad, y)
    with pytest.raises(ValueError, match="y_pred"):
        fn(y, y_bad)


@pytest.mark.parametrize("fn", [r2_score, r2_per_dim])
def test_zero_variance_target_raises(fn) -> None:
    y = np.column_stack([np.arange(5.0), np.full(5, 0.1)])  # dim 1 constant
    with pytest.raises(ValueError, match=r"zero variance.*\[1\]"):
        fn(y, y)
    with pytest.raises(ValueError, match="zero variance"):
        fn(np.full(4, 3.0), np.arange(4.0))


def test_non_numeric_raises() -> None:
    with pytest.raises(ValueError, match="numeric"):
        r2_score(np.array(["a", "b"]), np.array(["a", "b"]))
