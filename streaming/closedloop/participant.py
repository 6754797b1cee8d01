"""The simulated participant's encoding model: intended 2-D velocity → spike counts per channel.

A linear-nonlinear Poisson model per channel, fitted on a real recording::

    sqrt(λ_c(t) · Δ_fit) = b_c + w_c · v(t − lag)        (λ in Hz, Δ_fit the recording's bin width)
    counts_c(t) ~ Poisson(g_c,trial · max(b_c + w_c · v, 0)² / Δ_fit · Δ)

fitted by least squares of ``sqrt(counts)`` on velocity (lag chosen by total R²), so the
channel count, the baseline rates and the tuning (preferred direction and depth) are the
recording's.  Trial-to-trial noise: each channel's rate is multiplied by a gain drawn per trial,
lognormal with the slow spread the fit left unexplained: the variance of the fit's ``sqrt(counts)``
residual averaged over :data:`TRIAL_BINS`-bin chunks (≈ a trial), above the Poisson ¼ / chunk
length, as a relative rate spread, capped at :data:`MAX_GAIN_SIGMA`.  Generation is at any bin
width Δ (the daemon's 20 ms): a rate model is resampled by construction.

Without the shared recording, :func:`synthetic_encoding` gives a documented cosine-tuned
population (96 channels, baselines 2–40 Hz log-uniform, modulation depth 0.2–0.8 of the
baseline's square root per 10 units/s, uniform preferred directions, gain σ 0.1).

Drift (:meth:`EncodingModel.drifted`): preferred directions rotated, rates scaled per channel,
channels silenced (lost) and new tuned channels gained — the kinds of change seen across days.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

#: the center-out recording the default participant is fitted on (a shared, read-only dataset)
DEFAULT_RECORDING = Path("/work/shared/data/limblab_nick_co/Nick_CO_001-01-binned.mat")
#: the largest per-trial gain spread (lognormal σ) the fit may give a channel
MAX_GAIN_SIGMA = 0.5
#: bins of the recording per chunk over which the slow (trial-scale) noise is measured
TRIAL_BINS = 20
#: velocity lags tried when fitting (bins of the recording; neural activity leads movement)
FIT_LAGS = (0, 1, 2, 3)


@dataclass(frozen=True, kw_only=True)
class EncodingModel:
    """Per channel c: ``sqrt(rate_c · fit_bin_s) = baseline_c + weights_c · v``; see the module docstring.

    baseline (N,), weights (N, 2), gain_sigma (N,) (per-trial lognormal σ), alive (N,) bool
    (a lost channel emits nothing), ``fit_bin_s`` the bin width the square-root model is in."""

    baseline: np.ndarray
    weights: np.ndarray
    gain_sigma: np.ndarray
    fit_bin_s: float
    alive: np.ndarray | None = None
    source: str = ""
    fit: dict = field(default_factory=dict)

    @property
    def n_channels(self) -> int:
        return int(self.baseline.shape[0])

    def rates_hz(self, velocity: np.ndarray) -> np.ndarray:
        """Expected rates (…, N) in Hz for intended velocities (…, 2) (no trial gain)."""
        root = np.maximum(self.baseline + np.asarray(velocity, dtype=np.float64) @ self.weights.T, 0.0)
        rate = root * root / self.fit_bin_s
        return rate if self.alive is None else rate * self.alive

    def drifted(
        self,
        *,
        rotation_deg: float = 0.0,
        rate_scale: np.ndarray | float = 1.0,
        lost: np.ndarray | None = None,
        gained: np.ndarray | None = None,
        seed: int = 0,
    ) -> "EncodingModel":
        """A drifted copy: every preferred direction rotated by ``rotation_deg``, rates scaled by
        ``rate_scale`` (scalar or (N,)), ``lost`` channels silenced and ``gained`` channels (bool
        (N,)) replaced by new units with a random preferred direction and this model's median
        tuning (seeded)."""
        th = np.deg2rad(rotation_deg)
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        s = np.sqrt(np.broadcast_to(np.asarray(rate_scale, dtype=np.float64), self.baseline.shape))
        base, w = self.baseline * s, (self.weights @ rot.T) * s[:, None]
        alive = np.ones(self.n_channels, bool) if self.alive is None else self.alive.copy()
        if gained is not None and np.any(gained):
            rng = np.random.default_rng(seed)
            g = np.flatnonzero(gained)
            depth = float(np.median(np.linalg.norm(self.weights, axis=1)))
            ang = rng.uniform(0, 2 * np.pi, g.size)
            base = base.copy()
            w = w.copy()
            base[g] = float(np.median(self.baseline))
            w[g] = depth * np.stack([np.cos(ang), np.sin(ang)], axis=1)
            alive[g] = True
        if lost is not None:
            alive &= ~np.asarray(lost, dtype=bool)
        return replace(self, baseline=base, weights=w, alive=alive)


class Participant:
    """Spikes from intentions: ``counts(velocity, bin_s)`` → (N,) counts for one bin; call
    :meth:`new_trial` at each trial start (draws the trial's gains).  Seeded: the same calls give
    the same counts.  ``encoding`` may be replaced between bins (drift)."""

    def __init__(self, *, encoding: EncodingModel, seed: int = 0) -> None:
        self.encoding = encoding
        self._rng = np.random.default_rng(seed)
        self._gain = np.ones(encoding.n_channels)

    def new_trial(self) -> None:
        sig = self.encoding.gain_sigma
        self._gain = np.exp(self._rng.normal(0.0, 1.0, sig.shape) * sig - 0.5 * sig * sig)

    def counts(self, velocity: np.ndarray, bin_s: float) -> np.ndarray:
        lam = self.encoding.rates_hz(velocity) * self._gain * bin_s
        return self._rng.poisson(lam).astype(np.int64)

    @staticmethod
    def spike_times(
        counts: np.ndarray, *, start_ns: int, bin_ns: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(channels, times) events for one bin's ``counts``: times uniform in [start, start + bin), sorted."""
        ch = np.repeat(np.arange(counts.shape[0], dtype=np.uint16), counts)
        t = start_ns + rng.integers(0, bin_ns, ch.size, dtype=np.int64)
        order = np.argsort(t, kind="stable")
        return ch[order], t[order]


def fit_encoding(
    counts: np.ndarray, velocity: np.ndarray, *, bin_s: float, source: str = ""
) -> EncodingModel:
    """Fit the LNP model of the module docstring on a recording: ``counts`` (T, N) at ``bin_s``,
    ``velocity`` (T, 2)."""
    c = np.asarray(counts, dtype=np.float64)
    v = np.asarray(velocity, dtype=np.float64)
    ok = np.all(np.isfinite(v), axis=1)
    best = None
    for lag in FIT_LAGS:
        y, x, m = np.sqrt(c[lag:]), v[: len(v) - lag], ok[: len(v) - lag]
        y, x = y[m], x[m]
        X = np.column_stack([np.ones(len(x)), x])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)  # (3, N)
        resid = y - X @ coef
        r2 = 1.0 - float((resid**2).sum()) / float(((y - y.mean(0)) ** 2).sum())
        if best is None or r2 > best[0]:
            best = (r2, lag, coef, resid)
    r2, lag, coef, resid = best
    root = np.sqrt(c).mean(0)
    n_chunks = len(resid) // TRIAL_BINS
    chunk = resid[: n_chunks * TRIAL_BINS].reshape(n_chunks, TRIAL_BINS, -1).mean(1)  # (chunks, N)
    extra_var = np.maximum(chunk.var(0) - 0.25 / TRIAL_BINS, 0.0)
    sigma = np.minimum(2.0 * np.sqrt(extra_var) / np.maximum(root, 0.05), MAX_GAIN_SIGMA)
    return EncodingModel(
        baseline=coef[0],
        weights=coef[1:].T.copy(),
        gain_sigma=sigma,
        fit_bin_s=float(bin_s),
        source=source,
        fit={
            "r2_sqrt_counts": round(r2, 4),
            "lag_bins": int(lag),
            "bin_s": float(bin_s),
            "n_bins": int(len(c)),
        },
    )


