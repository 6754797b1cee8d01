"""Classic causal baselines that run in the same harness and on the same splits as RPNT.

Every baseline implements the :class:`rpnt_core.decoder.Decoder` contract (``info``,
``reset()``, ``step(counts (N,)) -> velocity (D,)``), so offline evaluation streams it through
:func:`rpnt_core.decoder.decode_stream` exactly like the transformer.  Each also has

- ``fit(*, train_counts (T, N), train_velocity (T, D), val_counts, val_velocity, bin_s,
  seed=0, **hyper) -> Self`` — learns on the train split only; the validation split is used for
  model selection (Wiener: ridge alpha; GRU: early stopping) or only reported (Kalman), and is
  streamed from a reset, as evaluation will be;
- ``predict(counts (T, N)) -> (T, D) float32`` — the vectorised equivalent of ``reset()`` then
  one ``step`` per bin (equal to float tolerance; it does not touch the streaming state).

All of them read the counts as ``sqrt(counts)`` (variance-stabilised).  Bin t's output depends
only on bins ≤ t, and a ``step`` costs the same at any stream position.

Registry: :data:`BASELINES` maps ``"wiener" | "kalman" | "gru"`` to the class.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import ClassVar, Self, Sequence

import numpy as np
import torch
from torch import nn

from rpnt_core.decoder import DecoderInfo, check_count_block, check_counts
from rpnt_core.evaluate.metrics import r2_score

__all__ = ["WienerFilter", "KalmanFilter", "GRUDecoder", "BASELINES"]


# --- shared helpers ------------------------------------------------------------------------------


def _sqrt_features(counts_f32: np.ndarray) -> np.ndarray:
    """sqrt of validated float32 counts, in float64 — the same arithmetic for a bin or a block."""
    return np.sqrt(counts_f32.astype(np.float64))


def _check_split(
    name: str, counts: np.ndarray, velocity: np.ndarray, n_channels: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One split's (counts float32 (T, N), velocity float64 (T, D)), validated."""
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"{name}_counts: expected (T, N), got shape {counts.shape}")
    c = check_count_block(counts, counts.shape[1] if n_channels is None else n_channels)
    v = np.asarray(velocity, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"{name}_velocity: expected (T, D), got shape {v.shape}")
    if v.shape[0] != c.shape[0]:
        raise ValueError(f"{name}: counts have {c.shape[0]} bins but velocity has {v.shape[0]}")
    if c.shape[0] < 2 or v.shape[1] == 0:
        raise ValueError(f"{name}: need at least 2 bins and 1 output dim, got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name}_velocity: contains NaN or inf")
    return c, v


