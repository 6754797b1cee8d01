# Over 500 lines: one self-contained benchmark script (its protocol, decoders, aggregation and report).
"""Cross-day transfer benchmark (issue 16): does pretraining on earlier days bring up a new day's
decoder from a short block of labels better than the classic decoders?

    python bench/bench_transfer.py --seeds 0,1,2 --jobs 2

Protocol (scenario ``spike``, the one multi-day array here): the Spike days sorted by recording
date; days that fail quality control (:func:`rpnt_core.data.quality.split_flagged`, the target
judged too) are dropped and printed with the reason; the first ``--pool-days`` (15) clean days are
the pretraining pool, every later clean day is a test day.  On a test day of T bins:

- **labels**: the first N seconds (N in ``--budgets``: 15, 30, 60, 120, 300).  Every label a
  decoder touches lies there: its train part is the first 80 % of the N s and its validation part
  (early stopping, model selection, the ridge penalty) the last 20 %, for RPNT and the baselines
  alike (:func:`label_split`).  Nothing else of the day's behaviour is read before scoring:
  decoders are fitted on :func:`calibration_view`, which ends where the test part starts and holds
  NaN for every label after the N s.
- **unlabelled bins**: every bin before the test part may be used without labels — for the input
  statistics of ``input_norm`` models and for label-free re-alignment of the read-in.
- **test**: the last 20 % of the day, streamed causally from the day's bin 0 (every decoder's
  prediction for bin t depends on bins ≤ t only); R² pooled and variance-weighted
  (:func:`rpnt_core.evaluate.metrics.r2_score`) on the cursor position.

Decoders, all on the same bins: causal Wiener filter (ridge, 10 lags), Kalman, GRU; RPNT from
scratch; RPNT pretrained on the pool with each adaptation recipe (:data:`RECIPES`, pretraining
variants in :data:`PRETRAINING`); and three zero-label rows: the pool's last day's decoder
unchanged (the pretrained model fully finetuned on that day's labels), the same decoder re-aligned
to the new day by its unlabelled bins (:func:`rpnt_core.train.realign.realign_input`: new input
statistics and a read-in refit by the masked Poisson loss; core and head kept), and the decoder
that supervised pretraining learned from all the pool's labels, given the new day's input
statistics only.  Pretraining sees
the pool only (no test-day bins).

Scenario ``nick``: the same protocol from the Spike pool plus Nick's center-out recording 1 to
Nick's recording 2 (another monkey, task and unit set), target velocity (natural for reaching).

Every decoder runs once per training seed (``--seeds``); tables give mean ± sd over seeds (and the
mean over test days).  The JSON holds every cell, the budget (steps, epochs, batch) and the wall
time of every stage; the PNG plots R² against seconds of labels (log x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rpnt_core.data.quality import fit_for_target  # noqa: E402
from rpnt_core.data.splits import calibration_view, label_budget_splits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SPIKE = DATA / "limblab_spike_wf_2012"
NICK = DATA / "limblab_nick_co"
BUDGETS_S = (15.0, 30.0, 60.0, 120.0, 300.0)
TEST_FRACTION = 0.2
VAL_SHARE = 0.2  # of the labelled seconds
BASELINES = ("wiener", "kalman", "gru")
ZERO_LABEL = (
    "last day's decoder, unchanged",
    "last day's decoder, re-aligned (no labels)",
    "pool decoder (earlier days' labels), day's input statistics",
)

# The product's recipe under the names its rows carry in bench/results (the recipes that lost to it —
# self-supervised pretraining with or without input normalisation, per-day read-ins, read-in-only
# adaptation, a full-rate core — were measured in transfer-rank-seed0 and removed; CHANGELOG).
# Pretraining: supervised on the pool's labels, input normalisation (rpnt pretrain's default on
# labelled days); adaptation: full finetuning, the kept head's core at 0.1× (rpnt finetune's rule).
PRETRAINING: dict[str, dict] = {
    "supervised+norm": dict(objective="supervised", channels="resample", input_norm=True)
}
RECIPES: dict[str, dict] = {
    "supervised+norm, full FT core lr ×0.1": dict(pretrain="supervised+norm", mode="full")
}
SCRATCH = {"RPNT from scratch +norm": True}
ZERO_LABEL_PRETRAIN = "supervised+norm"  # the last day's decoder starts from this pretraining
# the finetuning sizes of budget(), under the names result files record them (their identity) →
# the names of rpnt_core's LABEL_BUDGET, which sizes `rpnt finetune --label-seconds` the same way
FT_BUDGET_KEYS = {
    "batch": "batch_size",
    "window": "window_len",
    "ft_epochs": "epochs",
    "ft_steps_max": "max_steps",
    "ft_bins_per_step": "bins_per_step",
    "patience": "patience",
}


def budget(quick: bool) -> dict:
    """Training budget of every RPNT run (reduced for 2 shared CPU cores; stated in the results)."""
    if quick:
        return dict(
            pre_epochs=2,
            pre_steps=4,
            batch=4,
            window=32,
            ft_epochs=2,
            ft_steps_max=2,
            ft_bins_per_step=400,
            patience=2,
            realign_steps=3,
            gru_epochs=2,
            preset="small",
        )
    from rpnt_core.train.options import LABEL_BUDGET

    return dict(
        pre_epochs=8,
        pre_steps=50,
        **{ours: LABEL_BUDGET[theirs] for ours, theirs in FT_BUDGET_KEYS.items()},
        realign_steps=100,
        gru_epochs=25,
        preset="small",
    )


# ------------------------------------------------------------------------------------------ splits


def label_split(n_bins: int, *, bin_s: float, seconds: float):
    """The day's splits for a label budget of ``seconds`` (:func:`rpnt_core.data.splits.label_budget_splits`)."""
    return label_budget_splits(
        n_bins, bin_s=bin_s, seconds=seconds, test_fraction=TEST_FRACTION, val_share=VAL_SHARE
    )


