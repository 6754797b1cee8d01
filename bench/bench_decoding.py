"""Decoding benchmark (issue: RPNT core): R² on every real session and a synthetic held-out subject.

One command, one run:

    python bench/bench_decoding.py --out bench/results/decoding.json

For each target session, on the same contiguous splits (train = first 20 %, validation = 70–80 %,
test = last 20 %), it reports test R² (pooled, variance-weighted, streamed causally from bin 0) for

- the classic baselines: causal Wiener filter (ridge, 10 lags), Kalman filter, causal GRU;
- RPNT trained from scratch on the 20 % split;
- RPNT pretrained (self-supervised, no labels) on the *other* sessions — the other real
  recording, synthetic sessions at the same bin width — plus the target's own training bins
  (never its validation/test bins), then few-shot finetuned (FS-SFT) on the 20 % split, once with
  channel resampling to a fixed width and once with a per-session read-in.

It prints a table and writes JSON (``--out``) and Markdown (same path, ``.md``).  Real data is
read from ../shared/data and skipped when absent.  Timing figures are wall-clock seconds on this
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
REAL = {"stevenson": DATA / "stevenson2011_m1_centerout" / "StevensonV2.mat",
        "contdata95": DATA / "contdata95_bme517" / "contdata95.mat"}


def recipe(quick: bool) -> dict:
    """The RPNT recipe used for every target (the same for scratch and pretrained)."""
    if quick:
        return dict(pre_epochs=2, pre_steps=10, ft_epochs=3, ft_steps=5, patience=3)
    return dict(pre_epochs=12, pre_steps=50, ft_epochs=40, ft_steps=20, patience=8)


MODEL: tuple = ()  # the small preset as it is


def targets(seed: int, quick: bool):
    from rpnt_core.data import SimulationSpec, load_session, simulate_sessions

    real = {k: load_session(p) for k, p in REAL.items() if p.exists()}
    out = []
    for name, sess in real.items():
        others = [s for k, s in real.items() if k != name]
        sims = simulate_sessions(SimulationSpec(n_subjects=3, sessions_per_subject=2, bin_s=float(sess.bin_s),
                                                bins_per_session=(3000, 4000), n_multisite_subjects=0), seed=seed)
        out.append((name, sess, others + sims))
    sims = simulate_sessions(SimulationSpec(n_subjects=4, sessions_per_subject=3, n_multisite_subjects=1), seed=seed)
    held = sims[0].subject
    target = max((s for s in sims if s.subject == held), key=lambda s: s.n_bins)
    out.append((f"synthetic-heldout-{held}", target, [s for s in sims if s.subject != held]))
    if quick:
        out = [(n, t.slice_bins(0, min(t.n_bins, 3000)), p[:2]) for n, t, p in out]
    return out


def run(args) -> dict:
    from rpnt_core.data import contiguous_splits
    from rpnt_core.evaluate.harness import evaluate_baseline
    from rpnt_core.train.finetune import FinetuneOptions, finetune
    from rpnt_core.train.pretrain import PretrainOptions, pretrain

    torch.set_num_threads(args.threads)
    rc = recipe(args.quick)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, target, pool in targets(args.seed, args.quick):
        splits = contiguous_splits(target.n_bins, train_fraction=args.train_fraction)
        print(f"\n== {name}: {target.n_bins} bins × {target.n_channels} channels, {target.bin_s * 1e3:.0f} ms, "
              f"splits {splits.as_dict()}", flush=True)

        def record(decoder: str, r2: float, per_dim, seconds: float, **extra):
            rows.append({"session": name, "decoder": decoder, "test_r2": r2, "r2_per_dim": per_dim,
                         "seconds": round(seconds, 1), **extra})
            print(f"  {decoder:<34} R² {r2:.4f}  ({seconds:.0f} s)", flush=True)

        for b in args.baselines:
            t = time.time()
            r = evaluate_baseline(b, target, splits, seed=args.seed)
            record(f"baseline: {b}", r["r2"], r["r2_per_dim"], time.time() - t)
        ft = dict(epochs=rc["ft_epochs"], steps_per_epoch=rc["ft_steps"], patience=rc["patience"], lr=1e-3,
                  train_fraction=args.train_fraction, seed=args.seed, device="cpu", progress=False,
                  config_overrides=MODEL)
        t = time.time()
        r = finetune(target, init=None, options=FinetuneOptions(**ft), out=None, splits=splits)
        record("RPNT from scratch", r["test_r2"], r["test_r2_per_dim"], time.time() - t, val_r2=r["val_r2"])
        unlabelled = replace(target.slice_bins(*splits.train), velocity=None, position=None)
        for channels in args.channels:
            t = time.time()
            pre_path = work / f"{name}-{channels}-pre.safetensors"
            for stale in (pre_path, pre_path.with_suffix(".log.jsonl"), pre_path.with_suffix(".resume.safetensors")):
                stale.unlink(missing_ok=True)
            pre = pretrain(pool + [unlabelled], options=PretrainOptions(
                epochs=rc["pre_epochs"], steps_per_epoch=rc["pre_steps"], channels=channels, seed=args.seed,
                device="cpu", progress=False, config_overrides=MODEL), out=pre_path)
            t_pre = time.time() - t
            t = time.time()
            r = finetune(target, init=pre_path, options=FinetuneOptions(**ft, channels=channels), out=None,
                         splits=splits)
            record(f"RPNT pretrained + FS-SFT ({channels})", r["test_r2"], r["test_r2_per_dim"], time.time() - t,
                   val_r2=r["val_r2"], pretrain_seconds=round(t_pre, 1), pretrain_val_nll=pre["best_val_loss"])
    return {"benchmark": "decoding", "train_fraction": args.train_fraction, "seed": args.seed, "recipe": rc,
            "model_overrides": dict(MODEL), "quick": args.quick, "rows": rows,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "threads": args.threads},
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def markdown(result: dict) -> str:
    decoders = list(dict.fromkeys(r["decoder"] for r in result["rows"]))
    sessions = list(dict.fromkeys(r["session"] for r in result["rows"]))
    cell = {(r["session"], r["decoder"]): r["test_r2"] for r in result["rows"]}
    lines = ["| decoder | " + " | ".join(sessions) + " |", "|---|" + "---:|" * len(sessions)]
    for d in decoders:
        vals = [cell.get((s, d)) for s in sessions]
        lines.append(f"| {d} | " + " | ".join("" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/decoding.json")
    p.add_argument("--workdir", default="/tmp/rpnt-bench-decoding")
    p.add_argument("--train-fraction", type=float, default=0.2)
    p.add_argument("--baselines", default="wiener,kalman,gru")
    p.add_argument("--channels", default="resample,readin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny budgets, for checking the script runs")
    a = p.parse_args(argv)
    a.baselines = [x for x in a.baselines.split(",") if x]
    a.channels = [x for x in a.channels.split(",") if x]
    result = run(a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    md = markdown(result)
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
