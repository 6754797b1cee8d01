"""service.metrics over a live daemon's snapshot (real ZeroMQ sockets, a numpy decoder): the
Prometheus text parses, and the reject counters say what the daemon counted, reason by reason."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_streaming_support import FIRDecoder, barrier, live_daemon  # noqa: E402

from service.metrics import BUCKETS_MS, render  # noqa: E402
from streaming.protocol import REJECT_REASONS  # noqa: E402


def _rejected_samples(text: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "rpnt_rejected_messages_total":
                out[s.labels["reason"]] = s.value
    return out


def test_metrics_export_every_reject_reason_with_the_daemons_counts():
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        for _ in range(3):
            rig.send_frames([b"not a header"])
        rig.send_tick(-1 & 0x7FFF_FFFF_FFFF_FFFF)  # beyond 2^62 ns: time_range (and it consumes a seq)
        barrier(rig, sub)
        snap = d.snapshot(buckets_ms=BUCKETS_MS)
        text = render(
            snapshot=snap,
            status=d.status(),
            calibration_totals={},
            calibration_running=False,
            registry_version=None,
        )
    got = _rejected_samples(text)
    assert snap["rejected"] == {"header_size": 3, "time_range": 1}
    assert set(got) == set(REJECT_REASONS)  # zeros included: a rate sees the first reject of a kind
    assert got == {r: float(snap["rejected"].get(r, 0)) for r in REJECT_REASONS}
