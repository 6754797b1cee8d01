"""``rpnt replay`` and the daemon-only ``python -m streaming.cli serve`` (``rpnt serve``, with the HTTP
control plane and settings, is :mod:`service.cli`; both serve through :func:`serve_until_stopped`).

The daemon flags are generated from :class:`~streaming.options.DaemonConfig` (:mod:`streaming.flags`).
Both commands return an exit status: 0 success; 1 the run failed (daemon error, replay mismatch or
no answer); 2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .flags import add_flags, as_argv, config_from_args
from .options import LOG_FORMATS, TUNING, DaemonConfig, EngineConfig
from .serving import EXIT_FAILED, EXIT_OK, EXIT_USAGE, nwb_output_problem, serve_until_stopped

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


class _Exit(Exception):
    """Leave a command with exit status ``code`` after printing ``message`` on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--precision``, from :class:`~streaming.options.EngineConfig`."""
    add_flags(p, EngineConfig, ("backend", "precision"))


def add_daemon_options(p: argparse.ArgumentParser) -> None:
    """The daemon's tuning flags (:data:`~streaming.options.TUNING`, from
    :class:`~streaming.options.DaemonConfig`), with the declared defaults."""
    add_flags(p.add_argument_group("daemon options"), DaemonConfig, TUNING)


def add_stats_interval(p: argparse.ArgumentParser) -> None:
    """``--stats-interval``: how often a serving daemon logs its one-line summary."""
    p.add_argument(
        "--stats-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="log a one-line summary every S seconds (0: never; default 10)",
    )


# ================================================================================ serve
#: the daemon flags of ``python -m streaming.cli serve`` (its --bin-ms defaults to 20)
SERVE_FLAGS = ("bin_ms", "ingest", "publish") + TUNING


def build_serve_parser() -> argparse.ArgumentParser:
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
    add_engine_flags(p)
    add_flags(p, DaemonConfig, ("bin_ms", "ingest", "publish"), defaults={"bin_ms": 20.0})
    add_stats_interval(p)
    p.add_argument("--log-level", default="info", help="debug|info|warning|error (default info)")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="start/stop messages: a summary for people (default) or JSON event lines",
    )
    add_daemon_options(p)
    return p


def serve_main(argv: list[str] | None = None) -> int:
    a = build_serve_parser().parse_args(argv)
    _setup_logging(a.log_level)
    from .daemon import Daemon
    from .launch import EndpointError, held_endpoints, load_decoder

    try:
        cfg = config_from_args(DaemonConfig, a, SERVE_FLAGS)
        with held_endpoints(
            {"--ingest": cfg.ingest, "--publish": cfg.publish}, allow_remote=cfg.allow_remote
        ):
            pass
        t0 = time.perf_counter()
        decoder = load_decoder(a.model, backend=a.backend, precision=a.precision)
        load_s = time.perf_counter() - t0
        daemon = Daemon(
            decoder=decoder,
            bin_s=cfg.bin_s(decoder.info.bin_s),
            ingest=cfg.ingest,
            publish=cfg.publish,
            options=cfg.options(),
        )
    except (EndpointError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"rpnt serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return serve_until_stopped(
        daemon,
        ready_fields={"model_loaded_s": round(load_s, 3)},
        stats_interval=a.stats_interval,
        log=logging.getLogger("rpnt.serve"),
        log_format=a.log_format,
    )


# ================================================================================ replay
def build_replay_parser() -> argparse.ArgumentParser:
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
    add_engine_flags(p)
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
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon (default 30)")
    p.add_argument("--log-level", default="warning")
    _add_replay_outputs(p)
    add_daemon_options(p)
    return p


def _add_replay_outputs(p: argparse.ArgumentParser) -> None:
    """What ``rpnt replay`` writes: a report directory, an NWB file, JSON on stdout."""
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


@dataclass
class _ReplayInput:
    """The part of the recording to replay: counts (T, N), behaviour series by name (T, D_k) each,
    bins [start, stop) of ``session``, at ``bin_s``."""

    session: Any
    counts: Any
    labels: dict
    stop: int
    bin_s: float


def replay_main(argv: list[str] | None = None) -> int:
    a = build_replay_parser().parse_args(argv)
    _setup_logging(a.log_level)
    try:
        data = _replay_input(a)
        _check_replay_args(a)
        with _replay_daemon(a, data.bin_s) as (ingest, publish, daemon, proc_note):
            res = _run_replay(a, data, ingest, publish, proc_note)
            snap = daemon.snapshot() if daemon is not None else None
        rep = _replay_report(a, data, res, snap)
        _write_replay_outputs(a, data, rep, res)
    except _Exit as exc:
        print(f"rpnt replay: {'error' if exc.code == EXIT_USAGE else 'FAILED'}: {exc}", file=sys.stderr)
        return exc.code
    _print_replay(a, rep)
    return EXIT_OK


def _replay_input(a: argparse.Namespace) -> _ReplayInput:
    import numpy as np

    from rpnt_core.data.formats import load_session

    try:
        session = load_session(a.data)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise _Exit(EXIT_USAGE, str(exc)) from None
    if session.counts.ndim != 2:
        raise _Exit(EXIT_USAGE, "multi-site sessions are not supported by the daemon")
    stop = session.n_bins if a.stop is None else min(a.stop, session.n_bins)
    if not 0 <= a.start < stop:
        raise _Exit(EXIT_USAGE, f"empty bin range [{a.start}, {stop})")
    return _ReplayInput(
        session=session,
        counts=np.asarray(session.counts[a.start : stop]),
        labels={name: np.asarray(series[a.start : stop]) for name, series in session.targets.items()},
        stop=stop,
        bin_s=session.bin_s if a.bin_ms is None else a.bin_ms / 1e3,
    )


def _check_replay_args(a: argparse.Namespace) -> None:
    if a.connect and (not a.ingest or not a.publish):
        raise _Exit(EXIT_USAGE, "--connect needs --ingest and --publish")
    if not a.timeout > 0:
        raise _Exit(EXIT_USAGE, f"--timeout: must be > 0 seconds, got {a.timeout:g}")
    if a.nwb is not None:
        problem = nwb_output_problem(a.nwb)
        if problem:
            raise _Exit(EXIT_USAGE, f"--nwb: {problem}")


@contextmanager
def _replay_daemon(a: argparse.Namespace, bin_s: float) -> Iterator[tuple]:
    """(ingest, publish, the daemon in a thread or None, a function saying how a child daemon
    ended) for the body of the ``with``: ``--connect``'s endpoints, or a daemon started here on
    private ipc:// endpoints and stopped (and its directory removed) on exit."""
    if a.connect:
        print(
            f"rpnt replay: waiting up to {a.timeout:g} s (--timeout) for the daemon to answer a PING: sending "
            f"to {a.ingest}, listening on {a.publish} (is `rpnt serve` running there?)",
            file=sys.stderr,
            flush=True,
        )
        yield a.ingest, a.publish, None, lambda: ""
        return
    from .launch import ipc_endpoints

    try:
        cfg = config_from_args(DaemonConfig, a, TUNING)
    except ValueError as exc:
        raise _Exit(EXIT_USAGE, str(exc)) from None
    ingest, publish, tmpdir = ipc_endpoints()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmpdir, ignore_errors=True)
        if a.daemon == "thread":
            daemon = stack.enter_context(_thread_daemon(a, cfg, bin_s, ingest, publish))
            yield ingest, publish, daemon, lambda: ""
        else:
            proc = stack.enter_context(_process_daemon(a, cfg, bin_s, ingest, publish, tmpdir))
            log = Path(tmpdir) / "daemon.log"
            yield (
                ingest,
                publish,
                None,
                lambda: (
                    f" (the daemon process exited with {proc.returncode}; log: {log})"
                    if proc.poll() is not None
                    else ""
                ),
            )


