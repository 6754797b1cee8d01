"""Map a session's N channels to a fixed model width N_max (the RPNT paper's recipe).

- N == N_max: identity.
- N < N_max: the original channels in order, then N_max - N extra copies: as many whole extra
  passes over all channels as fit, then a random subset (without replacement) of the remainder,
  in random order.  Every channel therefore appears either ⌊N_max/N⌋ or ⌈N_max/N⌉ times.
- N > N_max: a random subset of N_max channels, kept in their original order.

The mapping is a fixed ``index`` (N_max,) into the session's channels, deterministic for
``seed``, so the same session always presents the same columns to the model, and it can be
stored with a checkpoint (``to_dict``/``from_dict``).  ``is_copy`` marks the duplicated columns
(e.g. to leave them out of a reconstruction loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ChannelResampler"]


def _positive_int(name: str, v: object) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}: must be a positive int, got {v!r}")
    return int(v)


def _build_index(n_channels: int, n_max: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if n_channels >= n_max:
        return np.sort(rng.choice(n_channels, size=n_max, replace=False)).astype(np.int64)
    extra = n_max - n_channels
    full, rem = divmod(extra, n_channels)
    parts = [np.arange(n_channels)] * (1 + full) + [rng.choice(n_channels, size=rem, replace=False)]
    return np.concatenate(parts).astype(np.int64)


@dataclass(frozen=True, kw_only=True)
class ChannelResampler:
    """Fixed channel map for one session: ``apply(counts)[..., i] = counts[..., index[i]]``."""

    n_channels: int
    n_max: int
    seed: int = 0
    index: np.ndarray = field(default=None, repr=False, compare=False)  # (N_max,) int64

    def __post_init__(self) -> None:
        n = _positive_int("n_channels", self.n_channels)
        m = _positive_int("n_max", self.n_max)
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative int, got {self.seed!r}")
        if self.index is None:
            index = _build_index(n, m, int(self.seed))
        else:
            index = np.asarray(self.index)
            if index.shape != (m,) or not np.issubdtype(index.dtype, np.integer):
                raise ValueError(f"index: expected ({m},) integers, got {index.dtype} {index.shape}")
            if index.min() < 0 or index.max() >= n:
                raise ValueError(f"index: entries must be in [0, {n}), got [{index.min()}, {index.max()}]")
            index = index.astype(np.int64)
        index.setflags(write=False)
        object.__setattr__(self, "index", index)

    @property
    def is_copy(self) -> np.ndarray:
        """(N_max,) bool: True where a column repeats a channel already shown to its left."""
        seen = np.zeros(self.n_channels, dtype=bool)
        out = np.zeros(self.n_max, dtype=bool)
        for i, c in enumerate(self.index):
            out[i] = seen[c]
            seen[c] = True
        return out

    def apply(self, counts: np.ndarray) -> np.ndarray:
        """Map a session's channels to the model's ``n_max`` columns.

        Shape: (..., N) → (..., N_max).

        Raises:
            ValueError: the last axis is not ``n_channels``.
        """
        arr = np.asarray(counts)
        if arr.ndim < 1 or arr.shape[-1] != self.n_channels:
            raise ValueError(
                f"counts: last axis has {arr.shape[-1] if arr.ndim else 0} channels, "
                f"resampler was built for {self.n_channels}"
            )
        return arr[..., self.index]

    def to_dict(self) -> dict:
        """JSON-ready record (the index is stored so a reload never depends on numpy's RNG)."""
        return {
            "n_channels": self.n_channels,
            "n_max": self.n_max,
            "seed": int(self.seed),
            "index": self.index.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ChannelResampler":
        """The resampler :meth:`to_dict` recorded; ``ValueError`` naming a missing field."""
        for k in ("n_channels", "n_max"):
            if k not in d:
                raise ValueError(f"{k}: missing from resampler dict")
        index = None if d.get("index") is None else np.asarray(d["index"], dtype=np.int64)
        return cls(n_channels=d["n_channels"], n_max=d["n_max"], seed=d.get("seed", 0), index=index)