# -------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    target: str
    pool: list
    tests: list
    dropped: list  # (session name, reason)


def _synthetic_days(quick_seed: int = 0) -> list:
    """Six short days of one simulated subject at 50 ms (the ``--quick`` stand-in for Spike)."""
    from rpnt_core.data import SimulationSpec, simulate_sessions

    spec = SimulationSpec(
        n_subjects=1,
        sessions_per_subject=6,
        bins_per_session=(2000, 2000),
        bin_s=0.05,
        channels_per_session=(30, 30),
        population_size=(40, 40),
        n_multisite_subjects=0,
    )
    return sorted(simulate_sessions(spec, seed=quick_seed), key=lambda s: s.date_days)


def scenarios(args) -> list[Scenario]:
    """The scenarios to run (``--scenarios``), their pools and test days (``--days`` filters the tests)."""
    from rpnt_core.data import load_session

    out = []
    if args.quick:
        days, dropped = fit_for_target(_synthetic_days(), "position")
        out.append(
            Scenario(
                name="spike",
                target="position",
                pool=days[: args.pool_days],
                tests=days[args.pool_days :],
                dropped=dropped,
            )
        )
        return out
    files = sorted(SPIKE.glob("*.mat"))
    if not files:
        raise SystemExit(f"data: no Spike recordings under {SPIKE.name}/ (read-only shared data is absent)")
    spike = sorted((load_session(f) for f in files), key=lambda s: s.date_days)
    if "spike" in args.scenarios:
        days, dropped = fit_for_target(spike, "position")
        tests = [d for d in days[args.pool_days :] if not args.days or d.name in args.days]
        out.append(
            Scenario(
                name="spike", target="position", pool=days[: args.pool_days], tests=tests, dropped=dropped
            )
        )
    nick = sorted(NICK.glob("Nick_CO_00*-binned.mat"))
    if "nick" in args.scenarios and len(nick) == 2:
        days, dropped = fit_for_target(spike, "velocity")
        n1, n2 = (load_session(f).with_target("velocity") for f in nick)
        out.append(
            Scenario(
                name="nick",
                target="velocity",
                pool=days[: args.pool_days] + [n1],
                tests=[n2],
                dropped=dropped,
            )
        )
    return out


