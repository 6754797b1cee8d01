"""Calibration speed (issue #17, item 6): from ``POST /calibrate`` to the new model live, for
``--seconds`` (default 120) of labelled 20 ms bins, while the decode loop runs — in one command:

    python bench/bench_calibration.py                             # ≈ 5 minutes on an idle 2-core host
    python bench/bench_calibration.py --baseline-ref 6588d35      # + the same POSTs on an older commit

1. A ``small`` RPNT (the recording's channels, 2 outputs, 20 ms bins) is trained on the first
   ``--seconds`` of StevensonV2.mat (recorded at 50 ms, re-timed to 20 ms as in bench_service.py)
   and exported: the live model.
2. ``rpnt serve`` (real uvicorn, real daemon, ``--gc-freeze``) is seeded with it on a fresh
   registry, with the service's default calibration settings (warm worker, niceness 10, one
   thread).  This process replays the recording through ZeroMQ at real-time pace the whole time
   (back-to-back replay segments of ``--segment-s``), so the decode loop runs.
3. ``--runs`` times: ``--rest-s`` seconds at rest, then ``POST /calibrate`` with an NPZ upload of
   ``--seconds`` of labelled bins (each run a later slice of the recording, ``force=true`` so that
   every run swaps), polling ``GET /calibrate/{id}`` every 0.1 s until the job is final.
   POST-to-live is client time from sending the POST to the first poll that shows the job
   ``succeeded`` (the swap has landed by then: ``activate`` waits for its bin); the job's
   ``timings`` give the per-phase breakdown.
4. The decode loop's time per bin (``daemon``: message off the socket → prediction on the PUB
   socket; ``infer``: the engine step) is split by when the bin's packet was sent: during a
   calibration job vs at rest, p50/p99 of each.
5. ``--baseline-ref REF``: the same, first, on commit REF of this repository (``git archive``
   into a temporary directory; the serve process runs that code), the baseline in the same run.

JSON to ``--out`` (default bench/results/calibration_speed.json) with a Markdown table beside it.
The host is shared: the load average is recorded, and the figures are what it gave under it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "stevenson2011_m1_centerout" / "StevensonV2.mat"
PHASES = (
    "input_s",
    "worker_start_s",
    "imports_s",
    "loading_s",
    "scoring_live_s",
    "finetuning_s",
    "scoring_candidate_s",
    "saving_s",
    "export_s",
    "registry_s",
    "swap_s",
)
EXPORT_PARTS = (
    "export.torch_reference_s",
    "export.step_graph_s",
    "export.step_parity_s",
    "export.window_graph_s",
)


def train_live_model(
    counts: np.ndarray, velocity: np.ndarray, bin_s: float, out: Path, *, steps: int
) -> Path:
    """A small RPNT trained on (counts, velocity) and exported (step and window graphs); its export dir."""
    from exporters.onnx_export import export_checkpoint
    from rpnt_core.data import Session
    from rpnt_core.train.finetune import FinetuneOptions, finetune

    sess = Session(
        counts=counts, velocity=velocity, bin_s=bin_s, target="velocity", source="bench live model"
    )
    opts = FinetuneOptions(
        preset="small",
        epochs=max(1, steps // 15),
        steps_per_epoch=15,
        patience=100,
        device="cpu",
        progress=False,
        train_fraction=0.8,
        val_fraction=0.1,
        test_fraction=0.1,
    )
    out.mkdir(parents=True, exist_ok=True)
    finetune(sess, init=None, options=opts, out=out / "live.safetensors")
    export_checkpoint(out / "live.safetensors", out / "export")
    return out / "export"


def upload_bytes(counts: np.ndarray, velocity: np.ndarray, bin_s: float, tmp: Path) -> bytes:
    """The labelled bins as the NPZ a lab would upload (``rpnt_core.data.save_npz``)."""
    from rpnt_core.data import Session, save_npz

    path = save_npz(
        Session(counts=counts, velocity=velocity, bin_s=bin_s, target="velocity", source="bench"),
        tmp / "upload.npz",
    )
    return Path(path).read_bytes()


class Replayer:
    """Replays the recording at real-time pace in back-to-back segments until :meth:`stop`."""

    def __init__(
        self, *, counts: np.ndarray, velocity: np.ndarray, bin_s: float, serve, segment_bins: int
    ) -> None:
        self.counts, self.velocity, self.bin_s, self.serve = counts, velocity, bin_s, serve
        self.segment_bins = segment_bins
        self.segments: list[tuple[float, int, object]] = []  # (wall at segment start, mono ns then, result)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from streaming.replay import run_replay

        k = 0
        while not self._stop.is_set():
            lo = (k * self.segment_bins) % (len(self.counts) - self.segment_bins)
            sl = slice(lo, lo + self.segment_bins)
            wall0, mono0 = time.time(), time.monotonic_ns()
            try:
                res = run_replay(
                    counts=self.counts[sl],
                    labels={"velocity": self.velocity[sl]},
                    bin_ns=round(self.bin_s * 1e9),
                    ingest=self.serve.ingest,
                    publish=self.serve.publish,
                    realtime=True,
                    drain_timeout_s=5.0,
                )
            except BaseException as exc:  # noqa: BLE001
                self.error = exc
                return
            self.segments.append((wall0, mono0, res))
            k += 1

    def bins(self) -> dict[str, np.ndarray]:
        """Per received, non-stalled bin: wall time its packet was sent, daemon and infer ns."""
        from streaming.protocol import PredFlag
        from streaming.report import stage_arrays

        out: dict[str, list] = {"wall_send": [], "daemon": [], "infer": [], "lost": []}
        for wall0, mono0, res in self.segments:
            ok = res.received & ((res.flags & int(PredFlag.STALLED)) == 0)
            st = stage_arrays(res)
            out["wall_send"].append(wall0 + (res.t_send[ok] - mono0) / 1e9)
            out["daemon"].append(st["daemon"])
            out["infer"].append(st["infer"])
            out["lost"].append(np.array([res.bins_lost]))
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def calibrate_once(serve, payload: bytes, *, poll_s: float) -> dict:
    """POST the upload, poll the job to its end; client-side seconds and the job's record."""
    import httpx

    t0 = time.time()
    r = httpx.post(
        serve.url + "/calibrate",
        headers=serve.headers(),
        timeout=120.0,
        files={"file": ("calibration.npz", payload, "application/octet-stream")},
        data={"force": "true"},
    )
    if r.status_code != 202:
        raise RuntimeError(f"POST /calibrate → {r.status_code}: {r.text}")
    job_id = r.json()["job_id"]
    t_accepted = time.time()
    while True:
        st = httpx.get(f"{serve.url}/calibrate/{job_id}", timeout=30.0).json()
        if st.get("state") in ("succeeded", "rejected", "failed"):
            break
        time.sleep(poll_s)
    t_end = time.time()
    live = httpx.get(serve.url + "/status", timeout=30.0).json()["model"]["registry_version"]
    return {
        "job_id": job_id,
        "state": st.get("state"),
        "error": st.get("error"),
        "post_to_live_s": round(t_end - t0, 3) if st.get("state") == "succeeded" else None,
        "post_to_accepted_s": round(t_accepted - t0, 3),
        "t_post": t0,
        "t_end": t_end,
        "created": st.get("created"),
        "finished": st.get("finished"),
        "version": st.get("version"),
        "live_version_after": live,
        "timings": st.get("timings") or {},
        "worker_cpu_s": (st.get("cpu") or {}).get("cpu_seconds"),
        "result": {
            k: (st.get("result") or {}).get(k)
            for k in (
                "candidate_holdout_r2",
                "live_holdout_r2",
                "candidate_val_r2",
                "best_epoch",
                "epochs_run",
                "gate",
            )
        },
    }


