# Over 500 lines: one self-contained benchmark script (its sections, their aggregation and report).
"""Closed-loop benchmark (issue 17): a simulated participant drives a cursor through the live daemon.

    python bench/bench_closedloop.py --workdir /tmp/cl                          # every section, seeds 0,1,2
    python bench/bench_closedloop.py --workdir /tmp/cl --sections decoders --seeds 1 --out /tmp/cl/s1.json
    python bench/bench_closedloop.py --merge /tmp/cl/s0.json,/tmp/cl/s1.json --out bench/results/closedloop.json

The participant is ``streaming.closedloop`` with its defaults (LNP encoding fitted on the shared
Nick center-out recording, center-out task: 8 targets at 8, radius 1.5, hold 0.3 s, timeout 6 s;
controller with a 100 ms visual delay).  Per seed, every decoder is fitted on the same seeded 180 s
observation block, and every block runs in real time (20 ms bins) through the real daemon and
ZeroMQ (RPNT: ``rpnt serve`` in a child process; Wiener/Kalman/GRU: the daemon in a thread, as they
have no export) under the same seeds.  A decoder ``rpnt:paper`` is RPNT of the paper preset
(trained ``--paper-epochs`` × ``--paper-steps``).  Sections (the JSON is rewritten after each block):

- ``decoders``: per decoder, block 1 (fitted on the observation block), then recalibration from
  block 1's ReFIT intention labels (RPNT: ``POST /calibrate source=recent labels=refit``, the labels
  streamed as KINEMATICS; baselines: refit + hot swap; both on the head's scale) and block 2 on the recalibrated decoder.
- ``labels``: from one block, recalibration from ReFIT labels vs the true intended velocity vs the
  decoded velocity (RPNT: NPZ uploads, ``labels=refit`` for the first, ``force`` so that each goes
  live; the base version is re-activated before each), each followed by a block.
- ``steps``: RPNT recalibrated from one block's ReFIT labels by a fresh service per
  ``calibration.max_steps`` (``--max-steps``): holdout R², POST-to-live time, success after.
- ``latency``: extra delay before a prediction moves the cursor, 0/20/50/100/200 ms.
- ``drift``: one ``--drift-s`` block (a compressed hour): ``--pre-s`` seconds on the fitted
  encoding, then every ``--chunk-s`` seconds the encoding takes one step along a drift path
  (:func:`drift_path`) that reaches, at the end of the block, preferred directions rotated by
  ``TOTAL_ROTATION_DEG``, per-channel rates a random walk with the day-to-day spread measured
  across the Spike days (limblab_spike_wf_2012; a documented fallback without them), and
  ``TOTAL_LOST`` of the channels lost and ``TOTAL_GAINED`` gained.  Arm *none*: the first decoder
  throughout; arm *recal*: from the end of the pre-drift part, every ``--period-s`` seconds
  ``POST /calibrate source=recent labels=refit`` from the last ``--recal-s`` seconds of ReFIT labels
  while the loop runs (the next one waits for the last to finish).  Success per period window,
  before the drift, and after it (trials starting after the first period of drift) as a fraction
  of before; bins lost over each run; receive lag around every swap.

The host is shared (2 cores, other work running): the JSON records the load average, and loop
overruns (an iteration that started more than one bin late) per block.  Results: ``--out``
(default bench/results/closedloop.json), a Markdown table (mean ± sd over seeds, and per seed)
and a PNG beside it; ``--merge`` combines result files of separate runs (e.g. one per seed).
"""

from __future__ import annotations

import argparse
import contextlib
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
sys.path.insert(0, str(REPO / "bench"))
SPIKE_DAYS = Path("/work/shared/data/limblab_spike_wf_2012")
#: day-to-day σ of log per-channel rate used when the Spike days are absent (documented fallback)
FALLBACK_LOG_RATE_SIGMA = 0.4
#: drift reached at the end of the drift block, whatever the number of steps (more steps = finer)
TOTAL_ROTATION_DEG = 36.0
TOTAL_LOST = 0.15
TOTAL_GAINED = 0.09
DRIFT_ARMS = ("none", "recal")

