"""Hidden-bin forecast: the mean-rate reference scores zero gain, hidden bins are really hidden."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rpnt_core import RPNT, RPNTConfig
from rpnt_core.data.session import Session
from rpnt_core.data.splits import contiguous_splits
from rpnt_core.evaluate.forecast import forecast_gain, hidden_bin_log_rates, hidden_bins


def _session(t: int = 400, n: int = 6, seed: int = 0) -> Session:
    rng = np.random.default_rng(seed)
    return Session(
        counts=rng.poisson(rng.uniform(0.2, 2.0, size=n), size=(t, n)).astype(np.int64),
        bin_s=0.02,
        velocity=rng.normal(size=(t, 2)).astype(np.float32),
    )


def _model(n: int, seed: int = 0) -> RPNT:
    torch.manual_seed(seed)
    return RPNT(
        RPNTConfig.preset(
            "small", n_channels=n, d_model=16, n_layers=1, n_heads=2, window=8, kernel_q=3, kernel_hidden=8
        )
    ).eval()


def test_a_model_that_predicts_the_mean_rates_gains_nothing():
    s = _session()
    sp = contiguous_splits(s.n_bins, train_fraction=0.3)
    model = _model(s.n_channels)
    lo, hi = sp.train
    with torch.no_grad():  # log-rates = log(train mean count), whatever the input
        model.rate_out.weight.zero_()
        model.rate_out.bias.copy_(torch.log(torch.from_numpy(s.counts[lo:hi].mean(0) + 1e-6)).float())
    r = forecast_gain(model, s, sp, every=5)
    assert r["bins"] == len(range(*sp.test)[::5])
    assert r["nll"] == pytest.approx(r["nll_mean_rate"], rel=1e-6)
    assert abs(r["gain"]) < 1e-6
    y = s.counts[hidden_bins(sp, every=5)].astype(np.float64)
    mu = s.counts[lo:hi].mean(0) + 1e-6
    assert r["nll_mean_rate"] == pytest.approx(float(np.mean(mu - y * np.log(mu))), rel=1e-12)  # closed form


def test_hidden_bins_do_not_reach_their_own_forecast():
    s = _session(seed=1)
    sp = contiguous_splits(s.n_bins, train_fraction=0.3)
    bins = hidden_bins(sp, every=4)
    model = _model(s.n_channels, seed=1)
    base = hidden_bin_log_rates(model, s, bins)
    poked = s.counts.copy()
    poked[bins] += 7  # only the hidden bins change
    assert np.array_equal(hidden_bin_log_rates(model, Session(counts=poked, bin_s=s.bin_s), bins), base)
    visible = s.counts.copy()
    visible[bins - 1] += 7  # the visible bin before each hidden one: the forecast uses it
    assert not np.allclose(hidden_bin_log_rates(model, Session(counts=visible, bin_s=s.bin_s), bins), base)


def test_rejects_a_history_with_nothing_visible():
    with pytest.raises(ValueError, match="every"):
        hidden_bins(contiguous_splits(100, train_fraction=0.3), every=1)
