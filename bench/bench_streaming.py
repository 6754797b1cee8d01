"""Streaming benchmark (issue #4): end-to-end latency of the daemon at real-time pace, next to the
model alone, for the ``small`` and ``paper`` presets.  One command, one run:

    python bench/bench_streaming.py                       # ≈ 8 minutes: 2 × 10,000 bins at 20 ms
    python bench/bench_streaming.py --bins 1000           # a quick look

Per preset:

1. A random-weight RPNT of the preset (196 channels, 2 outputs, bin 20 ms) is exported with the
   exporters package (the step graph: what the daemon runs).  Timing does not depend on weights.
2. **Model alone**: the ONNX Runtime engine (1 intra-op thread, as the daemon loads it) steps over
   the first ``--model-bins`` bins of the real counts in this process, back to back, and over
   ``--paced-bins`` bins with a Δ sleep before each step — the way the daemon runs it, one step per
   bin with idle time in between (measured here: a step right after a 20 ms sleep takes about twice
   as long as back to back).  Per-step wall time.
3. **Daemon**: ``rpnt serve`` in a child process (its own interpreter; ``--gc-freeze``, engine
   warm-up; ``--affinity`` if asked), ipc:// endpoints.  This process replays ``--bins`` bins of the
   real counts of StevensonV2.mat (196 channels, recorded at 50 ms) **at real-time pace with
   Δ = 20 ms on both sides** — the same counts re-timed to 20 ms bins, so 10,000 bins take 200 s
   instead of 8.3 minutes, and each bin's events go out as one SPIKES packet (with its clock) the
   moment the replay clock reaches the bin's end, plus one KINEMATICS message.  End to end is
   measured on one clock: just before the bin-closing packet is sent → the prediction leaves this
   process's SUB socket.  The daemon's own per-stage stamps come back in every prediction.

Reported (ms): model-alone step p50/p99/p99.9/max (back to back and paced); the daemon's own
``infer`` stage (the model inside the daemon, same run); per stage (ingest hop, parse, infer, publish,
deliver hop, daemon = parse+infer+publish); **daemon overhead** = per-bin (daemon − infer), i.e. what
the daemon adds around the model; end to end; bins lost (sent, never received), stalled, late.
The bars checked: daemon overhead p99 ≤ 0.2 ms, end-to-end p99 ≤ 1.5 ms for the paper preset,
zero bins lost.  JSON goes to ``--out`` (default bench/results/streaming.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "stevenson2011_m1_centerout" / "StevensonV2.mat"

BARS = {"daemon_overhead_p99_ms": 0.2, "paper_end_to_end_p99_ms": 1.5, "bins_lost": 0}


def recorded_stream(sess, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, velocity float32) of a recording, played again end to end until ≥ ``n_bins`` bins."""
    counts, velocity = np.asarray(sess.counts), np.asarray(sess.velocity, dtype=np.float32)
    if n_bins > counts.shape[0]:
        reps = -(-n_bins // counts.shape[0])
        counts, velocity = np.tile(counts, (reps, 1)), np.tile(velocity, (reps, 1))
    return counts, velocity


def export_preset(preset: str, n_channels: int, bin_s: float, out: Path, precision: str = "fp32") -> Path:
    """The preset's step graph in ``out`` (and its dynamic-int8 variant for ``precision="int8"``;
    its R² loss vs fp32 is measured in bench/bench_engines.py, not gated here)."""
    import torch

    from exporters.contract import step_file
    from exporters.onnx_export import export_step_graph
    from exporters.quantize import quantize_int8
    from rpnt_core import RPNT, RPNTConfig

    torch.manual_seed(0)
    model = RPNT(RPNTConfig.preset(preset, n_channels=n_channels, n_outputs=2, bin_s=bin_s)).eval()
    out.mkdir(parents=True, exist_ok=True)
    export_step_graph(model, out / step_file("fp32"))
    if precision == "int8":
        quantize_int8(out / step_file("fp32"), out / step_file("int8"))
    return out


def model_alone(
    export: Path, counts: np.ndarray, n: int, *, pace_s: float = 0.0, precision: str = "fp32"
) -> dict:
    """engine.step over ``n`` bins of real counts: back to back (``pace_s`` 0), or sleeping ``pace_s``
    before each step — as the daemon does between bins (a step right after a sleep is slower: caches
    and clocks have cooled)."""
    from exporters.runtime import load_engine
    from streaming.latency import percentiles_ms

    eng = load_engine(export, precision=precision)  # warms up on load, like the daemon's engine
    x = counts[:n].astype(np.float32)
    t = np.empty(x.shape[0], dtype=np.int64)
    for i in range(x.shape[0]):
        if pace_s:
            time.sleep(pace_s)
        t0 = time.perf_counter_ns()
        eng.step(x[i])
        t[i] = time.perf_counter_ns() - t0
    return percentiles_ms(t)


def run_preset(
    preset: str,
    counts: np.ndarray,
    velocity: np.ndarray,
    *,
    bin_ms: float,
    bins: int,
    model_bins: int,
    paced_bins: int,
    affinity: str | None,
    busy_poll_us: int,
    workdir: Path,
    log,
    prewarm_lead_us: int = 0,
    precision: str = "fp32",
) -> dict:
    from streaming.client import PredictionSubscriber, RigClient, wait_for_daemon
    from streaming.launch import spawn_daemon
    from streaming.replay import run_replay
    from streaming.report import build_report, stage_arrays

    t0 = time.time()
    export = export_preset(preset, counts.shape[1], bin_ms / 1e3, workdir / f"export-{preset}", precision)
    log(f"[{preset}] exported in {time.time() - t0:.1f} s; model alone over {model_bins} bins ...")
    alone = model_alone(export, counts, model_bins, precision=precision)
    paced = model_alone(export, counts, paced_bins, pace_s=bin_ms / 1e3, precision=precision)
    log(
        f"[{preset}] model alone: p50 {alone['p50_ms']:.3f} ms, p99 {alone['p99_ms']:.3f} ms back to back; "
        f"p50 {paced['p50_ms']:.3f} ms, p99 {paced['p99_ms']:.3f} ms paced at {bin_ms:g} ms"
    )
    ingest, publish = f"ipc://{workdir}/{preset}-in", f"ipc://{workdir}/{preset}-out"
    extra = (
        ["--gc-freeze"]
        + (["--affinity", affinity] if affinity else [])
        + (["--busy-poll-us", str(busy_poll_us)] if busy_poll_us else [])
        + (["--prewarm-lead-us", str(prewarm_lead_us)] if prewarm_lead_us else [])
    )
    proc = spawn_daemon(
        model=export,
        bin_ms=bin_ms,
        ingest=ingest,
        publish=publish,
        extra=extra,
        precision=precision,
        log_path=workdir / f"daemon-{preset}.log",
    )
    try:
        rig, sub = RigClient(endpoint=ingest, source_id=99), PredictionSubscriber(endpoint=publish)
        status = wait_for_daemon(rig, sub, timeout=120)
        rig.close()
        sub.close()
        log(
            f"[{preset}] daemon up ({status['decoder']}); replaying {bins} bins at {bin_ms:g} ms real-time pace "
            f"(≈ {bins * bin_ms / 1e3:.0f} s) ..."
        )
        res = run_replay(
            counts=counts[:bins],
            labels={"velocity": velocity[:bins]},
            bin_ns=round(bin_ms * 1e6),
            ingest=ingest,
            publish=publish,
            realtime=True,
            drain_timeout_s=10.0,
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except Exception:  # noqa: BLE001
            proc.kill()
    startup = ""
    for line in (workdir / f"daemon-{preset}.log").read_text().splitlines():
        if line.startswith('{"event": "ready"'):
            startup = json.loads(line)["startup"]
    rep = build_report(res, recorded_velocity=velocity[:bins])
    st = stage_arrays(res)
    e2e_p99, alone_p99 = rep["latency_ms"]["end_to_end"].get("p99_ms"), paced["p99_ms"]
    return {
        "preset": preset,
        "bins": bins,
        "bins_received": rep["bins_received"],
        "bins_lost": rep["bins_lost"],
        "flags": rep["flags"],
        "wall_s": round(res.wall_s, 1),
        "model_alone_ms": alone,
        "model_alone_paced_ms": paced,
        "latency_ms": rep["latency_ms"],
        "daemon_adds_p99_ms": {
            "per_bin_overhead_p99": rep["latency_ms"]["daemon_overhead"].get("p99_ms"),
            "daemon_p99_minus_infer_p99": rep["latency_ms"]["daemon"]["p99_ms"]
            - rep["latency_ms"]["infer"]["p99_ms"],
            "daemon_p99_minus_model_alone_paced_p99": rep["latency_ms"]["daemon"]["p99_ms"] - alone_p99,
            "end_to_end_p99_minus_model_alone_paced_p99": None if e2e_p99 is None else e2e_p99 - alone_p99,
        },
        "samples": int(st["end_to_end"].size),
        "daemon_startup": startup,
        "daemon_status": {k: status.get(k) for k in ("decoder", "model_version", "n_channels", "bin_ns")},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default=str(DATA), help="recording whose counts are replayed (default StevensonV2.mat)"
    )
    p.add_argument("--presets", default="small,paper")
    p.add_argument("--bins", type=int, default=10_000, help="bins replayed per preset (default 10000)")
    p.add_argument("--bin-ms", type=float, default=20.0, help="bin width on both sides (default 20)")
    p.add_argument(
        "--model-bins",
        type=int,
        default=2000,
        help="steps timed back to back for the model alone (default 2000)",
    )
    p.add_argument(
        "--paced-bins",
        type=int,
        default=500,
        help="steps timed for the model alone with a bin-width sleep before each (default 500)",
    )
    p.add_argument("--affinity", default=None, metavar="CPU", help="pin the daemon's decode thread (e.g. 1)")
    p.add_argument(
        "--busy-poll-us",
        type=int,
        default=0,
        metavar="US",
        help="daemon spins this long after each message before blocking (default 0: blocks)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="step graph the daemon serves (default fp32)",
    )
    p.add_argument(
        "--prewarm-lead-us",
        type=int,
        default=0,
        metavar="US",
        help="daemon runs the engine's prewarm() this long before each bin is due (default 0: off)",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "streaming.json"))
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from rpnt_core.data.formats import load_session

    sess = load_session(a.data)
    counts, velocity = recorded_stream(sess, a.bins)
    log(
        f"{a.data}: {sess.n_bins} bins × {sess.n_channels} channels recorded at {sess.bin_s * 1e3:g} ms; "
        f"replayed at {a.bin_ms:g} ms"
    )
    t_start = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="rpnt-bench-") as tmp:
        for preset in [x for x in a.presets.split(",") if x]:
            results.append(
                run_preset(
                    preset,
                    counts,
                    velocity,
                    bin_ms=a.bin_ms,
                    bins=a.bins,
                    model_bins=a.model_bins,
                    paced_bins=a.paced_bins,
                    affinity=a.affinity,
                    busy_poll_us=a.busy_poll_us,
                    workdir=Path(tmp),
                    log=log,
                    prewarm_lead_us=a.prewarm_lead_us,
                    precision=a.precision,
                )
            )
    out = {
        "benchmark": "streaming end-to-end latency at real-time pace (bench/bench_streaming.py)",
        "data": str(a.data),
        "recorded_bin_ms": sess.bin_s * 1e3,
        "replayed_bin_ms": a.bin_ms,
        "precision": a.precision,
        "daemon_flags": {
            "busy_poll_us": a.busy_poll_us,
            "prewarm_lead_us": a.prewarm_lead_us,
            "affinity": a.affinity,
        },
        "note": (
            "the recording's counts re-timed to the replayed bin width on both sides (daemon and replay); "
            "end_to_end = replay client's send of the bin-closing packet → its receipt of the prediction "
            "(one clock); daemon_overhead = per-bin (daemon − infer); model_alone = engine.step in the bench "
            "process over the same counts, back to back; model_alone_paced = the same with a bin-width sleep "
            "before each step, as the daemon sees it"
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg(),
        },
        "bars": BARS,
        "results": results,
        "seconds": round(time.time() - t_start, 1),
    }
    checks = {}
    for r in results:
        checks[f"{r['preset']}: daemon overhead p99 ≤ 0.2 ms"] = (
            r["daemon_adds_p99_ms"]["per_bin_overhead_p99"] <= 0.2
        )
        checks[f"{r['preset']}: zero bins lost"] = r["bins_lost"] == 0
        if r["preset"] == "paper":
            checks["paper: end-to-end p99 ≤ 1.5 ms"] = r["latency_ms"]["end_to_end"]["p99_ms"] <= 1.5
    out["checks"] = checks
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")

    print(
        f"\nstreaming benchmark: {a.bins} bins per preset at {a.bin_ms:g} ms real-time pace "
        f"(counts of {Path(a.data).name}), {out['seconds']:.0f} s; load average {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs"
    )
    hdr = f"{'preset':<7}{'ms':<20}{'p50':>8}{'p99':>8}{'p99.9':>8}{'max':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        rows = [("model alone", r["model_alone_ms"]), ("model alone paced", r["model_alone_paced_ms"])] + [
            (name, r["latency_ms"][key])
            for name, key in (
                ("daemon infer", "infer"),
                ("daemon overhead", "daemon_overhead"),
                ("daemon total", "daemon"),
                ("ingest hop", "ingest"),
                ("deliver hop", "deliver"),
                ("end to end", "end_to_end"),
            )
        ]
        for i, (name, s) in enumerate(rows):
            print(
                f"{r['preset'] if i == 0 else '':<7}{name:<20}{s['p50_ms']:>8.3f}{s['p99_ms']:>8.3f}"
                f"{s['p99.9_ms']:>8.3f}{s['max_ms']:>8.3f}"
            )
        fl = {k: v for k, v in r["flags"].items() if v and k != "first"}
        print(
            f"{'':<7}bins {r['bins']}, received {r['bins_received']}, lost {r['bins_lost']}"
            + (f", flags {fl}" if fl else "")
        )
    print()
    for k, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {k}")
    print(f"\nJSON: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
