"""The velocity Kalman filter with sqrt(counts) observations."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Self

import numpy as np

from rpnt_core.decoder import DecoderInfo
from rpnt_core.evaluate.baselines.common import Baseline, check_fit_inputs, fingerprint, sqrt_features
from rpnt_core.evaluate.metrics import r2_score

__all__ = ["KalmanFilter"]


class KalmanFilter(Baseline):
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
            fingerprint=fingerprint(self.A, self.a, self.W, self.H, self.c, self.Q, self.x0, self.P0),
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
        z = sqrt_features(self._check_step(counts))  # (N,)
        self._x, self._P = self._update(self._x, self._P, self._HtQi @ (z - self.c))
        return self._x.astype(np.float32)

    def predict(self, counts: np.ndarray) -> np.ndarray:
        z = sqrt_features(self._check_block(counts))  # (T, N)
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
        tc, x, vc, vv = check_fit_inputs(train_counts, train_velocity, val_counts, val_velocity, bin_s)
        z = sqrt_features(tc)  # (T, N)
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
                "val_r2": r2_score(vv, model._predict_sqrt(sqrt_features(vc))),
            },
        )
        return model
