"""``rpnt serve`` and ``rpnt replay``.  Also runnable as ``python -m streaming.cli serve|replay ...``.

Both return an exit status: 0 success; 1 the run failed (daemon error, replay mismatch or no
answer); 2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LOG_FORMATS = ("text", "json")  # = service.settings.Settings.log_format (a test keeps them equal)

SERVE_DESCRIPTION = """\
Run the real-time decoder daemon: spike events (or binned counts) in over ZeroMQ, one velocity
prediction per bin out on a PUB socket.  The wire protocol is docs/protocol.md; a reference
client is streaming/client.py.

Bins close on the acquisition clock: bin [t, t+Δ) is decoded as soon as any source reports a
time ≥ t+Δ (an event, a SPIKES clock, a TICK); if the sources stall, a wall-clock deadline
(--stall-ms past the bin's due time) closes it with what arrived, flagged STALLED.

With an ONNX back-end the daemon does not import torch.  Both endpoints bind to loopback unless
--allow-remote is given.  Stop with Ctrl-C / SIGTERM; the final counters follow.
"""

SERVE_EPILOG = """\
examples:
  rpnt serve --model exports/m1
  rpnt serve --model exports/m1 --bin-ms 50 --ingest tcp://127.0.0.1:7000 --publish tcp://127.0.0.1:7001
  rpnt serve --model exports/m1 --affinity 1 --gc-freeze
  rpnt serve --model runs/m1/best.safetensors --backend torch     (development)
"""

REPLAY_DESCRIPTION = """\
Replay a recorded session (.npz/.mat/.nwb) through the daemon as spike events and report what
came back: R² against the recorded series of the model's target (velocity, position, …), latency per stage and end to end (client send of
the bin-closing packet → client receipt of the prediction), bins lost, and plots.

Each bin's counts become events at evenly spaced midpoints inside the bin (deterministic; see
docs/protocol.md), so the daemon rebuilds the recorded counts exactly at the same bin width.

Two ways to get a daemon:
  --model M               start one here, from an export directory (or a checkpoint with
                          --backend torch): in a thread of this process (--daemon thread,
                          default) or as a child `rpnt serve` process (--daemon process: its own
                          interpreter, the better latency measurement), on private ipc:// endpoints.
  --connect               use a daemon that is already running at --ingest / --publish.  The
                          replay starts a new stream (RESET) and checks the daemon's bin width
                          and channel count against the recording first.
"""

REPLAY_EPILOG = """\
examples:
  rpnt replay --data session.npz --model exports/m1 --report out/replay
  rpnt replay --data StevensonV2.mat --model exports/m1 --realtime --daemon process --report out/rt
  rpnt replay --data session.npz --connect --ingest tcp://127.0.0.1:5555 --publish tcp://127.0.0.1:5556
  rpnt replay --data session.npz --model exports/m1 --nwb decoded.nwb
