"""The daemon's own per-message work, without sockets, back to back vs paced — one command:

    python bench/bench_hotpath.py            # ≈ 50 s

A :class:`streaming.daemon.Daemon` (196 channels, 20 ms bins) with a do-nothing decoder and a
do-nothing PUB socket handles the SPIKES (+ KINEMATICS) messages a replay of random counts would
send, in this thread: ``Daemon._handle`` per bin-closing SPIKES message is timed — parse, source
checks, binning, bin close, (dummy) step, prediction encoding, history — i.e. the ``parse`` +
``publish`` stages the streaming benchmark calls *daemon overhead*.

Two runs of the same code in one process: **back to back** (caches hot) and **paced** (a 20 ms
sleep before each bin, as at real-time pace), and paced while **spinning** through the 20 ms
instead of sleeping (a hot core, what ``--busy-poll-us`` aims at).  The difference is what waking up costs on this
machine, as opposed to what the daemon's code costs.  JSON to ``--out``
(default bench/results/hotpath.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class _NullDecoder:
    def __init__(self, n_channels: int) -> None:
        from rpnt_core.decoder import DecoderInfo

        self.info = DecoderInfo(n_channels=n_channels, n_outputs=2, bin_s=0.02, name="null")
        self._out = np.zeros(2, np.float32)

    def reset(self) -> None:
        pass

    def step(self, counts: np.ndarray) -> np.ndarray:
        return self._out


def run(n_bins: int, pace_s: float, *, n_channels: int, seed: int, spin: bool = False) -> np.ndarray:
    from streaming.daemon import Daemon
    from streaming.protocol import encode_kinematics, encode_spikes
    from streaming.replay import events_from_counts

    d = Daemon(
        decoder=_NullDecoder(n_channels),
        bin_s=0.02,
        ingest="inproc://hotpath-in",
        publish="inproc://hotpath-out",
    )
    d._pub = types.SimpleNamespace(send=lambda *a, **k: None)  # the loop's socket, minus ZeroMQ
    bin_ns = 20_000_000
    counts = np.random.default_rng(seed).poisson(0.5, (n_bins, n_channels))
    chans, times = events_from_counts(counts, bin_ns)
    spikes = [
        encode_spikes(source=1, seq=2 * k, channels=chans[k], times=times[k], clock=(k + 1) * bin_ns)
        for k in range(n_bins)
    ]
    kin = [
        encode_kinematics(source=1, seq=2 * k + 1, first=k, values=np.zeros((1, 2), np.float32))
        for k in range(n_bins)
    ]
    d._binner.reset(start_ns=0, wall_ns=time.monotonic_ns())
    t = np.empty(n_bins, dtype=np.int64)
    for k in range(n_bins):
        if pace_s and spin:  # wait on a hot core, as --busy-poll-us does
            end = time.perf_counter() + pace_s
            while time.perf_counter() < end:
                pass
        elif pace_s:
            time.sleep(pace_s)
        t0 = time.perf_counter_ns()
        d._handle(spikes[k], t0)
        t[k] = time.perf_counter_ns() - t0
        d._handle(kin[k], time.perf_counter_ns())
    snap = d.snapshot()
    if snap["counters"]["bins"] != n_bins or snap["rejected"]:
        raise RuntimeError(
            f"the daemon did not decode every bin cleanly: {snap['counters']}, {snap['rejected']}"
        )
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bins", type=int, default=5000, help="bins back to back (default 5000)")
    p.add_argument(
        "--paced-bins", type=int, default=1000, help="bins with a 20 ms sleep before each (default 1000)"
    )
    p.add_argument("--channels", type=int, default=196)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "hotpath.json"))
    a = p.parse_args(argv)
    from streaming.latency import percentiles_ms

    hot = percentiles_ms(run(a.bins, 0.0, n_channels=a.channels, seed=0))
    paced = percentiles_ms(run(a.paced_bins, 0.02, n_channels=a.channels, seed=1))
    spun = percentiles_ms(run(a.paced_bins, 0.02, n_channels=a.channels, seed=1, spin=True))
    out = {
        "benchmark": "daemon per-message work without sockets (bench/bench_hotpath.py)",
        "channels": a.channels,
        "back_to_back_ms": hot,
        "paced_20ms_ms": paced,
        "paced_20ms_spinning_ms": spun,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg(),
        },
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"Daemon._handle per bin-closing SPIKES message ({a.channels} channels), µs:")
    print(f"{'':<14}{'p50':>8}{'p99':>8}{'p99.9':>8}{'max':>8}")
    for name, s in (("back to back", hot), ("paced 20 ms", paced), ("paced, spinning", spun)):
        print(
            f"{name:<14}" + "".join(f"{s[k] * 1e3:>8.1f}" for k in ("p50_ms", "p99_ms", "p99.9_ms", "max_ms"))
        )
    print(f"paced / back to back at p50: {paced['p50_ms'] / hot['p50_ms']:.1f}×   JSON: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
