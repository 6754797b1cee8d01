"""What the adapter tests (LSL, Redis streams, Open Ephys) share: their spike counts, a bridge's
counters, bridges started for the length of a block, the native replay to compare with, and the
stacked predictions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
from test_streaming_support import collect, send_stream, wait_until

from streaming.adapters import start_adapters, stop_adapters

N_CH = 8  # the channels of test_streaming_support.FIRDecoder()


def poisson_counts(T: int, seed: int) -> np.ndarray:
    """(T, N_CH) Poisson(1.5) spike counts, the same for the same seed."""
    return np.random.default_rng(seed).poisson(1.5, (T, N_CH))


def adapter_stats(d, key: str) -> dict:
    """The counters of the bridge ``key`` ("ingest KIND:TARGET" / "publish KIND:TARGET") of daemon ``d``."""
    return d.snapshot()["adapters"][key]


def wait_connected(d, *keys: str) -> None:
    """Wait (the liveness timeout) until every bridge in ``keys`` reports itself connected."""
    assert wait_until(lambda: all(adapter_stats(d, k)["connected"] for k in keys)), f"not connected: {keys}"


@contextmanager
def bridges(d, *, ingest: Iterable[str] = (), publish: Iterable[str] = ()) -> Iterator[list]:
    """The bridges for the ``ingest`` / ``publish`` specs, started on daemon ``d``, stopped (and
    joined) when the block ends."""
    started = start_adapters(d, ingest=list(ingest), publish=list(publish))
    try:
        yield started
    finally:
        stop_adapters(started)


def native_predictions(rig, sub, counts: np.ndarray) -> list:
    """The daemon's predictions for ``counts`` sent natively (a RESET, then SPIKES per bin): the
    reference an adapter's stream must equal."""
    send_stream(rig, counts)
    preds = collect(sub, counts.shape[0])
    assert len(preds) == counts.shape[0]
    return preds


def velocities(predictions) -> np.ndarray:
    """(T, D) the decoded values of ``predictions``, stacked in order."""
    return np.stack([p.velocity for p in predictions])
