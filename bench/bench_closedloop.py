"""Closed-loop benchmark (issue 17): a simulated participant drives a cursor through the live daemon.

    python bench/bench_closedloop.py --workdir /tmp/cl                     # every section
    python bench/bench_closedloop.py --sections decoders,drift --seconds 45

The participant is ``streaming.closedloop`` with its defaults (LNP encoding fitted on the shared
Nick center-out recording, center-out task: 8 targets at 8, radius 1.5, hold 0.3 s, timeout 6 s;
controller with a 100 ms visual delay).  Every decoder is fitted on the same seeded 180 s
observation block, every block runs in real time (20 ms bins) through the real daemon and ZeroMQ
(RPNT: ``rpnt serve`` in a child process; Wiener/Kalman/GRU: the daemon in a thread, as they have
no export) under the same seeds.  Sections (each written to the JSON as soon as it ends):

- ``decoders``: per decoder, block 1 (fitted on the observation block), then recalibration from
  block 1's ReFIT intention labels (RPNT: ``POST /calibrate source=recent``, the labels streamed as
  KINEMATICS; baselines: refit + hot swap) and block 2 on the recalibrated decoder.
- ``labels``: from one block, recalibration from ReFIT labels vs the true intended velocity vs the
  decoded velocity (RPNT: NPZ uploads, ``labels=refit`` for the first, ``force`` so that each goes
  live; the base version is re-activated before each), each followed by a block.
- ``latency``: extra delay before a prediction moves the cursor, 0/20/50/100/200 ms.
- ``drift``: ``--stages`` stages (a simulated hour): preferred directions rotated, per-channel rates
  a random walk that reaches, at the last stage, the day-to-day spread measured across the Spike
  days (limblab_spike_wf_2012; a documented fallback without them), channels lost and gained.  Arm *none*: the first decoder
  throughout; arm *recal*: in each stage, after ``--stage-s`` seconds, ``POST /calibrate`` from the
  last ``--stage-s`` seconds of ReFIT labels while the loop runs, then ``--stage-s`` more seconds
  on the swapped-in model.  Bins lost counted over the whole arm.

The host is shared (2 cores, other work running): the JSON records the load average, and loop
overruns (an iteration that started more than one bin late) per block.  Results:
``--out`` (default bench/results/closedloop.json), a Markdown table and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPIKE_DAYS = Path("/work/shared/data/limblab_spike_wf_2012")
#: day-to-day σ of log per-channel rate used when the Spike days are absent (documented fallback)
FALLBACK_LOG_RATE_SIGMA = 0.4
#: drift reached at the last stage, whatever the number of stages (more stages = finer steps)
TOTAL_ROTATION_DEG = 36.0
TOTAL_LOST = 0.15
TOTAL_GAINED = 0.09

from streaming.closedloop.session import (  # noqa: E402
    BIN_S,
    ClosedLoopSpec,
    block_summary,
    fit_initial,
    make_participant,
    recalibrate,
    run_block,
    start_backend,
)


def log(*a) -> None:
    print(*a, flush=True)


def spike_days_rate_drift(days: int = 5) -> dict:
    """Day-to-day change of per-channel rates across consecutive Spike days: the median over day
    pairs of the across-channel spread (1.4826 · MAD, so channels that go silent count as lost
    channels rather than as rate drift) of log((rate_b + 0.5 Hz) / (rate_a + 0.5 Hz)), and each
    pair's common (median) ratio."""
    files = sorted(SPIKE_DAYS.glob("Spike_*.mat"))
    files = [f for f in files if "07-20-12" not in f.name][:days]  # 07-20: the README's bad session
    if len(files) < 2:
        return {"source": "fallback", "log_rate_sigma": FALLBACK_LOG_RATE_SIGMA}
    from rpnt_core.data import load_session

    rates = []
    for f in files:
        s = load_session(f)
        rates.append(np.asarray(s.counts, dtype=np.float64).mean(0) / s.bin_s)
    sig, common = [], []
    for a, b in zip(rates[:-1], rates[1:]):
        lr = np.log((b + 0.5) / (a + 0.5))
        med = float(np.median(lr))
        sig.append(
            float(1.4826 * np.median(np.abs(lr - med)))
        )  # robust: channels that die are "lost", not drift
        common.append(float(np.exp(med)))
    return {
        "source": [f.name for f in files],
        "log_rate_sigma": float(np.median(sig)),
        "per_pair_sigma": sig,
        "per_pair_common_ratio": common,
    }