# ---------------------------------------------------------------------------------------- training


def _pretrain_path(args, scenario: str, variant: str, seed: int, n_days: int) -> Path:
    slug = "".join(ch if ch.isalnum() else "-" for ch in variant)
    return Path(args.workdir) / f"{scenario}-{slug}-{n_days}d-seed{seed}.safetensors"


def pretrain_unit(args, scenario_index: int, variant: str, seed: int, n_days: int) -> dict:
    """One pretraining run on the last ``n_days`` days of a scenario's pool; returns its summary."""
    from rpnt_core.train.pretrain import PretrainOptions, pretrain

    torch.set_num_threads(1)
    sc = scenarios(args)[scenario_index]
    b, v = budget(args.quick), PRETRAINING[variant]
    path = _pretrain_path(args, sc.name, variant, seed, n_days)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_suffix(".log.jsonl"), path.with_suffix(".resume.safetensors")):
        stale.unlink(missing_ok=True)
    t = time.time()
    res = pretrain(
        sc.pool[-n_days:],
        out=path,
        options=PretrainOptions(
            preset=b["preset"],
            epochs=b["pre_epochs"],
            steps_per_epoch=b["pre_steps"],
            batch_size=b["batch"],
            window_len=b["window"],
            warmup_steps=min(50, b["pre_steps"]),
            channels=v["channels"],
            objective=v["objective"],
            seed=seed,
            device="cpu",
            progress=False,
            config_overrides=(("input_norm", v["input_norm"]),),
        ),
    )
    seconds = time.time() - t
    print(
        f"  pretrained {sc.name} / {variant} / {n_days} days / seed {seed}: val {res['best_val_loss']:.4f} "
        f"({seconds:.0f} s)",
        flush=True,
    )
    return {
        "scenario": sc.name,
        "variant": variant,
        "seed": seed,
        "pool_days": n_days,
        "seconds": round(seconds, 1),
        "best_val_loss": res["best_val_loss"],
        "val_loss_mean_rate": res["val_loss_mean_rate"],
        "best_epoch": res["best_epoch"],
    }


def _ft_options(args, *, n_train: int, seed: int, mode: str = "full", input_norm: bool | None = None):
    """Finetuning options for a train part of ``n_train`` bins: steps per epoch grow with the labels."""
    from rpnt_core.train.finetune import FinetuneOptions

    b = budget(args.quick)
    over = () if input_norm is None else (("input_norm", input_norm),)
    return FinetuneOptions.for_labels(
        n_train,
        budget={theirs: b[ours] for ours, theirs in FT_BUDGET_KEYS.items()},
        mode=mode,
        preset=b["preset"],
        seed=seed,
        device="cpu",
        progress=False,
        config_overrides=over,
    )


def _score_model(model, day, splits) -> float:
    from rpnt_core.evaluate.harness import evaluate_model

    return evaluate_model(model, day, splits)["r2"]


def _score_baseline(name: str, view, day, splits, *, seed: int, quick: bool) -> float:
    from rpnt_core.evaluate.baselines import BASELINES as FITS
    from rpnt_core.evaluate.metrics import r2_score

    (lo, hi), (vlo, vhi) = splits.train, splits.val
    hyper = {"num_threads": 1, "max_epochs": budget(quick)["gru_epochs"]} if name == "gru" else {}
    dec = FITS[name].fit(
        train_counts=view.counts[lo:hi],
        train_velocity=view.labels[lo:hi],
        val_counts=view.counts[vlo:vhi],
        val_velocity=view.labels[vlo:vhi],
        bin_s=day.bin_s,
        seed=seed,
        **hyper,
    )
    tlo, thi = splits.test
    return r2_score(day.labels[tlo:thi], dec.predict(np.asarray(day.counts[:thi]))[tlo:thi])


