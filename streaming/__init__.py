"""streaming: the real-time decoder daemon around the one decoder contract.

Modules (one job each)::

    protocol   wire format v1: bytes ⇄ typed messages (docs/protocol.md is its normative twin)
    sources    per-source sequence balance and time watermarks
    binner     exact binning on the acquisition clock; owns the open bin; stall deadlines
    history    ring of (counts, kinematics) per decoded bin, for calibration and warm swaps
    latency    fixed-size latency histograms (hot path) and exact percentiles (reports)
    logsink    logging off the hot path, rate-limited per reason
    realtime   optional real-time habits: CPU affinity, SCHED_FIFO, gc.freeze
    daemon     Daemon / DaemonOptions: ZeroMQ ingest → binner → decoder.step → PUB, in one loop thread
    client     reference client: RigClient (send), PredictionSubscriber (receive), wait_for_daemon
    replay     recorded sessions → events (deterministic) → daemon → predictions
    report     replay report: R², per-stage latency, bins lost, PNG plots, JSON
    nwb_out    a decoded session as an NWB file (``rpnt replay --nwb``, the daemon's recording)
    recording  the daemon's session recording: every decoded bin, kept until stop
    adapters   bridges to the stacks labs run: LSL, Redis streams, Open Ephys
    launch     load a decoder (ONNX Runtime without torch, or torch), start a daemon process
    cli        ``rpnt serve`` and ``rpnt replay``

Names below resolve lazily, so ``import streaming`` costs nothing.
"""

from __future__ import annotations

from rpnt_core.lazy import lazy_exports

_EXPORTS = {
    "Daemon": "streaming.daemon",
    "DaemonOptions": "streaming.daemon",
    "SwapTicket": "streaming.daemon",
    "RigClient": "streaming.client",
    "PredictionSubscriber": "streaming.client",
    "wait_for_daemon": "streaming.client",
    "Prediction": "streaming.protocol",
    "PROTOCOL_VERSION": "streaming.protocol",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
