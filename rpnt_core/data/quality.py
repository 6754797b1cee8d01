"""Session quality control: per-session facts, and the flags that make a session unfit to train on.

:func:`assess_session` reports, for one recording: bins, channels, duration, the spread of the
channels' mean rates, silent and saturated channels, channels whose rate shifts within the
session, and (when asked) facts about the chosen behaviour target.  A session is *flagged* when
one of the rules below holds; ``flags`` says why, one line per reason.  Pretraining skips flagged
sessions unless told otherwise (``rpnt pretrain --allow-flagged``); ``rpnt inspect`` prints the
facts.

Rules (thresholds from first principles — what a channel or a behaviour signal can physically
do — not fitted to any data set).  "A tenth of the channels" is the line between a few units that
a model can learn to ignore and a recording-level fault:

- **silent channel**: mean rate below 0.5 Hz (under one spike in 2 s).  Flag when more than 90 %
  of the channels are silent: fewer than a tenth carry any signal.
- **saturated channel**: mean rate of 500 Hz or more (a 2 ms mean interval, beyond a neuron's
  sustained rate: the channel is crossing threshold on noise), or one non-zero count in 90 % or
  more of the bins (stuck or clipped; a Poisson channel never shows one count in more than
  1/e ≈ 37 % of its bins).  Flag when more than a tenth of the channels are saturated.
- **rate shift**: the session is cut into fifths in time and each channel's rate is taken per
  fifth.  A channel *shifts* when its highest and lowest fifth differ by more than 4× (each rate
  plus 1 Hz, so a near-silent channel needs a real change, not a handful of spikes) **and** the
  difference is beyond Poisson noise (z > 5 for the two fifths' counts given their sum).  It
  *turns on/off* when it is also silent in its lowest fifth.  Flag when more than a tenth of the
  channels shift: the recording itself changed (thresholds, reference, a connector), so a model
  would learn the channels' meaning in one part of the session and meet another in the rest.
- **target** (the chosen behaviour series, when assessed): each dimension's robust z-score
  ``|x − median| / (1.4826 · MAD)``; *outlier bins* have z > 10 in some dimension (reported, not
  flagged: kinematics of a still-then-moving cursor are heavy-tailed by nature).  *Idle bins* sit
  exactly at the median in every dimension (within 1e-6 of the dimension's standard deviation).
  Flag when half of the bins or more are idle: the robust scale is then zero, and the behaviour
  was not recorded, or not performed, for most of the session.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from .session import Session

__all__ = ["SessionQuality", "assess_session", "format_json", "format_table", "split_flagged"]

SILENT_HZ = 0.5
SATURATED_HZ = 500.0
STUCK_SHARE = 0.9
SHIFT_RATIO = 4.0
SHIFT_FLOOR_HZ = 1.0
SHIFT_Z = 5.0
SHIFT_PARTS = 5
CHANNEL_SHARE = 0.1  # more than this share of the channels = a recording-level fault
SILENT_SHARE = 0.9
OUTLIER_Z = 10.0
IDLE_SHARE = 0.5


@dataclass(frozen=True, kw_only=True)
class SessionQuality:
    """The facts :func:`assess_session` found for one session (channel lists are 0-based indices)."""

    session: str
    n_bins: int
    n_channels: int
    bin_s: float
    duration_s: float
    rate_hz_median: float
    rate_hz_min: float
    rate_hz_max: float
    silent: tuple[int, ...]
    saturated: tuple[int, ...]
    shifted: tuple[int, ...]
    on_off: tuple[int, ...]
    target: str | None = None
    target_dims: int | None = None
    target_idle_fraction: float | None = None
    target_outlier_bins: int | None = None
    target_max_abs: float | None = None
    flags: tuple[str, ...] = ()

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    @property
    def reason(self) -> str:
        """The flags as one line ("" when none)."""
        return "; ".join(self.flags)

    def to_dict(self) -> dict:
        """JSON-ready facts, with ``flagged``."""
        return {**asdict(self), "flagged": self.flagged}


def _channels_last(counts: np.ndarray) -> np.ndarray:
    """(T, N) counts; the sites of a multi-site (S, T, N) recording side by side as channels."""
    c = np.asarray(counts)
    return c if c.ndim == 2 else np.moveaxis(c, 0, 1).reshape(c.shape[1], -1)


def _stuck(counts: np.ndarray) -> np.ndarray:
    """(N,) bool: one non-zero count in at least ``STUCK_SHARE`` of the bins."""
    out = np.zeros(counts.shape[1], dtype=bool)
    for j in range(counts.shape[1]):
        per_value = np.bincount(counts[:, j].astype(np.int64))
        per_value[0] = 0
        out[j] = per_value.max() >= STUCK_SHARE * counts.shape[0]
    return out


def _shifts(counts: np.ndarray, bin_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(shifted, on_off) bool (N,) by the rate-shift rule of the module docstring."""
    n = counts.shape[1]
    if counts.shape[0] < 2 * SHIFT_PARTS:
        return np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    parts = np.array_split(np.arange(counts.shape[0]), SHIFT_PARTS)
    spikes = np.stack([counts[p].sum(0, dtype=np.float64) for p in parts])  # (P, N)
    bins = np.array([len(p) for p in parts], dtype=np.float64)[:, None]  # (P, 1)
    rate = spikes / (bins * bin_s)  # (P, N) Hz
    lo, hi, cols = rate.argmin(0), rate.argmax(0), np.arange(n)
    ratio = (rate[hi, cols] + SHIFT_FLOOR_HZ) / (rate[lo, cols] + SHIFT_FLOOR_HZ)
    total = spikes[lo, cols] + spikes[hi, cols]
    share = bins[hi, 0] / (bins[lo, 0] + bins[hi, 0])  # expected share of the high part, equal rates
    spread = np.sqrt(np.maximum(total * share * (1 - share), 1e-12))
    z = (spikes[hi, cols] - total * share) / spread
    shifted = (ratio > SHIFT_RATIO) & (z > SHIFT_Z)
    return shifted, shifted & (rate[lo, cols] < SILENT_HZ)


