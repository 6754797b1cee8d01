"""The offline half of ``rpnt demo``: pretrain → calibrate a new day from seconds of labels → baselines.

:func:`demo_data` picks the sessions and :func:`run_demo` trains and scores on them:

- **Real days** (the default when the shared Spike recordings are present, ``--days DIR``):
  quality control drops the days unfit to train on (and says why); the newest clean day is the
  new day, the ``--pool-days`` clean days before it the pretraining pool.  RPNT is pretrained on
  the pool (supervised on their cursor position, the product's default on labelled days), then
  the new day is calibrated from its first ``--label-seconds`` of labels — the same budget for
  RPNT pretrained, RPNT from scratch and the classic baselines, early stopping included — and
  every decoder is scored on the day's last 20 %.  The full curve over days, budgets and seeds is
  ``bench/bench_transfer.py``'s job.
- **Simulated** (no shared data, or ``--days none``): pretrain a small RPNT on all simulated
  subjects but one (self-supervised: the pool includes the held-out session's unlabelled
  training bins) → few-shot finetune on a session of the held-out subject (20 % train split).
- ``--data FILE``: the simulated pool plus a real recording's unlabelled training bins; decode
  the recording.

``rpnt demo`` itself (``service.demo``) continues from here with the live half: export, daemon,
real-time replay and a calibration.  ``rpnt demo --offline`` (or ``python -m rpnt_core.demo``)
stops after this part and needs only the core install.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SHARED_SPIKE_DAYS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "limblab_spike_wf_2012"
DAYS_TARGET = "position"  # isometric wrist task: cursor position ≈ force


@dataclass(frozen=True, kw_only=True)
class DemoData:
    """The target session, its splits, and the pretraining pool."""

    target: Any  # rpnt_core.data.Session
    splits: Any  # rpnt_core.data.Splits
    pool: list
    source: str
    n_simulated: int
    label_seconds: float | None = None  # real days: the new day's label budget
    dropped: tuple = ()  # (session, reason) dropped by quality control


def default_days() -> str | None:
    """The shared Spike days' folder when it holds recordings, else ``None`` (simulated demo)."""
    return str(SHARED_SPIKE_DAYS) if any(SHARED_SPIKE_DAYS.glob("*.mat")) else None


def demo_data(
    *,
    data: str | None,
    days: str | None,
    pool_days: int,
    label_seconds: float,
    seed: int,
    train_fraction: float,
) -> DemoData:
    """The demo's sessions: real days (:func:`days_data`), else simulated ones (module docstring).

    Args:
        data: a recording to decode instead of a simulated session (``--data``).
        days: a folder of recording days; used when ``data`` is not given.
        pool_days: real days: clean days before the new day to pretrain on.
        label_seconds: real days: the new day's label budget.
        seed: the simulator's seed.
        train_fraction: simulated or ``data``: the few-shot train split.
    Returns:
        The target, its splits and the pretraining pool; a simulated pool also holds the target's
        unlabelled training bins (never its validation or test bins).
    """
    if days and not data:
        return days_data(days=days, pool_days=pool_days, label_seconds=label_seconds)
    from .data import SimulationSpec, contiguous_splits, load_session, simulate_sessions

    target = load_session(data) if data else None
    spec = SimulationSpec(
        n_subjects=4,
        sessions_per_subject=3,
        bins_per_session=(1500, 2500),
        bin_s=float(target.bin_s) if target else 0.02,
    )
    sims = simulate_sessions(spec, seed=seed)
    if target is None:
        held_subject = sims[0].subject  # a single-site subject, never seen in pretraining
        target = next(s for s in sims if s.subject == held_subject)
        pool = [s for s in sims if s.subject != held_subject]
        source = f"simulated held-out subject {held_subject}, session {target.session}"
    else:
        pool = list(sims)
        source = str(data)
    splits = contiguous_splits(target.n_bins, train_fraction=train_fraction)
    # unlabelled pretraining may use the target's training bins, never its validation/test bins
    pool.append(replace(target.slice_bins(*splits.train), velocity=None, position=None))
    return DemoData(target=target, splits=splits, pool=pool, source=source, n_simulated=len(sims))