import _result_tables as T  # noqa: E402

from streaming.closedloop.metrics import summarise  # noqa: E402
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
    for a, b in zip(rates[:-1], rates[1:], strict=True):
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


def drift_path(enc, n: int, sigma: float, seed: int) -> list:
    """``n`` encodings: the fitted one, then ``n − 1`` steps of drift, cumulative.  At step s of
    S = n − 1: preferred directions rotated by TOTAL_ROTATION_DEG · s/S; per-channel rates a
    geometric random walk with per-step σ = sigma/√S, so that it reaches ``sigma`` (one day of
    Spike-day rate drift; the hour is compressed from a day) at the end; round(TOTAL_LOST · s/S · N)
    channels lost by step s (any live channel), round(TOTAL_GAINED · s/S · N) gained (a lost one
    replaced by a new tuned unit).  Seeded."""
    rng = np.random.default_rng(seed)
    steps = max(n - 1, 1)
    step_sigma = sigma / np.sqrt(steps)
    out, scale = [enc], np.ones(enc.n_channels)
    lost = np.zeros(enc.n_channels, bool)
    gained = np.zeros(enc.n_channels, bool)
    for s in range(1, n):
        scale = scale * np.exp(rng.normal(0.0, step_sigma, enc.n_channels) - 0.5 * step_sigma**2)
        n_lost = int(round(TOTAL_LOST * s / steps * enc.n_channels)) - int(lost.sum() + gained.sum())
        alive = np.flatnonzero(~lost & ~gained)
        lost[rng.choice(alive, max(0, min(n_lost, alive.size)), replace=False)] = True
        dead = np.flatnonzero(lost)
        n_gain = int(round(TOTAL_GAINED * s / steps * enc.n_channels)) - int(gained.sum())
        gain = rng.choice(dead, max(0, min(n_gain, dead.size)), replace=False)
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
    return {**block_summary(name, loop), **extra}


def _decoder_spec(entry: str, args, *, seconds: float, seed: int) -> ClosedLoopSpec:
    """``entry``: a decoder name, or ``rpnt:PRESET`` (RPNT of that preset; ``paper`` trained with
    ``--paper-epochs`` × ``--paper-steps``)."""
    dec, _, preset = entry.partition(":")
    preset = preset or args.preset
    epochs, steps = (args.paper_epochs, args.paper_steps) if preset == "paper" else (10, 20)
    return ClosedLoopSpec(
        decoder=dec, seconds=seconds, seed=seed, preset=preset, rpnt_epochs=epochs, rpnt_steps=steps
    )


def _initial(args, entry: str, spec: ClosedLoopSpec, enc) -> dict:
    """The decoder fitted on the seed's observation block (RPNT cached per preset and seed)."""
    wd = args.workdir / f"initial-{entry.replace(':', '-')}-seed{spec.seed}"
    return fit_initial(spec, enc, workdir=wd, log=log)


@contextlib.contextmanager
def _under_test(args, entry: str, *, seconds: float, seed: int, workdir: str):
    """``(spec, participant, initial fit, backend)`` of ``entry`` for ``seed``; the backend is
    closed on the way out."""
    spec = _decoder_spec(entry, args, seconds=seconds, seed=seed)
    enc = make_participant(spec)
    init = _initial(args, entry, spec, enc)
    be = start_backend(spec, init, workdir=args.workdir / workdir, env=args.serve_env)
    try:
        yield spec, enc, init, be
    finally:
        be.close()