def synthetic_encoding(*, n_channels: int = 96, seed: int = 0, fit_bin_s: float = 0.05) -> EncodingModel:
    """The documented fallback population (module docstring) when no recording is at hand."""
    rng = np.random.default_rng(seed)
    rate = np.exp(rng.uniform(np.log(2.0), np.log(40.0), n_channels))
    base = np.sqrt(rate * fit_bin_s)
    depth = rng.uniform(0.2, 0.8, n_channels) * base / 10.0
    ang = rng.uniform(0, 2 * np.pi, n_channels)
    return EncodingModel(
        baseline=base,
        weights=depth[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1),
        gain_sigma=np.full(n_channels, 0.1),
        fit_bin_s=fit_bin_s,
        source=f"synthetic cosine tuning (seed {seed})",
    )


def default_encoding(path: str | Path | None = None, *, seed: int = 0) -> EncodingModel:
    """Fitted on ``path`` (default :data:`DEFAULT_RECORDING`) if it exists, else :func:`synthetic_encoding`."""
    p = Path(path) if path is not None else DEFAULT_RECORDING
    if not p.exists():
        if path is not None:
            raise FileNotFoundError(f"recording: no such file: {p}")
        return synthetic_encoding(seed=seed)
    from rpnt_core.data import load_session

    s = load_session(p)
    if s.velocity is None or s.velocity.shape[1] != 2:
        raise ValueError(f"recording: {p.name} has no 2-D velocity to fit tuning on")
    return fit_encoding(s.counts, s.velocity, bin_s=s.bin_s, source=str(p))
