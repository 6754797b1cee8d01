"""Adapter benchmark (issue 19): the latency each adapter adds to the native path, in one run.

    python bench/bench_adapters.py                 # ≈ 5 minutes: 6 paths × 1,500 bins at 20 ms
    python bench/bench_adapters.py --bins 300      # a quick look
    python bench/bench_adapters.py --table bench/results/adapters.json   # the docs table, no runs

One ``rpnt serve`` child process (its own interpreter, ipc:// endpoints, no HTTP) runs a small
random-weight RPNT export (32 channels; the model's cost is the same on every path, so it cancels
in the differences) with every adapter at once: ingest ``lsl:``, ``redis:``, ``openephys:`` and
publish ``lsl:``, ``redis:`` (a ``redis-server`` started here on a free port).  This process then
replays the same Poisson counts through six paths at real-time pace (bin k is sent when the replay
clock reaches the end of bin k).  The paths take turns — ``--segment`` bins each, a new stream
each turn, round after round — so that the busy host's load bursts fall on every path alike:

- ingest paths (the prediction is received on the daemon's native SUB socket):
  ``native`` — one SPIKES packet per bin with its clock (:class:`~streaming.client.RigClient`);
  ``lsl`` — the bin's events and a clock tick (channel −1) pushed to an LSL outlet;
  ``redis`` — one ``XADD`` per bin (channels, times_ns, clock_ns);
  ``openephys`` — the bin's spikes then the next continuous buffer (the clock) in the ZMQ
  Interface format, on a PUB socket;
- publish paths (native ingest; the prediction is received from the adapter's sink):
  ``lsl-out`` — an LSL inlet on the prediction outlet; ``redis-out`` — ``XREAD BLOCK`` on the
  prediction stream.

Per bin, on one clock (CLOCK_MONOTONIC, same host): just before the bin-closing message is sent
(the native packet, the LSL chunk, the XADD, the Open Ephys continuous buffer that follows the
bin's spikes) → the prediction is received here.  The daemon runs with ``--stall-ms 500``, so every bin is closed
by its message rather than by the wall-clock deadline (on a busy host a message that comes late
would otherwise close its bin STALLED and hide the delay).  Reported per path: median, p99, max (ms) and bins received; the
**added latency** of an adapter is its median (p99) minus the native path's median (p99) of the
same run.  The Open Ephys figure is the bridge's own cost: the GUI itself sends a buffer's clock
only once that buffer is acquired, which adds up to one GUI buffer (docs/adapters.md).

The machine this runs on is shared and busy (other processes saturate the cores): the result file
says so, and absolute figures are upper bounds for an idle host.  JSON goes to ``--out`` (default
bench/results/adapters.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BIN_NS = 20_000_000
N_CH = 32
RATE = 30_000
PER_BIN = RATE * BIN_NS // 1_000_000_000
INGEST_PATHS = ("native", "lsl", "redis", "openephys")
PUBLISH_PATHS = ("lsl-out", "redis-out")


def _free_port(pair: bool = False) -> int:
    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if not pair:
                return port
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port


def make_export(root: Path) -> Path:
    """A small random-weight RPNT (32 channels, 20 ms bins) exported as the daemon runs it."""
    import torch

    from exporters.onnx_export import export_step_graph
    from rpnt_core import RPNT, RPNTConfig, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    cfg = RPNTConfig(
        n_channels=N_CH,
        d_model=32,
        n_layers=1,
        n_heads=2,
        window=16,
        kernel_q=2,
        kernel_hidden=8,
        dropout=0.0,
        bin_s=BIN_NS / 1e9,
    )
    ckpt = root / "bench.safetensors"
    save_checkpoint(RPNT(cfg).eval(), ckpt, meta={"kind": "scratch", "data_fingerprint": "bench-adapters"})
    out = root / "export"
    out.mkdir()
    export_step_graph(load_checkpoint(ckpt), out / "rpnt_step.onnx", checkpoint=str(ckpt.resolve()))
    return out


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_adapters: {what} did not happen within {timeout:g} s")
        time.sleep(0.05)


def stats(v: list[float]) -> dict:
    a = np.asarray(v, dtype=np.float64)
    if not a.size:
        return {"count": 0}
    return {
        "count": int(a.size),
        "p50_ms": float(np.median(a)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
    }


class Bench:
    def __init__(self, *, bins: int, workdir: Path) -> None:
        import pylsl
        import redis
        import zmq

        from rpnt_core.child_env import child_env
        from streaming.client import PredictionSubscriber, RigClient

        self.pylsl, self.zmq = pylsl, zmq
        self.T = bins
        rng = np.random.default_rng(0)
        self.counts = rng.poisson(rng.uniform(0.2, 2.0, N_CH), (bins, N_CH))
        self.chans: list = []
        self.times: list = []
        self.tag = f"rpnt-bench-{os.getpid()}"
        self.redis_port, self.oe_port = _free_port(), _free_port(pair=True)
        self.redis_proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        self.r = redis.Redis(port=self.redis_port)
        _wait(self._redis_up, 30, "redis-server start")
        ctx = zmq.Context.instance()
        self.oe_pub = ctx.socket(zmq.PUB)
        self.oe_pub.setsockopt(zmq.SNDHWM, 1_000_000)
        self.oe_pub.bind(f"tcp://127.0.0.1:{self.oe_port}")
        self.oe_num = 0
        self.outlet = pylsl.StreamOutlet(
            pylsl.StreamInfo(
                f"{self.tag}-spikes", "spikes", 1, pylsl.IRREGULAR_RATE, pylsl.cf_int32, f"{self.tag}-spikes"
            )
        )
        ipc = workdir / "ipc"
        ipc.mkdir()
        self.ingest, self.publish = f"ipc://{ipc}/in", f"ipc://{ipc}/out"
        self.specs_in = [
            f"lsl:{self.tag}-spikes",
            f"redis:rig?port={self.redis_port}",
            f"openephys:tcp://127.0.0.1:{self.oe_port}?heartbeat=0",
        ]
        self.specs_out = [f"lsl:{self.tag}-pred", f"redis:pred?port={self.redis_port}"]
        args = [
            sys.executable,
            "-m",
            "rpnt_core.cli",
            "serve",
            "--model",
            str(make_export(workdir)),
            "--registry",
            str(workdir / "registry"),
            "--no-http",
            "--ingest",
            self.ingest,
            "--publish",
            self.publish,
            "--stats-interval",
            "0",
            "--log-format",
            "json",
            "--gc-freeze",
            "--stall-ms",
            "500",
        ]
        for s in self.specs_in:
            args += ["--ingest-adapter", s]
        for s in self.specs_out:
            args += ["--publish-adapter", s]
        self.log = open(workdir / "serve.log", "w+")  # noqa: SIM115 - open while the daemon runs; closed in close()
        self.serve = subprocess.Popen(
            args,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=child_env(),
        )
        self.rig = RigClient(endpoint=self.ingest, source_id=7)
        self.sub = PredictionSubscriber(endpoint=self.publish, predictions_only=False)
        from streaming.client import wait_for_daemon

        wait_for_daemon(self.rig, self.sub, timeout=300)
        found = pylsl.resolve_byprop("name", f"{self.tag}-pred", 1, 60)
        self.inlet = pylsl.StreamInlet(found[0])
        self.inlet.open_stream(timeout=60)
        self.lsl_base_ns = 0

    def _redis_up(self) -> bool:
        try:
            return bool(self.r.ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    # ------------------------------------------------------------------ one bin per path
    def send_bin(self, path: str, k: int) -> int:
        """Send bin ``k`` on ``path``; returns the time (ns) just before its bin-closing message went out."""
        ch, tm, end = self.chans[k], self.times[k], (k + 1) * BIN_NS
        if path == "lsl":  # one chunk: the events and the tick
            ids = [[int(c)] for c in ch] + [[-1]]
            ts = [(self.lsl_base_ns + int(t)) / 1e9 for t in tm] + [(self.lsl_base_ns + end) / 1e9]
            t = time.monotonic_ns()
            self.outlet.push_chunk(ids, ts)
        elif path == "redis":
            fields = {
                "channels": ch.astype("<u2").tobytes(),
                "times_ns": tm.astype("<i8").tobytes(),
                "clock_ns": end,
            }
            t = time.monotonic_ns()
            self.r.xadd("rig", fields)
        elif path == "openephys":  # the spikes, then the next buffer: the clock that closes the bin
            for c, s in zip(ch.tolist(), tm.tolist(), strict=True):
                self._oe(
                    "spike",
                    {
                        "spike": {
                            "electrode": f"Electrode {c + 1}",
                            "sample_num": s * RATE // 10**9,
                            "num_channels": 1,
                            "num_samples": 1,
                            "sorted_id": 0,
                        }
                    },
                    b"\0" * 4,
                )
            t = time.monotonic_ns()
            self._oe_data((k + 1) * PER_BIN)
        else:
            t = time.monotonic_ns()
            self.rig.send_spikes(ch, tm, clock=end)
        return t

    def _oe(self, kind: str, header: dict, data: bytes) -> None:
        self.oe_num += 1
        self.oe_pub.send_multipart(
            [kind.encode(), json.dumps({"message_num": self.oe_num, "type": kind, **header}).encode(), data]
        )

    def _oe_data(self, start: int) -> None:
        self._oe(
            "data",
            {
                "content": {
                    "channel_num": 0,
                    "sample_num": start,
                    "num_samples": PER_BIN,
                    "sample_rate": float(RATE),
                }
            },
            b"\0" * (4 * PER_BIN),
        )

    def start_stream(self, path: str) -> int:
        """Open a new stream on ``path`` (after :meth:`drain` ended the previous one); the bin index
        its bin 0 gets."""
        if path == "lsl":
            now = int(self.pylsl.local_clock() * 1e9)
            self.lsl_base_ns = (now // BIN_NS + 5) * BIN_NS
            self.outlet.push_chunk([[-1]], [self.lsl_base_ns / 1e9])
            return self.lsl_base_ns // BIN_NS
        if path == "redis":
            self.r.xadd("rig", {"clock_ns": 0})
        elif path == "openephys":
            self._oe_data(0)
        else:
            self.rig.send_reset(start=0)
        return 0

    # ------------------------------------------------------------------ receiving
    def recv(self, path: str, want_bin: int, timeout: float = 2.0):
        """(receive time ns, flags) of the prediction for ``want_bin`` on ``path``'s consumer, or None."""
        from streaming.protocol import Prediction

        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if path == "lsl-out":
                sample, _ = self.inlet.pull_sample(timeout=left)
                t = time.monotonic_ns()
                if sample is not None and int(sample[-1]) == want_bin:
                    return t, int(sample[-3])
            elif path == "redis-out":
                resp = self.r.xread({"pred": self.redis_last}, count=1, block=max(1, int(left * 1000)))
                t = time.monotonic_ns()
                for _, entries in resp or ():
                    for eid, f in entries:
                        self.redis_last = eid
                        if int(f[b"bin"]) == want_bin:
                            return t, int(f[b"flags"])
            else:
                m = self.sub.recv(left)
                t = time.monotonic_ns()
                if isinstance(m, Prediction) and m.bin == want_bin:
                    return t, m.flags
        return None

    def drain(self) -> None:
        """End the open stream and drop what is still in flight (bounded: the wait is for liveness only)."""
        self.rig.send_reset()
        deadline = time.monotonic() + 10.0
        while self.sub.recv(0.2) is not None and time.monotonic() < deadline:
            pass
        while self.inlet.pull_chunk(timeout=0.0)[1]:
            pass
        last = self.r.xrevrange("pred", count=1)
        self.redis_last = last[0][0] if last else b"0-0"

    def run_segment(self, path: str, rows: np.ndarray) -> tuple[list[float], int, int]:
        """One new stream of ``rows`` (bins × channels) through ``path`` at real-time pace:
        (latencies ms, bins lost, bins stalled)."""
        from streaming.replay import events_from_counts

        self.chans, self.times = events_from_counts(rows, BIN_NS)
        self.drain()
        first = self.start_stream(path)
        lat, lost, stalled = [], 0, 0
        t0 = time.monotonic_ns()
        for k in range(rows.shape[0]):
            due = t0 + (k + 2) * BIN_NS  # one bin of slack for the stream start
            while (left := due - time.monotonic_ns()) > 0:
                time.sleep(left / 1e9)
            t_send = self.send_bin(path if path in INGEST_PATHS else "native", k)
            got = self.recv(path, first + k)
            if got is None:
                lost += 1
                continue
            lat.append((got[0] - t_send) / 1e6)
            stalled += bool(got[1] & 2)
        return lat, lost, stalled

    def close(self) -> dict:
        self.rig.send_reset()
        self.serve.send_signal(signal.SIGINT)
        try:
            self.serve.wait(60)
        except subprocess.TimeoutExpired:
            self.serve.kill()
        self.log.seek(0)
        stopped = [json.loads(ln) for ln in self.log if ln.startswith('{"event": "stopped"')]
        self.log.close()
        self.redis_proc.terminate()
        self.redis_proc.wait(30)
        return stopped[-1]["snapshot"]["adapters"] if stopped else {}