def days_data(*, days: str, pool_days: int, label_seconds: float) -> DemoData:
    """The newest clean day of a folder as the new day, the clean days before it as the pool.

    Args:
        days: the folder (its recordings: :func:`~rpnt_core.data.formats.session_files`), ordered
            by recording date.
        pool_days: how many clean days before the new day to pretrain on.
        label_seconds: the new day's label budget (:func:`~rpnt_core.data.splits.label_budget_splits`).
    Returns:
        The demo data, with the days quality control dropped and why.
    Raises:
        ValueError: naming ``days`` when fewer than ``pool_days`` + 1 clean recordings are there.
    """
    from .data import load_session, session_files
    from .data.quality import fit_for_target
    from .data.splits import label_budget_splits

    sessions = sorted((load_session(f) for f in session_files(days)), key=lambda s: s.date_days)
    kept, dropped = fit_for_target(sessions, DAYS_TARGET)
    if len(kept) < pool_days + 1:
        raise ValueError(
            f"days: {len(kept)} clean recordings with {DAYS_TARGET!r} under {Path(days).name}/, "
            f"need {pool_days + 1}"
        )
    target, pool = kept[-1], kept[-1 - pool_days : -1]
    splits = label_budget_splits(target.n_bins, bin_s=target.bin_s, seconds=label_seconds)
    return DemoData(
        target=target,
        splits=splits,
        pool=pool,
        n_simulated=0,
        label_seconds=label_seconds,
        source=f"{target.name} (new day), pretraining on {', '.join(s.name for s in pool)}",
        dropped=tuple(dropped),
    )


def run_demo(
    *,
    workdir: Path,
    data: DemoData,
    seed: int,
    preset: str,
    pretrain_epochs: int,
    steps_per_epoch: int,
    finetune_epochs: int,
    baselines: tuple[str, ...],
    device: str,
    progress: bool,
) -> dict:
    """Pretrain on the pool, calibrate the target twice (pretrained, from scratch), fit the baselines.

    Args:
        workdir: where the checkpoints and ``results.json`` are written (made if absent).
        data: the sessions and splits (:func:`demo_data`).
        seed: for pretraining, finetuning and the baselines.
        preset: the RPNT model size.
        pretrain_epochs, steps_per_epoch: the pretraining budget.
        finetune_epochs: the finetuning budget when ``data`` has no label budget (simulated or
            ``--data``); real days use the calibration budget for their labels.
        baselines: names in :data:`rpnt_core.evaluate.baselines.BASELINES`, scored on the same splits.
        device: ``cpu``, ``cuda`` or ``auto``.
        progress: print what is happening.
    Returns:
        The result written to ``workdir / "results.json"``: one row per decoder (test and
        validation R², seconds), the pretraining summary, the splits and :func:`interpretation`.
    """
    t0 = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)
    _log_target(data, log)
    pre_path = workdir / "pretrained.safetensors"
    objective, pool, pre = _pretrain_pool(
        data,
        out=pre_path,
        seed=seed,
        preset=preset,
        epochs=pretrain_epochs,
        steps_per_epoch=steps_per_epoch,
        device=device,
        progress=progress,
        log=log,
    )
    ft_opts = _finetune_options(data, epochs=finetune_epochs, preset=preset, seed=seed, device=device)
    rows = _finetune_rows(data, init=pre_path, options=ft_opts, workdir=workdir, log=log)
    rows += _baseline_rows(data, baselines, seed=seed, log=log)
    result = {
        "target": data.source,
        "decoded": data.target.target,
        "splits": data.splits.as_dict(),
        "train_fraction": _train_fraction(data),
        "label_seconds": data.label_seconds,
        "preset": preset,
        "pretrain": {
            "objective": objective,
            "recordings": [s.name for s in pool],
            **{k: pre[k] for k in ("best_val_loss", "val_loss_mean_rate", "best_epoch", "epochs")},
        },
        "dropped": [list(d) for d in data.dropped],
        "rows": rows,
        "total_seconds": round(time.time() - t0, 1),
    }
    result["interpretation"] = interpretation(result)
    (workdir / "results.json").write_text(json.dumps(result, indent=2))
    return result


Log = Callable[..., None]


def _train_fraction(data: DemoData) -> float:
    return (data.splits.train[1] - data.splits.train[0]) / data.target.n_bins


def _log_target(data: DemoData, log: Log) -> None:
    """Say what quality control dropped and what the demo decodes."""
    target = data.target
    for name, why in data.dropped:
        log(f"[demo] quality control dropped {name}: {why}")
    log(
        f"[demo] target: {data.source} ({target.n_bins} bins, {target.n_channels} channels, "
        f"{target.bin_s * 1000:.0f} ms bins, decoding {target.target})"
        + (f"; {data.n_simulated} simulated sessions" if data.n_simulated else "")
    )


