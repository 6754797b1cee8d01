"""Finetuning recipe pieces, checked against closed forms: the ridge fit and the linear-probe
start of the velocity head (LP-FT)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from rpnt_core import RPNT, RPNTConfig
from rpnt_core.data import SimulationSpec, simulate_sessions
from rpnt_core.data.splits import contiguous_splits
from rpnt_core.evaluate.harness import evaluate_model, predict_session
from rpnt_core.evaluate.probe import linear_probe_r2, ridge_by_validation
from rpnt_core.train.finetune import HEAD_RIDGE_REL_ALPHAS, FinetuneOptions, finetune, ridge_head_init

TINY = (("d_model", 32), ("n_heads", 2), ("window", 12), ("kernel_q", 3))


def test_ridge_by_validation_recovers_a_linear_map_and_shrinks_noise():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(8, 2)), rng.normal(size=2)
    x = rng.normal(size=(700, 8))
    y = x @ w + b + 0.01 * rng.normal(size=(700, 2))
    fit = ridge_by_validation(x[:500], y[:500], x[500:], y[500:])
    np.testing.assert_allclose(fit["weights"], w, atol=0.01)
    np.testing.assert_allclose(fit["bias"], b, atol=0.01)
    assert fit["val_r2"] > 0.999 and fit["rel_alpha"] == 1e-4  # the least penalty wins on clean data
    noise = rng.normal(size=(700, 2))  # unrelated target: the strongest penalty is chosen
    assert ridge_by_validation(x[:500], noise[:500], x[500:], noise[500:])["rel_alpha"] == 1.0


@pytest.fixture(scope="module")
def session():
    s = simulate_sessions(SimulationSpec(n_subjects=1, sessions_per_subject=1, bins_per_session=(1500, 1500),
                                         n_multisite_subjects=0), seed=0)[0]
    return s


def test_ridge_head_init_is_the_linear_probe_of_the_latent(session):
    one_dim = replace(session, velocity=session.velocity[:, :1])
    sp = contiguous_splits(one_dim.n_bins, train_fraction=0.3)
    torch.manual_seed(0)
    model = RPNT(RPNTConfig.preset("small", n_channels=one_dim.n_channels, n_outputs=1, **dict(TINY))).eval()
    v = one_dim.velocity[sp.train[0]:sp.train[1]]
    model.set_velocity_normalisation(torch.tensor(v.mean(0)), torch.tensor(v.std(0)))
    lp = ridge_head_init(model, one_dim, sp)
    assert lp["val_r2"] == pytest.approx(evaluate_model(model, one_dim, sp, split="val")["r2"], abs=1e-6)
    probe = linear_probe_r2(predict_session(model, one_dim, output="latent"), one_dim.velocity, sp, n_lags=1,
                            rel_alphas=HEAD_RIDGE_REL_ALPHAS)
    assert lp["val_r2"] == pytest.approx(probe["val_r2"], abs=1e-4)  # one output: z-scoring is a rescaling
    assert lp["rel_alpha"] == probe["rel_alpha"]


def test_finetune_starts_from_the_probe_and_never_returns_worse_on_validation(session):
    opts = dict(epochs=2, steps_per_epoch=3, batch_size=4, window_len=40, progress=False, device="cpu",
                train_fraction=0.3, config_overrides=TINY)
    res = finetune(session, init=None, options=FinetuneOptions(**opts, head_init="ridge"), out=None)
    lp = res["head_init"]["ridge_val_r2"]
    assert res["val_r2"] == max([lp] + [h["val_r2"] for h in res["history"]])
    assert res["best_epoch"] == -1 or res["history"][res["best_epoch"]]["val_r2"] == res["val_r2"]
    scratch = finetune(session, init=None, options=FinetuneOptions(**opts), out=None)
    assert "head_init" not in scratch  # the default starts at random
    with pytest.raises(ValueError, match="head_init"):
        FinetuneOptions(head_init="lstsq")