def _target_facts(labels: np.ndarray) -> dict:
    """Idle fraction, outlier bins and largest magnitude of a (T, D) target (module docstring)."""
    y = np.asarray(labels, dtype=np.float64)
    med = np.median(y, axis=0)
    dev = np.abs(y - med)  # (T, D)
    idle = (dev <= 1e-6 * y.std(axis=0)).all(axis=1)  # (T,)
    scale = 1.4826 * np.median(dev, axis=0)  # (D,)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(dev > 0, dev / scale, 0.0)  # inf where the robust scale is 0
    return {
        "target_idle_fraction": float(idle.mean()),
        "target_outlier_bins": int((z > OUTLIER_Z).any(axis=1).sum()),
        "target_max_abs": float(np.abs(y).max()),
    }


def _share(idx: tuple[int, ...], n: int) -> str:
    return f"{len(idx)} of {n} channels ({100 * len(idx) / n:.0f} %)"


def _flags(q: SessionQuality) -> tuple[str, ...]:
    n, out = q.n_channels, []
    if len(q.silent) > SILENT_SHARE * n:
        out.append(f"{_share(q.silent, n)} are silent (< {SILENT_HZ:g} Hz)")
    if len(q.saturated) > CHANNEL_SHARE * n:
        out.append(f"{_share(q.saturated, n)} are saturated (≥ {SATURATED_HZ:g} Hz or stuck at one count)")
    if len(q.shifted) > CHANNEL_SHARE * n:
        out.append(
            f"{_share(q.shifted, n)} change rate more than {SHIFT_RATIO:g}× within the session "
            f"({len(q.on_off)} turn on or off)"
        )
    if q.target_idle_fraction is not None and q.target_idle_fraction >= IDLE_SHARE:
        out.append(
            f"target {q.target} sits at one value in {100 * q.target_idle_fraction:.0f} % of bins "
            "(not recorded or not performed for most of the session)"
        )
    return tuple(out)


