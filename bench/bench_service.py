"""Control-plane benchmark (issue #5): decode-loop latency at real-time pace with and without a
calibration job running, and the model swap — in one run, one command:

    python bench/bench_service.py                 # ≈ 3.5 minutes
    python bench/bench_service.py --bins 4000     # shorter

1. A random-weight ``small`` RPNT (channels of the recording, 2 outputs, 20 ms bins) is saved as a
   checkpoint and exported (step graph); ``rpnt serve`` (daemon + HTTP control plane, one child
   process, ``--gc-freeze``) is seeded with it on a fresh registry.
2. This process replays ``--bins`` bins of the real counts of StevensonV2.mat (recorded at 50 ms,
   re-timed to 20 ms on both sides, as in bench_streaming.py) at real-time pace, with the recorded
   velocity as KINEMATICS.
3. ``--rest-s`` seconds in, it sends ``POST /calibrate`` (``source=recent``: the daemon's own last
   ``--rest-s − 5`` seconds, closed loop; ``force=true`` so that the swap happens whatever the R²)
   with the service's default calibration settings: FS-SFT in a separate process at niceness 10,
   one thread, then ONNX export + parity check, then the swap at a bin boundary.
4. A monitoring client polls ``GET /status`` and the calibration job (``GET /calibrate`` before it
   exists) every 0.5 s throughout, so the HTTP load is the same in every phase.  Bins are split by when their bin-closing packet was sent: **during
   calibration** (between the job's start and end) and **at rest** (before the POST and after the
   job, each also shown alone).  For each: p50/p99/p99.9/max
   of the daemon's own time per bin (``daemon``: message off the socket → prediction on the PUB
   socket) and of end to end (client send of the bin-closing packet → client receipt of the
   prediction, one clock).

Bars: p99 during calibration ≤ 1.5 × p99 at rest (checked for both measures); zero bins lost or
decoded twice across the swap (every bin received exactly once, one SWAPPED bin, the model version
changing exactly there).  JSON to ``--out`` (default bench/results/service.json) and a Markdown
table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
BAR_RATIO = 1.5


def phase_stats(values_ns: np.ndarray, mask: np.ndarray) -> dict:
    from streaming.latency import percentiles_ms

    return percentiles_ms(values_ns[mask])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default=str(DATA), help="recording whose counts are replayed (default StevensonV2.mat)"
    )
    p.add_argument("--bins", type=int, default=9000, help="bins replayed (default 9000 = 180 s at 20 ms)")
    p.add_argument("--bin-ms", type=float, default=20.0)
    p.add_argument(
        "--rest-s", type=float, default=50.0, help="seconds at rest before POST /calibrate (default 50)"
    )
    p.add_argument("--affinity", default=None, metavar="CPU", help="pin the daemon's decode thread (e.g. 1)")
    p.add_argument(
        "--calibration-affinity",
        default=None,
        metavar="CPU[,CPU]",
        help="CPUs the calibration process may use (e.g. 0; calibration.affinity)",
    )
    p.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra settings for rpnt serve, e.g. RPNT_CALIBRATION__NICE=0 (repeatable)",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "service.json"))
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from _serve import ReplayThread, Served, random_export
    from bench_streaming import recorded_stream  # this directory: the same recording, the same way

    from rpnt_core.data.formats import load_session
    from service.demo import http_call
    from streaming.protocol import PredFlag
    from streaming.report import stage_arrays

    sess = load_session(a.data)
    counts, velocity = recorded_stream(sess, a.bins)
    counts, velocity = counts[: a.bins], velocity[: a.bins]
    bin_s = a.bin_ms / 1e3
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="rpnt-bench-svc-") as tmp:
        tmp = Path(tmp)
        export = random_export(counts.shape[1], bin_s, tmp / "model")
        env = (
            {"RPNT_CALIBRATION__AFFINITY": json.dumps([int(c) for c in a.calibration_affinity.split(",")])}
            if a.calibration_affinity
            else {}
        )
        env.update(kv.split("=", 1) for kv in a.serve_env)
        served = Served(
            export=export,
            run_dir=tmp,
            log=log,
            env=env,
            extra=["--affinity", a.affinity] if a.affinity else [],
        )
        with served as serve:
            log(
                f"replaying {a.bins} bins at {a.bin_ms:g} ms real-time pace (≈ {a.bins * bin_s:.0f} s); "
                f"POST /calibrate after {a.rest_s:g} s"
            )
            wall0, mono0 = time.time(), time.monotonic_ns()
            th = ReplayThread(
                counts=counts,
                labels={"velocity": velocity},
                bin_ns=round(bin_s * 1e9),
                ingest=serve.ingest,
                publish=serve.publish,
                realtime=True,
                drain_timeout_s=10.0,
            )
            th.start()
            job: dict = {}
            st: dict = {}
            # a monitoring client polls /status (and the job) every 0.5 s for the whole run, so that the
            # only difference between the phases is the calibration job itself
            t_post = time.time() + a.rest_s
            posted = False
            while th.is_alive() or (
                job.get("job_id") and st.get("state") not in ("succeeded", "rejected", "failed")
            ):
                http_call(serve.url + "/status")
                if not posted and time.time() >= t_post:
                    t_post, posted = time.time(), True
                    code, job = http_call(
                        serve.url + "/calibrate",
                        headers=serve.headers(),
                        form={"source": "recent", "seconds": str(a.rest_s - 5), "force": "true"},
                    )
                    log(f"POST /calibrate → {code} {job}")
                if job.get("job_id"):
                    st = http_call(f"{serve.url}/calibrate/{job['job_id']}")[1]
                else:  # the same two requests per round before the job exists
                    http_call(serve.url + "/calibrate")
                time.sleep(0.5)
                if not th.is_alive() and time.time() - t_post > 900:
                    break
            th.join()
            res = th.result()
            status = http_call(serve.url + "/status")[1]
    rc = served.exit_code
    stages = stage_arrays(res)
    wall_send = wall0 + (res.t_send - mono0) / 1e9
    t_job0 = st.get("created", t_post)
    t_job1 = st.get("finished", float("inf"))
    warm = wall0 + 2.0  # the first 2 s: the stream starting
    before, after = (wall_send >= warm) & (wall_send < t_post), wall_send > t_job1
    phases = {
        "at_rest": before | after,
        "during_calibration": (wall_send >= t_job0) & (wall_send <= t_job1),
        "at_rest_before": before,
        "at_rest_after": after,
    }
    ok = res.received & ((res.flags & int(PredFlag.STALLED)) == 0)
    # stage_arrays holds the received, non-STALLED bins only (the ``ok`` ones), in bin order
    table = {
        ph: {m: phase_stats(stages[m], mask[ok]) for m in ("daemon", "infer", "end_to_end")}
        for ph, mask in phases.items()
    }
    swapped = np.flatnonzero((res.flags & int(PredFlag.SWAPPED)) != 0)
    ratio = {
        m: table["during_calibration"][m]["p99_ms"] / table["at_rest"][m]["p99_ms"]
        for m in ("daemon", "end_to_end")
        if table["during_calibration"][m].get("count")
    }
    checks = {
        "calibration job succeeded (forced swap)": st.get("state") == "succeeded",
        f"daemon p99 during calibration ≤ {BAR_RATIO} × at rest": ratio.get("daemon", np.inf) <= BAR_RATIO,
        f"end-to-end p99 during calibration ≤ {BAR_RATIO} × at rest": ratio.get("end_to_end", np.inf)
        <= BAR_RATIO,
        "zero bins lost": res.bins_lost == 0,
        "no bin decoded twice": res.extra_predictions == 0,
        "exactly one SWAPPED bin": swapped.size == 1,
        "two model versions, switching at the swap": len(res.model_versions) == 2,
    }
    out = {
        "benchmark": "decode-loop latency with and without a calibration job, and the model swap "
        "(bench/bench_service.py)",
        "data": str(a.data),
        "recorded_bin_ms": sess.bin_s * 1e3,
        "replayed_bin_ms": a.bin_ms,
        "bins": a.bins,
        "pinning": {"decode_thread": a.affinity, "calibration": a.calibration_affinity},
        "serve_env": a.serve_env,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg(),
        },
        "bins_per_phase": {ph: int((ok & m).sum()) for ph, m in phases.items()},
        "latency_ms": table,
        "p99_ratio_during_vs_rest": ratio,
        "swap_bin": int(swapped[0]) if swapped.size else None,
        "bins_lost": res.bins_lost,
        "extra_predictions": int(res.extra_predictions),
        "model_versions": res.model_versions,
        "flags": {f.name.lower(): int(((res.flags[res.received] & f) != 0).sum()) for f in PredFlag},
        "calibration_job": {k: st.get(k) for k in ("id", "state", "n_bins", "result", "swap", "error")}
        | {"seconds": (t_job1 - t_job0) if np.isfinite(t_job1) else None},
        "daemon_counters": status.get("counters"),
        "serve_exit": rc,
        "checks": checks,
        "seconds": round(time.time() - t_start, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    lines = [
        f"service benchmark: {a.bins} bins of {Path(a.data).name} at {a.bin_ms:g} ms real-time pace; "
        f"calibration job {out['calibration_job']['seconds'] or float('nan'):.1f} s; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        "",
        "| phase | bins | daemon p50 | daemon p99 | daemon p99.9 | end-to-end p50 | end-to-end p99 | "
        "end-to-end p99.9 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ph in phases:
        d, e = table[ph]["daemon"], table[ph]["end_to_end"]
        if not d.get("count"):
            lines.append(f"| {ph} | 0 | | | | | | | |")
            continue
        lines.append(
            f"| {ph} | {d['count']} | {d['p50_ms']:.3f} | {d['p99_ms']:.3f} | {d['p99.9_ms']:.3f} | "
            f"{e['p50_ms']:.3f} | {e['p99_ms']:.3f} | {e['p99.9_ms']:.3f} | {e['max_ms']:.3f} |"
        )
    lines += [
        "",
        "ms; " + ", ".join(f"p99 ratio during/rest ({m}) {r:.2f}" for m, r in ratio.items()),
        f"swap at bin {out['swap_bin']}, bins lost {res.bins_lost}, decoded twice {res.extra_predictions}",
        "",
    ]
    lines += [f"- [{'ok' if v else 'MISSED'}] {k}" for k, v in checks.items()]
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nJSON: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