def drift_stages(enc, n: int, sigma: float, seed: int) -> list:
    """Stage 0 = the fitted encoding; stage s: cumulative rotation, rate random walk, losses, gains.
    The random walk reaches one day of Spike-day rate drift (``sigma``) at the last stage: per-stage
    σ = sigma / √(n − 1) (the hour is compressed from a day)."""
    rng = np.random.default_rng(seed)
    steps = max(n - 1, 1)
    sigma = sigma / np.sqrt(steps)
    out, scale = [enc], np.ones(enc.n_channels)
    lost = np.zeros(enc.n_channels, bool)
    gained = np.zeros(enc.n_channels, bool)
    for s in range(1, n):
        scale = scale * np.exp(rng.normal(0.0, sigma, enc.n_channels) - 0.5 * sigma**2)
        alive = np.flatnonzero(~lost & ~gained)
        lose = rng.choice(alive, int(round(TOTAL_LOST / steps * enc.n_channels)), replace=False)
        lost[lose] = True
        dead = np.flatnonzero(lost)
        gain = rng.choice(
            dead, min(dead.size, int(round(TOTAL_GAINED / steps * enc.n_channels))), replace=False
        )
        lost[gain], gained[gain] = False, True
        out.append(
            enc.drifted(
                rotation_deg=TOTAL_ROTATION_DEG * s / steps,
                rate_scale=scale,
                lost=lost.copy(),
                gained=gained.copy(),
                seed=seed + s,
            )
        )
    return out


def _row(name: str, loop, **extra) -> dict:
    s = block_summary(name, loop)
    return {**s, **extra}


def section_decoders(args, results: dict, save) -> None:
    rows = results.setdefault("decoders", [])
    for dec in args.decoders:
        spec = ClosedLoopSpec(decoder=dec, seconds=args.seconds, seed=args.seed, preset=args.preset)
        enc = make_participant(spec)
        wd = args.workdir / dec
        init = fit_initial(
            spec, enc, workdir=args.workdir / "shared-initial" if dec == "rpnt" else wd, log=log
        )
        be = start_backend(spec, init, workdir=wd)
        try:
            log(f"[bench] {dec}: block 1")
            l1 = run_block(be, enc, spec, seconds=args.seconds, seed=args.seed, labels="refit")
            rows.append(_row("observation-fit", l1, decoder=dec, offline_test_r2=init.get("offline_test_r2")))
            save()
            cal = recalibrate(be, l1, "refit", seed=args.seed, log=log)
            log(f"[bench] {dec}: recalibrated from ReFIT labels: {cal}")
            l2 = run_block(be, enc, spec, seconds=args.seconds, seed=args.seed + 1, labels="refit")
            rows.append(_row("refit-recalibrated", l2, decoder=dec, calibration=cal))
            save()
            if dec == args.latency_decoder or dec == "rpnt":
                results.setdefault("_loops", {})[dec] = (l1, l2)
        finally:
            be.close()


def section_latency(args, results: dict, save) -> None:
    rows = results.setdefault("latency", [])
    for dec in args.latency_decoders:
        spec = ClosedLoopSpec(decoder=dec, seconds=args.latency_s, seed=args.seed, preset=args.preset)
        enc = make_participant(spec)
        init = fit_initial(
            spec,
            enc,
            workdir=args.workdir / "shared-initial" if dec == "rpnt" else args.workdir / dec,
            log=log,
        )
        be = start_backend(spec, init, workdir=args.workdir / f"{dec}-latency")
        try:
            for ms in args.latencies:
                log(f"[bench] latency {dec} +{ms:g} ms")
                lp = run_block(
                    be,
                    enc,
                    spec,
                    seconds=args.latency_s,
                    seed=args.seed + 7,
                    labels=None,
                    extra_latency_s=ms / 1e3,
                )
                rows.append(_row(f"+{ms:g} ms", lp, decoder=dec, extra_latency_ms=ms))
                save()
        finally:
            be.close()