"""


def _cpus(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--affinity: expected CPU ids like 1 or 0,2, got {text!r}"
        ) from None


def add_daemon_options(p: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """The daemon's tuning flags.  ``defaults=False``: every flag defaults to None (not given), so
    that a settings file can supply the value (``rpnt serve`` in :mod:`service.cli`)."""

    def d(value):
        return value if defaults else None

    g = p.add_argument_group("daemon options")
    g.add_argument(
        "--stall-ms",
        type=float,
        default=None,
        help="how long past its due time a bin waits before the wall-clock deadline closes it "
        "(default: one bin width)",
    )
    g.add_argument(
        "--max-jump-s",
        type=float,
        default=d(10.0),
        help="reject messages reporting a time this far ahead of the open bin (default 10)",
    )
    g.add_argument(
        "--history-s",
        type=float,
        default=d(300.0),
        help="seconds of (counts, kinematics) kept for calibration (default 300)",
    )
    g.add_argument(
        "--warmup-bins", type=int, default=d(32), help="engine steps run before the first bin (default 32)"
    )
    g.add_argument(
        "--affinity",
        type=_cpus,
        default=None,
        metavar="CPU[,CPU]",
        help="pin the decode thread to these CPUs",
    )
    g.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after warm-up")
    g.add_argument(
        "--busy-poll-us",
        type=int,
        default=d(0),
        metavar="US",
        help="spin this long after each message before blocking (keeps the core hot; costs a core; "
        "default 0)",
    )
    g.add_argument(
        "--prewarm-lead-us",
        type=int,
        default=d(0),
        metavar="US",
        help="run the engine once, without advancing the stream, this long before each bin is due "
        "(re-warms its caches after the idle gap; same core; needs a lead longer than one step; "
        "default 0 = off)",
    )
    g.add_argument(
        "--rt-priority",
        type=int,
        default=None,
        metavar="N",
        help="SCHED_FIFO priority for the decode thread (needs privileges)",
    )
    g.add_argument(
        "--allow-bin-mismatch",
        action="store_true",
        help="decode at a --bin-ms other than the model's training bin width",
    )
    g.add_argument("--allow-remote", action="store_true", help="allow binding non-loopback TCP endpoints")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# ================================================================================ serve
def build_serve_parser() -> argparse.ArgumentParser:
    from .daemon import DEFAULT_INGEST, DEFAULT_PUBLISH
    from .launch import BACKENDS

    p = argparse.ArgumentParser(
        prog="rpnt serve",
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR_OR_FILE",
        help="export directory (rpnt export --out DIR) or .onnx file; a checkpoint with --backend torch",
    )
    p.add_argument(
        "--backend", choices=BACKENDS, default="onnx-cpu", help="inference engine (default onnx-cpu)"
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "int8", "fp16"),
        default="fp32",
        help="which step graph of an export directory (default fp32)",
    )
    p.add_argument(
        "--bin-ms",
        type=float,
        default=20.0,
        help="bin width Δ in ms (default 20); must match the model's unless --allow-bin-mismatch",
    )
    p.add_argument(
        "--ingest", default=DEFAULT_INGEST, help=f"PULL endpoint for rig messages (default {DEFAULT_INGEST})"
    )
    p.add_argument(
        "--publish", default=DEFAULT_PUBLISH, help=f"PUB endpoint for predictions (default {DEFAULT_PUBLISH})"
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="print a one-line summary every S seconds (0: never; default 10)",
    )
    p.add_argument("--log-level", default="info", help="debug|info|warning|error (default info)")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="start/stop messages: a summary for people (default) or JSON event lines",
    )
    add_daemon_options(p)
    return p


def stats_line(snap: dict) -> str:
    c = snap["counters"]
    lat = snap["latency_ms"].get("daemon", {})
    rej = sum(snap["rejected"].values())
    p99 = f"{lat['p99_ms']:.3f}" if lat.get("count") else "-"
    return (
        f"bins {c['bins']} (stalled {c['bins_stalled']}), events {c['events']}, late {c['late_events']}, "
        f"lost msgs {c['gaps']}, rejected {rej}, daemon p99 {p99} ms"
    )


def serve_main(argv: list[str] | None = None) -> int:
    a = build_serve_parser().parse_args(argv)
    _setup_logging(a.log_level)
    log = logging.getLogger("rpnt.serve")
    from .daemon import Daemon, DaemonOptions
    from .launch import EndpointError, held_endpoints, load_decoder

    try:
        with held_endpoints({"--ingest": a.ingest, "--publish": a.publish}, allow_remote=a.allow_remote):
            pass
    except EndpointError as exc:
        print(f"rpnt serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    t0 = time.perf_counter()
    try:
        decoder = load_decoder(a.model, backend=a.backend, precision=a.precision)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"rpnt serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    load_s = time.perf_counter() - t0
    try:
        daemon = Daemon(
            decoder=decoder,
            bin_s=a.bin_ms / 1e3,
            ingest=a.ingest,
            publish=a.publish,
            options=DaemonOptions.from_fields(a),
        )
    except ValueError as exc:
        print(f"rpnt serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    return serve_until_stopped(
        daemon,
        ready_fields={"model_loaded_s": round(load_s, 3)},
        stats_interval=a.stats_interval,
        log=log,
        log_format=a.log_format,
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
    ``python -m streaming.cli serve``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format: expected one of {', '.join(LOG_FORMATS)}, got {log_format}")
    _quiet_daemon_ready_dump()
    stop = threading.Event()

    def _on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
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
    st = daemon.status()
    ready = {
        "event": "ready",
        **ready_fields,
        **(extra or {}),
        "torch_imported": "torch" in sys.modules,
        **{
            k: st[k]
            for k in (
                "model_version",
                "fingerprint",
                "decoder",
                "n_channels",
                "n_outputs",
                "bin_s",
                "ingest",
                "publish",
            )
        },
        "startup": st["startup"],
    }
    if log_format == "json":
        emit_event(ready)
    else:
        emit_lines(ready_summary(ready))
    interval = stats_interval if stats_interval > 0 else None
    while not stop.is_set() and daemon.running:
        if stop.wait(interval if interval else 0.5) or not interval:
            continue
        log.info(stats_line(daemon.snapshot()))
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


# ================================================================================ replay
def build_replay_parser() -> argparse.ArgumentParser:
    from .launch import BACKENDS

    p = argparse.ArgumentParser(
        prog="rpnt replay",
        description=REPLAY_DESCRIPTION,
        epilog=REPLAY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="FILE", help="recorded session (.npz/.mat/.nwb)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR_OR_FILE", help="start a daemon here with this model")
    src.add_argument("--connect", action="store_true", help="use the daemon running at --ingest/--publish")
    p.add_argument("--backend", choices=BACKENDS, default="onnx-cpu", help="engine of a daemon started here")
    p.add_argument("--precision", choices=("fp32", "int8", "fp16"), default="fp32")
    p.add_argument(
        "--daemon",
        choices=("thread", "process"),
        default="thread",
        help="a daemon started here runs in a thread of this process or in a child process",
    )
    p.add_argument("--ingest", default=None, help="with --connect: the daemon's ingest endpoint")
    p.add_argument("--publish", default=None, help="with --connect: the daemon's publish endpoint")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--realtime",
        dest="realtime",
        action="store_true",
        help="send each bin when the replay clock reaches its end, as a rig would",
    )
    pace.add_argument(
        "--fast", dest="realtime", action="store_false", help="as fast as the daemon decodes (default)"
    )
    p.set_defaults(realtime=False)
    p.add_argument(
        "--bin-ms",
        type=float,
        default=None,
        help="bin width to replay at (default: the recording's); pacing a recording at another "
        "width re-times the same counts (the daemon must bin at the same width)",
    )
    p.add_argument("--start", type=int, default=0, help="first bin to replay (default 0)")
    p.add_argument("--stop", type=int, default=None, help="bin to stop before (default: the end)")
    p.add_argument(
        "--no-kinematics",
        action="store_true",
        help="do not stream the recorded target series (the daemon's: velocity, position, …) as KINEMATICS",
    )
    p.add_argument(
        "--report",
        metavar="DIR",
        default=None,
        help="write report.json, velocity.png, latency.png, predictions.npz here",
    )
    p.add_argument(
        "--nwb",
        metavar="OUT.nwb",
        default=None,
        help="also write the decoded session as NWB: the binned counts, the recorded behaviour, the "
        "decoded target, flags, per-stage latencies and model version (docs/nwb.md); "
        "rpnt evaluate and rpnt replay read it back",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon (default 30)")
    p.add_argument("--log-level", default="warning")
    add_daemon_options(p)
    return p


def replay_main(argv: list[str] | None = None) -> int:
    a = build_replay_parser().parse_args(argv)
    _setup_logging(a.log_level)
    import numpy as np

    from rpnt_core.data.formats import load_session

    from .replay import ReplayError, run_replay
    from .report import build_report, summary_lines, write_report

    try:
        session = load_session(a.data)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"rpnt replay: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if session.counts.ndim != 2:
        print("rpnt replay: error: multi-site sessions are not supported by the daemon", file=sys.stderr)
        return EXIT_USAGE
    stop = session.n_bins if a.stop is None else min(a.stop, session.n_bins)
    if not 0 <= a.start < stop:
        print(f"rpnt replay: error: empty bin range [{a.start}, {stop})", file=sys.stderr)
        return EXIT_USAGE
    counts = np.asarray(session.counts[a.start : stop])
    labels = {name: np.asarray(series[a.start : stop]) for name, series in session.targets.items()}
    bin_s = session.bin_s if a.bin_ms is None else a.bin_ms / 1e3
    bin_ns = round(bin_s * 1e9)
    if a.connect and (not a.ingest or not a.publish):
        print("rpnt replay: error: --connect needs --ingest and --publish", file=sys.stderr)
        return EXIT_USAGE
    if not a.timeout > 0:
        print(f"rpnt replay: error: --timeout: must be > 0 seconds, got {a.timeout:g}", file=sys.stderr)
        return EXIT_USAGE
    if a.nwb is not None:
        problem = nwb_output_problem(a.nwb)
        if problem:
            print(f"rpnt replay: error: --nwb: {problem}", file=sys.stderr)
            return EXIT_USAGE

    daemon = proc = None
    tmpdir = None
    try:
        if a.connect:
            ingest, publish = a.ingest, a.publish
            print(
                f"rpnt replay: waiting up to {a.timeout:g} s (--timeout) for the daemon to answer a PING: sending "
                f"to {ingest}, listening on {publish} (is `rpnt serve` running there?)",
                file=sys.stderr,
                flush=True,
            )
        else:
            from .launch import ipc_endpoints, load_decoder, spawn_daemon

            ingest, publish, tmpdir = ipc_endpoints()
            if a.daemon == "thread":
                from .daemon import Daemon, DaemonOptions

                try:
                    decoder = load_decoder(a.model, backend=a.backend, precision=a.precision)
                    daemon = Daemon(
                        decoder=decoder,
                        bin_s=bin_s,
                        ingest=ingest,
                        publish=publish,
                        options=DaemonOptions.from_fields(a),
                    )
                except (FileNotFoundError, ValueError) as exc:
                    print(f"rpnt replay: error: {exc}", file=sys.stderr)
                    return EXIT_USAGE
                daemon.start()
            else:
                extra = [
                    "--warmup-bins",
                    str(a.warmup_bins),
                    "--max-jump-s",
                    str(a.max_jump_s),
                    "--history-s",
                    str(a.history_s),
                ]
                if a.stall_ms is not None:
                    extra += ["--stall-ms", str(a.stall_ms)]
                if a.affinity:
                    extra += ["--affinity", ",".join(map(str, a.affinity))]
                if a.gc_freeze:
                    extra.append("--gc-freeze")
                if a.busy_poll_us:
                    extra += ["--busy-poll-us", str(a.busy_poll_us)]
                if a.prewarm_lead_us:
                    extra += ["--prewarm-lead-us", str(a.prewarm_lead_us)]
                if a.allow_bin_mismatch:
                    extra.append("--allow-bin-mismatch")
                proc = spawn_daemon(
                    model=a.model,
                    bin_ms=bin_s * 1e3,
                    ingest=ingest,
                    publish=publish,
                    backend=a.backend,
                    precision=a.precision,
                    extra=extra,
                    log_path=Path(tmpdir) / "daemon.log",
                )
        try:
            res = run_replay(
                counts=counts,
                bin_ns=bin_ns,
                ingest=ingest,
                publish=publish,
                labels=labels,
                realtime=a.realtime,
                send_kinematics=not a.no_kinematics,
                handshake_timeout_s=a.timeout,
            )
        except (ReplayError, TimeoutError) as exc:
            msg = str(exc)
            if proc is not None and proc.poll() is not None:
                msg += (
                    f" (the daemon process exited with {proc.returncode}; log: {Path(tmpdir) / 'daemon.log'})"
                )
            print(f"rpnt replay: FAILED: {msg}", file=sys.stderr)
            return EXIT_FAILED
        snap = daemon.snapshot() if daemon is not None else None
        test_range = None
        if a.start == 0 and stop == session.n_bins and session.n_bins >= 10:
            from rpnt_core.data.splits import contiguous_splits

            test_range = contiguous_splits(session.n_bins, train_fraction=0.2).test
        meta = {
            "data": str(a.data),
            "bin_range": [a.start, stop],
            "model": a.model,
            "daemon_mode": "connect" if a.connect else a.daemon,
            "backend": None if a.connect else a.backend,
        }
        rep = build_report(
            res,
            recorded_velocity=res.recorded,
            meta=meta | {"target": res.target},
            daemon_snapshot=snap,
            test_range=test_range,
        )
        if a.report:
            write_report(a.report, rep, res, res.recorded)
        if a.nwb is not None:
            from .nwb_out import from_replay, write_nwb

            t0 = float(session.timestamps[a.start]) if session.timestamps is not None else a.start * bin_s
            try:
                write_nwb(
                    a.nwb,
                    from_replay(
                        res,
                        counts=counts,
                        labels=labels,
                        starting_time=t0,
                        description=f"rpnt replay of {Path(a.data).name}, bins {a.start}–{stop}",
                        session_id=session.session,
                        subject=session.subject,
                    ),
                )
            except OSError as exc:
                print(
                    f"rpnt replay: FAILED: --nwb: cannot write {a.nwb}: {exc.strerror or exc}",
                    file=sys.stderr,
                )
                return EXIT_FAILED
        if a.json:
            print(json.dumps(rep, default=str))
        else:
            print("\n".join(summary_lines(rep)))
            if a.report:
                print(
                    f"report: {Path(a.report) / 'report.json'} (+ velocity.png, latency.png, predictions.npz)"
                )
            if a.nwb is not None:
                print(f"NWB: {a.nwb}")
        return EXIT_OK
    finally:
        if daemon is not None:
            daemon.stop()
            daemon.join(10.0)
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except Exception:  # noqa: BLE001
                proc.kill()
        if tmpdir is not None:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "replay"):
        print("usage: python -m streaming.cli serve|replay [options]", file=sys.stderr)
        return EXIT_USAGE
    return (serve_main if argv[0] == "serve" else replay_main)(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
