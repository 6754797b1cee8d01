"""The in-memory session record that every loader returns and every trainer consumes.

A :class:`Session` is one continuous recording binned at ``bin_s`` seconds.  It is the
Python twin of the NPZ interchange format (see :mod:`rpnt_core.data.formats`).

Shapes
------
- ``counts``: (T, N) non-negative integer spike counts for a single-site recording, or
  (S, T, N) for a multi-site recording (S sites, each resampled/selected to N channels).
- ``velocity``: (T, D) float32 behaviour target (optional for unlabelled pretraining data).
- ``position``: (T, D) float32 (optional).
- ``timestamps``: (T,) float64 bin *start* times in seconds on the acquisition clock (optional;
  when absent, bins are taken as contiguous from 0).
- ``site_xy``: (S, 2) float32 site coordinates, required when ``counts`` is 3-D.

Metadata that is constant within a recording (``subject``, ``session``, ``task``,
``date_days``) is carried as plain values and reaches the model through learned/continuous
embeddings, never through rotary axes (see ``../shared/design/streaming-rpnt.md``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Session:
    counts: np.ndarray  # (T, N) or (S, T, N), integer
    bin_s: float
    velocity: np.ndarray | None = None  # (T, D) float32
    position: np.ndarray | None = None  # (T, D) float32
    timestamps: np.ndarray | None = None  # (T,) float64 seconds
    site_xy: np.ndarray | None = None  # (S, 2) float32
    subject: str = ""
    session: str = ""
    task: str = ""
    date_days: float = 0.0
    source: str = ""  # where it was loaded from (path or generator), for reports
    extra: dict = field(default_factory=dict)  # loader-specific extras (e.g. simulator ground truth)

    @property
    def multisite(self) -> bool:
        return self.counts.ndim == 3

    @property
    def n_bins(self) -> int:
        return int(self.counts.shape[-2])

    @property
    def n_channels(self) -> int:
        return int(self.counts.shape[-1])

    @property
    def n_outputs(self) -> int:
        return 0 if self.velocity is None else int(self.velocity.shape[1])

    def slice_bins(self, start: int, stop: int) -> "Session":
        """The same session restricted to bins [start, stop) (a view, no copy)."""
        def cut(a: np.ndarray | None, axis: int = 0) -> np.ndarray | None:
            if a is None:
                return None
            idx = [slice(None)] * a.ndim
            idx[axis] = slice(start, stop)
            return a[tuple(idx)]

        return replace(
            self,
            counts=cut(self.counts, axis=self.counts.ndim - 2),
            velocity=cut(self.velocity),
            position=cut(self.position),
            timestamps=cut(self.timestamps),
        )

    def fingerprint(self) -> str:
        """A short content hash (counts + velocity + bin width) identifying the training data."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.counts).tobytes())
        if self.velocity is not None:
            h.update(np.ascontiguousarray(self.velocity, dtype=np.float32).tobytes())
        h.update(repr(float(self.bin_s)).encode())
        return h.hexdigest()[:16]


def fingerprint_sessions(sessions: list[Session]) -> str:
    """One hash for a list of sessions (order-sensitive)."""
    h = hashlib.sha256()
    for s in sessions:
        h.update(s.fingerprint().encode())
    return h.hexdigest()[:16]


METADATA_FIELDS = ("subject", "session", "task", "date_days")


def conditioning_metadata(session: Session) -> dict:
    """The metadata that conditions the model on ``session`` (every field; an empty name means
    "unknown" to the model): what finetuning stores in its checkpoint and an export bakes in."""
    return {k: getattr(session, k) for k in METADATA_FIELDS}