def section_labels(args, results: dict, save) -> None:
    rows = results.setdefault("labels", [])
    for dec in args.label_decoders:
        spec = ClosedLoopSpec(decoder=dec, seconds=args.seconds, seed=args.seed, preset=args.preset)
        enc = make_participant(spec)
        init = fit_initial(
            spec,
            enc,
            workdir=args.workdir / "shared-initial" if dec == "rpnt" else args.workdir / dec,
            log=log,
        )
        be = start_backend(spec, init, workdir=args.workdir / f"{dec}-labels")
        try:
            base = be.status()["model"]["registry_version"] if dec == "rpnt" else None
            first = init.get("decoder")
            l1 = run_block(be, enc, spec, seconds=args.seconds, seed=args.seed, labels=None)
            for kind in ("refit", "intended", "decoded"):
                if dec == "rpnt":
                    be.request("POST", f"/models/{base}/activate")
                else:
                    be.swap(first)
                cal = recalibrate(be, l1, kind, upload=True, force=True, seed=args.seed, log=log)
                log(f"[bench] {dec}: calibrated from {kind} labels: {cal}")
                l2 = run_block(be, enc, spec, seconds=args.seconds, seed=args.seed + 1, labels=None)
                rows.append(_row(f"calibrated from {kind}", l2, decoder=dec, labels=kind, calibration=cal))
                save()
        finally:
            be.close()


def section_drift(args, results: dict, save) -> None:
    drift = spike_days_rate_drift()
    out = results.setdefault(
        "drift",
        {
            "rate_drift": drift,
            "arms": {},
            "stages": args.stages,
            "stage_s": args.stage_s,
            "rotation_total_deg": TOTAL_ROTATION_DEG,
            "lost_total": TOTAL_LOST,
            "gained_total": TOTAL_GAINED,
        },
    )
    dec = args.drift_decoder
    spec = ClosedLoopSpec(decoder=dec, seconds=args.stage_s, seed=args.seed, preset=args.preset)
    enc = make_participant(spec)
    stages = drift_stages(enc, args.stages, drift["log_rate_sigma"], args.seed + 11)
    init = fit_initial(
        spec, enc, workdir=args.workdir / "shared-initial" if dec == "rpnt" else args.workdir / dec, log=log
    )
    for arm in args.drift_arms:
        be = start_backend(spec, init, workdir=args.workdir / f"drift-{arm}")
        marks: list[dict] = []

        def schedule(loop, arm=arm, marks=marks):
            for s, e in enumerate(stages):
                if s:
                    loop.set_encoding(e)
                t0 = loop.k
                marks.append({"stage": s, "start_bin": t0})
                _wait_bins(loop, t0 + int(args.stage_s / BIN_S))
                if arm == "recal" and s:
                    cal = recalibrate(be, loop, "refit", seconds=args.stage_s, seed=args.seed, log=log)
                    log(f"[bench] drift stage {s}: {cal}")
                    marks[-1]["calibration"] = cal
                    marks[-1]["after_bin"] = loop.k
                    _wait_bins(loop, loop.k + int(args.stage_s / BIN_S))
                marks[-1]["end_bin"] = loop.k
            loop.stop()

        try:
            log(f"[bench] drift arm {arm}: {args.stages} stages")
            lp = run_block(be, enc, spec, seconds=3600.0, seed=args.seed + 3, labels="refit", during=schedule)
        finally:
            be.close()
        trials = lp.trial_rows()
        per_stage = []
        for m in marks:
            lo = m.get("after_bin", m["start_bin"]) * BIN_S
            hi = m["end_bin"] * BIN_S
            from streaming.closedloop.metrics import summarise

            before = (
                [t for t in trials if m["start_bin"] * BIN_S <= t["start_s"] and t["end_s"] <= lo]
                if "after_bin" in m
                else None
            )
            win = [t for t in trials if lo <= t["start_s"] and t["end_s"] <= hi]
            per_stage.append(
                {
                    **m,
                    "measured": summarise(win),
                    **({"before_recal": summarise(before)} if before is not None else {}),
                }
            )
        out["arms"][arm] = {"stages": per_stage, "summary": lp.summary(), "swap_lag": swap_lag(lp)}
        save()


