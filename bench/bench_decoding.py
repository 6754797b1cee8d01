"""Decoding benchmark (issue: RPNT core): R² on every real session and a synthetic held-out subject.

One command, one run:

    python bench/bench_decoding.py --jobs 2 --seeds 0,1,2   # ≈ 33 min per seed on 2 cores

(``--reuse earlier.json`` takes the (seed, target) cells an earlier run of the same recipe
already measured instead of rerunning them; see :func:`reusable` for how exactly they reproduce.)

Targets: each real session in ../shared/data, and a synthetic held-out subject twice — its
longest simulated session (57 s at 20 ms) and the same subject recorded for 10 minutes — each
with a pretraining pool of other subjects (plus, below, the target's own unlabelled training
bins).  For each target session, on the same contiguous splits (train = first 20 %,
validation = 70–80 %, test = last 20 %), it reports test R² (pooled, variance-weighted, streamed causally from bin 0) for

- the classic baselines: causal Wiener filter (ridge, 10 lags), Kalman filter, causal GRU;
- RPNT trained from scratch on the 20 % split;
- RPNT pretrained (self-supervised, no labels) on the *other* sessions — the other real
  recording, synthetic sessions at the same bin width — plus the target's own training bins
  (never its validation/test bins), then few-shot finetuned (FS-SFT) on the 20 % split, once with
  channel resampling to a fixed width and once with a per-session read-in.

Why pretraining does or does not help is measured alongside (``probes`` in the JSON): the test
R² of a causal linear read-out (:func:`rpnt_core.evaluate.probe.linear_probe_r2`, 5 lags) from
sqrt(counts), from a randomly initialised encoder's latent and from each pretrained encoder's
latent (the target met through its pretraining read-in/channel map); each pretraining run's
validation Poisson NLL next to that of a predictor that knows only every channel's mean rate
(``pretrain_val_nll`` vs ``pretrain_val_nll_mean_rate``); and how well the pretrained model
forecasts the target's hidden test bins from their visible past, as an NLL gain over the
target's mean rates (``target_forecast_gain``, :func:`rpnt_core.evaluate.forecast.forecast_gain`:
0 = it has learned nothing about the target's dynamics).

Every cell runs once per training seed (``--seeds``): model initialisation, batches, masks and the
GRU differ between seeds, the data do not (the synthetic sessions come from ``--data-seed``).  The
tables give the mean over seeds and each seed's value, so a gap can be read against the
seed-to-seed spread; JSON rows carry their ``seed``.

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
REAL = {
    "stevenson": DATA / "stevenson2011_m1_centerout" / "StevensonV2.mat",
    "contdata95": DATA / "contdata95_bme517" / "contdata95.mat",
}


def recipe(quick: bool) -> dict:
    """The RPNT recipe used for every target (the same for scratch and pretrained)."""
    budget = (
        dict(pre_epochs=2, pre_steps=10, ft_epochs=3, ft_steps=5, patience=3)
        if quick
        else dict(pre_epochs=12, pre_steps=50, ft_epochs=40, ft_steps=20, patience=8)
    )
    # target_share: the target's unlabelled training bins get a quarter of the pretraining batches
    # (by length they were ≈ 6 % of Stevenson's pool, too few for its read-in to learn anything).
    return dict(**budget, target_share=0.25)


MODEL: tuple = ()  # the small preset as it is


def targets(seed: int, quick: bool):
    from rpnt_core.data import SimulationSpec, load_session, simulate_sessions

    real = {k: load_session(p) for k, p in REAL.items() if p.exists()}
    out = []
    for name, sess in real.items():
        others = [s for k, s in real.items() if k != name]
        sims = simulate_sessions(
            SimulationSpec(
                n_subjects=3,
                sessions_per_subject=2,
                bin_s=float(sess.bin_s),
                bins_per_session=(3000, 4000),
                n_multisite_subjects=0,
            ),
            seed=seed,
        )
        out.append((name, sess, others + sims))
    sims = simulate_sessions(
        SimulationSpec(n_subjects=4, sessions_per_subject=3, n_multisite_subjects=1), seed=seed
    )
    held = sims[0].subject
    target = max((s for s in sims if s.subject == held), key=lambda s: s.n_bins)
    others = [s for s in sims if s.subject != held]
    out.append((f"synthetic-heldout-{held}", target, others))
    # The same held-out subject recorded for 10 minutes (the real sessions are 13 and 26 min), same
    # pretraining pool: its 20 % split is 2 min of calibration and its test split 2 min, not 11 s.
    long = simulate_sessions(
        SimulationSpec(
            n_subjects=1, sessions_per_subject=1, bins_per_session=(30000, 30000), n_multisite_subjects=0
        ),
        seed=seed,
    )[0]
    out.append((f"synthetic-heldout-{held}-10min", long, others))
    if quick:
        out = [(n, t.slice_bins(0, min(t.n_bins, 3000)), p[:2]) for n, t, p in out]
    return out


def probe(model, session, splits) -> float:
    """Causal linear read-out R² of velocity from the model's latent (see the module docstring)."""
    from rpnt_core.evaluate.harness import predict_session
    from rpnt_core.evaluate.probe import linear_probe_r2

    model.eval()
    return linear_probe_r2(predict_session(model, session, output="latent"), session.velocity, splits)[
        "test_r2"
    ]


