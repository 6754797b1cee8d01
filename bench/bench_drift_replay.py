"""Drift recalibration recipes, compared in the synchronous closed loop (issue 17, item 5).

    python bench/bench_drift_replay.py                     # 4 arms × seeds 0,1,2, ≈ 15 min on one core

The same participant, observation block, initial RPNT (small, from scratch) and drift path as the
``drift`` section of ``bench_closedloop.py`` (:func:`bench_closedloop.drift_path`), but the loop is
:meth:`ClosedLoop.simulate`: the decoder (:class:`~rpnt_core.model.TorchDecoder`) is called in this
thread, each prediction moves the cursor in its own bin, and the clock stops while a
recalibration trains.  It ranks recipes quickly and without load noise; the live figures are
``bench_closedloop.py``'s.  Every ``--period-s`` from the start of the drift, a recalibration runs
the calibration worker's own steps on the last ``--recal-s`` seconds of ReFIT labels
(:func:`service.calibration_worker.job_session`, ``holdout_score`` of the live model and
``fit_candidate`` from its checkpoint; the service's gate, :func:`service.calibration.passes_gate`),
and the candidate is warmed on the last 60 bins before it decodes.  Arms:

- ``none``: the first decoder throughout;
- ``kept-speed``: ReFIT labels as the rule gives them (the decoded speed kept: a ``recorded`` job);
- ``head-scale``: the service's recipe for ``labels=refit`` — labels on the live head's scale;
- ``head-scale-core1``: the same with the kept head's core at 1× the learning rate instead of the
  rule's 0.1× (``rpnt_core.train.finetune.KEPT_HEAD_CORE_LR_SCALE`` set for the run).

Success before the drift, after it (trials starting after the first period of drift), in the last
third, and after ÷ before, per seed; JSON to ``--out`` (default
bench/results/closedloop-drift-replay.json) with a Markdown table beside it.
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

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_closedloop import _f, _pm, drift_metrics, drift_path, spike_days_rate_drift  # noqa: E402

ARMS = ("none", "kept-speed", "head-scale", "head-scale-core1")
BIN_S = 0.02


def initial_checkpoint(spec, enc, work: Path) -> Path:
    """The checkpoint of the RPNT ``fit_initial`` trains for ``spec`` (cached in ``work``)."""
    from streaming.closedloop.session import fit_initial

    fit_initial(spec, enc, workdir=work, log=lambda *a: None)
    return work / "initial" / "checkpoint.safetensors"


class Recalibrating:
    """The decoder contract over the live checkpoint; at the schedule's bins it moves the encoding
    one drift step and (arms other than ``none``) recalibrates, as the service would."""

    def __init__(self, *, loop, arm: str, start: Path, path: list, args, work: Path) -> None:
        from rpnt_core import load_checkpoint
        from rpnt_core.model.torch_decoder import TorchDecoder

        self.loop, self.arm, self.live, self.path, self.args, self.work = loop, arm, start, path, args, work
        self.decoder = TorchDecoder(load_checkpoint(start))
        self.info = self.decoder.info
        self.k, self.jobs = 0, []
        self.pre, self.chunk, self.period = (
            int(round(x / BIN_S)) for x in (args.pre_s, args.chunk_s, args.period_s)
        )

    def reset(self) -> None:
        self.decoder.reset()

    def step(self, counts: np.ndarray) -> np.ndarray:
        k, self.k = self.k, self.k + 1
        v = self.decoder.step(counts)
        if k >= self.pre and (k - self.pre) % self.chunk == 0:
            i = (k - self.pre) // self.chunk + 1
            if i < len(self.path):
                self.loop.set_encoding(self.path[i])
        if self.arm != "none" and k > self.pre and (k - self.pre) % self.period == 0:
            self.recalibrate(k)
        return v

    def recalibrate(self, k: int) -> None:
        from rpnt_core import load_checkpoint
        from rpnt_core.data import Session
        from rpnt_core.model.torch_decoder import TorchDecoder
        from service.calibration import passes_gate
        from service.calibration_worker import fit_candidate, holdout_score, job_session, save_candidate
        from service.settings import CalibrationSettings
        from streaming.closedloop.session import labels_of

        counts, labels = labels_of(self.loop, "refit", max(0, k - int(round(self.args.recal_s / BIN_S))), k)
        session = Session(
            counts=counts.astype(np.int32),
            bin_s=BIN_S,
            velocity=labels.astype(np.float32),
            subject="closedloop-sim",
            session=f"bin{k}",
            source="bench_drift_replay",
        )
        opt = CalibrationSettings()
        live = load_checkpoint(self.live)
        intention = "refit" if self.arm.startswith("head-scale") else "recorded"
        session, splits, _ = job_session(session, live, opt, labels=intention)
        live_r2 = holdout_score(live, session, splits.test)["r2"]
        model, fit, fo, cand = fit_candidate(session, splits, base=self.live, opt=opt)
        live_now = passes_gate(cand["r2"], live_r2)
        self.jobs.append(
            {"at_s": round(k * BIN_S, 2), "live_r2": live_r2, "candidate_r2": cand["r2"], "live": live_now}
        )
        if live_now:
            d = self.work / f"{self.arm}-bin{k}"
            d.mkdir(parents=True, exist_ok=True)
            self.live = save_candidate(
                d, model, fit=fit, holdout=cand, session=session, splits=splits, options=fo
            )
            self.decoder = TorchDecoder(load_checkpoint(self.live))
            for b in range(max(0, k - 60), k + 1):  # warmed on the stream's history, as the daemon does
                self.decoder.step(self.loop.record.counts[b])


def run(arm: str, seed: int, args, rate_sigma: float) -> dict:
    import rpnt_core.train.finetune as ft
    from streaming.closedloop.runner import ClosedLoop, LoopConfig
    from streaming.closedloop.session import ClosedLoopSpec, make_participant

    spec = ClosedLoopSpec(seed=seed)
    enc = make_participant(spec)
    n_steps = int(round((args.drift_s - args.pre_s) / args.chunk_s))
    path = drift_path(enc, n_steps + 1, rate_sigma, seed + 11)
    work = args.workdir / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    start = initial_checkpoint(spec, enc, work)
    kept = ft.KEPT_HEAD_CORE_LR_SCALE
    ft.KEPT_HEAD_CORE_LR_SCALE = 1.0 if arm == "head-scale-core1" else kept
    try:
        cfg = LoopConfig(seconds=args.drift_s, bin_s=BIN_S, seed=seed + 3, labels=None)
        loop = ClosedLoop(
            ingest="", publish="", encoding=enc, task=spec.task, controller=spec.controller, config=cfg
        )
        dec = Recalibrating(loop=loop, arm=arm, start=start, path=path, args=args, work=work)
        t0 = time.perf_counter()
        loop.simulate(dec)
    finally:
        ft.KEPT_HEAD_CORE_LR_SCALE = kept
    return {
        "arm": arm,
        "seed": seed,
        **drift_metrics(loop.trial_rows(), args),
        "recalibrations": dec.jobs,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def write_markdown(path: Path, res: dict) -> None:
    runs = res["runs"]
    L = [
        f"# Drift recalibration recipes, synchronous replay ({res['meta']['when']})",
        "",
        f"Written by bench/bench_drift_replay.py; {res['drift_s']:g} s block, drift from {res['pre_s']:g} s, "
        f"recalibration every {res['period_s']:g} s from the last {res['recal_s']:g} s of ReFIT labels; the decoder "
        "is called in-thread and the clock stops while a recalibration trains (a ranking, not a live figure).",
        "",
        "| arm | seeds | success before | after | after ÷ before | last third | time to target after s | "
        "recalibrations live / run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    for arm in ARMS:
        ar = [r for r in runs if r["arm"] == arm]
        if not ar:
            continue
        jobs = [j for r in ar for j in r["recalibrations"]]
        live = f"{sum(j['live'] for j in jobs)} / {len(jobs)}" if jobs else "–"
        L.append(
            f"| {arm} | {len(ar)} | {_pm([r['before']['success_rate'] for r in ar])} | "
            f"{_pm([r['after']['success_rate'] for r in ar])} | {_pm([r['ratio'] for r in ar])} | "
            f"{_pm([r['last_third']['success_rate'] for r in ar])} | "
            f"{_pm([r['after']['median_time_to_target_s'] for r in ar])} | "
            f"{live} |"
        )
    L += ["", "| arm | seed | after ÷ before | trials after |", "|---|---:|---:|---:|"]
    L += [f"| {r['arm']} | {r['seed']} | {_f(r['ratio'])} | {r['after']['n_trials']} |" for r in runs]
    path.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--drift-s", type=float, default=400.0)
    p.add_argument("--pre-s", type=float, default=40.0)
    p.add_argument("--chunk-s", type=float, default=5.0)
    p.add_argument("--period-s", type=float, default=20.0)
    p.add_argument("--recal-s", type=float, default=40.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rpnt-drift-replay"))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "closedloop-drift-replay.json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    drift = spike_days_rate_drift()
    res = {
        "meta": {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "load_start": [round(x, 2) for x in os.getloadavg()],
            "argv": sys.argv[1:] if argv is None else argv,
        },
        "rate_drift": drift,
        **{k: getattr(args, k) for k in ("drift_s", "pre_s", "chunk_s", "period_s", "recal_s")},
        "runs": [],
    }
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in args.arms.split(","):
            r = run(arm, seed, args, drift["log_rate_sigma"])
            print(f"[drift-replay] seed {seed} {arm}: after ÷ before {r['ratio']}", flush=True)
            res["runs"].append(r)
            res["meta"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1, default=str))
            write_markdown(args.out.with_suffix(".md"), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
