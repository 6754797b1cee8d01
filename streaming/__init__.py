"""streaming: the real-time decoder daemon around the one decoder contract.

Modules (one job each)::

    protocol   wire format v1: bytes ⇄ typed messages (docs/protocol.md is its normative twin)
    sources    per-source sequence balance and time watermarks
    binner     exact binning on the acquisition clock; owns the open bin; stall deadlines
    history    ring of (counts, kinematics) per decoded bin, for calibration and warm swaps
    latency    fixed-size latency histograms (hot path) and exact percentiles (reports)
    logsink    logging off the hot path, rate-limited per reason
    realtime   optional real-time habits: CPU affinity, SCHED_FIFO, gc.freeze
    options    DaemonConfig: the operator options, declared once (settings, flags, DaemonOptions)
    flags      command-line flags generated from settings fields
    daemon     Daemon: ZeroMQ ingest → binner → decoder.step → PUB, in one loop thread
    ingest     the loop's message handlers: checks, then the binner (one dispatch table)
    publish    one closed bin → decoder.step → PUB (and the swaps that land on it)
    swap       the model-swap decision (fresh / warm / catch-up), pure functions
    threads    the one background-thread-with-stop-flag shape (daemon, adapter bridges)
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
    "DaemonOptions": "streaming.options",
    "SwapTicket": "streaming.swap",
    "RigClient": "streaming.client",
    "PredictionSubscriber": "streaming.client",
    "wait_for_daemon": "streaming.client",
    "Prediction": "streaming.protocol",
    "PROTOCOL_VERSION": "streaming.protocol",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
