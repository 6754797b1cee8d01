"""The model-swap decision, without sockets: how a swapped-in decoder gets its state.

A swap is asked for in one thread (:meth:`~streaming.daemon.Daemon.swap_decoder`) and applied by
the loop at the next bin it closes.  Three ways for the new decoder to start:

- **warm**: in the caller's thread it is reset and run over the current stream's last bins from
  the history ring (:func:`warm_up`); at the boundary the loop feeds it the few bins decoded since
  (:func:`plan_boundary` → a catch-up range, at most ``max_catchup`` bins), so its first output is
  what it would have said had it been running all along;
- **fresh**: ``reset()`` at the boundary — when not warm, when the stream changed since the
  warm-up, or when the catch-up bins are too many or no longer in the history;
- **fresh (first bin of a stream)**: the swap lands on a stream's first bin, where every decoder
  is reset anyway.

:func:`apply_at_boundary` carries a plan out on a decoder and a :class:`~streaming.history.HistoryRing`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from rpnt_core.decoder import Decoder

from .history import HistoryRing

#: warm-up length when the decoder does not say its receptive field
DEFAULT_WARM_BINS = 256
FRESH_AT_FIRST_BIN = "fresh (first bin of a stream)"


class SwapTicket:
    """A pending swap: :meth:`wait` returns the bin index it took effect at.

    Args:
        decoder: the decoder to swap in.
        warm: whether it was warmed on the history (:func:`warm_up`).
        warm_epoch, warm_last: the stream and its last bin the warm-up ended at (None: no bins).
        warm_bins: how many bins the warm-up ran.
    """

    def __init__(
        self, decoder: Decoder, *, warm: bool, warm_epoch: int, warm_last: int | None, warm_bins: int
    ) -> None:
        self.decoder = decoder
        self.warm = warm
        self.warm_epoch = warm_epoch
        self.warm_last = warm_last
        self.warm_bins = warm_bins
        self.bin: int | None = None
        self.epoch: int | None = None
        self.generation: int | None = None
        self.mode: str = ""
        self.error: str | None = None
        self._done = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the swap is applied; return the first bin the new decoder decoded."""
        if not self._done.wait(timeout):
            raise TimeoutError("swap not applied yet (it takes effect at the next bin the daemon closes)")
        if self.error is not None:
            raise RuntimeError(self.error)
        assert self.bin is not None
        return self.bin

    def resolve(self, **kw: Any) -> None:
        """Record the outcome (``bin``, ``epoch``, ``generation``, ``mode``, or ``error``) and wake waiters."""
        for k, v in kw.items():
            setattr(self, k, v)
        self._done.set()


@dataclass(frozen=True)
class BoundaryPlan:
    """What the loop does with a swapped-in decoder at bin ``k``.

    ``catch_up``: bins [first, stop) of the stream to step it through from the history (a warm
    swap); None: ``reset`` it (or not, on a stream's first bin) and ``mode`` says why."""

    mode: str
    reset: bool
    catch_up: tuple[int, int] | None = None


def warm_bins_for(info: Any, warm_bins: int | None = None) -> int:
    """How many bins to warm a decoder on: ``warm_bins``, else its receptive field − 1 (from
    ``info.extra['receptive_field']``), else :data:`DEFAULT_WARM_BINS`."""
    if warm_bins is not None:
        return max(0, int(warm_bins))
    rf = info.extra.get("receptive_field") if isinstance(info.extra, dict) else None
    return int(rf) - 1 if rf else DEFAULT_WARM_BINS


def warm_up(decoder: Decoder, history: HistoryRing, n_bins: int) -> tuple[int, int | None, int]:
    """Reset ``decoder`` and step it over the current stream's last ``n_bins`` bins in ``history``.

    Returns:
        (epoch, last bin stepped or None, bins stepped).
    """
    decoder.reset()
    epoch, last, counts = history.stream_tail(max(0, int(n_bins)))
    for row in counts:
        decoder.step(row)
    return epoch, last, int(counts.shape[0])


def plan_boundary(
    *, k: int, epoch: int, first_bin: bool, ticket: SwapTicket, max_catchup: int
) -> BoundaryPlan:
    """The decision for ``ticket`` at bin ``k`` of stream ``epoch`` (``first_bin``: k starts it)."""
    if first_bin:
        return BoundaryPlan(FRESH_AT_FIRST_BIN, reset=False)
    if ticket.warm and ticket.warm_epoch == epoch and ticket.warm_last is not None:
        gap = k - 1 - ticket.warm_last
        if gap <= max_catchup:
            return BoundaryPlan("", reset=False, catch_up=(ticket.warm_last + 1, k))
        return BoundaryPlan(_too_far(gap), reset=True)
    return BoundaryPlan(
        "fresh (no history of this stream to warm on)" if ticket.warm else "fresh", reset=True
    )


def _too_far(gap: int) -> str:
    return f"fresh (the {gap} bins since warm-up exceed swap_catchup_bins or left the history)"


def apply_at_boundary(plan: BoundaryPlan, ticket: SwapTicket, *, epoch: int, history: HistoryRing) -> str:
    """Carry ``plan`` out on ``ticket.decoder``; returns the mode that happened (a catch-up whose
    bins left the history falls back to fresh)."""
    new = ticket.decoder
    if plan.catch_up is None:
        if plan.reset:
            new.reset()
        return plan.mode
    first, stop = plan.catch_up
    fill = history.stream_range(epoch, first, stop)
    if fill is None:
        new.reset()
        return _too_far(stop - first)
    for row in fill:
        new.step(row)
    return f"warm ({ticket.warm_bins} bins of history + {fill.shape[0]} at the boundary)"
