"""The daemon's operator options, declared once: name, type, default, bounds and description.

:class:`DaemonConfig` (and :class:`EngineConfig` for the engine) is the one declaration.  Everything
else is derived from it:

- ``rpnt serve``'s ``[daemon]`` / ``[model]`` settings (:mod:`service.settings` composes these
  models, so TOML keys and ``RPNT_DAEMON__*`` variables are the field names);
- the command-line flags of ``rpnt serve``, ``python -m streaming.cli serve`` and ``rpnt replay``
  (:mod:`streaming.flags`: ``--stall-ms`` for ``stall_ms``, the description is the help text);
- the run-time :class:`DaemonOptions` (:meth:`DaemonConfig.options`: ms → s, CPU list → tuple),
  whose operator fields take their defaults from here.

Also the checks on those options that need no socket: :func:`check_endpoint` (loopback unless
allowed) and :func:`max_jump_bins`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from exporters.backends import BACKENDS  # the engines a daemon can run
from exporters.contract import PRECISIONS  # the step graphs of an export directory

from .protocol import DEFAULT_LIMITS, Limits

#: how start and stop are announced on stderr: a summary for people, or JSON event lines
LOG_FORMATS = ("text", "json")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def option(
    default: Any, description: str, *, metavar: str | None = None, unset: str | None = None, **bounds: Any
) -> Any:
    """A settings field: ``default``, ``description`` (the help text and the example-config comment)
    and pydantic ``bounds`` (``gt``, ``ge``, ``le``, ...).  ``metavar``: the flag's value name;
    ``unset``: what a ``None`` default means (said after the description)."""
    extra: dict[str, Any] = {k: v for k, v in (("metavar", metavar), ("unset", unset)) if v is not None}
    return Field(default, description=description, json_schema_extra=extra or None, **bounds)


def extra(field: Any, key: str) -> Any:
    """``key`` of a field's :func:`option` extras (``metavar``, ``unset``), or None."""
    more = field.json_schema_extra
    return more.get(key) if isinstance(more, dict) else None


def described(field: Any) -> str:
    """A field's description, with what leaving it unset means (``unset``) when it says."""
    unset = extra(field, "unset")
    text = field.description or ""
    return f"{text} (default: {unset})" if unset else text