def latency_table(bins: dict, jobs: list[dict], warm_s: float) -> dict:
    from streaming.latency import percentiles_ms

    t = bins["wall_send"]
    during = np.zeros(t.shape, bool)
    for j in jobs:
        during |= (t >= j["t_post"]) & (t <= j["t_end"])
    start = t.min() if t.size else 0.0
    rest = ~during & (t >= start + warm_s)
    return {
        ph: {m: percentiles_ms(bins[m][mask]) for m in ("daemon", "infer")}
        for ph, mask in (("at_rest", rest), ("during_calibration", during))
    }


def run_arm(
    *,
    name: str,
    src: Path | None,
    export: Path,
    tmp: Path,
    counts: np.ndarray,
    velocity: np.ndarray,
    bin_s: float,
    starts: list[int],
    n_bins: int,
    a,
    log,
) -> dict:
    from _serve import Served

    run_dir = tmp / name
    run_dir.mkdir()
    served = Served(
        export=export, run_dir=run_dir, log=lambda m: log(f"[{name}] {m}"), code=src, ready_timeout=300.0
    )
    jobs: list[dict] = []
    with served as serve:
        rep = Replayer(
            counts=counts,
            velocity=velocity,
            bin_s=bin_s,
            serve=serve,
            segment_bins=int(round(a.segment_s / bin_s)),
        )
        rep.start()
        time.sleep(a.settle_s)  # the stream's start
        deadline = time.monotonic() + 300.0
        while time.monotonic() < deadline:  # a warm worker (where there is one) has done its imports
            import httpx

            w = httpx.get(serve.url + "/status", timeout=30.0).json()["calibration"].get("worker")
            if not w or not w.get("warm") or w.get("ready"):
                break
            time.sleep(0.5)
        for k, lo in enumerate(starts):
            time.sleep(a.rest_s)
            payload = upload_bytes(counts[lo : lo + n_bins], velocity[lo : lo + n_bins], bin_s, run_dir)
            j = calibrate_once(serve, payload, poll_s=a.poll_s)
            if src is not None and "finetuning_s" in j["timings"]:
                raise RuntimeError(f"[{name}] the job ran this checkout's worker, not {src}'s")
            jobs.append(j)
            log(
                f"[{name}] run {k + 1}/{len(starts)}: {j['state']} POST→live {j['post_to_live_s']} s "
                f"(candidate holdout R² {j['result']['candidate_holdout_r2']}, live "
                f"{j['result']['live_holdout_r2']}) {j['error'] or ''}"
            )
        time.sleep(a.rest_s)
        rep.stop()
        if rep.error is not None:
            raise RuntimeError(f"replay failed: {rep.error}")
    rc = served.exit_code
    bins = rep.bins()
    secs = [j["post_to_live_s"] for j in jobs if j["post_to_live_s"] is not None]
    phases = {
        p: float(np.median([j["timings"].get(p, 0.0) for j in jobs]))
        for p in (*PHASES, *EXPORT_PARTS)
        if any(p in j["timings"] for j in jobs)
    }
    return {
        "arm": name,
        "code": "this checkout" if src is None else f"git archive {a.baseline_ref}",
        "runs": len(jobs),
        "succeeded": len(secs),
        "post_to_live_s": {
            "median": float(np.median(secs)) if secs else None,
            "p99": float(np.percentile(secs, 99)) if secs else None,
            "min": min(secs, default=None),
            "max": max(secs, default=None),
            "each": secs,
        },
        "worker_cpu_s_median": float(
            np.median([j["worker_cpu_s"] for j in jobs if j["worker_cpu_s"] is not None])
        )
        if any(j["worker_cpu_s"] is not None for j in jobs)
        else None,
        "server_total_s_median": float(
            np.median([j["timings"]["total_s"] for j in jobs if "total_s" in j["timings"]])
        )
        if jobs and all("total_s" in j["timings"] for j in jobs)
        else None,
        "phase_median_s": phases,
        "decode_latency_ms": latency_table(bins, jobs, warm_s=2.0),
        "bins_lost": int(bins["lost"].sum()) if bins["lost"].size else 0,
        "serve_exit": rc,
        "jobs": jobs,
    }


