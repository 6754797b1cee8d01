"""Finetuning recipe pieces: the ridge fit of the linear probe (closed form), and the rule that a
checkpoint that already decodes the target (a finetuned decoder, e.g. the live model that
``POST /calibrate`` starts from) keeps its head and is the first candidate."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from rpnt_core.checkpoint import is_decoder, read_header
from rpnt_core.data import SimulationSpec, simulate_sessions
from rpnt_core.data.splits import contiguous_splits
from rpnt_core.evaluate.harness import evaluate_model
from rpnt_core.evaluate.probe import ridge_by_validation
from rpnt_core.train.finetune import FinetuneOptions, build_model, finetune, fit_decoder

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
    return simulate_sessions(
        SimulationSpec(
            n_subjects=1, sessions_per_subject=1, bins_per_session=(1500, 1500), n_multisite_subjects=0
        ),
        seed=0,
    )[0]


def test_a_finetuned_decoder_keeps_its_head_and_is_the_first_candidate(session, tmp_path):
    opts = FinetuneOptions(
        epochs=2,
        steps_per_epoch=3,
        batch_size=4,
        window_len=40,
        progress=False,
        device="cpu",
        train_fraction=0.3,
        config_overrides=TINY,
    )
    base = tmp_path / "day1.safetensors"
    finetune(session, init=None, options=opts, out=base)
    assert is_decoder(read_header(base)[1])
    model, fresh, prov = build_model(session, base, opts)
    assert prov["head"] == "pretrained" and not fresh
    # a run that cannot improve on validation (lr ≈ 0) returns the decoder it started from
    splits = contiguous_splits(session.n_bins, train_fraction=0.3)
    still, fit = fit_decoder(session, init=base, splits=splits, options=replace(opts, lr=1e-12, epochs=1))
    assert fit["best_epoch"] == -1 and fit["core_lr_scale"] == 0.1  # a kept head: the core moves gently
    start, _, _ = build_model(session, base, opts)
    assert fit["val_r2"] == pytest.approx(evaluate_model(still, session, splits, split="val")["r2"], abs=1e-6)
    for (k, a), b in zip(still.state_dict().items(), start.state_dict().values(), strict=True):
        if not k.startswith("input_"):  # the input statistics are the session's
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)


def test_a_decoder_of_another_target_width_starts_a_fresh_head(session, tmp_path):
    opts = FinetuneOptions(
        epochs=1,
        steps_per_epoch=2,
        batch_size=4,
        window_len=40,
        progress=False,
        device="cpu",
        train_fraction=0.3,
        config_overrides=TINY,
    )
    base = tmp_path / "two_dims.safetensors"
    finetune(session, init=None, options=opts, out=base)
    one_dim = replace(session, velocity=session.velocity[:, :1])
    assert build_model(one_dim, base, opts)[2]["head"] == "fresh"
    splits = contiguous_splits(one_dim.n_bins, train_fraction=0.3)
    assert fit_decoder(one_dim, init=base, splits=splits, options=opts)[1]["core_lr_scale"] == 1.0
