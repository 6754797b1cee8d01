"""Contiguous train / validation / test splits of one session, in bins.

:func:`label_budget_splits` is the calibration layout of a new day: its first ``seconds`` of labels
(train, then validation) and its last ``test_fraction`` (test); :func:`calibration_view` is all a
decoder fitted on them may read.

Layout of a session of ``n_bins`` bins (``[start, stop)`` ranges)::

    | train (first train_fraction) | (unused gap) | val | test (last test_fraction) |

- ``test`` is always the last ``test_fraction`` of the session and ``val`` sits immediately
  before it, so both stay the same whatever ``train_fraction`` is: a few-shot split is just a
  shorter train prefix scored on the same test bins.
- Sizes are ``floor(fraction * n_bins)`` (so they never sum past ``n_bins``); every split must
  be non-empty.  Contiguous blocks keep evaluation honest for a causal decoder: no test bin's
  history leaks into training except at the single val/test boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rpnt_core.data.session import Session

__all__ = ["Splits", "calibration_view", "contiguous_splits", "label_budget_splits"]

_NAMES = ("train", "val", "test")


def _check_range(name: str, r: object) -> tuple[int, int]:
    if not (isinstance(r, (tuple, list)) and len(r) == 2):
        raise ValueError(f"{name}: expected a (start, stop) pair, got {r!r}")
    start, stop = r
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, stop)):
        raise ValueError(f"{name}: start and stop must be ints, got {r!r}")
    if not 0 <= start < stop:
        raise ValueError(f"{name}: expected 0 <= start < stop, got {r!r}")
    return int(start), int(stop)


@dataclass(frozen=True, kw_only=True)
class Splits:
    """Three non-overlapping, non-empty ``(start, stop)`` bin ranges, in order train < val < test."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]

    def __post_init__(self) -> None:
        ranges = [_check_range(n, getattr(self, n)) for n in _NAMES]
        for n, r in zip(_NAMES, ranges, strict=True):
            object.__setattr__(self, n, r)
        for (a, ra), (b, rb) in pairwise(zip(_NAMES, ranges, strict=True)):
            if ra[1] > rb[0]:
                raise ValueError(f"{b}: range {rb} overlaps or precedes {a} range {ra}")

    @property
    def n_bins(self) -> int:
        """The end of the last split (the session length for :func:`contiguous_splits`)."""
        return self.test[1]

    def as_dict(self) -> dict[str, list[int]]:
        """JSON-ready ``{"train": [start, stop], "val": [...], "test": [...]}``."""
        return {n: list(getattr(self, n)) for n in _NAMES}

    @classmethod
    def from_dict(cls, d: dict) -> "Splits":
        missing = [n for n in _NAMES if n not in d]
        if missing:
            raise ValueError(f"{missing[0]}: missing from splits dict")
        return cls(**{n: tuple(d[n]) for n in _NAMES})

    def cut(self, session: "Session") -> dict[str, "Session"]:
        """The session's train/val/test parts (views), checking the ranges fit in it."""
        if self.test[1] > session.n_bins:
            raise ValueError(f"test: range {self.test} exceeds the session's {session.n_bins} bins")
        return {n: session.slice_bins(*getattr(self, n)) for n in _NAMES}


def _bins(name: str, fraction: float, n_bins: int) -> int:
    if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0):
        raise ValueError(f"{name}: must be in (0, 1), got {fraction!r}")
    n = math.floor(fraction * n_bins + 1e-9)  # tolerate 0.3 * 10 = 2.9999999999999996
    if n < 1:
        raise ValueError(f"{name}: {fraction} of {n_bins} bins leaves the split empty")
    return n


def contiguous_splits(
    n_bins: int, *, train_fraction: float, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> Splits:
    """Split ``n_bins`` bins into train prefix, then val, then test at the end (see module doc).

    Args:
        n_bins: the session length, ≥ 3.
        train_fraction, val_fraction, test_fraction: each in (0, 1), together ≤ 1.
    Returns:
        The :class:`Splits`; sizes are ``floor(fraction * n_bins)``.
    Raises:
        ValueError: naming the field when ``n_bins`` < 3, a fraction is outside (0, 1), the
            fractions sum past 1, or any split would be empty.
    """
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 3:
        raise ValueError(f"n_bins: must be an int >= 3, got {n_bins!r}")
    n_bins = int(n_bins)
    n_train = _bins("train_fraction", train_fraction, n_bins)
    n_val = _bins("val_fraction", val_fraction, n_bins)
    n_test = _bins("test_fraction", test_fraction, n_bins)
    total = train_fraction + val_fraction + test_fraction
    if total > 1.0 + 1e-9:
        raise ValueError(
            f"train_fraction: train + val + test = {train_fraction} + {val_fraction} + {test_fraction} = {total:g} > 1"
        )
    test_start = n_bins - n_test
    val_start = test_start - n_val
    return Splits(train=(0, n_train), val=(val_start, test_start), test=(test_start, n_bins))


def label_budget_splits(
    n_bins: int, *, bin_s: float, seconds: float, test_fraction: float = 0.2, val_share: float = 0.2
) -> Splits:
    """Splits of a day calibrated from its first ``seconds`` of labels.

    Args:
        n_bins: the day's length in bins.
        bin_s: its bin width in seconds.
        seconds: the label budget, from the day's start.
        test_fraction: the last part of the day, scored.
        val_share: the share of the labelled bins held out for early stopping and model selection
            (they spend the same budget).
    Returns:
        train = the first (1 − ``val_share``) of the labelled bins, val = the rest of them,
        test = the last ``test_fraction`` of the day.
    Raises:
        ValueError: naming ``seconds`` when the budget reaches into the test part or leaves the
            train or validation part under 2 bins.
    """
    n_lab = int(round(seconds / bin_s))
    test_start = n_bins - int(math.floor(test_fraction * n_bins + 1e-9))
    n_val = max(2, int(round(val_share * n_lab)))
    if n_lab > test_start:
        raise ValueError(
            f"seconds: {seconds:g} s of labels reach into the test part ({test_start * bin_s:g} s on)"
        )
    if n_lab - n_val < 2:
        raise ValueError(f"seconds: {seconds:g} s of labels is too few bins to train and validate on")
    return Splits(train=(0, n_lab - n_val), val=(n_lab - n_val, n_lab), test=(test_start, n_bins))


def calibration_view(session: "Session", splits: Splits) -> "Session":
    """What a decoder may see of ``session`` while it is fitted for ``splits``.

    Returns:
        The bins before the test part, with only the chosen target's series, NaN after the
        labelled bins (the end of ``splits.val``).
    """
    from dataclasses import replace

    view = session.slice_bins(0, splits.test[0])
    labels = np.array(view.labels, dtype=np.float32)
    labels[splits.val[1] :] = np.nan
    series: dict = {"velocity": None, "position": None, "behaviour": {}}
    if view.target in ("velocity", "position"):
        series[view.target] = labels
    else:
        series["behaviour"] = {view.target: labels}
    return replace(view, **series)