def git_archive(ref: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    tar = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return dest


def markdown(out: dict) -> str:
    lines = [
        f"calibration speed: {out['n_bins']} labelled bins ({out['seconds']:g} s at {out['bin_ms']:g} ms) per "
        f"POST, {out['runs']} runs per arm, decode loop running; {out['machine']['cpus']} CPUs, load average "
        f"{out['machine']['load_avg_start'][0]:.2f} at start, {out['machine']['load_avg_end'][0]:.2f} at end "
        "(a shared host: measured under other work)",
        "",
        "| arm | POST→live median (s) | p99 (s) | runs ok | worker CPU s (median) | "
        "daemon p50 rest / during (ms) | daemon p99 rest / during (ms) | infer p99 rest / during (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in out["arms"]:
        lat = arm["decode_latency_ms"]
        r, d = lat["at_rest"], lat["during_calibration"]

        def f(x: dict, m: str, q: str) -> str:
            return f"{x[m][q]:.3f}" if x[m].get("count") else "–"

        med, p99 = arm["post_to_live_s"]["median"], arm["post_to_live_s"]["p99"]
        lines.append(
            f"| {arm['arm']} ({arm['code']}) | {med if med is None else f'{med:.2f}'} | "
            f"{p99 if p99 is None else f'{p99:.2f}'} | {arm['succeeded']}/{arm['runs']} | "
            f"{'–' if arm['worker_cpu_s_median'] is None else format(arm['worker_cpu_s_median'], '.1f')} | "
            f"{f(r, 'daemon', 'p50_ms')} / {f(d, 'daemon', 'p50_ms')} | "
            f"{f(r, 'daemon', 'p99_ms')} / {f(d, 'daemon', 'p99_ms')} | "
            f"{f(r, 'infer', 'p99_ms')} / {f(d, 'infer', 'p99_ms')} |"
        )
    new = out["arms"][-1]
    lines += [
        "",
        f"per-phase breakdown ({new['arm']}, median over runs, seconds; server side):",
        "",
        "| phase | s |",
        "|---|---:|",
    ]
    for p, v in new["phase_median_s"].items():
        lines.append(f"| {p.removesuffix('_s')} | {v:.3f} |")
    if new["server_total_s_median"] is not None:
        lines.append(f"| **total (server)** | **{new['server_total_s_median']:.3f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=str(DATA), help="recording (default StevensonV2.mat)")
    p.add_argument("--seconds", type=float, default=120.0, help="labelled seconds per POST (default 120)")
    p.add_argument("--bin-ms", type=float, default=20.0)
    p.add_argument("--runs", type=int, default=5, help="POSTs per arm (default 5)")
    p.add_argument(
        "--rest-s", type=float, default=10.0, help="seconds at rest before each POST and after the last"
    )
    p.add_argument("--settle-s", type=float, default=20.0, help="seconds after start before the first rest")
    p.add_argument("--segment-s", type=float, default=15.0, help="length of each replay segment")
    p.add_argument("--poll-s", type=float, default=0.1, help="GET /calibrate/{id} polling interval")
    p.add_argument("--live-steps", type=int, default=90, help="training steps of the live model")
    p.add_argument("--baseline-ref", default=None, help="also run the same POSTs on this commit, first")
    p.add_argument("--baseline-runs", type=int, default=None, help="POSTs on the baseline (default --runs)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "calibration_speed.json"))
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from bench_streaming import (
        recorded_stream,  # this directory: the same recording, the same way
    )

    from rpnt_core.data.formats import load_session

    load0 = os.getloadavg()
    bin_s = a.bin_ms / 1e3
    n_bins = int(round(a.seconds / bin_s))
    starts = [n_bins + k * (n_bins // 4) for k in range(a.runs)]
    sess = load_session(a.data)
    counts, velocity = recorded_stream(sess, starts[-1] + n_bins)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="rpnt-bench-cal-") as tmp:
        tmp = Path(tmp)
        log(f"training the live model ({a.live_steps} steps on the first {a.seconds:g} s) ...")
        export = train_live_model(
            counts[:n_bins], velocity[:n_bins], bin_s, tmp / "model", steps=a.live_steps
        )
        arms = []
        if a.baseline_ref:
            src = git_archive(a.baseline_ref, tmp / "baseline-src")
            nb = a.runs if a.baseline_runs is None else a.baseline_runs
            arms.append(
                run_arm(
                    name="baseline",
                    src=src,
                    export=export,
                    tmp=tmp,
                    counts=counts,
                    velocity=velocity,
                    bin_s=bin_s,
                    starts=starts[:nb],
                    n_bins=n_bins,
                    a=a,
                    log=log,
                )
            )
        arms.append(
            run_arm(
                name="this",
                src=None,
                export=export,
                tmp=tmp,
                counts=counts,
                velocity=velocity,
                bin_s=bin_s,
                starts=starts,
                n_bins=n_bins,
                a=a,
                log=log,
            )
        )
    out = {
        "benchmark": "POST /calibrate → new model live, decode loop running (bench/bench_calibration.py)",
        "note": "measured on a shared 2-core host under other engineers' load; see machine.load_avg_*",
        "data": str(a.data),
        "seconds": a.seconds,
        "bin_ms": a.bin_ms,
        "n_bins": n_bins,
        "runs": a.runs,
        "baseline_ref": a.baseline_ref,
        "live_steps": a.live_steps,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_start": load0,
            "load_avg_end": os.getloadavg(),
        },
        "arms": arms,
        "seconds_total": round(time.time() - t_start, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    md = markdown(out)
    Path(a.out).with_suffix(".md").write_text(md)
    print(md)
    print(f"JSON: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