def section_decoders(args, results: dict, save) -> None:
    """Per seed and decoder: block 1 (observation fit), ReFIT recalibration, block 2."""
    rows = results.setdefault("decoders", [])
    for seed in args.seeds:
        for entry in args.decoders:
            wd = f"{entry}-seed{seed}"
            with _under_test(args, entry, seconds=args.seconds, seed=seed, workdir=wd) as under:
                spec, enc, init, be = under
                tag = {"decoder": entry, "seed": seed, "fit_s": init.get("fit_s")}
                log(f"[bench] seed {seed} {entry}: block 1")
                l1 = run_block(be, enc, spec, seconds=args.seconds, seed=seed, labels="refit")
                rows.append(_row("observation-fit", l1, **tag, offline_test_r2=init.get("offline_test_r2")))
                save()
                cal = recalibrate(be, l1, "refit", seed=seed, log=log)
                log(f"[bench] seed {seed} {entry}: recalibrated from ReFIT labels: {cal}")
                l2 = run_block(be, enc, spec, seconds=args.seconds, seed=seed + 1, labels="refit")
                rows.append(_row("refit-recalibrated", l2, **tag, calibration=cal))
                save()


def section_latency(args, results: dict, save) -> None:
    """Per decoder (``rpnt:paper`` included): blocks with 0–200 ms added before the cursor moves."""
    rows = results.setdefault("latency", [])
    for seed in args.seeds:
        for entry in args.latency_decoders:
            wd = f"{entry}-latency-seed{seed}"
            with _under_test(args, entry, seconds=args.latency_s, seed=seed, workdir=wd) as under:
                spec, enc, init, be = under
                for ms in args.latencies:
                    log(f"[bench] latency seed {seed} {entry} +{ms:g} ms")
                    lp = run_block(
                        be,
                        enc,
                        spec,
                        seconds=args.latency_s,
                        seed=seed + 7,
                        labels=None,
                        extra_latency_s=ms / 1e3,
                    )
                    rows.append(
                        _row(
                            f"+{ms:g} ms",
                            lp,
                            decoder=entry,
                            seed=seed,
                            extra_latency_ms=ms,
                            fit_s=init.get("fit_s"),
                            offline_test_r2=init.get("offline_test_r2"),
                        )
                    )
                    save()


def section_labels(args, results: dict, save) -> None:
    """From one block: recalibration from ReFIT vs true intended vs decoded labels, each forced live."""
    rows = results.setdefault("labels", [])
    for seed in args.seeds:
        for entry in args.label_decoders:
            wd = f"{entry}-labels-seed{seed}"
            with _under_test(args, entry, seconds=args.seconds, seed=seed, workdir=wd) as under:
                spec, enc, init, be = under
                base = be.status()["model"]["registry_version"] if spec.decoder == "rpnt" else None
                l1 = run_block(be, enc, spec, seconds=args.seconds, seed=seed, labels=None)
                for kind in ("refit", "intended", "decoded"):
                    if base is not None:
                        be.request("POST", f"/models/{base}/activate")
                    else:
                        be.swap(init["decoder"])
                    cal = recalibrate(be, l1, kind, upload=True, force=True, seed=seed, log=log)
                    log(f"[bench] seed {seed} {entry}: calibrated from {kind} labels: {cal}")
                    l2 = run_block(be, enc, spec, seconds=args.seconds, seed=seed + 1, labels=None)
                    rows.append(
                        _row(
                            f"calibrated from {kind}",
                            l2,
                            decoder=entry,
                            seed=seed,
                            labels=kind,
                            calibration=cal,
                        )
                    )
                    save()