def _check_fit_inputs(
    train_counts: np.ndarray,
    train_velocity: np.ndarray,
    val_counts: np.ndarray,
    val_velocity: np.ndarray,
    bin_s: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tc, tv = _check_split("train", train_counts, train_velocity)
    vc, vv = _check_split("val", val_counts, val_velocity, n_channels=tc.shape[1])
    if vv.shape[1] != tv.shape[1]:
        raise ValueError(f"val_velocity has {vv.shape[1]} dims, train_velocity {tv.shape[1]}")
    if not (bin_s > 0 and math.isfinite(bin_s)):
        raise ValueError(f"bin_s must be a positive number of seconds, got {bin_s}")
    return tc, tv, vc, vv


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class _Baseline:
    """Common plumbing: ``info``, input checks and ``predict`` as documented in the module."""

    name: ClassVar[str] = ""
    _info: DecoderInfo

    @property
    def info(self) -> DecoderInfo:
        return self._info

    def _check_step(self, counts: np.ndarray) -> np.ndarray:
        return check_counts(counts, self._info.n_channels)  # (N,) float32

    def _check_block(self, counts: np.ndarray) -> np.ndarray:
        return check_count_block(counts, self._info.n_channels)  # (T, N) float32


# --- Wiener filter -------------------------------------------------------------------------------


class WienerFilter(_Baseline):
    """Causal Wiener filter: ridge regression of velocity on the last L bins of sqrt(counts).

    ŷ_t = b + Σ_{l=0}^{L-1} sqrt(x_{t-l}) · W_l, with W (L, N, D) and intercept b (D,) (the
    intercept is not penalised: features and targets are centred on the train split).  Bins
    before the stream start (t − l < 0) are treated as **zero counts**, in ``predict``, in
    ``step`` after ``reset()`` and in the training design matrix alike; so a stream's first L−1
    outputs see a partly empty history, exactly as the online decoder would.

    ``fit`` hyper-parameters: ``n_lags`` (L, default 10) and ``rel_alphas``: the ridge penalty is
    alpha = r · tr(XᵀX)/p (p = L·N, X the centred train design), r chosen from ``rel_alphas``
    by validation R² (the validation split streamed from a reset).  The weights are those fitted
    on the train split with the chosen alpha; ``seed`` is unused (the fit is deterministic).
    """

    name: ClassVar[str] = "wiener"
    DEFAULT_REL_ALPHAS: ClassVar[tuple[float, ...]] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)

    def __init__(
        self, *, weights: np.ndarray, bias: np.ndarray, bin_s: float, extra: dict | None = None
    ) -> None:
        w = np.asarray(weights, dtype=np.float64)  # (L, N, D)
        b = np.asarray(bias, dtype=np.float64)  # (D,)
        if w.ndim != 3 or b.shape != (w.shape[2],):
            raise ValueError(f"weights (L, N, D) and bias (D,) expected, got {w.shape}, {b.shape}")
        self.weights, self.bias = w, b
        self._w_flat = w.reshape(-1, w.shape[2])  # (L·N, D), lag-major like the ring buffer
        self._info = DecoderInfo(
            n_channels=w.shape[1],
            n_outputs=w.shape[2],
            bin_s=float(bin_s),
            name=self.name,
            version="1",
            fingerprint=_fingerprint(w, b),
            extra=dict(extra or {}),
        )
        self._hist = np.zeros((w.shape[0], w.shape[1]))  # (L, N), row l = sqrt counts of bin t−l
        self.reset()

    @property
    def n_lags(self) -> int:
        return self.weights.shape[0]

    def reset(self) -> None:
        self._hist[:] = 0.0  # zero counts before the stream start

    def step(self, counts: np.ndarray) -> np.ndarray:
        s = _sqrt_features(self._check_step(counts))  # (N,)
        self._hist[1:] = self._hist[:-1]  # O(L·N), independent of stream length
        self._hist[0] = s
        return (self.bias + self._hist.reshape(-1) @ self._w_flat).astype(np.float32)  # (D,)

    def predict(self, counts: np.ndarray) -> np.ndarray:
        return self._predict_sqrt(_sqrt_features(self._check_block(counts))).astype(np.float32)

    def _predict_sqrt(self, s: np.ndarray) -> np.ndarray:
        """(T, N) sqrt counts → (T, D) float64, zero history before bin 0."""
        out = np.broadcast_to(self.bias, (s.shape[0], self.bias.shape[0])).copy()  # (T, D)
        for lag in range(min(self.n_lags, s.shape[0])):
            out[lag:] += s[: s.shape[0] - lag] @ self.weights[lag]
        return out

    @staticmethod
    def _lagged(s: np.ndarray, n_lags: int, start: int, stop: int) -> np.ndarray:
        """Design rows for bins [start, stop): (stop−start, L·N), lag-major, zeros before bin 0."""
        n = s.shape[1]
        x = np.zeros((stop - start, n_lags * n))
        for lag in range(n_lags):
            lo = max(start, lag)
            if lo < stop:
                x[lo - start :, lag * n : (lag + 1) * n] = s[lo - lag : stop - lag]
        return x

    @classmethod
    def fit(
        cls,
        *,
        train_counts: np.ndarray,
        train_velocity: np.ndarray,
        val_counts: np.ndarray,
        val_velocity: np.ndarray,
        bin_s: float,
        seed: int = 0,
        n_lags: int = 10,
        rel_alphas: Sequence[float] = DEFAULT_REL_ALPHAS,
        chunk: int = 4096,
    ) -> Self:
        del seed  # deterministic
        tc, tv, vc, vv = _check_fit_inputs(train_counts, train_velocity, val_counts, val_velocity, bin_s)
        if n_lags < 1 or not rel_alphas or min(rel_alphas) <= 0:
            raise ValueError("n_lags must be ≥ 1 and rel_alphas a non-empty list of positive numbers")
        s = _sqrt_features(tc)  # (T, N)
        t_train, n = s.shape
        p = n_lags * n
        # Accumulate XᵀX and XᵀY in time chunks (memory O(chunk·L·N)), then centre.
        g = np.zeros((p, p))
        xty = np.zeros((p, tv.shape[1]))
        xsum = np.zeros(p)
        for start in range(0, t_train, chunk):
            stop = min(start + chunk, t_train)
            x = cls._lagged(s, n_lags, start, stop)  # (chunk, p)
            g += x.T @ x
            xty += x.T @ tv[start:stop]
            xsum += x.sum(axis=0)
        mu_x, mu_y = xsum / t_train, tv.mean(axis=0)  # (p,), (D,)
        g -= t_train * np.outer(mu_x, mu_x)
        xty -= t_train * np.outer(mu_x, mu_y)
        g = 0.5 * (g + g.T)
        evals, evecs = np.linalg.eigh(g)  # one decomposition serves every alpha
        evals = np.clip(evals, 0.0, None)
        proj = evecs.T @ xty  # (p, D)
        scale = max(float(np.trace(g)) / p, np.finfo(np.float64).tiny)
        sv = _sqrt_features(vc)
        best: tuple[float, float, np.ndarray, np.ndarray] | None = None
        scores: dict[float, float] = {}
        for r in rel_alphas:
            alpha = float(r) * scale
            w = evecs @ (proj / (evals + alpha)[:, None])  # (p, D)
            b = mu_y - mu_x @ w
            model = cls(weights=w.reshape(n_lags, n, -1), bias=b, bin_s=bin_s)
            score = r2_score(vv, model._predict_sqrt(sv))
            scores[float(r)] = score
            if best is None or score > best[0]:
                best = (score, float(r), w, b)
        assert best is not None
        score, r, w, b = best
        extra = {
            "n_lags": n_lags,
            "rel_alpha": r,
            "alpha": r * scale,
            "val_r2": score,
            "val_r2_by_rel_alpha": scores,
            "n_train_bins": t_train,
        }
        return cls(weights=w.reshape(n_lags, n, -1), bias=b, bin_s=bin_s, extra=extra)