def _last_day_decoder(args, sc: Scenario, seed: int):
    """The pool's last day's decoder: the zero-label pretraining, fully finetuned on that day (first
    80 % of its labels; validation = the 10 % before its last 10 %)."""
    from rpnt_core.data.splits import contiguous_splits
    from rpnt_core.train.finetune import fit_decoder

    last = sc.pool[-1]
    splits = contiguous_splits(last.n_bins, train_fraction=0.8, val_fraction=0.1, test_fraction=0.1)
    opts = _ft_options(args, n_train=splits.train[1], seed=seed)
    init = _pretrain_path(args, sc.name, ZERO_LABEL_PRETRAIN, seed, len(sc.pool))
    return fit_decoder(last, init=init, options=opts, splits=splits)[0]


def _zero_label_rows(args, sc: Scenario, day, seed: int, record) -> None:
    """The wanted :data:`ZERO_LABEL` rows of one test day, each passed to ``record``."""
    from rpnt_core.checkpoint import load_checkpoint
    from rpnt_core.evaluate.harness import session_metadata
    from rpnt_core.train.finetune import set_input_statistics
    from rpnt_core.train.realign import RealignOptions, realign_input

    if sc.pool[-1].n_channels != day.n_channels:
        print(
            f"  {sc.name} {day.name}: no zero-label rows (its {day.n_channels} channels are not the pool's last "
            f"day's {sc.pool[-1].n_channels}: another unit set, a decoder of it cannot be applied as is)",
            flush=True,
        )
        return
    splits = label_split(day.n_bins, bin_s=day.bin_s, seconds=min(args.budgets))  # the test part only
    t = time.time()
    model = _last_day_decoder(args, sc, seed)
    if ZERO_LABEL[0] in args.only:
        record(ZERO_LABEL[0], 0.0, _score_model(model, day, splits), t)
    if ZERO_LABEL[1] in args.only:
        t = time.time()
        info = realign_input(
            model,
            day.counts[: splits.test[0]],
            metadata=session_metadata(model, day),
            options=RealignOptions(
                steps=budget(args.quick)["realign_steps"],
                batch_size=budget(args.quick)["batch"],
                window_len=budget(args.quick)["window"],
                seed=seed,
            ),
        )
        record(ZERO_LABEL[1], 0.0, _score_model(model, day, splits), t, **info)
    if ZERO_LABEL[2] in args.only:
        t = time.time()
        model = load_checkpoint(_pretrain_path(args, sc.name, ZERO_LABEL_PRETRAIN, seed, len(sc.pool)))
        set_input_statistics(model, day.counts[: splits.test[0]])
        record(ZERO_LABEL[2], 0.0, _score_model(model, day, splits), t)


