"""Contiguous splits, the channel resampler and training windows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpnt_core.data import ChannelResampler, Session, Splits, WindowSampler, contiguous_splits, make_windows

fractions = st.floats(min_value=0.01, max_value=0.98)


# ------------------------------------------------------------------------------------ splits


@settings(max_examples=200, deadline=None)
@given(n_bins=st.integers(3, 200_000), train=fractions, val=fractions, test=fractions)
def test_contiguous_splits_properties(n_bins: int, train: float, val: float, test: float) -> None:
    try:
        sp = contiguous_splits(n_bins, train_fraction=train, val_fraction=val, test_fraction=test)
    except ValueError as exc:
        assert str(exc).split(":")[0] in {"train_fraction", "val_fraction", "test_fraction"}
        too_small = min(math.floor(f * n_bins + 1e-9) for f in (train, val, test)) < 1
        assert too_small or train + val + test > 1
        return
    assert train + val + test <= 1 + 1e-9
    assert sp.train[0] == 0 and sp.test[1] == n_bins == sp.n_bins
    assert sp.val[1] == sp.test[0]  # val right before test
    assert sp.train[1] <= sp.val[0]  # no overlap
    for a, b in (sp.train, sp.val, sp.test):
        assert 0 <= a < b <= n_bins
    assert sp.test[1] - sp.test[0] == math.floor(test * n_bins + 1e-9)
    assert sp.train[1] == math.floor(train * n_bins + 1e-9)


@settings(max_examples=100, deadline=None)
@given(n_bins=st.integers(100, 100_000), small=st.floats(0.01, 0.3), big=st.floats(0.3, 0.7))
def test_test_split_does_not_move_with_train_fraction(n_bins: int, small: float, big: float) -> None:
    a = contiguous_splits(n_bins, train_fraction=small)
    b = contiguous_splits(n_bins, train_fraction=big)
    assert a.test == b.test and a.val == b.val
    assert a.train[1] <= b.train[1]  # few-shot split is a prefix of the larger one


def test_splits_json_round_trip_and_cut() -> None:
    sp = contiguous_splits(1000, train_fraction=0.7)
    assert sp.as_dict() == {"train": [0, 700], "val": [700, 800], "test": [800, 1000]}
    assert Splits.from_dict(json.loads(json.dumps(sp.as_dict()))) == sp
    s = Session(counts=np.zeros((1000, 3), np.int32), bin_s=0.02, velocity=np.zeros((1000, 2), np.float32))
    parts = sp.cut(s)
    assert [p.n_bins for p in parts.values()] == [700, 100, 200]
    with pytest.raises(ValueError, match="^test: range"):
        sp.cut(s.slice_bins(0, 900))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_bins": 100, "train_fraction": 0.0}, "train_fraction"),
        ({"n_bins": 100, "train_fraction": 1.0}, "train_fraction"),
        ({"n_bins": 100, "train_fraction": 0.8}, "train_fraction"),  # 0.8 + 0.1 + 0.2 > 1
        ({"n_bins": 100, "train_fraction": 0.5, "val_fraction": 0.0}, "val_fraction"),
        ({"n_bins": 100, "train_fraction": 0.5, "test_fraction": 1.5}, "test_fraction"),
        ({"n_bins": 5, "train_fraction": 0.5}, "val_fraction"),  # floor(0.1 * 5) = 0 bins
        ({"n_bins": 2, "train_fraction": 0.5}, "n_bins"),
        ({"n_bins": 10.0, "train_fraction": 0.5}, "n_bins"),
    ],
)
def test_contiguous_splits_errors(kwargs: dict, field: str) -> None:
    n = kwargs.pop("n_bins")
    with pytest.raises(ValueError, match=f"^{field}:"):
        contiguous_splits(n, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"train": (0, 10), "val": (5, 20), "test": (20, 30)}, "val"),
        ({"train": (0, 10), "val": (10, 20), "test": (15, 30)}, "test"),
        ({"train": (5, 5), "val": (10, 20), "test": (20, 30)}, "train"),
        ({"train": (0, 10), "val": (10, 20), "test": (20,)}, "test"),
    ],
)
def test_splits_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        Splits(**kwargs)


# ------------------------------------------------------------------------------------ channels


@pytest.mark.parametrize("n", [1, 7, 40, 96, 97, 250, 300])
def test_resampler_shapes_and_recipe(n: int) -> None:
    r = ChannelResampler(n_channels=n, n_max=96, seed=3)
    assert r.index.shape == (96,) and r.index.dtype == np.int64
    assert r.index.min() >= 0 and r.index.max() < n
    counts = np.arange(2 * 5 * n).reshape(2, 5, n)  # (B, T, N)
    out = r.apply(counts)
    assert out.shape == (2, 5, 96)
    np.testing.assert_array_equal(out, counts[..., r.index])
    uses = np.bincount(r.index, minlength=n)
    if n <= 96:
        np.testing.assert_array_equal(r.index[:n], np.arange(n))  # originals first, in order
        assert uses.min() == 96 // n and uses.max() <= -(-96 // n)  # copies spread evenly
        assert r.is_copy.sum() == 96 - n and not r.is_copy[:n].any()
    else:
        assert len(np.unique(r.index)) == 96 and (np.diff(r.index) > 0).all()
        assert not r.is_copy.any()


def test_resampler_deterministic_and_serialisable() -> None:
    a = ChannelResampler(n_channels=50, n_max=128, seed=11)
    b = ChannelResampler(n_channels=50, n_max=128, seed=11)
    c = ChannelResampler(n_channels=50, n_max=128, seed=12)
    np.testing.assert_array_equal(a.index, b.index)
    assert (a.index != c.index).any()
    d = ChannelResampler.from_dict(json.loads(json.dumps(a.to_dict())))
    np.testing.assert_array_equal(d.index, a.index)
    assert (d.n_channels, d.n_max, d.seed) == (50, 128, 11)
    with pytest.raises(ValueError, match="^counts: last axis has 49 channels"):
        a.apply(np.zeros((3, 49)))
    with pytest.raises(ValueError, match="^index:"):
        ChannelResampler.from_dict({**a.to_dict(), "index": [0] * 127 + [50]})
    with pytest.raises(ValueError, match="^n_max:"):
        ChannelResampler(n_channels=5, n_max=0)
    with pytest.raises(ValueError, match="^n_channels:"):
        ChannelResampler.from_dict({"n_max": 4})
    with pytest.raises(ValueError, match="read-only"):
        a.index[0] = 3


# ------------------------------------------------------------------------------------ windows


@settings(max_examples=200, deadline=None)
@given(
    n_bins=st.integers(1, 5000),
    length=st.integers(1, 300),
    stride=st.integers(1, 300),
    a=st.integers(0, 5000),
    b=st.integers(1, 5000),
    include_end=st.booleans(),
)
def test_make_windows_stay_inside(
    n_bins: int, length: int, stride: int, a: int, b: int, include_end: bool
) -> None:
    start, stop = min(a, n_bins - 1), min(max(b, a + 1), n_bins)
    if not start < stop:
        return
    w = make_windows(n_bins, length=length, stride=stride, start=start, stop=stop, include_end=include_end)
    assert w.dtype == np.int64
    if stop - start < length:
        assert w.size == 0
        return
    assert w[0] == start and (w >= start).all() and (w + length <= stop).all()
    assert (np.diff(w) > 0).all()
    if include_end:
        assert w[-1] + length == stop
    else:
        assert (np.diff(w) == stride).all() and w[-1] + stride + length > stop


def test_make_windows_errors() -> None:
    np.testing.assert_array_equal(make_windows(10, length=4, stride=3), [0, 3, 6])
    np.testing.assert_array_equal(make_windows(10, length=4, stride=4, include_end=True), [0, 4, 6])
    with pytest.raises(ValueError, match="^stride:"):
        make_windows(10, length=4, stride=0)
    with pytest.raises(ValueError, match="^stop:"):
        make_windows(10, length=4, stride=1, start=5, stop=11)


def test_window_sampler() -> None:
    ws = WindowSampler(start=100, stop=300, length=50)
    a = ws.sample(np.random.default_rng(0), 5000)
    b = ws.sample(np.random.default_rng(0), 5000)
    np.testing.assert_array_equal(a, b)
    assert a.min() == 100 and a.max() == 250 and (a + 50 <= 300).all()
    assert ws.n_positions == 151
    with pytest.raises(ValueError, match="^length:"):
        WindowSampler(start=0, stop=10, length=11)