def section_steps(args, results: dict, save) -> None:
    """RPNT recalibration quality and POST-to-live time vs ``calibration.max_steps``: one block of
    ReFIT labels per seed, uploaded (``labels=refit``, the gate deciding) to a fresh service per
    ``max_steps``, then a block on whatever is live."""
    rows = results.setdefault("steps", [])
    for seed in args.seeds:
        spec = _decoder_spec("rpnt", args, seconds=args.seconds, seed=seed)
        enc = make_participant(spec)
        init = _initial(args, "rpnt", spec, enc)
        be = start_backend(spec, init, workdir=args.workdir / f"steps-seed{seed}", env=args.serve_env)
        try:
            l1 = run_block(be, enc, spec, seconds=args.seconds, seed=seed, labels=None)
        finally:
            be.close()
        rows.append(_row("block 1 (observation fit)", l1, seed=seed, max_steps=None))
        for ms in args.max_steps:
            # epochs unbounded so that max_steps is what binds (data-sized steps per epoch, early stopping)
            env = {
                **(args.serve_env or {}),
                "RPNT_CALIBRATION__MAX_STEPS": str(ms),
                "RPNT_CALIBRATION__EPOCHS": "1000",
            }
            be = start_backend(spec, init, workdir=args.workdir / f"steps-seed{seed}-{ms}", env=env)
            try:
                cal = recalibrate(be, l1, "refit", upload=True, seed=seed, log=log)
                log(f"[bench] seed {seed} max_steps {ms}: {cal}")
                l2 = run_block(be, enc, spec, seconds=args.seconds, seed=seed + 1, labels=None)
                rows.append(_row(f"max_steps {ms}", l2, seed=seed, max_steps=ms, calibration=cal))
                save()
            finally:
                be.close()


def section_drift(args, results: dict, save) -> None:
    """Per seed and arm: one ``--drift-s`` real-time block under drift (see the docstring)."""
    drift = spike_days_rate_drift()
    out = results.setdefault(
        "drift",
        {
            "rate_drift": drift,
            "runs": [],
            "drift_s": args.drift_s,
            "pre_s": args.pre_s,
            "chunk_s": args.chunk_s,
            "period_s": args.period_s,
            "recal_s": args.recal_s,
            "rotation_total_deg": TOTAL_ROTATION_DEG,
            "lost_total": TOTAL_LOST,
            "gained_total": TOTAL_GAINED,
        },
    )
    n_steps = int(round((args.drift_s - args.pre_s) / args.chunk_s))
    for seed in args.seeds:
        spec = _decoder_spec(args.drift_decoder, args, seconds=args.drift_s, seed=seed)
        enc = make_participant(spec)
        path = drift_path(enc, n_steps + 1, drift["log_rate_sigma"], seed + 11)
        init = _initial(args, args.drift_decoder, spec, enc)
        for arm in args.drift_arms:
            be = start_backend(
                spec, init, workdir=args.workdir / f"drift-{arm}-seed{seed}", env=args.serve_env
            )
            jobs: list[dict] = []
            try:
                log(f"[bench] drift seed {seed} arm {arm}: {args.drift_s:g} s, {n_steps} drift steps")
                lp = run_block(
                    be,
                    enc,
                    spec,
                    seconds=args.drift_s,
                    seed=seed + 3,
                    labels="refit",
                    during=lambda loop, be=be, arm=arm, jobs=jobs, path=path, seed=seed: _drift_schedule(
                        args, loop, be, path, arm=arm, jobs=jobs, seed=seed
                    ),
                )
            finally:
                be.close()
            out["runs"].append(
                {
                    "seed": seed,
                    "arm": arm,
                    **drift_metrics(lp.trial_rows(), args),
                    "calibrations": jobs,
                    "summary": lp.summary(),
                    "swap_lag": swap_lag(lp),
                }
            )
            save()


def _drift_schedule(args, loop, be, path: list, *, arm: str, jobs: list, seed: int) -> None:
    """Runs in the bench's thread while the loop runs: the encoding steps along ``path`` every
    ``--chunk-s`` after ``--pre-s``; in arm ``recal``, from ``--pre-s`` on, a recalibration from the
    last ``--recal-s`` seconds of ReFIT labels every ``--period-s`` (in a thread of its own, so that
    the drift keeps its clock; one at a time: a period that finds the last job running is skipped)."""
    import threading

    pre, chunk, period = (int(round(x / BIN_S)) for x in (args.pre_s, args.chunk_s, args.period_s))
    step, next_cal, worker = 0, pre + period, None
    while not loop.finished.is_set():
        k = loop.k
        if k >= pre + (step + 1) * chunk and step + 1 < len(path):
            step += 1
            loop.set_encoding(path[step])
        if arm == "recal" and k >= next_cal:
            next_cal += period
            if worker is None or not worker.is_alive():

                def job(at: int = k) -> None:
                    cal = recalibrate(be, loop, "refit", seconds=args.recal_s, seed=seed, log=log)
                    jobs.append(
                        {"at_s": round(at * BIN_S, 2), "swapped_at_s": round(loop.k * BIN_S, 2), **cal}
                    )

                worker = threading.Thread(target=job, daemon=True)
                worker.start()
        time.sleep(0.02)
    if worker is not None:
        worker.join(300.0)