def day_unit(args, scenario_index: int, day_index: int, seed: int) -> list[dict]:
    """Every wanted decoder at every label budget on one test day, one training seed."""
    from rpnt_core.train.finetune import fit_decoder

    torch.set_num_threads(1)
    sc = scenarios(args)[scenario_index]
    day = sc.tests[day_index]
    rows: list[dict] = []

    def record(decoder: str, seconds_of_labels: float, r2: float, t0: float, **extra) -> None:
        rows.append(
            {
                "scenario": sc.name,
                "day": day.name,
                "decoder": decoder,
                "seed": seed,
                "label_seconds": seconds_of_labels,
                "test_r2": float(r2),
                "seconds": round(time.time() - t0, 1),
                **extra,
            }
        )
        print(
            f"  {sc.name} {day.name} seed {seed} {seconds_of_labels:>5g} s  {decoder:<52} R² {r2:.4f}",
            flush=True,
        )

    full_pool = len(sc.pool)
    if any(d in args.only for d in ZERO_LABEL):
        _zero_label_rows(args, sc, day, seed, record)
    for seconds in args.budgets:
        try:
            splits = label_split(day.n_bins, bin_s=day.bin_s, seconds=seconds)
        except ValueError as exc:
            print(f"  {sc.name} {day.name}: skipped {seconds:g} s ({exc})", flush=True)
            continue
        view = calibration_view(day, splits)
        n_train = splits.train[1] - splits.train[0]
        for name in BASELINES:
            if name in args.only:
                t = time.time()
                record(
                    f"baseline: {name}",
                    seconds,
                    _score_baseline(name, view, day, splits, seed=seed, quick=args.quick),
                    t,
                )
        for name, norm in SCRATCH.items():
            if name in args.only:
                t = time.time()
                model, fit = fit_decoder(
                    view,
                    init=None,
                    splits=splits,
                    options=_ft_options(args, n_train=n_train, seed=seed, input_norm=norm),
                )
                record(name, seconds, _score_model(model, day, splits), t, val_r2=fit["val_r2"])
        for name, rc in RECIPES.items():
            if name not in args.only:
                continue
            for n_days in [full_pool] + [k for k in args.pool_sizes if k < full_pool]:
                t = time.time()
                init = _pretrain_path(args, sc.name, rc["pretrain"], seed, n_days)
                model, fit = fit_decoder(
                    view,
                    init=init,
                    splits=splits,
                    options=_ft_options(args, n_train=n_train, seed=seed, mode=rc["mode"]),
                )
                label = name if n_days == full_pool else f"{name} [{n_days} pretraining days]"
                record(
                    label,
                    seconds,
                    _score_model(model, day, splits),
                    t,
                    val_r2=fit["val_r2"],
                    pool_days=n_days,
                )
    return rows


# ------------------------------------------------------------------------------------------ report


def _pool(args, fn, units: list[tuple]):
    """``fn(*unit)`` for every unit, ``args.jobs`` processes at a time; yields results as they finish."""
    if args.jobs > 1 and len(units) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as workers:
            yield from workers.imap_unordered(_star, [(fn, u) for u in units], chunksize=1)
        return
    for u in units:
        yield fn(*u)


def _star(job: tuple):
    fn, unit = job
    return fn(*unit)


