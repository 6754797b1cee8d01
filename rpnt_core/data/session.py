"""The in-memory session record that every loader returns and every trainer consumes.

A :class:`Session` is one continuous recording binned at ``bin_s`` seconds.  It is the
Python twin of the NPZ interchange format (see :mod:`rpnt_core.data.npz`).

Shapes
------
- ``counts``: (T, N) non-negative integer spike counts for a single-site recording, or
  (S, T, N) for a multi-site recording (S sites, each resampled/selected to N channels).
- ``velocity``: (T, D) float32 behaviour (optional for unlabelled pretraining data).
- ``position``: (T, D) float32 (optional).
- ``behaviour``: further named behaviour series, each (T, D_k) float32 (e.g. ``"force"``,
  ``"emg"``); names are identifiers other than ``velocity``/``position``.
- ``target``: the name of the series a decoder is trained on and scored against (default
  ``"velocity"``); :attr:`Session.targets` lists every available series by name, and
  :attr:`Session.labels` is the chosen one (``None`` when the session does not have it).
- ``timestamps``: (T,) float64 bin *start* times in seconds on the acquisition clock (optional;
  when absent, bins are taken as contiguous from 0).
- ``site_xy``: (S, 2) float32 site coordinates, required when ``counts`` is 3-D.

Metadata that is constant within a recording (``subject``, ``session``, ``task``,
``date_days``) is carried as plain values and reaches the model through learned/continuous
embeddings, never through rotary axes (see ``../shared/design/streaming-rpnt.md``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

DEFAULT_TARGET = "velocity"


@dataclass(frozen=True, kw_only=True)
class Session:
    counts: np.ndarray  # (T, N) or (S, T, N), integer
    bin_s: float
    velocity: np.ndarray | None = None  # (T, D) float32
    position: np.ndarray | None = None  # (T, D) float32
    behaviour: dict = field(default_factory=dict)  # name -> (T, D_k) float32, e.g. "force", "emg"
    target: str = DEFAULT_TARGET  # which named series is decoded (see ``labels``)
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
    def targets(self) -> dict[str, np.ndarray]:
        """Every behaviour series the session has, by name (velocity, position, then ``behaviour``)."""
        named = {"velocity": self.velocity, "position": self.position, **self.behaviour}
        return {k: v for k, v in named.items() if v is not None}

    @property
    def labels(self) -> np.ndarray | None:
        """(T, D) the chosen ``target`` series, or ``None`` when the session does not have it."""
        return self.targets.get(self.target)

    @property
    def n_outputs(self) -> int:
        """D of the chosen target (0 when the session does not have it)."""
        return 0 if self.labels is None else int(self.labels.shape[1])

    @property
    def name(self) -> str:
        """The session name, else the file name it came from (never a directory path)."""
        return self.session or Path(self.source).name or "session"

    def with_target(self, target: str | None) -> "Session":
        """The same session decoding ``target`` (``None`` keeps the current choice).

        Raises ``ValueError`` starting with ``target:`` when the session has no such series."""
        name = self.target if target is None else target
        if name not in self.targets:
            have = ", ".join(self.targets) or "no behaviour at all"
            raise ValueError(f"target: {self.name} has no {name!r} (it has {have})")
        return self if name == self.target else replace(self, target=name)

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
            behaviour={k: cut(v) for k, v in self.behaviour.items()},
            timestamps=cut(self.timestamps),
        )

    def fingerprint(self) -> str:
        """A short content hash (counts + the chosen target's series + bin width) identifying the
        training data; the target's name enters the hash when it is not velocity."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.counts).tobytes())
        if self.target != DEFAULT_TARGET:
            h.update(f"target={self.target}".encode())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels, dtype=np.float32).tobytes())
        h.update(repr(float(self.bin_s)).encode())
        return h.hexdigest()[:16]


def fingerprint_sessions(sessions: list[Session]) -> str:
    """One hash for a list of sessions (order-sensitive)."""
    h = hashlib.sha256()
    for s in sessions:
        h.update(s.fingerprint().encode())
    return h.hexdigest()[:16]


def check_bin_width(*, data_bin_s: float, model_bin_s: float) -> None:
    """Refuse data binned at a width other than the model's: a decoder trained on 20 ms counts
    reads 50 ms counts as 2.5× the firing rate and its history window as 2.5× the time.

    Raises ``ValueError``: "bin_s: data bin width 50 ms does not match the model's 20 ms"."""
    if not math.isclose(float(data_bin_s), float(model_bin_s), rel_tol=1e-6):
        raise ValueError(
            f"bin_s: data bin width {_ms(data_bin_s)} does not match the model's {_ms(model_bin_s)}"
        )


def _ms(bin_s: float) -> str:
    return f"{float(bin_s) * 1000:.6g} ms"


METADATA_FIELDS = ("subject", "session", "task", "date_days")


def conditioning_metadata(session: Session) -> dict:
    """The metadata that conditions the model on ``session`` (every field; an empty name means
    "unknown" to the model): what finetuning stores in its checkpoint and an export bakes in."""
    return {k: getattr(session, k) for k in METADATA_FIELDS}