def run_target(args, index: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Every decoder on target ``index`` of :func:`targets` (rebuilt here: deterministic), training seed ``seed``."""
    from rpnt_core.data import contiguous_splits
    from rpnt_core.evaluate.forecast import forecast_gain
    from rpnt_core.evaluate.harness import evaluate_baseline
    from rpnt_core.evaluate.probe import linear_probe_r2
    from rpnt_core.train.finetune import FinetuneOptions, build_model, finetune
    from rpnt_core.train.pretrain import PretrainOptions, pretrain

    torch.set_num_threads(args.threads)
    rc = recipe(args.quick)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows, probes = [], []
    name, target, pool = targets(args.data_seed, args.quick)[index]
    splits = contiguous_splits(target.n_bins, train_fraction=args.train_fraction)
    print(
        f"\n== {name} (seed {seed}): {target.n_bins} bins × {target.n_channels} channels, {target.bin_s * 1e3:.0f} ms, "
        f"splits {splits.as_dict()}",
        flush=True,
    )

    def record(decoder: str, r2: float, per_dim, seconds: float, **extra):
        rows.append(
            {
                "session": name,
                "decoder": decoder,
                "seed": seed,
                "test_r2": r2,
                "r2_per_dim": per_dim,
                "seconds": round(seconds, 1),
                **extra,
            }
        )
        print(f"  {name} (seed {seed}): {decoder:<34} R² {r2:.4f}  ({seconds:.0f} s)", flush=True)

    for b in args.baselines:
        t = time.time()
        r = evaluate_baseline(b, target, splits, seed=seed)
        record(f"baseline: {b}", r["r2"], r["r2_per_dim"], time.time() - t)
    ft = dict(
        epochs=rc["ft_epochs"],
        steps_per_epoch=rc["ft_steps"],
        patience=rc["patience"],
        lr=1e-3,
        train_fraction=args.train_fraction,
        seed=seed,
        device="cpu",
        progress=False,
        config_overrides=MODEL,
    )
    probes.append(
        {
            "session": name,
            "features": "sqrt counts",
            "seed": seed,
            "test_r2": linear_probe_r2(
                np.sqrt(np.asarray(target.counts, np.float64)), target.velocity, splits
            )["test_r2"],
        }
    )
    torch.manual_seed(seed)  # the random init must not depend on what this worker process ran before
    probes.append(
        {
            "session": name,
            "features": "random-init encoder latent",
            "seed": seed,
            "test_r2": probe(build_model(target, None, FinetuneOptions(**ft))[0], target, splits),
        }
    )
    t = time.time()
    r = finetune(target, init=None, options=FinetuneOptions(**ft), out=None, splits=splits)
    record("RPNT from scratch", r["test_r2"], r["test_r2_per_dim"], time.time() - t, val_r2=r["val_r2"])
    unlabelled = replace(target.slice_bins(*splits.train), velocity=None, position=None)
    for channels in args.channels:
        t = time.time()
        pre_path = work / f"{name}-{channels}-seed{seed}-pre.safetensors"
        for stale in (
            pre_path,
            pre_path.with_suffix(".log.jsonl"),
            pre_path.with_suffix(".resume.safetensors"),
        ):
            stale.unlink(missing_ok=True)
        pre = pretrain(
            pool + [unlabelled],
            options=PretrainOptions(
                epochs=rc["pre_epochs"],
                steps_per_epoch=rc["pre_steps"],
                channels=channels,
                seed=seed,
                target_share=rc["target_share"],
                device="cpu",
                progress=False,
                config_overrides=MODEL,
            ),
            out=pre_path,
        )
        t_pre = time.time() - t
        met = build_model(target, pre_path, FinetuneOptions(**ft, channels=channels))[
            0
        ]  # as finetuning meets it
        probes.append(
            {
                "session": name,
                "features": f"pretrained encoder latent ({channels})",
                "seed": seed,
                "test_r2": probe(met, target, splits),
            }
        )
        gain = forecast_gain(met, target, splits)["gain"]
        t = time.time()
        r = finetune(
            target, init=pre_path, options=FinetuneOptions(**ft, channels=channels), out=None, splits=splits
        )
        record(
            f"RPNT pretrained + FS-SFT ({channels})",
            r["test_r2"],
            r["test_r2_per_dim"],
            time.time() - t,
            val_r2=r["val_r2"],
            pretrain_seconds=round(t_pre, 1),
            pretrain_val_nll=pre["best_val_loss"],
            pretrain_val_nll_mean_rate=pre["val_loss_mean_rate"],
            target_forecast_gain=gain,
        )
    return rows, probes


def run_identity(args) -> dict:
    """What a cell's numbers depend on besides its seed; cells of runs that agree on it can be reused."""
    return {
        "recipe": recipe(args.quick),
        "train_fraction": args.train_fraction,
        "data_seed": args.data_seed,
        "model_overrides": dict(MODEL),
        "quick": args.quick,
    }


def reusable(args, paths: list[str]) -> dict[tuple[int, str], tuple[str, list[dict], list[dict]]]:
    """(seed, target) cells of earlier result files, each cell whole from one file: rows, probes.

    A file counts only if it was made with this run's recipe, split, data seed, model and
    budget (else SystemExit naming the difference).  A cell's numbers depend only on those and
    the seed — on one machine and install a rerun is identical; on another, float round-off
    amplified by training moved a rerun cell by ≤ 3e-4 R²
    (docs/experiments/2026-12-02-single-session-decoding.md), far below the seed-to-seed spread.  Its
    wall-clock ``seconds`` are the earlier run's."""
    here = run_identity(args)
    cells: dict[tuple[int, str], tuple[str, list[dict], list[dict]]] = {}
    for path in paths:
        try:
            old = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"--reuse {path}: cannot read it as a result file ({exc})") from None
        diff = [k for k in here if old.get(k) != here[k]]
        if diff:
            raise SystemExit(
                f"--reuse {path}: made with a different {', '.join(diff)}; rerun those cells instead"
            )
        for key in dict.fromkeys((r["seed"], r["session"]) for r in old["rows"]):
            cells.setdefault(
                key,
                (
                    path,
                    [r for r in old["rows"] if (r["seed"], r["session"]) == key],
                    [p for p in old.get("probes", []) if (p["seed"], p["session"]) == key],
                ),
            )
    return cells


