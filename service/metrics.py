"""``GET /metrics``: the daemon's counters and latency histograms through ``prometheus_client``.

:class:`DaemonCollector` is a custom collector: each scrape reads a fresh
:meth:`streaming.daemon.Daemon.snapshot` (a copy; the decode loop is never touched) and yields
metric families from it.  Each :class:`~service.control.ControlPlane` registers its collector in
a :class:`~prometheus_client.CollectorRegistry` of its own, never the process-wide default one,
so several apps in one process do not clash and nothing else leaks into their output.

Latency histograms are ``rpnt_stage_latency_seconds{stage=...}`` with the buckets below
(cumulative, ``le`` in seconds); the stages are those of :data:`streaming.latency.STAGE_DOC`.
``rpnt_rejected_messages_total{reason=...}`` has one sample per reason of
:data:`streaming.protocol.REJECT_REASONS`, zeros included, so that a rate over the first reject
of a kind is seen.  Names are listed in ``deploy/OPERATIONS.md``; the Grafana dashboard and the
alert rules in ``deploy/`` use only these (``tests/test_monitoring.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypedDict

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from streaming.protocol import REJECT_REASONS

BUCKETS_MS = (
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    50.0,
    100.0,
    250.0,
    1000.0,
)

# counter name → (snapshot counter key, help)
COUNTERS = {
    "rpnt_bins_total": ("bins", "bins decoded and published"),
    "rpnt_bins_stalled_total": ("bins_stalled", "bins closed by the wall-clock deadline (a source stalled)"),
    "rpnt_late_events_total": (
        "late_events",
        "spike events that arrived for a bin already decoded (dropped)",
    ),
    "rpnt_late_packets_total": (
        "late_packets",
        "SPIKES/COUNTS messages with events or rows for a bin already decoded (once per message)",
    ),
    "rpnt_sequence_gaps_total": ("gaps", "messages lost, from per-source sequence numbers"),
    "rpnt_decode_errors_total": (
        "decode_errors",
        "bins whose decoder step raised (published as NaN, flag ERROR)",
    ),
    "rpnt_publish_dropped_total": (
        "publish_dropped",
        "predictions the PUB socket refused to queue (a subscriber "
        "that falls behind its high-water mark loses messages "
        "inside ZeroMQ, unseen here)",
    ),
    "rpnt_model_swaps_total": ("swaps", "decoder swaps applied at a bin boundary"),
    "rpnt_events_total": ("events", "spike events received"),
    "rpnt_messages_total": ("messages", "ingest messages received"),
    "rpnt_kinematics_stored_total": ("kinematics_stored", "bins with rig kinematics kept for calibration"),
}


class MetricsInput(TypedDict):
    """What one scrape reads: ``snapshot`` from ``Daemon.snapshot(buckets_ms=BUCKETS_MS)``,
    ``status`` from ``Daemon.status()``, the calibration manager's totals by final state, whether a
    job runs, and the registry version that is live (None outside a registry)."""

    snapshot: dict
    status: dict
    calibration_totals: dict
    calibration_running: bool
    registry_version: str | None


def _latency_family(latency_ms: dict) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(
        "rpnt_stage_latency_seconds",
        "per-bin latency of each hot-path stage (parse, infer, publish; daemon = message "
        "off the socket → prediction on the PUB socket)",
        labels=["stage"],
    )
    for stage, s in latency_ms.items():
        buckets = [(floatToGoString(le_ms / 1e3), n) for le_ms, n in s.get("buckets", [])]
        buckets.append(("+Inf", s["count"]))
        fam.add_metric([stage], buckets, sum_value=s.get("mean_ms", 0.0) * s["count"] / 1e3)
    return fam


def _labelled_counter(name: str, help_: str, label: str, values: dict) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, help_, labels=[label])
    for key, n in values.items():
        fam.add_metric([key], n)
    return fam


def families(m: MetricsInput) -> Iterator[Metric]:
    """The metric families of one scrape (every name in ``deploy/OPERATIONS.md``)."""
    snapshot, status = m["snapshot"], m["status"]
    yield _latency_family(snapshot["latency_ms"])
    c = snapshot["counters"]
    for name, (key, help_) in COUNTERS.items():
        yield CounterMetricFamily(name, help_, value=c.get(key, 0))
    rejected = snapshot["rejected"]  # non-zero reasons only; every reason is exported, from 0
    yield _labelled_counter(
        "rpnt_rejected_messages_total",
        "ingest messages rejected, by reason (docs/protocol.md §6)",
        "reason",
        {r: rejected.get(r, 0) for r in REJECT_REASONS},
    )
    yield _labelled_counter(
        "rpnt_calibration_jobs_total",
        "calibration jobs finished since start, by outcome",
        "state",
        dict(sorted(m["calibration_totals"].items())),
    )
    yield GaugeMetricFamily(
        "rpnt_calibration_running", "1 while a calibration job runs", value=int(m["calibration_running"])
    )
    yield GaugeMetricFamily(
        "rpnt_uptime_seconds", "seconds since the daemon became ready", value=float(snapshot["uptime_s"])
    )
    yield GaugeMetricFamily(
        "rpnt_daemon_running",
        "1 while the decode loop runs (0: HTTP answers but nothing decodes)",
        value=int(bool(snapshot["running"])),
    )
    yield GaugeMetricFamily(
        "rpnt_bin_seconds", "bin width: the latency budget of one bin", value=float(status["bin_s"])
    )
    yield GaugeMetricFamily(
        "rpnt_model_generation", "decoder generation (1 at start, +1 per swap)", value=status["generation"]
    )
    info = GaugeMetricFamily(
        "rpnt_model_info",
        "the decoder that decodes now",
        labels=["version", "fingerprint", "registry_version"],
    )
    info.add_metric([status["model_version"], status["fingerprint"] or "", m["registry_version"] or ""], 1)
    yield info


class DaemonCollector(Collector):
    """A collector over ``source()`` (called once per scrape).  ``describe`` is empty, so
    registering it never calls ``source``: it can be registered before the daemon starts."""

    def __init__(self, *, source: Callable[[], MetricsInput]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from families(self._source())


def new_registry(source: Callable[[], MetricsInput]) -> CollectorRegistry:
    """A registry of its own holding only a :class:`DaemonCollector` over ``source``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(source=source))
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """(body, content type) of a scrape: Prometheus text, or OpenMetrics when ``accept`` asks for it."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def render(
    *,
    snapshot: dict,
    status: dict,
    calibration_totals: dict,
    calibration_running: bool,
    registry_version: str | None,
) -> str:
    """Prometheus text for one snapshot (the fields of :class:`MetricsInput`)."""
    m = MetricsInput(
        snapshot=snapshot,
        status=status,
        calibration_totals=calibration_totals,
        calibration_running=calibration_running,
        registry_version=registry_version,
    )
    return generate_latest(new_registry(lambda: m)).decode()