def run(args, on_rows=None) -> dict:
    """Pretraining runs, then every (scenario, seed, test day) unit; ``on_rows(result so far)`` is called
    after each unit (the caller writes partial results, so a run cut short keeps what it measured)."""
    t_all = time.time()
    t = time.time()
    scs = scenarios(args)
    stages = {"load_and_qc_seconds": round(time.time() - t, 1)}
    for sc in scs:
        for name, why in sc.dropped:
            print(f"{sc.name}: dropped {name} (quality control: {why})", flush=True)
        print(f"{sc.name}: pool {[d.name for d in sc.pool]} → tests {[d.name for d in sc.tests]}", flush=True)
    variants = {RECIPES[r]["pretrain"] for r in RECIPES if r in args.only}
    if any(d in args.only for d in ZERO_LABEL):
        variants.add(ZERO_LABEL_PRETRAIN)
    pre_units = []
    for i, sc in enumerate(scs):
        for seed in args.seeds:
            for v in sorted(variants):
                sizes = {len(sc.pool)} | (
                    {k for k in args.pool_sizes if k < len(sc.pool)}
                    if any(RECIPES[r]["pretrain"] == v for r in RECIPES if r in args.only)
                    else set()
                )
                pre_units += [(args, i, v, seed, k) for k in sorted(sizes)]
    t = time.time()
    pretraining = list(_pool(args, pretrain_unit, pre_units))
    stages["pretraining_seconds"] = round(time.time() - t, 1)
    t = time.time()
    day_units = [
        (args, i, j, seed) for i, sc in enumerate(scs) for seed in args.seeds for j in range(len(sc.tests))
    ]

    def result(rows: list[dict], done: int) -> dict:
        return {
            "benchmark": "transfer",
            "quick": args.quick,
            "seeds": args.seeds,
            "budgets_s": args.budgets,
            "budget": budget(args.quick),
            "pool_sizes": args.pool_sizes,
            "protocol": {
                "test_fraction": TEST_FRACTION,
                "val_share_of_labels": VAL_SHARE,
                "unlabelled_bins": "every bin before the test part: input statistics and label-free "
                "re-alignment (counts only)",
                "pretraining": "the pool only (no test-day bins)",
            },
            "scenarios": [
                {
                    "name": sc.name,
                    "target": sc.target,
                    "pool": [d.name for d in sc.pool],
                    "tests": [d.name for d in sc.tests],
                    "dropped": sc.dropped,
                }
                for sc in scs
            ],
            "pretraining": pretraining,
            "rows": rows,
            "units_done": f"{done} of {len(day_units)}",
            "stages": stages,
            "jobs": args.jobs,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "threads_per_job": 1,
            },
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    rows: list[dict] = []
    for done, part in enumerate(_pool(args, day_unit, day_units), start=1):
        rows += part
        stages["calibration_and_test_seconds"] = round(time.time() - t, 1)
        if on_rows is not None and done < len(day_units):
            on_rows(result(rows, done))
    stages["total_seconds"] = round(time.time() - t_all, 1)
    return result(sorted(rows, key=lambda r: (r["scenario"], r["seed"], r["day"])), len(day_units))


def identity(result: dict) -> dict:
    """What a row's number depends on besides its seed, decoder and day: runs that agree can be merged."""
    return {k: result[k] for k in ("quick", "budget", "protocol")} | {
        "scenarios": [{k: sc[k] for k in ("name", "target", "pool")} for sc in result["scenarios"]]
    }


def merge(result: dict, paths: list[str], decoders: list[str] | None = None) -> dict:
    """``result`` plus the rows (and pretraining runs) of earlier result files made with the same budget,
    protocol and pools, for (scenario, day, decoder, seed) cells this run did not measure — of the
    ``decoders`` named (a recipe's pool-size variants included), all when ``None``; each merged row
    keeps a ``from`` naming its file.  SystemExit names a file that differs."""
    here = identity(result)
    seen = {(r["scenario"], r["day"], r["decoder"], r["seed"]) for r in result["rows"]}
    rows, pre, stages = list(result["rows"]), list(result["pretraining"]), {}
    for path in paths:
        try:
            old = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"--merge {path}: cannot read it as a result file ({exc})") from None
        other = identity(old)
        if any(other[k] != here[k] for k in ("quick", "budget", "protocol")) or any(
            sc not in other["scenarios"]
            for sc in here["scenarios"]
            if sc["name"] in {r["scenario"] for r in old["rows"]}
        ):
            raise SystemExit(f"--merge {path}: made with a different budget, protocol or pool; rerun instead")
        new = [
            r | {"from": Path(path).name}
            for r in old["rows"]
            if (r["scenario"], r["day"], r["decoder"], r["seed"]) not in seen
            and (
                decoders is None
                or r["decoder"].split(" [")[0] in decoders
                or r["decoder"].removeprefix("baseline: ") in decoders
            )
        ]
        rows += new
        pre += [p for p in old["pretraining"] if p not in pre]
        stages[Path(path).name] = old.get("stages")
        seen |= {(r["scenario"], r["day"], r["decoder"], r["seed"]) for r in new}
        names = {sc["name"] for sc in result["scenarios"]}
        result = {
            **result,
            "scenarios": result["scenarios"] + [sc for sc in old["scenarios"] if sc["name"] not in names],
        }
    seeds = sorted({r["seed"] for r in rows})
    return {**result, "rows": rows, "pretraining": pre, "seeds": seeds, "merged_stages": stages}