class EngineConfig(BaseModel):
    """Which inference engine runs the decoder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal[BACKENDS] = option(  # type: ignore[valid-type]
        "onnx-cpu",
        "inference engine (onnx-cuda/onnx-tensorrt need the [gpu] extra on a GPU host, openvino-cpu the "
        "[openvino] extra)",
    )
    precision: Literal[PRECISIONS] = option("fp32", "which step graph of an export to run")  # type: ignore[valid-type]
    intra_op_threads: int = option(1, "ONNX Runtime intra-op threads of the decode engine", ge=1, le=64)


class DaemonConfig(BaseModel):
    """The real-time path (see ``rpnt serve --help`` and docs/protocol.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bin_ms: float | None = option(None, "bin width in ms", unset="the model's training bin width", gt=0)
    ingest: str = option("tcp://127.0.0.1:5555", "PULL endpoint for rig messages")
    publish: str = option("tcp://127.0.0.1:5556", "PUB endpoint for predictions")
    stall_ms: float | None = option(
        None,
        "wall-clock grace past a bin's due time before it closes flagged STALLED",
        unset="one bin width",
        gt=0,
    )
    max_jump_s: float = option(
        10.0,
        "reject times this far ahead of the open bin: no one message closes more than "
        "⌈max_jump_s / bin width⌉ bins (a rig whose clock really jumps sends RESET)",
        gt=0,
    )
    history_s: float = option(
        300.0, "seconds of (counts, kinematics) kept for closed-loop calibration and warm swaps", gt=0
    )
    record_nwb: str | None = option(
        None,
        "session recording: write every decoded bin (counts, decoded target, flags, per-stage latencies, "
        "model version, the rig's kinematics) to this NWB file when the daemon stops (docs/nwb.md; needs "
        "the [nwb] extra)",
        metavar="OUT.nwb",
    )
    record_max_s: float = option(
        14400.0,
        "the session recording keeps at most this many seconds of bins (memory: 4·(channels + outputs) "
        "+ 72 bytes per bin); later bins are counted, not kept",
        gt=0,
    )
    warmup_bins: int = option(32, "engine steps run before the first bin", ge=0)
    affinity: list[int] | None = option(None, "CPU ids to pin the decode thread to", metavar="CPU[,CPU]")
    gc_freeze: bool = option(False, "gc.freeze() after warm-up")
    busy_poll_us: int = option(
        0,
        "spin this long after each message before blocking in poll (keeps the decode core's caches "
        "warm between bins, at the price of one busy core)",
        metavar="US",
        ge=0,
    )
    prewarm_lead_us: int = option(
        0,
        "run the engine once, without advancing the stream, this long before each bin is due (re-warms "
        "its caches after the idle gap, on the same core; needs a lead longer than one step; 0 = off)",
        metavar="US",
        ge=0,
    )
    rt_priority: int | None = option(
        None, "SCHED_FIFO priority of the decode thread (needs privileges)", metavar="N", ge=1, le=99
    )
    allow_bin_mismatch: bool = option(False, "decode at a bin width other than the model's")
    allow_remote: bool = option(False, "allow non-loopback TCP endpoints")

    def bin_s(self, model_bin_s: float) -> float:
        """The bin width to decode at (s): ``bin_ms``, else the model's ``model_bin_s``."""
        return self.bin_ms / 1e3 if self.bin_ms else float(model_bin_s)

    def options(self, **internals: Any) -> DaemonOptions:
        """The run-time :class:`DaemonOptions` (``internals``: its fields no operator sets)."""
        return DaemonOptions(
            stall_timeout_s=None if self.stall_ms is None else self.stall_ms / 1e3,
            max_jump_s=self.max_jump_s,
            history_s=self.history_s,
            warmup_bins=self.warmup_bins,
            record_s=self.record_max_s if self.record_nwb else 0.0,
            affinity=tuple(self.affinity) if self.affinity else None,
            gc_freeze=self.gc_freeze,
            rt_priority=self.rt_priority,
            allow_bin_mismatch=self.allow_bin_mismatch,
            busy_poll_us=self.busy_poll_us,
            prewarm_lead_us=self.prewarm_lead_us,
            allow_remote=self.allow_remote,
            **internals,
        )


#: the operator defaults (what DaemonOptions and the Daemon constructor default to)
DECLARED = DaemonConfig()


@dataclass(frozen=True, kw_only=True)
class DaemonOptions:
    """Everything about the running daemon that is not the decoder, the bin width or the endpoints.

    The operator's options (:class:`DaemonConfig`, converted by :meth:`DaemonConfig.options`):
    ``stall_timeout_s`` (``stall_ms`` in s; None = one bin width), ``max_jump_s``, ``history_s``,
    ``warmup_bins``, ``affinity`` (CPU ids), ``gc_freeze``, ``rt_priority``, ``allow_bin_mismatch``,
    ``busy_poll_us``, ``prewarm_lead_us``, ``allow_remote``, and ``record_s`` (keep up to this many
    seconds of decoded bins for :meth:`~streaming.daemon.Daemon.recording`; 0 = none).

    Internals:
        limits: per-message size limits (``oversized``); max_message_bytes: ZMQ_MAXMSGSIZE, the
            socket's hard cap per frame (a peer sending more is disconnected by ZeroMQ itself).
        max_sources: sources tracked for sequence accounting (least recently seen evicted).
        max_pending_kinematics: KINEMATICS rows held for bins not decoded yet.
        n_kinematics: width D of KINEMATICS messages (None = the decoder's n_outputs).
        swap_catchup_bins: at most this many bins are replayed into a swapped-in decoder at the
            boundary (the bins decoded between its warm-up and the swap); more → it starts fresh.
        publish_hwm / ingest_hwm: ZeroMQ high-water marks (messages) of the PUB and PULL sockets.
        log_interval_s: at most one log line per reject reason per interval.
        max_batch: messages drained per wake-up before the stall deadline is checked.
    """

    stall_timeout_s: float | None = None if DECLARED.stall_ms is None else DECLARED.stall_ms / 1e3
    max_jump_s: float = DECLARED.max_jump_s
    history_s: float = DECLARED.history_s
    warmup_bins: int = DECLARED.warmup_bins
    record_s: float = 0.0
    affinity: int | tuple[int, ...] | None = None
    gc_freeze: bool = DECLARED.gc_freeze
    rt_priority: int | None = DECLARED.rt_priority
    allow_bin_mismatch: bool = DECLARED.allow_bin_mismatch
    busy_poll_us: int = DECLARED.busy_poll_us
    prewarm_lead_us: int = DECLARED.prewarm_lead_us
    allow_remote: bool = DECLARED.allow_remote
    limits: Limits = DEFAULT_LIMITS
    max_message_bytes: int = 64 << 20
    max_sources: int = 256
    max_pending_kinematics: int = 4096
    n_kinematics: int | None = None
    swap_catchup_bins: int = 16
    publish_hwm: int = 10_000
    ingest_hwm: int = 100_000
    log_interval_s: float = 5.0
    max_batch: int = 64


def check_endpoint(endpoint: str, *, allow_remote: bool = False) -> str:
    """A ZeroMQ bind endpoint; ``tcp://`` must name a loopback host unless ``allow_remote``.

    Returns:
        ``endpoint`` unchanged.
    Raises:
        ValueError: not ``tcp://``, ``ipc://`` or ``inproc://``, or a non-loopback TCP host.
    """
    scheme = endpoint.split("://", 1)[0] if "://" in endpoint else ""
    if scheme in ("ipc", "inproc"):
        return endpoint
    if scheme != "tcp":
        raise ValueError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    host = urlsplit(endpoint).hostname or endpoint[len("tcp://") :].rsplit(":", 1)[0]
    if host not in LOOPBACK_HOSTS and host.strip("[]") not in LOOPBACK_HOSTS and not allow_remote:
        raise ValueError(
            f"endpoint {endpoint!r} is not loopback; pass allow_remote=True (--allow-remote) to "
            "bind other interfaces"
        )
    return endpoint


def max_jump_bins(*, max_jump_s: float, bin_ns: int) -> int:
    """The most bins one message may close: ⌈max_jump_s / Δ⌉, at least 1 (exact, in integer ns)."""
    return max(1, -(-round(max_jump_s * 1e9) // bin_ns))


#: the daemon's tuning options: every command line that starts a daemon takes these flags
TUNING = (
    "stall_ms",
    "max_jump_s",
    "history_s",
    "warmup_bins",
    "affinity",
    "gc_freeze",
    "busy_poll_us",
    "prewarm_lead_us",
    "rt_priority",
    "allow_bin_mismatch",
    "allow_remote",
)
