"""The participant's control model: where it wants the cursor to go, from what it sees.

The participant sees the cursor ``feedback_delay_s`` late (visual feedback delay) and aims at the
target from there: intended velocity ``max_speed · û · min(1, |d| / slow_radius)`` with ``d`` the
seen target − cursor offset — full speed far away, slowing in proportion near the target, and
correcting whatever error the decoder adds on the next look (feedback).  ``noise_sd`` adds
independent Gaussian motor noise per axis (seeded).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    max_speed: float = 12.0
    slow_radius: float = 4.0
    feedback_delay_s: float = 0.1
    noise_sd: float = 1.0


def aim(offset: np.ndarray, *, max_speed: float, slow_radius: float) -> np.ndarray:
    """The noiseless intended velocity for a seen target − cursor ``offset`` (2,)."""
    d = np.asarray(offset, dtype=np.float64)
    dist = float(np.linalg.norm(d))
    if dist == 0.0:
        return np.zeros(2)
    return max_speed * (d / dist) * min(1.0, dist / slow_radius)


class Controller:
    """Call :meth:`observe` with the displayed cursor each bin, then :meth:`intent` for the target."""

    def __init__(self, *, config: ControllerConfig, bin_s: float, seed: int = 0) -> None:
        self.config = config
        self.delay_bins = int(round(config.feedback_delay_s / bin_s))
        self._seen: deque[np.ndarray] = deque(maxlen=self.delay_bins + 1)
        self._rng = np.random.default_rng(seed)

    def observe(self, cursor: np.ndarray) -> None:
        self._seen.append(np.asarray(cursor, dtype=np.float64).copy())

    def perceived(self) -> np.ndarray:
        """The cursor as the participant sees it now (``delay_bins`` old)."""
        return self._seen[0] if self._seen else np.zeros(2)

    def intent(self, target: np.ndarray) -> np.ndarray:
        c = self.config
        v = aim(np.asarray(target) - self.perceived(), max_speed=c.max_speed, slow_radius=c.slow_radius)
        return v + self._rng.normal(0.0, c.noise_sd, 2) if c.noise_sd > 0 else v
