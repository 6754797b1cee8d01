"""Per-source bookkeeping: exact sequence-gap accounting and each source's reported time.

Every ingest message carries ``(source_id, seq)``; a source numbers *all* its messages with one
counter that goes up by one per message.  Per source we keep a running balance

    sent = received + missing         (exact, by construction)

where ``received`` counts every message whose header the daemon could read — accepted or rejected
for any reason other than ``duplicate`` (a reject is never a loss; ``rejected`` counts those) —
and ``missing`` adds ``seq − last − 1`` whenever a message skips ahead: over ZeroMQ/TCP nothing is
reordered or duplicated within one connection, so a skip is a loss, never a late arrival.  A
sequence number at or below the last one is a ``duplicate`` (rejected, the counter does not move),
except ``seq == 0``, which is read as the source restarting its numbering (``restarts``; its time
watermark is forgotten too).  The first message of a source the table does not hold (new, or
evicted earlier) starts its balance at that ``seq``; no loss is inferred before it.

The table is bounded (``max_sources``, least-recently-seen evicted, counted in ``evicted``) so a
flood of bogus source ids cannot grow memory.  Owned by the daemon's loop thread; ``summary`` is
safe to call from other threads (it copies under the GIL).
"""

from __future__ import annotations

from dataclasses import dataclass

DUPLICATE = -1


@dataclass(slots=True)
class SourceState:
    first_seq: int
    last_seq: int
    received: int = 1
    missing: int = 0
    duplicates: int = 0
    restarts: int = 0
    rejected: int = 0  # received messages the daemon rejected (any reason but duplicate)
    time_ns: int = -1  # highest acquisition time this source has reported (−1: none yet)


class SourceTable:
    """``observe(source, seq)`` → number of newly missing messages (≥ 0) or :data:`DUPLICATE`."""

    def __init__(self, *, max_sources: int = 256) -> None:
        if max_sources < 1:
            raise ValueError(f"max_sources: must be ≥ 1, got {max_sources}")
        self.max_sources = int(max_sources)
        self._s: dict[int, SourceState] = {}
        self.evicted = 0
        # totals over all sources ever seen (including evicted ones)
        self.received = 0
        self.missing = 0
        self.duplicates = 0
        self.restarts = 0

    def __len__(self) -> int:
        return len(self._s)

    def observe(self, source: int, seq: int) -> int:
        st = self._s.pop(source, None)
        if st is None:
            if len(self._s) >= self.max_sources:
                self._s.pop(next(iter(self._s)))  # least recently seen
                self.evicted += 1
            self._s[source] = SourceState(first_seq=seq, last_seq=seq)
            self.received += 1
            return 0
        self._s[source] = st  # re-insert: most recently seen goes last
        if seq > st.last_seq:
            gap = seq - st.last_seq - 1
            st.missing += gap
            st.received += 1
            st.last_seq = seq
            self.missing += gap
            self.received += 1
            return gap
        if seq == 0:
            st.restarts += 1
            st.last_seq = 0
            st.received += 1
            st.time_ns = -1
            self.restarts += 1
            self.received += 1
            return 0
        st.duplicates += 1
        self.duplicates += 1
        return DUPLICATE

    def note_reject(self, source: int) -> None:
        """Count a received message of ``source`` (already observed) as rejected."""
        st = self._s.get(source)
        if st is not None:
            st.rejected += 1

    def time_of(self, source: int) -> int:
        st = self._s.get(source)
        return -1 if st is None else st.time_ns

    def report_time(self, source: int, t_ns: int) -> None:
        st = self._s.get(source)
        if st is not None and t_ns > st.time_ns:
            st.time_ns = t_ns

    def clear_times(self) -> None:
        """Forget every source's time watermark (a new stream may restart the clock)."""
        for st in self._s.values():
            st.time_ns = -1

    def summary(self, limit: int = 64) -> dict:
        """Totals plus the ``limit`` most recently seen sources (plain dict, JSON-ready)."""
        items = list(self._s.items())[-limit:]
        return {
            "received": self.received,
            "missing": self.missing,
            "sent": self.received + self.missing,
            "duplicates": self.duplicates,
            "restarts": self.restarts,
            "evicted": self.evicted,
            "tracked": len(items),
            "per_source": {str(k): _row(v) for k, v in items},
        }

    def source_summary(self, source: int) -> dict | None:
        """The balance of one source (the ``per_source`` entry of :meth:`summary`), None if not tracked."""
        st = self._s.get(source)
        return None if st is None else _row(st)


def _row(st: SourceState) -> dict:
    return {
        "first_seq": st.first_seq,
        "last_seq": st.last_seq,
        "received": st.received,
        "missing": st.missing,
        "sent": st.received + st.missing,
        "duplicates": st.duplicates,
        "restarts": st.restarts,
        "rejected": st.rejected,
    }
