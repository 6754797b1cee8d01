"""Hidden-bin forecast: has a (pretrained) model learned the population's dynamics?

``forecast_gain(model, session, splits)`` hides every ``every``-th bin of the test split (all
channels zeroed, as pretraining's time mask does), streams the session causally from bin 0 and
scores the model's Poisson rates on exactly those bins: each is forecast from a history that is
(1 − 1/every) visible, never from the bin itself.  The reference is a predictor that knows only
each channel's mean count over the train split.  ``gain = (nll_mean_rate − nll) / nll_mean_rate``:
0 means the model has learned nothing beyond firing rates (its output may as well ignore its
input).  Reference gains on the synthetic benchmark session (a causal Poisson GLM, the true rates)
are in ``docs/benchmarks.md``.

Unlike the pretraining validation loss (random neuron *and* time masks, most inputs hidden), this
asks the question downstream decoding cares about — what the model infers from an intact past —
on one named session, through the read-in or channel map it will be finetuned with.

NLL convention: mean over scored entries of ``exp(λ) − y·λ`` (the ``log y!`` constant dropped,
as :func:`rpnt_core.train.objectives.masked_poisson_nll`); targets are the columns the model
predicts (``model.units(counts)``: the session's channels through a resampling channel map).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..data.session import Session
from ..data.splits import Splits
from ..model.rpnt import RPNT

__all__ = ["forecast_gain", "hidden_bin_log_rates", "hidden_bins"]


def hidden_bins(splits: Splits, *, every: int = 10) -> np.ndarray:
    """The test split's bins hidden and scored: every ``every``-th, from its first bin."""
    if every < 2:
        raise ValueError(f"every: must be ≥ 2 (some history must stay visible), got {every}")
    lo, hi = splits.test
    return np.arange(lo, hi, every)


@torch.no_grad()
def hidden_bin_log_rates(model: RPNT, session: Session, bins: np.ndarray) -> np.ndarray:
    """Log-rates at ``bins`` with the input at those bins zeroed, streamed from bin 0.

    Nothing at a hidden bin reaches its own prediction: changing ``session.counts`` there leaves
    the result unchanged.

    Shape: (len(bins), N).
    """
    from .harness import predict_session

    if session.counts.ndim != 2:
        raise ValueError("session: single-site counts (T, N) expected")
    counts = np.array(session.counts, copy=True)  # (T, N)
    counts[bins] = 0
    stop = int(bins.max()) + 1
    log_rates = predict_session(
        model, replace(session, counts=counts), stop=stop, output="log_rates"
    )  # (stop, N)
    return log_rates[bins]


def forecast_gain(model: RPNT, session: Session, splits: Splits, *, every: int = 10) -> dict:
    """How much better than mean rates the model forecasts hidden test bins (module docstring).

    Args:
        model: the model; its train/eval mode is restored after.
        session: a single-site session.
        splits: the mean rates come from ``train``; every ``every``-th ``test`` bin is hidden.
        every: the spacing of hidden bins, ≥ 2.
    Returns:
        ``{"nll", "nll_mean_rate", "gain", "bins"}``.
    """
    bins = hidden_bins(splits, every=every)
    was = model.training
    model.eval()
    try:
        log_rates = hidden_bin_log_rates(model, session, bins).astype(np.float64)  # (B, N)
        with torch.no_grad():
            target = model.units(
                torch.from_numpy(np.asarray(session.counts, dtype=np.float32))
            ).numpy()  # (T, N)
    finally:
        model.train(was)
    lo, hi = splits.train
    mean = target[lo:hi].astype(np.float64).mean(axis=0) + 1e-6  # (N,)
    y = target[bins].astype(np.float64)  # (B, N)
    nll = float(np.mean(np.exp(log_rates) - y * log_rates))
    floor = float(np.mean(mean - y * np.log(mean)))
    return {"nll": nll, "nll_mean_rate": floor, "gain": (floor - nll) / floor, "bins": int(len(bins))}