def drift_metrics(trials: list[dict], args) -> dict:
    """Success before the drift (trials within ``--pre-s``), after it (trials starting after the first
    period of drift) and in the last third of the block, each with its trial count; ``ratio``:
    after ÷ before; ``windows``: success per ``--period-s`` window (trials that start and end in it)."""

    def within(lo: float, hi: float) -> dict:
        m = summarise([t for t in trials if lo <= t["start_s"] and t["end_s"] <= hi])
        keys = ("success_rate", "n_trials", "median_time_to_target_s")
        return {k: m.get(k) for k in keys}

    before = within(0.0, args.pre_s)
    after = within(args.pre_s + args.period_s, args.drift_s)
    last = within(args.drift_s * 2 / 3, args.drift_s)
    ratio = (
        after["success_rate"] / before["success_rate"]
        if before["success_rate"] and after["success_rate"] is not None
        else None
    )
    windows = [
        {"start_s": float(lo), **within(float(lo), float(lo + args.period_s))}
        for lo in np.arange(0.0, args.drift_s, args.period_s)
    ]
    return {"before": before, "after": after, "last_third": last, "ratio": ratio, "windows": windows}


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


# ============================================================================ aggregation and report
def _ms(values: list) -> tuple[float | None, float | None]:
    """(mean, sd) of the non-None values (sd 0 for one value)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _pm(values: list, p: int = 2) -> str:
    m, s = _ms(values)
    return "–" if m is None else f"{m:.{p}f} ± {s:.{p}f}"


def _f(x, p: int = 2) -> str:
    return "–" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))


def _groups(rows: list[dict], *keys: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def md_decoders(rows: list[dict]) -> list[str]:
    L = [
        "## Decoders side by side (center-out, the same seeds)",
        "",
        "Mean ± sd over seeds (each seed: its own participant noise, observation block and targets).",
        "",
        "| decoder | block | seeds | success | median time to target (s) | path eff. | bitrate (bits/s) "
        "| trials | bins lost |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (dec, name), g in _groups(rows, "decoder", "name").items():
        L.append(
            f"| {dec} | {name} | {len(g)} | {_pm([r['success_rate'] for r in g])} | "
            f"{_pm([r['median_time_to_target_s'] for r in g])} | {_pm([r['median_path_efficiency'] for r in g])} | "
            f"{_pm([r['bitrate_bps'] for r in g])} | {sum(r['n_trials'] for r in g)} | "
            f"{sum(r['bins_lost'] for r in g)} |"
        )
    L += [
        "",
        "Per seed:",
        "",
        "| seed | decoder | block | success | trials | time to target (s) | dial-in (s) | bitrate | bins lost "
        "| loop overruns |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r.get("seed", 0), r["decoder"])):
        L.append(
            f"| {r.get('seed', 0)} | {r['decoder']} | {r['name']} | {_f(r['success_rate'])} | {r['n_trials']} | "
            f"{_f(r['median_time_to_target_s'])} | {_f(r['median_dial_in_s'])} | {_f(r['bitrate_bps'])} | "
            f"{r['bins_lost']} | {r['loop_overruns']} |"
        )
    return L + [""]


def md_latency(rows: list[dict]) -> list[str]:
    L = [
        "## Injected latency",
        "",
        "| decoder | extra latency (ms) | seeds | success | time to target (s) | bitrate (bits/s) | trials "
        "| bins lost | fit (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (dec, ms), g in _groups(rows, "decoder", "extra_latency_ms").items():
        L.append(
            f"| {dec} | {ms:g} | {len(g)} | {_pm([r['success_rate'] for r in g])} | "
            f"{_pm([r['median_time_to_target_s'] for r in g])} | {_pm([r['bitrate_bps'] for r in g])} | "
            f"{sum(r['n_trials'] for r in g)} | {sum(r['bins_lost'] for r in g)} | "
            f"{_pm([r.get('fit_s') for r in g], 0)} |"
        )
    return L + [""]


def md_labels(rows: list[dict]) -> list[str]:
    L = [
        "## Recalibration labels",
        "",
        "| decoder | labels | seeds | success | time to target (s) | bitrate |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (dec, kind), g in _groups(rows, "decoder", "labels").items():
        L.append(
            f"| {dec} | {kind} | {len(g)} | {_pm([r['success_rate'] for r in g])} | "
            f"{_pm([r['median_time_to_target_s'] for r in g])} | {_pm([r['bitrate_bps'] for r in g])} |"
        )
    return L + [""]


def md_steps(rows: list[dict]) -> list[str]:
    L = [
        "## Recalibration budget (`calibration.max_steps`), ReFIT labels of one block uploaded",
        "",
        "| max_steps | seeds | success after | candidate holdout R² | live holdout R² | went live "
        "| POST→live, server (s) | finetuning (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (ms,), g in _groups(rows, "max_steps").items():
        cal = [r.get("calibration") or {} for r in g]
        tim = [c.get("timings") or {} for c in cal]
        L.append(
            f"| {ms if ms is not None else 'none (block 1)'} | {len(g)} | {_pm([r['success_rate'] for r in g])} | "
            f"{_pm([c.get('candidate_holdout_r2') for c in cal], 3)} | {_pm([c.get('live_holdout_r2') for c in cal], 3)} "
            f"| {sum(c.get('state') == 'succeeded' for c in cal) if ms is not None else '–'} | "
            f"{_pm([t.get('total_s') for t in tim], 1)} | {_pm([t.get('finetuning_s') for t in tim], 1)} |"
        )
    return L + [""]


def md_drift(d: dict) -> list[str]:
    src = "Spike days" if d["rate_drift"]["source"] != "fallback" else "fallback"
    L = [
        "## Drift and recovery",
        "",
        f"One {d['drift_s']:g} s real-time block per seed and arm: {d['pre_s']:g} s on the fitted encoding, then a step "
        f"of drift every {d['chunk_s']:g} s, reaching by the end: rotation {d['rotation_total_deg']:g}°, rates a random "
        f"walk to log-rate σ {d['rate_drift']['log_rate_sigma']:.3f} ({src}), {d['lost_total']:.0%} of channels lost and "
        f"{d['gained_total']:.0%} gained.  Arm recal: `POST /calibrate source=recent labels=refit` from the last "
        f"{d['recal_s']:g} s of ReFIT labels every {d['period_s']:g} s from the start of the drift.  *After*: trials "
        f"starting after the first {d['period_s']:g} s of drift; *last third*: the most drifted part.",
        "",
        *T.closedloop_drift({"drift": d}),
    ]
    runs = d.get("runs", [])
    L += [
        "",
        "Per seed:",
        "",
        "| arm | seed | before | after | ratio | last third | windows |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]

    for r in runs:
        w = " ".join(_f(x["success_rate"]) for x in r["windows"])
        L.append(
            f"| {r['arm']} | {r['seed']} | {_f(r['before']['success_rate'])} | {_f(r['after']['success_rate'])} | "
            f"{_f(r['ratio'])} | {_f(r['last_third']['success_rate'])} | {w} |"
        )
    lost = sum(r["summary"]["bins_lost"] for r in runs)
    bins = sum(r["summary"]["bins"] for r in runs)
    lags = [x for r in runs for x in r.get("swap_lag", [])]
    late = sum(x["around_max_ms"] > BIN_S * 1e3 for x in lags)
    worst = max((x["around_max_ms"] for x in lags), default=float("nan"))
    p99 = max((x["block_p99_ms"] for x in lags if x.get("block_p99_ms") is not None), default=float("nan"))
    L += [
        "",
        f"Bins lost over all runs: {lost} of {bins}.  Swaps: {len(lags)}; the largest receive lag within ± 25 bins "
        f"of a swap: {worst:.1f} ms (the blocks' p99 up to {p99:.1f} ms); swaps with a prediction later than one "
        f"bin ({BIN_S * 1e3:g} ms) around them: {late}.",
        "",
    ]
    return L


def write_markdown(path: Path, res: dict) -> None:
    m = res["meta"]
    L = [
        f"# Closed-loop benchmark ({m['when']})",
        "",
        f"Measured under load on a shared 2-core host (load average at start {m['load_start']}, at end "
        f"{m.get('load_end')}); real-time 20 ms bins through the real daemon; seeds {m['seeds']}. "
        "Written by bench/bench_closedloop.py.",
        "",
    ]
    for key, fn in (
        ("decoders", md_decoders),
        ("labels", md_labels),
        ("steps", md_steps),
        ("latency", md_latency),
    ):
        if res.get(key):
            L += fn(res[key])
    if (res.get("drift") or {}).get("runs"):
        L += md_drift(res["drift"])
    path.write_text("\n".join(L))


def _plot_decoders(ax, rows: list[dict]) -> None:
    g = _groups(rows, "decoder", "name")
    keys = list(g)
    means = [_ms([r["success_rate"] for r in g[k]]) for k in keys]
    ax.bar(range(len(keys)), [m or 0 for m, _ in means], yerr=[s or 0 for _, s in means], color="tab:blue")
    ax.set_xticks(range(len(keys)), [f"{d}\n{n.split('-')[0]}" for d, n in keys], fontsize=7)
    for i, k in enumerate(keys):
        b = _ms([r["bitrate_bps"] for r in g[k]])[0] or 0
        ax.text(i, (means[i][0] or 0) + 0.03, f"{b:.2f} b/s", ha="center", fontsize=7)
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("success rate (mean ± sd over seeds)")
    ax.set_title("decoders (bar label: Fitts bitrate)")


def _plot_latency(ax, rows: list[dict]) -> None:
    for dec, g in _groups(rows, "decoder").items():
        by = _groups(g, "extra_latency_ms")
        xs = sorted(k[0] for k in by)
        ax.plot(xs, [_ms([r["bitrate_bps"] for r in by[(x,)]])[0] or 0 for x in xs], "o-", label=f"{dec[0]}")
    ax.set_xlabel("extra latency (ms)")
    ax.set_ylabel("bitrate (bits/s, mean over seeds)")
    if rows:
        ax.legend(fontsize=7)
    ax.set_title("injected latency")


def _plot_drift(ax, d: dict) -> None:
    runs = d.get("runs", [])
    for arm in sorted({r["arm"] for r in runs}):
        ar = [r for r in runs if r["arm"] == arm]
        xs = [w["start_s"] + d["period_s"] / 2 for w in ar[0]["windows"]]
        ys = [_ms([r["windows"][i]["success_rate"] for r in ar]) for i in range(len(xs))]
        ax.errorbar(
            xs,
            [m if m is not None else np.nan for m, _ in ys],
            yerr=[s or 0 for _, s in ys],
            fmt="o-",
            label=arm,
        )
    if runs:
        ax.axvline(d["pre_s"], color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7)
    ax.set_xlabel("time in block (s); drift starts at the dotted line")
    ax.set_ylabel("success rate per window")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("drift: none vs periodic ReFIT recalibration")


def plot(path: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    _plot_decoders(ax[0], res.get("decoders") or [])
    _plot_latency(ax[1], res.get("latency") or [])
    _plot_drift(ax[2], res.get("drift") or {})
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ============================================================================ command line
SECTIONS = {
    "decoders": section_decoders,
    "latency": section_latency,
    "labels": section_labels,
    "steps": section_steps,
    "drift": section_drift,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--sections", default="decoders,drift,latency,labels,steps")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--decoders", default="wiener,kalman,gru,rpnt")
    p.add_argument("--latency-decoders", default="kalman,rpnt,rpnt:paper")
    p.add_argument("--label-decoders", default="kalman,rpnt")
    p.add_argument("--latencies", default="0,20,50,100,200")
    p.add_argument("--drift-decoder", default="rpnt")
    p.add_argument("--drift-arms", default=",".join(DRIFT_ARMS))
    p.add_argument("--max-steps", default="16,50,150", help="section steps: calibration.max_steps values")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--latency-s", type=float, default=40.0)
    p.add_argument("--drift-s", type=float, default=400.0, help="section drift: the block's length")
    p.add_argument("--pre-s", type=float, default=40.0, help="section drift: seconds before the drift starts")
    p.add_argument("--chunk-s", type=float, default=5.0, help="section drift: seconds per drift step")
    p.add_argument(
        "--period-s", type=float, default=20.0, help="section drift: seconds between recalibrations"
    )
    p.add_argument(
        "--recal-s", type=float, default=40.0, help="section drift: seconds of labels per recalibration"
    )
    p.add_argument("--preset", default="small")
    p.add_argument("--paper-epochs", type=int, default=10)
    p.add_argument("--paper-steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "closedloop.json")
    p.add_argument(
        "--merge", default=None, help="comma-separated result JSONs to combine into --out (no runs)"
    )
    a = p.parse_args(argv)
    a.seeds = [int(x) for x in a.seeds.split(",")]
    for name in ("decoders", "latency_decoders", "label_decoders", "drift_arms", "sections"):
        setattr(a, name, getattr(a, name).split(","))
    a.latencies = [float(x) for x in a.latencies.split(",")]
    a.max_steps = [int(x) for x in a.max_steps.split(",")]
    a.serve_env = None
    return a


def merge(paths: list[Path]) -> dict:
    """The result files' rows in one (list sections concatenated, drift runs concatenated)."""
    out: dict = {}
    metas = []
    for p in paths:
        r = json.loads(Path(p).read_text())
        metas.append(r.get("meta", {}))
        for k, v in r.items():
            if k == "drift":
                d = out.setdefault("drift", {kk: vv for kk, vv in v.items() if kk != "runs"} | {"runs": []})
                d["runs"] += v.get("runs", [])
            elif isinstance(v, list):
                out.setdefault(k, []).extend(v)
    out["meta"] = {
        "when": max(m.get("when", "") for m in metas),
        "merged_from": [str(p) for p in paths],
        "seeds": sorted({s for m in metas for s in m.get("seeds", [])}),
        "load_start": [m.get("load_start") for m in metas],
        "load_end": [m.get("load_end") for m in metas],
        "parts": metas,
    }
    return out


def save_results(out: Path, res: dict) -> None:
    clean = {k: v for k, v in res.items() if not k.startswith("_")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(clean, indent=1, default=str))
    write_markdown(out.with_suffix(".md"), clean)
    with contextlib.suppress(ImportError):
        plot(out.with_suffix(".png"), clean)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        save_results(args.out, merge([Path(x) for x in args.merge.split(",")]))
        return 0
    if args.workdir is None:
        raise SystemExit("bench_closedloop: --workdir is required (unless --merge)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "meta": {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "load_start": [round(x, 2) for x in os.getloadavg()],
            "seeds": args.seeds,
            "note": "measured under load on a shared 2-core host; real time, so a loaded host shows as "
            "loop overruns and receive lag",
            "argv": sys.argv[1:] if argv is None else argv,
        }
    }

    def save() -> None:
        res["meta"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
        save_results(args.out, res)

    for name in args.sections:
        log(f"[bench] section {name}")
        SECTIONS[name](args, res, save)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