def _pretrain_pool(
    data: DemoData,
    *,
    out: Path,
    seed: int,
    preset: str,
    epochs: int,
    steps_per_epoch: int,
    device: str,
    progress: bool,
    log: Log,
) -> tuple[str, list, dict]:
    """Pretrain on the pool: supervised on the target's series when every pool session has it.

    Returns:
        (objective, the pool as pretrained on, :func:`~rpnt_core.train.pretrain.pretrain`'s result).
    """
    from .train.choices import pretraining_objective
    from .train.pretrain import PretrainOptions, pretrain

    decoded = data.target.target
    objective = pretraining_objective(data.pool, decoded)
    pool = [s.with_target(decoded) for s in data.pool] if objective == "supervised" else data.pool
    log(
        f"[demo] pretraining ({objective}, {epochs} epochs × {steps_per_epoch} steps) on {len(pool)} recordings …"
    )
    options = PretrainOptions(
        preset=preset,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        objective=objective,
        seed=seed,
        device=device,
        progress=progress,
    )
    return objective, pool, pretrain(pool, options=options, out=out)


def _finetune_options(data: DemoData, *, epochs: int, preset: str, seed: int, device: str) -> Any:
    """The calibration budget for a label budget in seconds (real days), else ``epochs`` epochs."""
    from .train.finetune import FinetuneOptions

    if data.label_seconds:
        n_train = data.splits.train[1] - data.splits.train[0]
        return FinetuneOptions.for_labels(n_train, preset=preset, seed=seed, device=device, progress=False)
    return FinetuneOptions(
        epochs=epochs,
        train_fraction=_train_fraction(data),
        preset=preset,
        seed=seed,
        device=device,
        progress=False,
    )


def _finetune_rows(data: DemoData, *, init: Path, options: Any, workdir: Path, log: Log) -> list[dict]:
    """Finetune RPNT on the target from scratch and from the pretrained ``init``: one row each."""
    from .train.finetune import finetune

    rows = []
    for label, start in (("RPNT from scratch", None), ("RPNT pretrained + finetuned", init)):
        log(f"[demo] finetuning: {label} …")
        out = workdir / ("scratch.safetensors" if start is None else "finetuned.safetensors")
        r = finetune(data.target, init=start, options=options, out=out, splits=data.splits)
        rows.append(
            {
                "decoder": label,
                "test_r2": r["test_r2"],
                "val_r2": r["val_r2"],
                "test_r2_per_dim": r["test_r2_per_dim"],
                "seconds": r["train_seconds"],
                "checkpoint": str(out),
            }
        )
    return rows


def _baseline_rows(data: DemoData, baselines: tuple[str, ...], *, seed: int, log: Log) -> list[dict]:
    """Fit and score each classic baseline on the target's splits: one row each."""
    from .evaluate.harness import evaluate_baseline

    rows = []
    for name in baselines:
        log(f"[demo] baseline: {name} …")
        t = time.time()
        r = evaluate_baseline(name, data.target, data.splits, seed=seed)
        rows.append(
            {
                "decoder": f"baseline: {name}",
                "test_r2": r["r2"],
                "val_r2": None,
                "test_r2_per_dim": r["r2_per_dim"],
                "seconds": round(time.time() - t, 2),
            }
        )
    return rows


def interpretation(result: dict) -> str:
    """One line saying what the table shows, with its numbers."""
    r2 = {r["decoder"]: r["test_r2"] for r in result["rows"]}
    pre, scratch = r2["RPNT pretrained + finetuned"], r2["RPNT from scratch"]
    classic = {k.removeprefix("baseline: "): v for k, v in r2.items() if k.startswith("baseline: ")}
    best = max(classic, key=classic.get) if classic else None
    budget = (
        f"{result['label_seconds']:g} s of labels"
        if result.get("label_seconds")
        else f"{result['train_fraction']:.0%} of the session as labels"
    )
    n_pool = len(result["pretrain"]["recordings"])
    verdict = (
        "pretraining helps"
        if pre > max([scratch, *classic.values()])
        else "pretraining does not beat the best decoder here"
    )
    return (
        f"with {budget}, RPNT pretrained on {n_pool} recordings decodes {result.get('decoded', 'the target')} "
        f"at test R² {pre:.3f}, from scratch {scratch:.3f}"
        + (f", best classic decoder ({best}) {classic[best]:.3f}" if best else "")
        + f": {verdict} (one seed, one day; the benchmark's curves: bench/results/transfer.md)"
    )