def summarise(rows: list[dict]) -> dict:
    """{(scenario, decoder): {label_seconds: (mean, sd, n_seeds)}}: per seed the mean over test days,
    then mean and sd over seeds."""
    by: dict = {}
    for r in rows:
        by.setdefault((r["scenario"], r["decoder"], r["label_seconds"], r["seed"]), []).append(r["test_r2"])
    out: dict = {}
    for (sc, dec, sec, _), vals in by.items():
        out.setdefault((sc, dec), {}).setdefault(sec, []).append(float(np.mean(vals)))
    return {
        k: {
            s: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
            for s, v in sorted(d.items())
        }
        for k, d in out.items()
    }


def markdown(result: dict) -> str:
    b = result["budget"]
    lines = [
        f"Cross-day transfer, test R² (mean over test days; mean ± sd over seeds {result['seeds']}; "
        f"units measured: {result.get('units_done', 'all')}).",
        f"Budget (reduced for 2 shared CPU cores): pretraining {b['pre_epochs']}×{b['pre_steps']} steps, batch "
        f"{b['batch']}×{b['window']} bins, preset {b['preset']}; finetuning ≤ {b['ft_epochs']} epochs × "
        f"≤ {b['ft_steps_max']} steps (1 step per {b['ft_bins_per_step']} labelled train bins), patience "
        f"{b['patience']}; re-alignment {b['realign_steps']} steps.  Wall time (s): {result['stages']}"
        + "".join(f"; merged {k}: {v}" for k, v in (result.get("merged_stages") or {}).items())
        + ".",
        "",
    ]
    summary = summarise(result["rows"])
    for sc in result["scenarios"]:
        secs = sorted({r["label_seconds"] for r in result["rows"] if r["scenario"] == sc["name"]})
        lines += [
            f"### {sc['name']} (target {sc['target']}): pool {len(sc['pool'])} days → tests "
            f"{', '.join(sc['tests'])}",
            "",
        ]
        if sc["dropped"]:
            lines += [f"Dropped by quality control: {'; '.join(f'{n} ({w})' for n, w in sc['dropped'])}", ""]
        lines += [
            "| decoder | seeds | " + " | ".join("0 s" if s == 0 else f"{s:g} s" for s in secs) + " |",
            "|---|---:|" + "---:|" * len(secs),
        ]
        for (scn, dec), cells in summary.items():
            if scn != sc["name"]:
                continue
            lines.append(
                f"| {dec} | {max(c[2] for c in cells.values())} | "
                + " | ".join(
                    (f"{cells[s][0]:.3f} ± {cells[s][1]:.3f}" if cells[s][2] > 1 else f"{cells[s][0]:.3f}")
                    if s in cells
                    else ""
                    for s in secs
                )
                + " |"
            )
        lines.append("")
    pre = result.get("pretraining") or []
    if pre:
        lines += [
            "Pretraining runs (best validation loss; masked-Poisson runs also show the mean-rate-only floor):",
            "",
            "| scenario | variant | days | seed | val loss | mean-rate floor | s |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for p in pre:
            floor = "" if p["val_loss_mean_rate"] is None else f"{p['val_loss_mean_rate']:.4f}"
            lines.append(
                f"| {p['scenario']} | {p['variant']} | {p['pool_days']} | {p['seed']} | "
                f"{p['best_val_loss']:.4f} | {floor} | {p['seconds']:.0f} |"
            )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(result["rows"])
    scs = [sc["name"] for sc in result["scenarios"]]
    fig, axes = plt.subplots(1, len(scs), figsize=(7 * len(scs), 5), squeeze=False)
    styles = iter([("black", ":"), ("grey", "--"), ("tab:olive", "-."), ("tab:cyan", ":")] * len(scs))
    for ax, sc in zip(axes[0], scs, strict=True):
        for (scn, dec), cells in summary.items():
            secs = [s for s in cells if s > 0]
            if scn != sc:
                continue
            if not secs:  # zero-label rows: a horizontal line each
                color, style = next(styles)
                ax.axhline(cells[0.0][0], color=color, linestyle=style, label=f"{dec} (0 labels)")
                continue
            m = np.array([cells[s][0] for s in secs])
            sd = np.array([cells[s][1] for s in secs])
            ax.errorbar(secs, m, yerr=sd, marker="o", capsize=2, label=dec)
        ax.set_xscale("log")
        ax.set_xlabel("labels of the new day (s, log scale)")
        ax.set_ylabel("test R² (pooled, variance-weighted)")
        ax.set_title(f"{sc}: transfer to later days")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _names(text: str, allowed: list[str], flag: str) -> list[str]:
    picked = [x.strip() for x in text.split(";") if x.strip()] if text else list(allowed)
    unknown = [x for x in picked if x not in allowed]
    if unknown:
        raise SystemExit(f"{flag}: unknown {unknown}; choose from {allowed}")
    return picked


def decoders() -> list[str]:
    return [*BASELINES, *SCRATCH, *RECIPES, *ZERO_LABEL]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/transfer.json")
    p.add_argument("--workdir", default="/tmp/rpnt-bench-transfer")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    p.add_argument(
        "--budgets", default=",".join(f"{s:g}" for s in BUDGETS_S), help="seconds of labels, comma-separated"
    )
    p.add_argument(
        "--pool-days", type=int, default=15, help="clean days in the pretraining pool (the first ones)"
    )
    p.add_argument(
        "--pool-sizes",
        default="",
        help="also pretrain the chosen recipes on only the pool's last K days, "
        "comma-separated K (e.g. 2,5,10)",
    )
    p.add_argument("--scenarios", default="spike,nick")
    p.add_argument("--only", default="", help="decoders, separated by ';' (default: all)")
    p.add_argument("--days", default="", help="test days by session name, comma-separated (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="processes (1 torch thread each)")
    p.add_argument("--quick", action="store_true", help="synthetic days and tiny budgets, for the test")
    p.add_argument(
        "--replot",
        action="store_true",
        help="rewrite --out's Markdown and PNG from its JSON, adding every "
        "decoder's cells of the --merge files (no runs)",
    )
    p.add_argument(
        "--merge",
        nargs="*",
        default=[],
        metavar="JSON",
        help="earlier result files of the same budget and protocol: their cells that this run does "
        "not measure are added to its tables (e.g. seed 0 of a ranking run)",
    )
    a = p.parse_args(argv)
    a.seeds = [int(x) for x in a.seeds.split(",") if x]
    a.budgets = [float(x) for x in a.budgets.split(",") if x]
    a.only = _names(a.only, decoders(), "--only")
    a.days = [x for x in a.days.split(",") if x]
    a.scenarios = [x for x in a.scenarios.split(",") if x]
    if a.quick:
        a.pool_days = min(a.pool_days, 4)
    a.pool_sizes = sorted({int(x) for x in a.pool_sizes.split(",") if x})  # besides the whole pool
    return a


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    if args.replot:  # with --merge: every decoder's cells of those files join --out's (no runs)
        print(write(merge(json.loads(out.read_text()), args.merge), out))
        return 0
    result = merge(
        run(args, on_rows=lambda partial: write(merge(partial, args.merge, args.only), out)),
        args.merge,
        args.only,
    )
    print("\n" + write(result, out))
    return 0


def write(result: dict, out: Path) -> str:
    """JSON, Markdown and PNG of ``result`` next to ``out``; returns the Markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    md = markdown(result)
    out.with_suffix(".md").write_text(md + "\n")
    plot(result, out.with_suffix(".png"))
    return md


if __name__ == "__main__":
    sys.exit(main())
