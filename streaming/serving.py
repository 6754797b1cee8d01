"""Serving a constructed daemon until it is told to stop, and saying so on stderr.

:func:`serve_until_stopped` is the one serve loop of ``rpnt serve`` (:mod:`service.cli`) and
``python -m streaming.cli serve``: start, announce (a summary for people, or a ``{"event":
"ready"}`` JSON line), log a stats line every few seconds, stop on SIGINT/SIGTERM, announce the
final counters.  :func:`write_recording` writes the session recording after the stop
(:func:`nwb_output_problem` checks its path before the start).  Every
announcement is written to stderr in a single write (:func:`emit_lines`), so that log lines never
land inside one.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

from .options import LOG_FORMATS

#: exit statuses of the serving commands: success, the run failed, bad arguments or inputs
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def stats_line(snap: dict) -> str:
    """One line from a :meth:`~streaming.daemon.Daemon.snapshot`: bins, events, losses, daemon p99."""
    c = snap["counters"]
    lat = snap["latency_ms"].get("daemon", {})
    rej = sum(snap["rejected"].values())
    p99 = f"{lat['p99_ms']:.3f}" if lat.get("count") else "-"
    return (
        f"bins {c['bins']} (stalled {c['bins_stalled']}), events {c['events']}, late {c['late_events']}, "
        f"lost msgs {c['gaps']}, rejected {rej}, daemon p99 {p99} ms"
    )


def serve_until_stopped(
    daemon,
    *,
    ready_fields: dict,
    stats_interval: float,
    log: logging.Logger,
    log_format: str = "text",
    after_start=None,
    before_stop=None,
) -> int:
    """Start ``daemon``, announce it (``log_format`` "text": :func:`ready_summary`; "json": the
    ``{"event": "ready", ...}`` line), log a summary every ``stats_interval`` s (0: never) until
    SIGINT/SIGTERM or the loop ends, then stop it and announce that (the final counters; in JSON
    ``{"event": "stopped", "snapshot": ...}``).  ``after_start(stop_event) -> dict`` runs once the
    loop is up (its dict joins the ready event; a ``RuntimeError`` aborts with exit 1);
    ``before_stop()`` runs before the daemon is stopped.  Both ``rpnt serve`` and
    ``python -m streaming.cli serve``.

    Returns:
        The exit status: 0 after a stop, 1 when the daemon or ``after_start`` failed to start.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format: expected one of {', '.join(LOG_FORMATS)}, got {log_format}")
    _quiet_daemon_ready_dump()
    stop = _stop_on_signals()
    try:
        daemon.start()
    except (RuntimeError, TimeoutError) as exc:
        print(f"rpnt serve: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        extra = after_start(stop) if after_start is not None else {}
    except RuntimeError as exc:
        print(f"rpnt serve: error: {exc}", file=sys.stderr)
        daemon.stop()
        daemon.join(10.0)
        return EXIT_FAILED
    ready = ready_event(daemon, {**ready_fields, **(extra or {})})
    if log_format == "json":
        emit_event(ready)
    else:
        emit_lines(ready_summary(ready))
    _log_stats_until(stop, daemon, stats_interval, log)
    if before_stop is not None:
        before_stop()
    daemon.stop()
    daemon.join(10.0)
    snap = daemon.snapshot()
    if log_format == "json":
        emit_event({"event": "stopped", "snapshot": snap})
    else:
        emit_lines(["rpnt serve: stopped; " + stats_line(snap)])
    return EXIT_OK


def _stop_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set (handlers installed in the calling, main, thread)."""
    stop = threading.Event()

    def _on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    return stop


def _log_stats_until(stop: threading.Event, daemon, stats_interval: float, log: logging.Logger) -> None:
    """Wait for ``stop`` or the loop's end, logging :func:`stats_line` every ``stats_interval`` s (0: never)."""
    interval = stats_interval if stats_interval > 0 else None
    while not stop.is_set() and daemon.running:
        if stop.wait(interval if interval else 0.5) or not interval:
            continue
        log.info(stats_line(daemon.snapshot()))


_READY_STATUS = (
    "model_version",
    "fingerprint",
    "decoder",
    "n_channels",
    "n_outputs",
    "bin_s",
    "ingest",
    "publish",
)


def ready_event(daemon, fields: dict) -> dict:
    """The ``{"event": "ready", ...}`` event of a started ``daemon``: ``fields``, whether torch was
    imported, the model and endpoints from its status, and its start-up habits."""
    st = daemon.status()
    return {
        "event": "ready",
        **fields,
        "torch_imported": "torch" in sys.modules,
        **{k: st[k] for k in _READY_STATUS},
        "startup": st["startup"],
    }


def ready_summary(ready: dict) -> list[str]:
    """The start-up summary for people, from a ready event: the model, the HTTP address with where
    the API token is (when HTTP is served), the ZeroMQ endpoints; then one note per real-time habit
    that was asked for but not applied."""
    model = f"model {ready['model_version']}"
    if ready.get("registry_version"):
        model += f" (registry version {ready['registry_version']})"
    lines = [
        f"rpnt serve: ready: {model}, {ready['n_channels']} channels in, {ready['n_outputs']} outputs out, "
        f"{ready['bin_s'] * 1e3:g} ms bins"
    ]
    if "http" in ready:
        lines.append(
            f"  HTTP    {ready['http']}   API token: {_token_where(ready.get('token_source'))}"
            if ready["http"]
            else "  HTTP    off (the decode loop alone)"
        )
    lines.append(f"  ZeroMQ  in {ready['ingest']} (from the rig)   out {ready['publish']} (predictions)")
    if ready.get("adapters"):
        lines.append(f"  adapters  {', '.join(ready['adapters'])}")
    for name, habit in (ready.get("startup") or {}).items():
        if isinstance(habit, dict) and habit.get("requested") and not habit.get("applied"):
            lines.append(
                f"  note: {name.replace('_', ' ')} was requested but not applied: {habit.get('detail')}"
            )
    return lines


def _token_where(source: str | None) -> str:
    if not source:
        return "none"
    return f"from {source}" if source.startswith("$") or source == "auth.token" else source


def _quiet_daemon_ready_dump() -> None:
    """Leave out the daemon's own start-up log line (its habits as a dict): the ready summary or
    event says the same, readably."""
    logger = logging.getLogger("rpnt.streaming")
    if not any(isinstance(f, _DropReadyDump) for f in logger.filters):
        logger.addFilter(_DropReadyDump())


class _DropReadyDump(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("rpnt daemon ready:")


def emit_event(obj: dict) -> None:
    """One JSON line on stderr in a single write: the log writer thread shares stderr, and a
    ``print`` (text, then newline: two writes) could have a log line land inside the event line."""
    emit_lines([json.dumps(obj, default=str)])


def emit_lines(lines: list[str]) -> None:
    """Lines on stderr in a single write (see :func:`emit_event`)."""
    sys.stderr.write("".join(line + "\n" for line in lines))
    sys.stderr.flush()


def write_recording(daemon, path: str, *, log_format: str = "text") -> int:
    """Write a stopped daemon's session recording to ``path`` (NWB) and say so on stderr (a line,
    or a ``{"event": "recorded", ...}`` JSON line); returns an exit status (1: could not write)."""
    from .nwb_out import write_nwb

    ds = daemon.recording(description=f"rpnt serve session, model {daemon.status()['model_version']}")
    if ds is None:
        event = {
            "event": "recorded",
            "path": None,
            "bins": 0,
            "detail": "no bin was decoded: nothing written",
        }
    else:
        try:
            write_nwb(path, ds)
        except (OSError, ValueError, ImportError) as exc:
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(f"rpnt serve: error: daemon.record_nwb: cannot write {path}: {msg}", file=sys.stderr)
            return EXIT_FAILED
        event = {
            "event": "recorded",
            "path": str(path),
            "bins": ds.n_bins,
            "bins_not_recorded": daemon.bins_not_recorded,
        }
    if log_format == "json":
        emit_event(event)
    elif event["path"] is None:
        emit_lines([f"rpnt serve: recording: {event['detail']}"])
    else:
        more = (
            f" ({event['bins_not_recorded']} later bins past record_max_s not kept)"
            if event["bins_not_recorded"]
            else ""
        )
        emit_lines([f"rpnt serve: recording: {event['bins']} bins written to {path}{more}"])
    return EXIT_OK


def nwb_output_problem(path: str) -> str | None:
    """Why an NWB output file could not be written at ``path`` (checked before a run, so that a
    session is not decoded for nothing), or None: pynwb missing, no such folder, not ``.nwb``."""
    import importlib.util

    p = Path(path)
    if p.suffix.lower() != ".nwb":
        return f"expected a file name ending in .nwb, got {p.name or path}"
    if not p.parent.is_dir():
        return f"no such directory: {p.parent}"
    if importlib.util.find_spec("pynwb") is None:
        return "NWB output needs pynwb: pip install 'rpnt[nwb]'"
    return None