def format_table(result: dict) -> str:
    """:func:`run_demo`'s result as a text table, the pretraining loss and the interpretation."""
    lines = [
        f"target: {result['target']}   splits: {result['splits']}",
        f"{'decoder':<28} {'test R²':>8} {'val R²':>8} {'seconds':>8}",
        "-" * 56,
    ]
    for r in result["rows"]:
        val = "" if r["val_r2"] is None else f"{r['val_r2']:.4f}"
        lines.append(f"{r['decoder']:<28} {r['test_r2']:>8.4f} {val:>8} {r['seconds']:>8.1f}")
    pre = result.get("pretrain") or {}
    if pre.get("val_loss_mean_rate") is not None:
        lines.append(
            f"pretraining validation Poisson NLL {pre['best_val_loss']:.4f} "
            f"(a mean-rate-only predictor: {pre['val_loss_mean_rate']:.4f})"
        )
    lines.append(f"total {result['total_seconds']:.0f} s")
    if result.get("interpretation"):
        lines.append(result["interpretation"])
    return "\n".join(lines)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The offline half's options (shared by ``rpnt demo`` and ``python -m rpnt_core.demo``)."""
    p.add_argument(
        "--data", default=None, help="a real labelled session to decode instead of a simulated one"
    )
    p.add_argument(
        "--days",
        default=default_days(),
        help="a folder of recording days of one array: the newest clean "
        "day is calibrated from --label-seconds of labels after pretraining on the --pool-days before it "
        "(default: the shared Spike days when present, else simulated; 'none' = simulated)",
    )
    p.add_argument(
        "--pool-days",
        type=int,
        default=2,
        help="clean days before the new day to pretrain on (default 2: "
        "the most recent days transferred best in the benchmark, bench/results/transfer-pooldays.md)",
    )
    p.add_argument(
        "--label-seconds", type=float, default=60.0, help="seconds of the new day's labels (default 60)"
    )
    p.add_argument("--workdir", default=None, help="where checkpoints and results go (default: a temp dir)")
    p.add_argument("--preset", choices=["small", "paper"], default="small", help="model size (default small)")
    p.add_argument("--pretrain-epochs", type=int, default=6, help="pretraining epochs (default 6)")
    p.add_argument("--steps-per-epoch", type=int, default=40, help="pretraining steps per epoch (default 40)")
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=25,
        help="finetuning epochs, simulated or --data demo (default 25; real days use the calibration budget)",
    )
    p.add_argument(
        "--train-fraction",
        type=float,
        default=0.2,
        help="few-shot train split, simulated or --data demo (default 0.2)",
    )
    p.add_argument("--baselines", default="wiener,kalman,gru", help="comma list (default wiener,kalman,gru)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for training (default 1: a busy "
        "machine slows a multi-threaded trainer many-fold, and the rest of the machine keeps a core)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the tables")


def offline_part(a: argparse.Namespace) -> tuple[dict, DemoData, Path]:
    """Run the offline half from parsed arguments; returns (result, data, workdir)."""
    import torch

    torch.set_num_threads(max(1, a.threads))
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="rpnt-demo-"))
    days = None if (a.days or "").lower() in ("", "none") else a.days
    data = demo_data(
        data=a.data,
        days=days,
        pool_days=a.pool_days,
        label_seconds=a.label_seconds,
        seed=a.seed,
        train_fraction=a.train_fraction,
    )
    result = run_demo(
        workdir=workdir,
        data=data,
        seed=a.seed,
        preset=a.preset,
        pretrain_epochs=a.pretrain_epochs,
        steps_per_epoch=a.steps_per_epoch,
        finetune_epochs=a.finetune_epochs,
        baselines=tuple(x for x in a.baselines.split(",") if x),
        device=a.device,
        progress=not a.quiet,
    )
    return result, data, workdir


def main(argv: list[str] | None = None) -> int:
    """``python -m rpnt_core.demo``: the offline half; exit code 2 on a user error."""
    p = argparse.ArgumentParser(
        prog="python -m rpnt_core.demo",
        description=(
            "The offline half of rpnt demo (no files needed): simulate → pretrain a small RPNT → few-shot "
            "finetune on a held-out subject → evaluate against classic baselines on the same splits, and "
            "print the results table. --data FILE does the same on a real recording."
        ),
    )
    add_demo_arguments(p)
    a = p.parse_args(argv)
    try:
        result, _, workdir = offline_part(a)
    except (ValueError, FileNotFoundError) as exc:
        print(f"rpnt demo: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"results: {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