@contextmanager
def _thread_daemon(a, cfg: DaemonConfig, bin_s: float, ingest: str, publish: str) -> Iterator[Any]:
    from .daemon import Daemon
    from .launch import load_decoder

    try:
        decoder = load_decoder(a.model, backend=a.backend, precision=a.precision)
        daemon = Daemon(decoder=decoder, bin_s=bin_s, ingest=ingest, publish=publish, options=cfg.options())
    except (FileNotFoundError, ValueError) as exc:
        raise _Exit(EXIT_USAGE, str(exc)) from None
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        daemon.join(10.0)


@contextmanager
def _process_daemon(
    a, cfg: DaemonConfig, bin_s: float, ingest: str, publish: str, tmpdir: str
) -> Iterator[Any]:
    """``python -m streaming.cli serve`` with the same daemon options, stopped with SIGINT on exit."""
    from .launch import spawn_daemon

    proc = spawn_daemon(
        model=a.model,
        bin_ms=bin_s * 1e3,
        ingest=ingest,
        publish=publish,
        backend=a.backend,
        precision=a.precision,
        extra=as_argv(cfg, TUNING),
        log_path=Path(tmpdir) / "daemon.log",
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except Exception:  # noqa: BLE001
            proc.kill()


def _run_replay(a: argparse.Namespace, data: _ReplayInput, ingest: str, publish: str, proc_note) -> Any:
    from .replay import ReplayError, run_replay

    try:
        return run_replay(
            counts=data.counts,
            bin_ns=round(data.bin_s * 1e9),
            ingest=ingest,
            publish=publish,
            labels=data.labels,
            realtime=a.realtime,
            send_kinematics=not a.no_kinematics,
            handshake_timeout_s=a.timeout,
        )
    except (ReplayError, TimeoutError) as exc:
        raise _Exit(EXIT_FAILED, str(exc) + proc_note()) from None


def _replay_report(a: argparse.Namespace, data: _ReplayInput, res: Any, snap: dict | None) -> dict:
    from .report import build_report

    n_bins = data.session.n_bins
    test_range = None
    if a.start == 0 and data.stop == n_bins and n_bins >= 10:
        from rpnt_core.data.splits import contiguous_splits

        test_range = contiguous_splits(n_bins, train_fraction=0.2).test
    meta = {
        "data": str(a.data),
        "bin_range": [a.start, data.stop],
        "model": a.model,
        "daemon_mode": "connect" if a.connect else a.daemon,
        "backend": None if a.connect else a.backend,
    }
    return build_report(
        res,
        recorded_velocity=res.recorded,
        meta=meta | {"target": res.target},
        daemon_snapshot=snap,
        test_range=test_range,
    )


def _write_replay_outputs(a: argparse.Namespace, data: _ReplayInput, rep: dict, res: Any) -> None:
    if a.report:
        from .report import write_report

        write_report(a.report, rep, res, res.recorded)
    if a.nwb is None:
        return
    from .nwb_out import from_replay, write_nwb

    s = data.session
    t0 = float(s.timestamps[a.start]) if s.timestamps is not None else a.start * data.bin_s
    try:
        write_nwb(
            a.nwb,
            from_replay(
                res,
                counts=data.counts,
                labels=data.labels,
                starting_time=t0,
                description=f"rpnt replay of {Path(a.data).name}, bins {a.start}–{data.stop}",
                session_id=s.session,
                subject=s.subject,
            ),
        )
    except OSError as exc:
        raise _Exit(EXIT_FAILED, f"--nwb: cannot write {a.nwb}: {exc.strerror or exc}") from None


def _print_replay(a: argparse.Namespace, rep: dict) -> None:
    from .report import summary_lines

    if a.json:
        print(json.dumps(rep, default=str))
        return
    print("\n".join(summary_lines(rep)))
    if a.report:
        print(f"report: {Path(a.report) / 'report.json'} (+ velocity.png, latency.png, predictions.npz)")
    if a.nwb is not None:
        print(f"NWB: {a.nwb}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "replay"):
        print("usage: python -m streaming.cli serve|replay [options]", file=sys.stderr)
        return EXIT_USAGE
    return (serve_main if argv[0] == "serve" else replay_main)(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