def run(args) -> dict:
    """All (seed, target) pairs, ``args.jobs`` at a time (each in its own process with ``args.threads``
    threads); cells found in ``args.reuse`` files are taken from them."""
    names = [name for name, _, _ in targets(args.data_seed, args.quick)]
    unknown = set(args.only) - set(names)
    if unknown:
        raise SystemExit(f"--only: unknown targets {sorted(unknown)}; choose from {names}")
    cells = reusable(args, args.reuse)
    wanted = [
        (seed, i, name)
        for seed in args.seeds
        for i, name in enumerate(names)
        if not args.only or name in args.only
    ]
    units = [(args, i, seed) for seed, i, name in wanted if (seed, name) not in cells]
    if args.jobs > 1 and len(units) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as workers:
            fresh = iter(workers.starmap(run_target, units, chunksize=1))
    else:
        fresh = iter([run_target(*u) for u in units])
    parts, reused = [], []
    for seed, _, name in wanted:  # seed-major order, as if every cell had run here
        if (seed, name) in cells:
            path, rows, probes = cells[(seed, name)]
            parts.append((rows, probes))
            reused.append({"seed": seed, "session": name, "from": path})
        else:
            parts.append(next(fresh))
    rows = [r for part, _ in parts for r in part]
    probes = [p for _, part in parts for p in part]
    return {
        "benchmark": "decoding",
        **run_identity(args),
        "seeds": args.seeds,
        "reused": reused,
        "rows": rows,
        "probes": probes,
        "jobs": args.jobs,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _table(rows: list[dict], label: str, cell) -> list[str]:
    """Markdown table, one row per ``label`` value, one column per session; ``cell`` gets the
    seed-ordered list of that cell's rows."""
    names = list(dict.fromkeys(r[label] for r in rows))
    sessions = list(dict.fromkeys(r["session"] for r in rows))
    by: dict = {}
    for r in sorted(rows, key=lambda r: r.get("seed", 0)):
        by.setdefault((r["session"], r[label]), []).append(r)
    lines = [f"| {label} | " + " | ".join(sessions) + " |", "|---|" + "---:|" * len(sessions)]
    for n in names:
        lines.append(
            f"| {n} | " + " | ".join(cell(by[(s, n)]) if (s, n) in by else "" for s in sessions) + " |"
        )
    return lines


def mean_and_seeds(values: list[float], fmt: str = ".3f") -> str:
    """``0.799 (0.796 / 0.802)``: the mean over seeds, then each seed's value; one value alone."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.mean(values)), fmt)} ({' / '.join(format(v, fmt) for v in values)})"


def markdown(result: dict) -> str:
    seeds = result.get("seeds", [result.get("seed", 0)])
    lines = [f"Test R², mean over training seeds {', '.join(map(str, seeds))} (each seed in brackets):", ""]
    lines += _table(result["rows"], "decoder", lambda rs: mean_and_seeds([r["test_r2"] for r in rs]))
    if result.get("probes"):
        lines += ["", "Linear probe (causal ridge, 5 lags), test R²:", ""]
        lines += _table(result["probes"], "features", lambda rs: mean_and_seeds([r["test_r2"] for r in rs]))
    pre = [r for r in result["rows"] if r.get("pretrain_val_nll_mean_rate") is not None]
    if pre:
        lines += ["", "Pretraining validation Poisson NLL: model / mean-rate-only predictor, per seed:", ""]
        lines += _table(
            pre,
            "decoder",
            lambda rs: " · ".join(
                f"{r['pretrain_val_nll']:.4f} / {r['pretrain_val_nll_mean_rate']:.4f}" for r in rs
            ),
        )
    gains = [r for r in pre if r.get("target_forecast_gain") is not None]
    if gains:
        lines += [
            "",
            "Pretrained model's forecast of hidden test bins on the target, NLL gain over its mean "
            "rates (%; `rpnt_core.evaluate.forecast`):",
            "",
        ]
        lines += _table(
            gains, "decoder", lambda rs: mean_and_seeds([100 * r["target_forecast_gain"] for r in rs], ".2f")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/decoding.json")
    p.add_argument("--workdir", default="/tmp/rpnt-bench-decoding")
    p.add_argument("--train-fraction", type=float, default=0.2)
    p.add_argument("--baselines", default="wiener,kalman,gru")
    p.add_argument("--channels", default="resample,readin")
    p.add_argument(
        "--seeds", default="0", help="training seeds, comma-separated; every cell runs once per seed"
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the synthetic sessions (the same for every training seed)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="targets run in parallel, one process each "
        "(results do not depend on it; the seconds columns do)",
    )
    p.add_argument("--only", default="", help="comma-separated target names (default: every target)")
    p.add_argument("--quick", action="store_true", help="tiny budgets, for checking the script runs")
    p.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        metavar="JSON",
        help="earlier result files of this benchmark (same recipe, split, data seed, model): "
        "(seed, target) cells found there are taken from them, not rerun",
    )
    a = p.parse_args(argv)
    a.baselines = [x for x in a.baselines.split(",") if x]
    a.channels = [x for x in a.channels.split(",") if x]
    a.seeds = [int(x) for x in a.seeds.split(",") if x]
    a.only = [x for x in a.only.split(",") if x]
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