def assess_session(session: Session, *, labels: bool = True) -> SessionQuality:
    """Quality facts and flags of ``session`` (rules in the module docstring).

    Args:
        session: the session.
        labels: also assess the chosen target (``session.target``) when the session has it;
            ``False`` for uses that read only the counts (pretraining).
    Returns:
        Its :class:`SessionQuality`; ``flags`` says why it is unfit to train on, if it is.
    """
    counts = _channels_last(session.counts)
    n_bins, n = counts.shape
    rates = counts.mean(axis=0, dtype=np.float64) / session.bin_s  # (N,) Hz
    shifted, on_off = _shifts(counts, session.bin_s)
    target: dict = {}
    if labels and session.labels is not None:
        target = {"target": session.target, "target_dims": session.n_outputs, **_target_facts(session.labels)}
    q = SessionQuality(
        session=session.name,
        n_bins=int(n_bins),
        n_channels=int(n),
        bin_s=float(session.bin_s),
        duration_s=float(n_bins * session.bin_s),
        rate_hz_median=float(np.median(rates)),
        rate_hz_min=float(rates.min()),
        rate_hz_max=float(rates.max()),
        silent=tuple(np.flatnonzero(rates < SILENT_HZ).tolist()),
        saturated=tuple(np.flatnonzero((rates >= SATURATED_HZ) | _stuck(counts)).tolist()),
        shifted=tuple(np.flatnonzero(shifted).tolist()),
        on_off=tuple(np.flatnonzero(on_off).tolist()),
        **target,
    )
    return SessionQuality(**{**asdict(q), "flags": _flags(q)})


_COLUMNS = (
    "session",
    "bins",
    "ch",
    "minutes",
    "Hz median [range]",
    "silent",
    "satur.",
    "shifted",
    "target",
    "idle %",
    "outliers",
    "flag",
)


def _row(q: SessionQuality) -> tuple[str, ...]:
    has_target = q.target is not None
    return (
        q.session,
        str(q.n_bins),
        str(q.n_channels),
        f"{q.duration_s / 60:.1f}",
        f"{q.rate_hz_median:.1f} [{q.rate_hz_min:.1f}–{q.rate_hz_max:.1f}]",
        str(len(q.silent)),
        str(len(q.saturated)),
        f"{len(q.shifted)} ({len(q.on_off)} on/off)",
        f"{q.target}×{q.target_dims}" if has_target else "-",
        f"{100 * q.target_idle_fraction:.0f}" if has_target else "-",
        str(q.target_outlier_bins) if has_target else "-",
        "FLAGGED" if q.flagged else "ok",
    )


def format_table(reports: list[SessionQuality]) -> str:
    """A compact fixed-width table, one row per session, then one line per flag reason."""
    rows = [_COLUMNS] + [_row(q) for q in reports]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines += [f"{q.session}: {reason}" for q in reports for reason in q.flags]
    return "\n".join(lines)


def format_json(reports: list[SessionQuality]) -> str:
    """One JSON object: ``{"sessions": [facts...], "flagged": [names...]}``."""
    return json.dumps(
        {"sessions": [q.to_dict() for q in reports], "flagged": [q.session for q in reports if q.flagged]}
    )


def split_flagged(
    sessions: list[Session], *, labels: bool = False
) -> tuple[list[Session], list[SessionQuality]]:
    """Separate the sessions quality control flags.

    Args:
        sessions: the sessions.
        labels: judge the chosen targets too (supervised use); pretraining reads only counts.
    Returns:
        (the sessions fit to train on, in order; the reports of the flagged ones).
    """
    kept: list[Session] = []
    flagged: list[SessionQuality] = []
    for s in sessions:
        q = assess_session(s, labels=labels)
        if q.flagged:
            flagged.append(q)
        else:
            kept.append(s)
    return kept, flagged


def fit_for_target(sessions: list[Session], target: str) -> tuple[list[Session], list[tuple[str, str]]]:
    """The sessions fit to decode ``target``: quality control with their labels judged too.

    Returns:
        (the passing sessions with ``target`` chosen, in order; (session name, reason) of each
        flagged one).
    Raises:
        ValueError: starting with ``target:`` for a session without that series.
    """
    kept, flagged = split_flagged([s.with_target(target) for s in sessions], labels=True)
    return kept, [(q.session, q.reason) for q in flagged]
