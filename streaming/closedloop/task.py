"""The cursor task: 2-D center-out(-and-back) or random-target acquisition, as a state machine.

Each bin the runner calls :meth:`Task.update` with the time and the cursor.  A trial shows one
target; it *succeeds* when the cursor stays within ``radius`` of the target for ``hold_s``
without leaving (leaving restarts the hold), and *fails* at ``timeout_s``.  Then the next trial
starts at once from wherever the cursor is.  Targets are drawn from ``seed``: center-out
alternates an outer target (``n_targets`` directions at ``distance``, each direction once per
block, shuffled) and the center; random-target draws targets uniformly in the square of
half-width ``distance``, at least ``2·radius`` from the previous one.  The cursor is clamped to
``workspace`` (half-width) so a runaway decoder cannot carry it off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    kind: str = "center_out"  # "center_out" | "random"
    n_targets: int = 8
    distance: float = 8.0
    radius: float = 1.5
    hold_s: float = 0.3
    timeout_s: float = 6.0
    workspace: float = 14.0

    def __post_init__(self) -> None:
        if self.kind not in ("center_out", "random"):
            raise ValueError(f"kind: expected 'center_out' or 'random', got {self.kind!r}")
        for name in ("distance", "radius", "timeout_s", "workspace"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.hold_s < 0 or self.n_targets < 1:
            raise ValueError("hold_s must be ≥ 0 and n_targets ≥ 1")


@dataclass(kw_only=True)
class Trial:
    """One trial's record: its target, when it ran, the cursor path, how it ended."""

    index: int
    target: np.ndarray
    start_t: float
    times: list = field(default_factory=list)
    path: list = field(default_factory=list)
    end_t: float | None = None
    success: bool = False


class Task:
    """See the module docstring.  ``trials`` holds finished trials, ``current`` the running one."""

    def __init__(self, *, config: TaskConfig, seed: int = 0) -> None:
        self.config = config
        self._rng = np.random.default_rng(seed)
        self._order: list[int] = []
        self._outer_next = True
        self.trials: list[Trial] = []
        self.current: Trial | None = None
        self._inside_since: float | None = None

    @property
    def target(self) -> np.ndarray:
        assert self.current is not None
        return self.current.target

    def holding(self, cursor: np.ndarray) -> bool:
        """Whether ``cursor`` is on the current target."""
        return bool(np.linalg.norm(np.asarray(cursor) - self.target) <= self.config.radius)

    def clamp(self, cursor: np.ndarray) -> np.ndarray:
        w = self.config.workspace
        return np.clip(cursor, -w, w)

    def _next_target(self) -> np.ndarray:
        c = self.config
        if c.kind == "center_out":
            outer, self._outer_next = self._outer_next, not self._outer_next
            if not outer:
                return np.zeros(2)
            if not self._order:
                self._order = list(self._rng.permutation(c.n_targets))
            a = 2 * np.pi * self._order.pop() / c.n_targets
            return c.distance * np.array([np.cos(a), np.sin(a)])
        prev = self.current.target if self.current is not None else np.zeros(2)
        while True:
            t = self._rng.uniform(-c.distance, c.distance, 2)
            if np.linalg.norm(t - prev) >= 2 * c.radius:
                return t

    def start(self, t: float) -> Trial:
        """Begin the next trial at time ``t``."""
        self.current = Trial(index=len(self.trials), target=self._next_target(), start_t=float(t))
        self._inside_since = None
        return self.current

    def update(self, t: float, cursor: np.ndarray) -> Trial | None:
        """Record the cursor at time ``t``; returns the trial that ended at this bin (and starts
        the next one), else None."""
        tr = self.current if self.current is not None else self.start(t)
        tr.times.append(float(t))
        tr.path.append(np.asarray(cursor, dtype=np.float64).copy())
        if self.holding(cursor):
            if self._inside_since is None:
                self._inside_since = t
            if t - self._inside_since >= self.config.hold_s - 1e-9:
                return self._finish(t, success=True)
        else:
            self._inside_since = None
        if t - tr.start_t >= self.config.timeout_s - 1e-9:
            return self._finish(t, success=False)
        return None

    def _finish(self, t: float, *, success: bool) -> Trial:
        tr = self.current
        tr.end_t, tr.success = float(t), success
        self.trials.append(tr)
        self.start(t)
        return tr
