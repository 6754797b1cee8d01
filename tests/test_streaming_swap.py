"""The model-swap decision without sockets (streaming.swap): fresh / warm / catch-up over the
history ring, and what a warm swap promises — the swapped-in decoder's first output is what it
would have said had it run the whole stream."""

from __future__ import annotations

import numpy as np
import pytest
from test_streaming_support import FIRDecoder

from streaming.history import HistoryRing
from streaming.swap import (
    DEFAULT_WARM_BINS,
    FRESH_AT_FIRST_BIN,
    SwapTicket,
    apply_at_boundary,
    plan_boundary,
    warm_bins_for,
    warm_up,
)

N, TAPS = 4, 5


def stream(n_bins: int, *, epoch: int = 1, capacity: int = 1000, seed: int = 0):
    """A history ring holding bins 0…n_bins−1 of stream ``epoch``, and those counts (T, N)."""
    rows = np.random.default_rng(seed).poisson(2.0, size=(n_bins, N)).astype(np.int32)
    ring = HistoryRing(capacity=capacity, n_channels=N, n_kinematics=2)
    for k, row in enumerate(rows):
        ring.append(epoch, k, row)
    return ring, rows


def ticket_after_warm_up(ring: HistoryRing, dec: FIRDecoder, n_bins: int) -> SwapTicket:
    epoch, last, n = warm_up(dec, ring, n_bins)
    return SwapTicket(dec, warm=True, warm_epoch=epoch, warm_last=last, warm_bins=n)


def reference(rows: np.ndarray, k: int) -> np.ndarray:
    """What a decoder that ran bins 0…k of the stream says at bin k."""
    dec = FIRDecoder(N, taps=TAPS)
    for row in rows[: k + 1]:
        out = dec.step(row)
    return out


def test_warm_swap_with_catch_up_says_what_it_would_have_said_all_along():
    ring, rows = stream(40)
    dec = FIRDecoder(N, taps=TAPS)
    t = ticket_after_warm_up(ring, dec, warm_bins_for(dec.info))  # warm-up over bins 36…39
    assert (t.warm_epoch, t.warm_last, t.warm_bins) == (1, 39, TAPS - 1)
    more = np.random.default_rng(1).poisson(2.0, size=(3, N)).astype(np.int32)
    for j, row in enumerate(more):  # bins 40…42 decoded by the old decoder meanwhile
        ring.append(1, 40 + j, row)
    rows = np.concatenate([rows, more])
    plan = plan_boundary(k=43, epoch=1, first_bin=False, ticket=t, max_catchup=16)
    assert plan.catch_up == (40, 43) and not plan.reset
    mode = apply_at_boundary(plan, t, epoch=1, history=ring)
    assert mode == f"warm ({TAPS - 1} bins of history + 3 at the boundary)"
    k43 = np.random.default_rng(2).poisson(2.0, size=N).astype(np.int32)
    np.testing.assert_allclose(dec.step(k43), reference(np.concatenate([rows, k43[None]]), 43), rtol=1e-6)


def test_too_many_bins_since_warm_up_start_fresh():
    ring, _ = stream(60)
    dec = FIRDecoder(N, taps=TAPS)
    t = SwapTicket(dec, warm=True, warm_epoch=1, warm_last=30, warm_bins=4)
    plan = plan_boundary(k=60, epoch=1, first_bin=False, ticket=t, max_catchup=16)
    assert plan.catch_up is None and plan.reset and "the 29 bins since warm-up exceed" in plan.mode
    dec.step(np.ones(N, np.int32))
    assert apply_at_boundary(plan, t, epoch=1, history=ring) == plan.mode and dec.t == 0  # reset


def test_catch_up_bins_that_left_the_history_fall_back_to_fresh():
    ring, _ = stream(40, capacity=8)  # holds bins 32…39 only
    dec = FIRDecoder(N, taps=TAPS)
    t = SwapTicket(dec, warm=True, warm_epoch=1, warm_last=25, warm_bins=4)
    plan = plan_boundary(k=40, epoch=1, first_bin=False, ticket=t, max_catchup=16)
    assert plan.catch_up == (26, 40)
    dec.step(np.ones(N, np.int32))
    mode = apply_at_boundary(plan, t, epoch=1, history=ring)
    assert mode.startswith("fresh (the 14 bins since warm-up") and dec.t == 0


def test_a_swap_on_a_streams_first_bin_is_fresh_and_left_to_the_stream_reset():
    ring, _ = stream(10)
    dec = FIRDecoder(N, taps=TAPS)
    t = ticket_after_warm_up(ring, dec, 4)
    plan = plan_boundary(k=0, epoch=2, first_bin=True, ticket=t, max_catchup=16)
    assert (plan.mode, plan.reset, plan.catch_up) == (FRESH_AT_FIRST_BIN, False, None)
    assert apply_at_boundary(plan, t, epoch=2, history=ring) == FRESH_AT_FIRST_BIN
    assert dec.t == 4  # untouched here: the daemon resets every decoder on a FIRST bin


@pytest.mark.parametrize(
    "warm,warm_epoch,warm_last,mode",
    [
        (False, 1, None, "fresh"),
        (True, 1, None, "fresh (no history of this stream to warm on)"),  # warmed on nothing
        (True, 0, 5, "fresh (no history of this stream to warm on)"),  # warmed on another stream
    ],
)
def test_fresh_swaps_reset(warm, warm_epoch, warm_last, mode):
    ring, _ = stream(10)
    dec = FIRDecoder(N, taps=TAPS)
    dec.step(np.ones(N, np.int32))
    t = SwapTicket(dec, warm=warm, warm_epoch=warm_epoch, warm_last=warm_last, warm_bins=0)
    plan = plan_boundary(k=10, epoch=1, first_bin=False, ticket=t, max_catchup=16)
    assert (plan.mode, plan.reset, plan.catch_up) == (mode, True, None)
    assert apply_at_boundary(plan, t, epoch=1, history=ring) == mode and dec.t == 0


def test_warm_up_covers_only_the_current_stream():
    ring, rows = stream(10)
    for k in range(3):
        ring.append(2, 100 + k, rows[k])  # a new stream: bins 100…102
    dec = FIRDecoder(N, taps=TAPS)
    assert warm_up(dec, ring, 50) == (2, 102, 3) and dec.t == 3
    assert warm_up(dec, HistoryRing(capacity=4, n_channels=N, n_kinematics=1), 50) == (0, None, 0)


def test_warm_bins_default_to_the_receptive_field():
    assert warm_bins_for(FIRDecoder(N, taps=7).info) == 6
    assert warm_bins_for(FIRDecoder(N, taps=7).info, 3) == 3
    assert warm_bins_for(FIRDecoder(N, taps=7).info, -2) == 0

    class NoField:
        extra: dict = {}

    assert warm_bins_for(NoField()) == DEFAULT_WARM_BINS


def test_ticket_wait():
    t = SwapTicket(FIRDecoder(N), warm=False, warm_epoch=0, warm_last=None, warm_bins=0)
    with pytest.raises(TimeoutError):
        t.wait(0.0)
    assert not t.done()
    t.resolve(bin=12, epoch=1, generation=2, mode="fresh")
    assert t.done() and t.wait(0.0) == 12 and (t.generation, t.mode) == (2, "fresh")
    failed = SwapTicket(FIRDecoder(N), warm=False, warm_epoch=0, warm_last=None, warm_bins=0)
    failed.resolve(error="daemon stopped before the swap took effect")
    with pytest.raises(RuntimeError, match="daemon stopped"):
        failed.wait(0.0)
