"""The causal GRU baseline and its training options."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import nn

from rpnt_core.decoder import DecoderInfo
from rpnt_core.evaluate.baselines.common import Baseline, check_fit_inputs, fingerprint, sqrt_features
from rpnt_core.evaluate.metrics import r2_score

__all__ = ["GRUDecoder", "GRUOptions"]


@dataclass(frozen=True, kw_only=True)
class GRUOptions:
    """How :meth:`GRUDecoder.fit` builds and trains the network; the defaults suit sessions of
    about 10k bins.

    Args:
        hidden: GRU hidden units.
        layers: stacked GRU layers.
        window: bins per training window (at most the train split's length is used).
        batch_size: windows per optimiser step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        grad_clip: gradient-norm clip per step; ≤ 0 disables it.
        max_epochs: the most epochs run.
        steps_per_epoch: optimiser steps per epoch.
        patience: epochs without a new best validation R² before training stops.
        num_threads: torch intra-op threads during ``fit`` only (restored after); ``None`` leaves
            torch's setting alone.  1 keeps small GRU ops from waiting on each other when the
            host's cores are busy.
    Raises:
        ValueError: a size or count below 1, or ``num_threads`` below 1.
    """

    hidden: int = 128
    layers: int = 1
    window: int = 64
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_epochs: int = 25
    steps_per_epoch: int = 20
    patience: int = 5
    num_threads: int | None = None

    def __post_init__(self) -> None:
        sizes = (
            self.hidden,
            self.layers,
            self.window,
            self.batch_size,
            self.max_epochs,
            self.steps_per_epoch,
            self.patience,
        )
        if min(sizes) < 1:
            raise ValueError(
                "hidden, layers, window, batch_size, max_epochs, steps_per_epoch, patience must all be ≥ 1"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be ≥ 1 or None, got {self.num_threads}")


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
        """Shape: x (B, T, N), h (layers, B, hidden) or None (zeros) → (B, T, D), (layers, B, hidden)."""
        y, h = self.gru(x, h)  # (B, T, hidden), (layers, B, hidden)
        return self.readout(y), h  # (B, T, D)


class GRUDecoder(Baseline):
    """Causal GRU baseline: sqrt(counts) → z-score (train stats) → GRU → linear → un-z-score.

    ``step`` carries the GRU hidden state (zeros after ``reset()``), so a stream's outputs equal
    the full-sequence forward from a zero state (``predict``), to float32 tolerance.

    Training (``fit``, options in :class:`GRUOptions`): Adam on random windows (``window`` bins,
    ``batch_size`` per step, each window starting from a zero hidden state — the same state a
    stream starts from) of the train split; loss MSE on velocity z-scored with train mean/std;
    ``steps_per_epoch`` steps per epoch, at most ``max_epochs`` epochs; after each epoch the
    validation split is streamed from a reset and scored with :func:`r2_score`; training stops
    after ``patience`` epochs without a new best and the best-validation weights are kept.
    Deterministic for a given ``seed`` on CPU: weights are initialised from a forked, seeded CPU
    generator (the global torch RNG state is restored) and windows are drawn from
    ``numpy.random.default_rng(seed)`` (bit-identical for the same seed *and* the same torch
    thread count).  The torch thread count is not changed, unless ``num_threads`` is given.
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
            fingerprint=fingerprint(self.in_mean, self.in_std, self.out_mean, self.out_std, *params),
            extra=dict(extra or {}),
        )
        self.reset()

    def reset(self) -> None:
        self._h: torch.Tensor | None = None  # None = zero hidden state

    def _inputs(self, counts_f32: np.ndarray) -> torch.Tensor:
        """float32 counts (..., N) → z-scored sqrt counts as a float32 tensor (same math per bin)."""
        s = (sqrt_features(counts_f32) - self.in_mean) / self.in_std
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
        options: GRUOptions | None = None,
        **overrides: Any,
    ) -> Self:
        """Train on the train split, keeping the weights of the best validation epoch.

        Args:
            train_counts, val_counts: (T, N) counts.
            train_velocity, val_velocity: (T, D) targets.
            bin_s: bin width in seconds.
            seed: weight initialisation and window draws.
            options: :class:`GRUOptions` (``None``: the defaults).
            **overrides: :class:`GRUOptions` fields replacing those of ``options``, e.g.
                ``max_epochs=3`` (what a caller that names hyper-parameters generically passes).
        Returns:
            The fitted decoder; ``info.extra`` holds the options used, the best validation R²,
            its epoch, the per-epoch history, the fit time and the torch thread count.
        Raises:
            ValueError: from the input checks or :class:`GRUOptions`.
            TypeError: an override that is not a :class:`GRUOptions` field.
        """
        tc, tv, vc, vv = check_fit_inputs(train_counts, train_velocity, val_counts, val_velocity, bin_s)
        opts = replace(options or GRUOptions(), **overrides)
        with _torch_threads(opts.num_threads):
            return cls._fit(tc, tv, vc, vv, bin_s=bin_s, seed=seed, opts=opts)

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
        opts: GRUOptions,
    ) -> Self:
        """:meth:`fit` on checked inputs, inside the thread-count scope."""
        t0 = time.perf_counter()
        s = sqrt_features(tc)  # (T, N)
        stats = {
            "in_mean": s.mean(axis=0),
            "in_std": np.maximum(s.std(axis=0), 1e-3),
            "out_mean": tv.mean(axis=0),
            "out_std": np.maximum(tv.std(axis=0), 1e-6),
            "bin_s": bin_s,
        }
        x_train = torch.from_numpy(((s - stats["in_mean"]) / stats["in_std"]).astype(np.float32))  # (T, N)
        y_train = torch.from_numpy(((tv - stats["out_mean"]) / stats["out_std"]).astype(np.float32))  # (T, D)
        win = min(opts.window, x_train.shape[0])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            net = _GRUNet(n_in=x_train.shape[1], hidden=opts.hidden, layers=opts.layers, n_out=tv.shape[1])
        model = cls(net=net, **stats)
        opt = torch.optim.Adam(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        rng = np.random.default_rng(seed)

        def train_epoch() -> None:
            _train_epoch(net, opt, x_train, y_train, win=win, rng=rng, opts=opts)

        best_r2, best_epoch, history = _early_stopping(
            model, train_epoch, vc, vv, patience=opts.patience, max_epochs=opts.max_epochs
        )
        extra = {
            **_options_record(opts, window=win, seed=seed),
            "val_r2": best_r2,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "val_r2_history": history,
            "fit_seconds": time.perf_counter() - t0,
            "n_train_bins": x_train.shape[0],
            "torch_threads": torch.get_num_threads(),
        }
        return cls(net=net, **stats, extra=extra)


def _train_epoch(
    net: _GRUNet,
    opt: torch.optim.Optimizer,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    win: int,
    rng: np.random.Generator,
    opts: GRUOptions,
) -> None:
    """``opts.steps_per_epoch`` Adam steps on random windows, each from a zero hidden state.

    Shape: x_train (T, N), y_train (T, D), both z-scored; windows (batch_size, win, ·).
    """
    net.train()
    offsets = torch.arange(win)
    for _ in range(opts.steps_per_epoch):
        starts = torch.from_numpy(rng.integers(0, x_train.shape[0] - win + 1, size=opts.batch_size))
        idx = starts[:, None] + offsets[None, :]  # (B, win)
        pred, _ = net(x_train[idx])  # (B, win, D)
        loss = torch.mean((pred - y_train[idx]) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opts.grad_clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), opts.grad_clip)
        opt.step()


def _early_stopping(
    model: GRUDecoder,
    train_epoch: Callable[[], None],
    vc: np.ndarray,
    vv: np.ndarray,
    *,
    patience: int,
    max_epochs: int,
) -> tuple[float, int, list[float]]:
    """Train epoch by epoch, scoring the validation split streamed from a zero state after each.

    Stops after ``patience`` epochs without a new best and loads the best epoch's weights into
    ``model.net``.

    Returns:
        (best validation R², its epoch counted from 1 (0: none finite), R² per epoch run).
    """
    net = model.net
    best_r2, best_epoch, history = -math.inf, 0, []
    best_state = copy.deepcopy(net.state_dict())
    for epoch in range(1, max_epochs + 1):
        train_epoch()
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
    return best_r2, best_epoch, history


def _options_record(opts: GRUOptions, *, window: int, seed: int) -> dict[str, Any]:
    """The options a fit ran with, as ``info.extra`` reports them (``window`` as used)."""
    return {
        "hidden": opts.hidden,
        "layers": opts.layers,
        "window": window,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "weight_decay": opts.weight_decay,
        "max_epochs": opts.max_epochs,
        "steps_per_epoch": opts.steps_per_epoch,
        "patience": opts.patience,
        "seed": seed,
    }