# --- Kalman filter -------------------------------------------------------------------------------


class KalmanFilter(_Baseline):
    """Velocity Kalman filter with sqrt(counts) observations (Wu et al. 2006 style).

    Model (state x_t = velocity, D-dim; intercepts are affine terms, which is the same as
    augmenting the state with a noiseless constant 1; position is not part of the state because
    the target is velocity)::

        x_t = A x_{t-1} + a + w_t,          w_t ~ N(0, W)
        sqrt(counts_t) = H x_t + c + q_t,   q_t ~ N(0, Q)

    A, a, W by least squares of x_t on [x_{t-1}, 1] over the train split (W = residual
    covariance); H, c, Q by least squares of sqrt(counts_t) on [x_t, 1] (Q = residual
    covariance + ``q_ridge`` · mean(diag Q) · I, so silent channels cannot make Q singular).

    Initial state: **not** the truth — the prior for the first bin of a stream is the training
    mean and covariance of velocity, N(μ_train, Σ_train); the first output is that prior updated
    with bin 0's counts.  Every later bin: predict (A x + a, A P Aᵀ + W), then update.  The
    update is the full (time-varying) one, written in information form so that only D×D systems
    are solved: P⁺ = (P⁻¹ + HᵀQ⁻¹H)⁻¹ = P(I + HᵀQ⁻¹H P)⁻¹, x⁺ = x⁻ + P⁺ HᵀQ⁻¹ (z − c − H x⁻),
    which is algebraically the textbook K = P Hᵀ(H P Hᵀ + Q)⁻¹ update.

    ``fit`` hyper-parameters: ``q_ridge`` (default 1e-3), ``w_ridge`` (default 1e-9, relative
    jitter on W).  The validation split is not used for selection; its R² is reported in
    ``info.extra["val_r2"]``.  ``seed`` is unused.
    """

    name: ClassVar[str] = "kalman"

    def __init__(
        self,
        *,
        A: np.ndarray,
        a: np.ndarray,
        W: np.ndarray,
        H: np.ndarray,
        c: np.ndarray,
        Q: np.ndarray,
        x0: np.ndarray,
        P0: np.ndarray,
        bin_s: float,
        extra: dict | None = None,
    ) -> None:
        f64 = lambda m: np.asarray(m, dtype=np.float64)  # noqa: E731
        self.A, self.a, self.W = f64(A), f64(a), f64(W)  # (D, D), (D,), (D, D)
        self.H, self.c, self.Q = f64(H), f64(c), f64(Q)  # (N, D), (N,), (N, N)
        self.x0, self.P0 = f64(x0), f64(P0)  # (D,), (D, D)
        n, d = self.H.shape
        shapes = {"A": (d, d), "a": (d,), "W": (d, d), "c": (n,), "Q": (n, n), "x0": (d,), "P0": (d, d)}
        for key, shape in shapes.items():
            if getattr(self, key).shape != shape:
                raise ValueError(f"{key}: expected shape {shape}, got {getattr(self, key).shape}")
        self._HtQi = np.linalg.solve(self.Q, self.H).T  # (D, N) = Hᵀ Q⁻¹ (Q symmetric)
        self._M = self._HtQi @ self.H  # (D, D) = Hᵀ Q⁻¹ H
        self._eye = np.eye(d)
        self._info = DecoderInfo(
            n_channels=n,
            n_outputs=d,
            bin_s=float(bin_s),
            name=self.name,
            version="1",
            fingerprint=_fingerprint(self.A, self.a, self.W, self.H, self.c, self.Q, self.x0, self.P0),
            extra=dict(extra or {}),
        )
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None  # posterior mean of the previous bin; None = no bin yet
        self._P: np.ndarray | None = None

    def _update(
        self, x_prev: np.ndarray | None, p_prev: np.ndarray | None, u: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One predict+update (pure). ``x_prev``/``p_prev``: the previous bin's posterior, or None
        at the stream start (prior = x0, P0); u = HᵀQ⁻¹(z − c) (D,).  Returns (x⁺ (D,), P⁺ (D, D))."""
        if x_prev is None or p_prev is None:
            x_prior, p_prior = self.x0, self.P0
        else:
            x_prior = self.A @ x_prev + self.a
            p_prior = self.A @ p_prev @ self.A.T + self.W
        # P⁺ = P (I + M P)⁻¹ = [ (I + P M)⁻¹ P ]ᵀ  (P, M symmetric)
        p_post = np.linalg.solve(self._eye + p_prior @ self._M, p_prior).T
        p_post = 0.5 * (p_post + p_post.T)
        x_post = x_prior + p_post @ (u - self._M @ x_prior)
        return x_post, p_post

    def step(self, counts: np.ndarray) -> np.ndarray:
        z = _sqrt_features(self._check_step(counts))  # (N,)
        self._x, self._P = self._update(self._x, self._P, self._HtQi @ (z - self.c))
        return self._x.astype(np.float32)

    def predict(self, counts: np.ndarray) -> np.ndarray:
        z = _sqrt_features(self._check_block(counts))  # (T, N)
        return self._predict_sqrt(z).astype(np.float32)

    def _predict_sqrt(self, z: np.ndarray) -> np.ndarray:
        """(T, N) sqrt counts → (T, D) float64 posterior means, from the stream-start prior."""
        u = (z - self.c) @ self._HtQi.T  # (T, D), all bins at once
        out = np.empty((z.shape[0], self.H.shape[1]))  # (T, D)
        x, p = None, None
        for t in range(z.shape[0]):  # the recursion itself is sequential; D×D work per bin
            x, p = self._update(x, p, u[t])
            out[t] = x
        return out

    @classmethod
    def fit(
        cls,
        *,
        train_counts: np.ndarray,
        train_velocity: np.ndarray,
        val_counts: np.ndarray,
        val_velocity: np.ndarray,
        bin_s: float,
        seed: int = 0,
        q_ridge: float = 1e-3,
        w_ridge: float = 1e-9,
    ) -> Self:
        del seed  # deterministic
        tc, x, vc, vv = _check_fit_inputs(train_counts, train_velocity, val_counts, val_velocity, bin_s)
        z = _sqrt_features(tc)  # (T, N)
        t_train, d = x.shape
        if t_train < d + 3:
            raise ValueError(f"train: need more than {d + 2} bins to fit the Kalman filter")
        ones = np.ones((t_train, 1))
        # dynamics: x_t ≈ [x_{t-1}, 1] @ [Aᵀ; aᵀ]
        xa = np.hstack([x[:-1], ones[:-1]])  # (T-1, D+1)
        coef_dyn, *_ = np.linalg.lstsq(xa, x[1:], rcond=None)  # (D+1, D)
        A, a = coef_dyn[:d].T, coef_dyn[d]
        res_w = x[1:] - xa @ coef_dyn  # (T-1, D)
        W = res_w.T @ res_w / res_w.shape[0]
        W = 0.5 * (W + W.T) + w_ridge * max(float(np.trace(W)) / d, 1e-12) * np.eye(d)
        # observations: z_t ≈ [x_t, 1] @ [Hᵀ; cᵀ]
        xo = np.hstack([x, ones])  # (T, D+1)
        coef_obs, *_ = np.linalg.lstsq(xo, z, rcond=None)  # (D+1, N)
        H, c = coef_obs[:d].T, coef_obs[d]
        res_q = z - xo @ coef_obs  # (T, N)
        Q = res_q.T @ res_q / t_train
        Q = 0.5 * (Q + Q.T)
        Q += q_ridge * max(float(np.mean(np.diag(Q))), 1e-12) * np.eye(Q.shape[0])
        # prior for the first bin: training mean and covariance (never the test truth)
        x0 = x.mean(axis=0)
        P0 = np.atleast_2d(np.cov(x, rowvar=False, bias=True))
        model = cls(A=A, a=a, W=W, H=H, c=c, Q=Q, x0=x0, P0=P0, bin_s=bin_s)
        model._info = replace(
            model._info,
            extra={
                "q_ridge": q_ridge,
                "w_ridge": w_ridge,
                "n_train_bins": t_train,
                "val_r2": r2_score(vv, model._predict_sqrt(_sqrt_features(vc))),
            },
        )
        return model


# --- GRU -----------------------------------------------------------------------------------------


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block and restore the previous count after it;
    ``None`` leaves torch's setting untouched."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _GRUNet(nn.Module):
    """Causal GRU over z-scored sqrt(counts) with a linear read-out to z-scored velocity."""

    def __init__(self, *, n_in: int, hidden: int, layers: int, n_out: int) -> None:
        super().__init__()
        self.gru = nn.GRU(n_in, hidden, num_layers=layers, batch_first=True)
        self.readout = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = self.gru(x, h)  # (B, T, hidden), (layers, B, hidden)
        return self.readout(y), h  # (B, T, D)


class GRUDecoder(_Baseline):
    """Causal GRU baseline: sqrt(counts) → z-score (train stats) → GRU → linear → un-z-score.

    ``step`` carries the GRU hidden state (zeros after ``reset()``), so a stream's outputs equal
    the full-sequence forward from a zero state (``predict``), to float32 tolerance.

    Training (``fit``): Adam on random windows (``window`` bins, ``batch_size`` per step, each
    window starting from a zero hidden state — the same state a stream starts from) of the train
    split; loss MSE on velocity z-scored with train mean/std; ``steps_per_epoch`` steps per epoch,
    at most ``max_epochs`` epochs; after each epoch the validation split is streamed from a reset
    and scored with :func:`r2_score`; training stops after ``patience`` epochs without a new best
    and the best-validation weights are kept.  Deterministic for a given ``seed`` on CPU: weights
    are initialised from a forked, seeded CPU generator (the global torch RNG state is restored)
    and windows are drawn from ``numpy.random.default_rng(seed)`` (bit-identical for the same
    seed *and* the same torch thread count).  The torch thread count is not changed, unless
    ``num_threads`` is given: then it is set for the duration of ``fit`` only and restored after
    (worth doing on a busy host: with 2 intra-op threads on 2 oversubscribed cores, small GRU
    ops wait on each other and training was measured ~20× slower than with 1 thread).

    Defaults (hidden 128, 1 layer, lr 3e-3, ≤ 25 epochs × 20 steps of 32 windows × 64 bins,
    patience 5) fit 10k bins × 100 channels in ~5 s (≤ ~16 s if all 25 epochs run) on 2 idle
    CPU cores.
    """

    name: ClassVar[str] = "gru"

    def __init__(
        self,
        *,
        net: _GRUNet,
        in_mean: np.ndarray,
        in_std: np.ndarray,
        out_mean: np.ndarray,
        out_std: np.ndarray,
        bin_s: float,
        extra: dict | None = None,
    ) -> None:
        self.net = net.eval()
        self.in_mean = np.asarray(in_mean, dtype=np.float64)  # (N,)
        self.in_std = np.asarray(in_std, dtype=np.float64)  # (N,)
        self.out_mean = np.asarray(out_mean, dtype=np.float64)  # (D,)
        self.out_std = np.asarray(out_std, dtype=np.float64)  # (D,)
        params = [p.detach().numpy() for p in net.state_dict().values()]
        self._info = DecoderInfo(
            n_channels=self.in_mean.shape[0],
            n_outputs=self.out_mean.shape[0],
            bin_s=float(bin_s),
            name=self.name,
            version="1",
            fingerprint=_fingerprint(self.in_mean, self.in_std, self.out_mean, self.out_std, *params),
            extra=dict(extra or {}),
        )
        self.reset()

    def reset(self) -> None:
        self._h: torch.Tensor | None = None  # None = zero hidden state

    def _inputs(self, counts_f32: np.ndarray) -> torch.Tensor:
        """float32 counts (..., N) → z-scored sqrt counts as a float32 tensor (same math per bin)."""
        s = (_sqrt_features(counts_f32) - self.in_mean) / self.in_std
        return torch.from_numpy(s.astype(np.float32))

    def _outputs(self, y: torch.Tensor) -> np.ndarray:
        return (y.numpy().astype(np.float64) * self.out_std + self.out_mean).astype(np.float32)

    def step(self, counts: np.ndarray) -> np.ndarray:
        x = self._inputs(self._check_step(counts))[None, None, :]  # (1, 1, N)
        with torch.inference_mode():
            y, self._h = self.net(x, self._h)
        return self._outputs(y[0, 0])  # (D,)

    def predict(self, counts: np.ndarray) -> np.ndarray:
        x = self._inputs(self._check_block(counts))[None]  # (1, T, N)
        with torch.inference_mode():
            y, _ = self.net(x)
        return self._outputs(y[0])  # (T, D)

    @classmethod
    def fit(
        cls,
        *,
        train_counts: np.ndarray,
        train_velocity: np.ndarray,
        val_counts: np.ndarray,
        val_velocity: np.ndarray,
        bin_s: float,
        seed: int = 0,
        hidden: int = 128,
        layers: int = 1,
        window: int = 64,
        batch_size: int = 32,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        max_epochs: int = 25,
        steps_per_epoch: int = 20,
        patience: int = 5,
        num_threads: int | None = None,
    ) -> Self:
        tc, tv, vc, vv = _check_fit_inputs(train_counts, train_velocity, val_counts, val_velocity, bin_s)
        if min(hidden, layers, window, batch_size, max_epochs, steps_per_epoch, patience) < 1:
            raise ValueError(
                "hidden, layers, window, batch_size, max_epochs, steps_per_epoch, patience must all be ≥ 1"
            )
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be ≥ 1 or None, got {num_threads}")
        with _torch_threads(num_threads):
            return cls._fit(
                tc,
                tv,
                vc,
                vv,
                bin_s=bin_s,
                seed=seed,
                hidden=hidden,
                layers=layers,
                window=window,
                batch_size=batch_size,
                lr=lr,
                weight_decay=weight_decay,
                grad_clip=grad_clip,
                max_epochs=max_epochs,
                steps_per_epoch=steps_per_epoch,
                patience=patience,
            )

    @classmethod
    def _fit(
        cls,
        tc: np.ndarray,
        tv: np.ndarray,
        vc: np.ndarray,
        vv: np.ndarray,
        *,
        bin_s: float,
        seed: int,
        hidden: int,
        layers: int,
        window: int,
        batch_size: int,
        lr: float,
        weight_decay: float,
        grad_clip: float,
        max_epochs: int,
        steps_per_epoch: int,
        patience: int,
    ) -> Self:
        t0 = time.perf_counter()
        s = _sqrt_features(tc)  # (T, N)
        in_mean, in_std = s.mean(axis=0), np.maximum(s.std(axis=0), 1e-3)
        out_mean, out_std = tv.mean(axis=0), np.maximum(tv.std(axis=0), 1e-6)
        x_train = torch.from_numpy(((s - in_mean) / in_std).astype(np.float32))  # (T, N)
        y_train = torch.from_numpy(((tv - out_mean) / out_std).astype(np.float32))  # (T, D)
        t_train, n = x_train.shape
        win = min(window, t_train)
        rng = np.random.default_rng(seed)

        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            net = _GRUNet(n_in=n, hidden=hidden, layers=layers, n_out=tv.shape[1])
        model = cls(net=net, in_mean=in_mean, in_std=in_std, out_mean=out_mean, out_std=out_std, bin_s=bin_s)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        offsets = torch.arange(win)
        best_r2, best_epoch, history = -math.inf, 0, []
        best_state = copy.deepcopy(net.state_dict())
        for epoch in range(1, max_epochs + 1):
            net.train()
            for _ in range(steps_per_epoch):
                starts = torch.from_numpy(rng.integers(0, t_train - win + 1, size=batch_size))
                idx = starts[:, None] + offsets[None, :]  # (B, win)
                pred, _ = net(x_train[idx])  # (B, win, D)
                loss = torch.mean((pred - y_train[idx]) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
                opt.step()
            net.eval()
            val_pred = model.predict(vc)  # (T_val, D), streamed from a zero state
            val_r2 = r2_score(vv, val_pred) if np.all(np.isfinite(val_pred)) else -math.inf
            history.append(val_r2)
            if val_r2 > best_r2:
                best_r2, best_epoch = val_r2, epoch
                best_state = copy.deepcopy(net.state_dict())
            elif epoch - best_epoch >= patience:
                break
        net.load_state_dict(best_state)
        extra = {
            "hidden": hidden,
            "layers": layers,
            "window": win,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "max_epochs": max_epochs,
            "steps_per_epoch": steps_per_epoch,
            "patience": patience,
            "seed": seed,
            "val_r2": best_r2,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "val_r2_history": history,
            "fit_seconds": time.perf_counter() - t0,
            "n_train_bins": t_train,
            "torch_threads": torch.get_num_threads(),
        }
        return cls(
            net=net,
            in_mean=in_mean,
            in_std=in_std,
            out_mean=out_mean,
            out_std=out_std,
            bin_s=bin_s,
            extra=extra,
        )


BASELINES: dict[str, type[_Baseline]] = {
    "wiener": WienerFilter,
    "kalman": KalmanFilter,
    "gru": GRUDecoder,
}