def swap_lag(loop, half: int = 25) -> list[dict]:
    """Per swap: the receive lag (prediction received − bin end, ms) around the swap bin (± ``half``
    bins: median and max) against the whole block's median and p99 — a swap must not show as a spike."""
    lag = loop.record.recv_lag_s * 1e3
    ok = np.isfinite(lag)
    whole = (
        {"median": float(np.median(lag[ok])), "p99": float(np.percentile(lag[ok], 99))} if ok.any() else {}
    )
    out = []
    for b in loop.swaps():
        w = lag[max(0, b - half) : b + half]
        w = w[np.isfinite(w)]
        out.append(
            {
                "swap_bin": b,
                "around_median_ms": float(np.median(w)),
                "around_max_ms": float(w.max()),
                "block_median_ms": whole.get("median"),
                "block_p99_ms": whole.get("p99"),
            }
        )
    return out


def _wait_bins(loop, k: int) -> None:
    while loop.k < k and not loop.finished.is_set():
        time.sleep(0.05)


def write_markdown(path: Path, res: dict) -> None:
    def f(x, p=2):
        return "–" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))

    L = [
        f"# Closed-loop benchmark ({res['meta']['when']})",
        "",
        f"Measured under load on a shared 2-core host (load average at start {res['meta']['load_start']}, at end "
        f"{res['meta'].get('load_end')}); real-time 20 ms bins through the real daemon; seed {res['meta']['seed']}. "
        "Written by bench/bench_closedloop.py.",
        "",
    ]
    if res.get("decoders"):
        L += [
            "## Decoders side by side (center-out, same seed)",
            "",
            "| decoder | block | success | median time to target (s) | dial-in (s) | path eff. | bitrate (bits/s) "
            "| bins lost | loop overruns |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["decoders"]:
            L.append(
                f"| {r['decoder']} | {r['name']} | {f(r['success_rate'])} | {f(r['median_time_to_target_s'])} | "
                f"{f(r['median_dial_in_s'])} | {f(r['median_path_efficiency'])} | {f(r['bitrate_bps'])} | "
                f"{r['bins_lost']} | {r['loop_overruns']} |"
            )
        L.append("")
    if res.get("labels"):
        L += [
            "## Recalibration labels",
            "",
            "| decoder | labels | success | time to target (s) | bitrate | job |",
            "|---|---|---:|---:|---:|---|",
        ]
        for r in res["labels"]:
            L.append(
                f"| {r['decoder']} | {r['labels']} | {f(r['success_rate'])} | {f(r['median_time_to_target_s'])} "
                f"| {f(r['bitrate_bps'])} | {r['calibration'].get('state')} |"
            )
        L.append("")
    if res.get("latency"):
        L += [
            "## Injected latency",
            "",
            "| decoder | extra latency (ms) | success | time to target (s) | bitrate | bins lost |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in res["latency"]:
            L.append(
                f"| {r['decoder']} | {r['extra_latency_ms']:g} | {f(r['success_rate'])} | "
                f"{f(r['median_time_to_target_s'])} | {f(r['bitrate_bps'])} | {r['bins_lost']} |"
            )
        L.append("")
    if res.get("drift", {}).get("arms"):
        d = res["drift"]
        L += [
            "## Drift and recovery",
            "",
            f"Rate drift: a random walk reaching log-rate σ {d['rate_drift']['log_rate_sigma']:.3f} at the last stage "
            f"({'Spike days' if d['rate_drift']['source'] != 'fallback' else 'fallback'}); rotation "
            f"{d.get('rotation_total_deg', TOTAL_ROTATION_DEG):g}° in all; {d.get('lost_total', TOTAL_LOST):.0%} of "
            f"channels lost, {d.get('gained_total', TOTAL_GAINED):.0%} gained in all, in {d.get('stages')} stages of "
            f"{d.get('stage_s')} s (drift steps between stages).",
            "",
            "| arm | stage | success (measured window) | success before recal | job | bins lost (arm) |",
            "|---|---:|---:|---:|---|---:|",
        ]
        for arm, a in d["arms"].items():
            for s in a["stages"]:
                L.append(
                    f"| {arm} | {s['stage']} | {f(s['measured']['success_rate'])} "
                    f"({s['measured']['n_trials']} trials) | "
                    f"{f((s.get('before_recal') or {}).get('success_rate'))} | "
                    f"{(s.get('calibration') or {}).get('state', '')} | {a['summary']['bins_lost']} |"
                )
        L.append("")
    path.write_text("\n".join(L))


def plot(path: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    dec = res.get("decoders") or []
    names = [f"{r['decoder']}\n{r['name'].split('-')[0]}" for r in dec]
    ax[0].bar(range(len(dec)), [r["success_rate"] or 0 for r in dec], color="tab:blue")
    ax[0].set_xticks(range(len(dec)), names, fontsize=7)
    ax[0].set_ylabel("success rate")
    for i, r in enumerate(dec):
        ax[0].text(
            i, (r["success_rate"] or 0) + 0.02, f"{r['bitrate_bps'] or 0:.2f} b/s", ha="center", fontsize=7
        )
    ax[0].set_ylim(0, 1.15)
    ax[0].set_title("decoders (bar label: Fitts bitrate)")
    for d in sorted({r["decoder"] for r in res.get("latency") or []}):
        rs = [r for r in res["latency"] if r["decoder"] == d]
        ax[1].plot(
            [r["extra_latency_ms"] for r in rs],
            [r["success_rate"] or 0 for r in rs],
            "o-",
            label=f"{d} success",
        )
        ax[1].plot(
            [r["extra_latency_ms"] for r in rs],
            [r["bitrate_bps"] or 0 for r in rs],
            "s--",
            label=f"{d} bitrate (b/s)",
        )
    ax[1].set_xlabel("extra latency (ms)")
    if res.get("latency"):
        ax[1].legend(fontsize=7)
    ax[1].set_title("injected latency")
    for arm, a in (res.get("drift") or {}).get("arms", {}).items():
        ax[2].plot(
            [s["stage"] for s in a["stages"]],
            [s["measured"]["success_rate"] or 0 for s in a["stages"]],
            "o-",
            label=f"{arm}",
        )
    ax[2].set_xlabel("drift stage")
    ax[2].set_ylabel("success rate")
    ax[2].set_ylim(-0.05, 1.05)
    if (res.get("drift") or {}).get("arms"):
        ax[2].legend(fontsize=7)
    ax[2].set_title("drift: no recalibration vs periodic ReFIT recalibration")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--sections", default="decoders,drift,latency,labels")
    p.add_argument("--decoders", default="wiener,kalman,gru,rpnt")
    p.add_argument("--latency-decoders", default="kalman,rpnt")
    p.add_argument("--label-decoders", default="kalman,rpnt")
    p.add_argument("--latencies", default="0,20,50,100,200")
    p.add_argument("--latency-decoder", default="kalman")
    p.add_argument("--drift-decoder", default="rpnt")
    p.add_argument("--drift-arms", default="none,recal")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--latency-s", type=float, default=40.0)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--stage-s", type=float, default=40.0)
    p.add_argument("--preset", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "closedloop.json")
    args = p.parse_args()
    args.decoders = args.decoders.split(",")
    args.latency_decoders = args.latency_decoders.split(",")
    args.label_decoders = args.label_decoders.split(",")
    args.latencies = [float(x) for x in args.latencies.split(",")]
    args.drift_arms = args.drift_arms.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    prev = json.loads(args.out.read_text()) if args.out.exists() else {}
    res = {k: v for k, v in prev.items() if k != "meta"}
    res["meta"] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "seed": args.seed,
        "note": "measured under load on a shared 2-core host; real time, so a loaded host shows as "
        "loop overruns and receive lag",
        "argv": sys.argv[1:],
    }

    def save() -> None:
        res["meta"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
        clean = {k: v for k, v in res.items() if not k.startswith("_")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(clean, indent=1, default=str))
        write_markdown(args.out.with_suffix(".md"), clean)
        try:
            plot(args.out.with_suffix(".png"), clean)
        except ImportError:
            pass

    for name in args.sections.split(","):
        log(f"[bench] section {name}")
        if name in ("decoders", "latency", "labels", "drift"):
            res.pop(name, None)
        {
            "decoders": section_decoders,
            "latency": section_latency,
            "labels": section_labels,
            "drift": section_drift,
        }[name](args, res, save)
        save()
    for r in res.get("decoders", []):
        log(
            f"{r['decoder']:>7} {r['name']:<20} success {r['success_rate']} time-to-target "
            f"{r['median_time_to_target_s']} bitrate {r['bitrate_bps']} bins lost {r['bins_lost']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
