"""What an open live page costs the decode loop: latency per bin with and without ``GET /events``
clients, interleaved in one run, one command:

    python bench/bench_live_page.py                 # ≈ 2.5 minutes
    python bench/bench_live_page.py --bins 3000     # shorter

1. A random-weight ``small`` RPNT (channels of the recording, 2 outputs, 20 ms bins; the model of
   bench_service.py, ``_serve.random_export``) is exported; ``rpnt serve`` (one child process,
   ``--gc-freeze``) is seeded with it on a fresh registry.
2. This process replays ``--bins`` bins of the real counts of StevensonV2.mat (recorded at 50 ms,
   re-timed to 20 ms, as in bench_streaming.py) at real-time pace.
3. Time is cut into windows of ``--window-s`` seconds, alternating: **page closed** (no client on
   ``/events``) and **page open** (``--clients`` server-sent-event readers on ``/events``, each
   reading every event as a browser tab would; the live feed's SUB socket and its thread run only
   then).  Alternating windows in one run share whatever else loads the machine.
4. For each condition: p50/p99/p99.9/max of the daemon's own time per bin (``daemon``: message
   off the socket → prediction on the PUB socket) and of end to end (client send of the
   bin-closing packet → client receipt of the prediction, one clock).  The first ``--window-s``
   seconds (the stream starting) and the first second of every window (clients connecting or
   leaving) are left out.

No bar is set: the numbers are reported, with the p99 ratio open/closed.  JSON to ``--out``
(default bench/results/live_page.json) and a Markdown table beside it, with the load average
(this host is shared: measured under whatever load it had).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
DATA = REPO.parent / "shared" / "data" / "stevenson2011_m1_centerout" / "StevensonV2.mat"
SETTLE_S = 1.0  # seconds at the start of each window left out (clients connecting or leaving)


class EventReaders:
    """``n`` threads, each reading ``GET /events`` until :meth:`close`; counts the events read."""

    def __init__(self, url: str, n: int) -> None:
        import httpx

        self._stop = threading.Event()
        self.events = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

        def read() -> None:
            try:
                with httpx.Client(timeout=30.0) as c, c.stream("GET", url + "/events") as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            json.loads(line[6:])  # a browser parses every event too
                            with self._lock:
                                self.events += 1
                        if self._stop.is_set():
                            return
            except Exception as exc:  # noqa: BLE001 - reported
                self.errors.append(repr(exc))

        self._threads = [threading.Thread(target=read, daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default=str(DATA), help="recording whose counts are replayed (default StevensonV2.mat)"
    )
    p.add_argument("--bins", type=int, default=6000, help="bins replayed (default 6000 = 120 s at 20 ms)")
    p.add_argument("--bin-ms", type=float, default=20.0)
    p.add_argument("--window-s", type=float, default=10.0, help="seconds per window (default 10)")
    p.add_argument(
        "--clients", type=int, default=2, help="/events readers while the page is open (default 2)"
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "live_page.json"))
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from _serve import ReplayThread, Served, random_export
    from bench_streaming import recorded_stream

    from rpnt_core.data.formats import load_session
    from service.demo import http_call
    from streaming.latency import percentiles_ms
    from streaming.protocol import PredFlag
    from streaming.report import stage_arrays

    sess = load_session(a.data)
    counts, _ = recorded_stream(sess, a.bins)
    counts = counts[: a.bins]
    bin_s = a.bin_ms / 1e3
    t_start = time.time()
    windows: list[tuple[float, float, bool]] = []  # (start, end) on time.monotonic_ns()/1e9, page open
    events_read = 0
    reader_errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rpnt-bench-live-") as tmp:
        tmp = Path(tmp)
        export = random_export(counts.shape[1], bin_s, tmp / "model")
        served = Served(export=export, run_dir=tmp, log=log)
        with served as serve:
            log(
                f"replaying {a.bins} bins at {a.bin_ms:g} ms real-time pace (≈ {a.bins * bin_s:.0f} s), "
                f"windows of {a.window_s:g} s alternating page closed / open ({a.clients} /events readers)"
            )
            th = ReplayThread(
                counts=counts,
                bin_ns=round(bin_s * 1e9),
                ingest=serve.ingest,
                publish=serve.publish,
                realtime=True,
                send_kinematics=False,
                drain_timeout_s=10.0,
            )
            th.start()
            is_open = False
            while th.is_alive():
                w0 = time.monotonic_ns() / 1e9
                readers = EventReaders(serve.url, a.clients) if is_open else None
                th.join(a.window_s)
                if readers is not None:
                    readers.close()
                    events_read += readers.events
                    reader_errors += readers.errors
                windows.append((w0, time.monotonic_ns() / 1e9, is_open))
                is_open = not is_open
            res = th.result()
            status = http_call(serve.url + "/status")[1]
    rc = served.exit_code
    stages = stage_arrays(res)
    ok = res.received & ((res.flags & int(PredFlag.STALLED)) == 0)
    t_send = res.t_send[ok] / 1e9  # stage_arrays holds the ok bins only, in bin order
    t0 = windows[0][0] + a.window_s
    cond = {"page_closed": np.zeros(t_send.shape, bool), "page_open": np.zeros(t_send.shape, bool)}
    for w0, w1, opened in windows:
        inside = (t_send >= max(w0 + SETTLE_S, t0)) & (t_send < w1)
        cond["page_open" if opened else "page_closed"] |= inside
    table = {
        c: {m: percentiles_ms(stages[m][mask]) for m in ("daemon", "end_to_end")} for c, mask in cond.items()
    }
    ratio = {
        m: table["page_open"][m]["p99_ms"] / table["page_closed"][m]["p99_ms"]
        for m in ("daemon", "end_to_end")
        if table["page_open"][m].get("count") and table["page_closed"][m].get("count")
    }
    load = os.getloadavg()
    out = {
        "benchmark": "decode-loop latency with and without live-page (/events) clients (bench/bench_live_page.py)",
        "data": str(a.data),
        "replayed_bin_ms": a.bin_ms,
        "bins": a.bins,
        "window_s": a.window_s,
        "clients_when_open": a.clients,
        "events_read": events_read,
        "reader_errors": reader_errors,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_end": load,
        },
        "note": "measured on a shared host under whatever load it had (see load_avg_at_end); the two conditions "
        "alternate in windows of one run so they share it",
        "bins_per_condition": {c: int(m.sum()) for c, m in cond.items()},
        "latency_ms": table,
        "p99_ratio_open_vs_closed": ratio,
        "bins_lost": res.bins_lost,
        "daemon_counters": status.get("counters"),
        "serve_exit": rc,
        "seconds": round(time.time() - t_start, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    lines = [
        f"live-page benchmark: {a.bins} bins of {Path(a.data).name} at {a.bin_ms:g} ms real-time pace; "
        f"{a.window_s:g} s windows alternating 0 and {a.clients} /events clients ({events_read} events read); "
        f"measured under load: load average {load[0]:.2f} on {os.cpu_count()} CPUs",
        "",
        "| page | bins | daemon p50 | daemon p99 | daemon p99.9 | end-to-end p50 | end-to-end p99 | "
        "end-to-end p99.9 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cond:
        d, e = table[c]["daemon"], table[c]["end_to_end"]
        if not d.get("count"):
            lines.append(f"| {c} | 0 | | | | | | | |")
            continue
        lines.append(
            f"| {c} | {d['count']} | {d['p50_ms']:.3f} | {d['p99_ms']:.3f} | {d['p99.9_ms']:.3f} | "
            f"{e['p50_ms']:.3f} | {e['p99_ms']:.3f} | {e['p99.9_ms']:.3f} | {e['max_ms']:.3f} |"
        )
    lines += [
        "",
        "ms; " + ", ".join(f"p99 ratio open/closed ({m}) {r:.2f}" for m, r in ratio.items()),
        f"bins lost {res.bins_lost}; reader errors {len(reader_errors)}",
    ]
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nJSON: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
