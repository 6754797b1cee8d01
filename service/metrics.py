"""``GET /metrics``: the daemon's counters and latency histograms in Prometheus text format (0.0.4).

Rendered on request from :meth:`streaming.daemon.Daemon.snapshot` (a copy; the decode loop is
never touched).  Latency histograms are ``rpnt_stage_latency_seconds{stage=...}`` with the
buckets below (cumulative, ``le`` in seconds); the stages are those of
:data:`streaming.latency.STAGE_DOC`.  ``rpnt_rejected_messages_total{reason=...}`` has one sample
per reason of :data:`streaming.protocol.REJECT_REASONS`, zeros included, so that a rate over the
first reject of a kind is seen.  Names are listed in ``deploy/OPERATIONS.md``.
"""

from __future__ import annotations

from typing import Iterable

from streaming.protocol import REJECT_REASONS

BUCKETS_MS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0,
              250.0, 1000.0)

# counter name → (snapshot counter key, help)
COUNTERS = {
    "rpnt_bins_total": ("bins", "bins decoded and published"),
    "rpnt_bins_stalled_total": ("bins_stalled", "bins closed by the wall-clock deadline (a source stalled)"),
    "rpnt_late_events_total": ("late_events", "spike events that arrived for a bin already decoded (dropped)"),
    "rpnt_late_packets_total": ("late_packets", "SPIKES/COUNTS messages with events or rows for a bin already "
                                                "decoded (once per message)"),
    "rpnt_sequence_gaps_total": ("gaps", "messages lost, from per-source sequence numbers"),
    "rpnt_decode_errors_total": ("decode_errors", "bins whose decoder step raised (published as NaN, flag ERROR)"),
    "rpnt_publish_dropped_total": ("publish_dropped", "predictions the PUB socket refused to queue (a subscriber "
                                                      "that falls behind its high-water mark loses messages "
                                                      "inside ZeroMQ, unseen here)"),
    "rpnt_model_swaps_total": ("swaps", "decoder swaps applied at a bin boundary"),
    "rpnt_events_total": ("events", "spike events received"),
    "rpnt_messages_total": ("messages", "ingest messages received"),
    "rpnt_kinematics_stored_total": ("kinematics_stored", "bins with rig kinematics kept for calibration"),
}


def _esc(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kw: object) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kw.items()) + "}" if kw else ""


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def render(*, snapshot: dict, status: dict, calibration_totals: dict, calibration_running: bool,
           registry_version: str | None) -> str:
    """Prometheus text for one snapshot (``snapshot`` from ``Daemon.snapshot(buckets_ms=BUCKETS_MS)``)."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{n} {_num(v)}" for n, v in samples)

    lat = snapshot["latency_ms"]
    samples = []
    for stage, s in lat.items():
        for le_ms, n in s.get("buckets", []):
            samples.append((f"rpnt_stage_latency_seconds_bucket{_labels(stage=stage, le=repr(le_ms / 1e3))}", n))
        samples.append((f"rpnt_stage_latency_seconds_bucket{_labels(stage=stage, le='+Inf')}", s["count"]))
        samples.append((f"rpnt_stage_latency_seconds_sum{_labels(stage=stage)}",
                        s.get("mean_ms", 0.0) * s["count"] / 1e3))
        samples.append((f"rpnt_stage_latency_seconds_count{_labels(stage=stage)}", s["count"]))
    family("rpnt_stage_latency_seconds", "histogram",
           "per-bin latency of each hot-path stage (parse, infer, publish; daemon = message off the socket → "
           "prediction on the PUB socket)", samples)
    c = snapshot["counters"]
    for name, (key, help_) in COUNTERS.items():
        family(name, "counter", help_, [(name, c.get(key, 0))])
    rejected = snapshot["rejected"]  # non-zero reasons only; every reason is exported, from 0
    family("rpnt_rejected_messages_total", "counter", "ingest messages rejected, by reason (docs/protocol.md §6)",
           [(f"rpnt_rejected_messages_total{_labels(reason=r)}", rejected.get(r, 0)) for r in REJECT_REASONS])
    family("rpnt_calibration_jobs_total", "counter", "calibration jobs finished since start, by outcome",
           [(f"rpnt_calibration_jobs_total{_labels(state=s)}", n) for s, n in sorted(calibration_totals.items())])
    family("rpnt_calibration_running", "gauge", "1 while a calibration job runs",
           [("rpnt_calibration_running", int(calibration_running))])
    family("rpnt_uptime_seconds", "gauge", "seconds since the daemon became ready", [("rpnt_uptime_seconds",
                                                                                       float(snapshot["uptime_s"]))])
    family("rpnt_model_generation", "gauge", "decoder generation (1 at start, +1 per swap)",
           [("rpnt_model_generation", status["generation"])])
    family("rpnt_model_info", "gauge", "the decoder that decodes now",
           [(f"rpnt_model_info{_labels(version=status['model_version'], fingerprint=status['fingerprint'] or '', registry_version=registry_version or '')}", 1)])
    return "\n".join(out) + "\n"