LABELS = {
    "native": "native (rpnt protocol)",
    "lsl": "LSL spike events in",
    "redis": "Redis stream in",
    "openephys": "Open Ephys ZMQ Interface in",
    "lsl-out": "LSL outlet out",
    "redis-out": "Redis stream out",
}


def markdown_table(doc: dict) -> str:
    """The docs table (docs/adapters.md) from a result file: per path p50 / p99 and added vs native."""
    rows = [
        "| path | p50 ms | p99 ms | added p50 ms | added p99 ms | bins lost |",
        "|---|---|---|---|---|---|",
    ]
    for path, r in doc["results_ms"].items():
        add = doc["added_vs_native_ms"].get(path)
        added = f"{add['p50_ms']:+.2f} | {add['p99_ms']:+.2f}" if add else "— | —"
        rows.append(
            f"| {LABELS.get(path, path)} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added} | "
            f"{r['bins_lost']} of {r['bins']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bins", type=int, default=1500, help="bins per path (default 1500 = 30 s at 20 ms)")
    p.add_argument("--segment", type=int, default=100, help="bins per turn of a path (default 100)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "adapters.json"))
    p.add_argument(
        "--table", metavar="JSON", help="print the Markdown table of a result file and exit (no runs)"
    )
    a = p.parse_args(argv)
    if a.table:
        print(markdown_table(json.loads(Path(a.table).read_text())))
        return 0
    if shutil.which("redis-server") is None:
        print("bench_adapters: redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="rpnt-ba") as tmp:
        b = Bench(bins=a.bins, workdir=Path(tmp))
        paths = INGEST_PATHS + PUBLISH_PATHS
        lat: dict[str, list[float]] = {p: [] for p in paths}
        lost, stalled = dict.fromkeys(paths, 0), dict.fromkeys(paths, 0)
        try:
            # the paths take turns, a segment each, so that the host's load bursts hit all of them alike
            for start in range(0, a.bins, a.segment):
                rows = b.counts[start : start + a.segment]
                for path in paths:
                    seg, n_lost, n_stalled = b.run_segment(path, rows)
                    lat[path] += seg
                    lost[path] += n_lost
                    stalled[path] += n_stalled
                print(f"{start + rows.shape[0]}/{a.bins} bins per path", flush=True)
        finally:
            counters = b.close()
    results = {
        p: {**stats(lat[p]), "bins": a.bins, "bins_lost": lost[p], "bins_stalled": stalled[p]} for p in paths
    }
    for path, r in results.items():
        nan = float("nan")
        print(
            f"{path:10s} p50 {r.get('p50_ms', nan):7.3f} ms   p99 {r.get('p99_ms', nan):7.3f} ms"
            f"   lost {r['bins_lost']}  stalled {r['bins_stalled']}"
        )
    base = results["native"]
    added = {
        path: {
            "p50_ms": results[path]["p50_ms"] - base["p50_ms"],
            "p99_ms": results[path]["p99_ms"] - base["p99_ms"],
        }
        for path in INGEST_PATHS[1:] + PUBLISH_PATHS
        if results[path].get("count")
    }
    print(
        "added latency vs native (ms): "
        + ", ".join(f"{k} p50 {v['p50_ms']:+.3f} p99 {v['p99_ms']:+.3f}" for k, v in added.items())
    )
    doc = {
        "benchmark": "bench/bench_adapters.py",
        "bins_per_path": a.bins,
        "segment_bins": a.segment,
        "bin_ms": BIN_NS / 1e6,
        "channels": N_CH,
        "pace": "real time",
        "note": (
            "measured under load: a shared 2-core machine with other processes saturating the cores; "
            "end to end = just before the bin-closing message is sent -> the prediction is received by "
            "this process (same host, CLOCK_MONOTONIC); added = path minus native, same run"
        ),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "results_ms": results,
        "added_vs_native_ms": added,
        "adapter_counters": counters,
        "seconds": round(time.time() - t_start, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
