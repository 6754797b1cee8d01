"""The offline half of ``rpnt demo``: simulate → pretrain → few-shot finetune → baselines.

:func:`demo_data` picks the sessions (simulated, or a real recording with ``--data``) and
:func:`run_demo` trains and scores on them: pretrain a small RPNT on all subjects but one →
few-shot finetune on a session of the held-out subject (20 % train split), from scratch and from
the pretrained checkpoint → classic baselines on exactly the same splits → ``results.json``.

``--data FILE`` runs the same on a real recording: the simulator is run at the file's bin width,
and pretraining also sees the unlabelled counts of the file's *training* bins (never its
validation or test bins).

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class DemoData:
    """The target session, its splits, and the unlabelled pretraining pool."""

    target: Any  # rpnt_core.data.Session
    splits: Any  # rpnt_core.data.Splits
    pool: list
    source: str
    n_simulated: int


def demo_data(*, data: str | None, seed: int, train_fraction: float) -> DemoData:
    from .data import SimulationSpec, contiguous_splits, load_session, simulate_sessions

    target = load_session(data) if data else None
    spec = SimulationSpec(n_subjects=4, sessions_per_subject=3, bins_per_session=(1500, 2500),
                          bin_s=float(target.bin_s) if target else 0.02)
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


def run_demo(*, workdir: Path, data: DemoData, seed: int, preset: str, pretrain_epochs: int, steps_per_epoch: int,
             finetune_epochs: int, baselines: tuple[str, ...], device: str, progress: bool) -> dict:
    from .evaluate.harness import evaluate_baseline
    from .train.finetune import FinetuneOptions, finetune
    from .train.pretrain import PretrainOptions, pretrain

    t0 = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)
    target, splits = data.target, data.splits
    train_fraction = (splits.train[1] - splits.train[0]) / target.n_bins
    log(f"[demo] {data.n_simulated} simulated sessions; target: {data.source} ({target.n_bins} bins, "
        f"{target.n_channels} channels, {target.bin_s * 1000:.0f} ms bins)")
    pre_path = workdir / "pretrained.safetensors"
    log(f"[demo] pretraining ({pretrain_epochs} epochs × {steps_per_epoch} steps) on {len(data.pool)} recordings …")
    pre = pretrain(data.pool, options=PretrainOptions(preset=preset, epochs=pretrain_epochs,
                                                      steps_per_epoch=steps_per_epoch, seed=seed, device=device,
                                                      progress=progress), out=pre_path)
    rows = []
    ft_opts = FinetuneOptions(epochs=finetune_epochs, train_fraction=train_fraction, preset=preset, seed=seed,
                              device=device, progress=False)
    for label, init in (("RPNT from scratch", None), ("RPNT pretrained + FS-SFT", pre_path)):
        log(f"[demo] finetuning: {label} …")
        out = workdir / ("scratch.safetensors" if init is None else "finetuned.safetensors")
        r = finetune(target, init=init, options=ft_opts, out=out, splits=splits)
        rows.append({"decoder": label, "test_r2": r["test_r2"], "val_r2": r["val_r2"],
                     "test_r2_per_dim": r["test_r2_per_dim"], "seconds": r["train_seconds"], "checkpoint": str(out)})
    for name in baselines:
        log(f"[demo] baseline: {name} …")
        t = time.time()
        r = evaluate_baseline(name, target, splits, seed=seed)
        rows.append({"decoder": f"baseline: {name}", "test_r2": r["r2"], "val_r2": None,
                     "test_r2_per_dim": r["r2_per_dim"], "seconds": round(time.time() - t, 2)})
    result = {"target": data.source, "splits": splits.as_dict(), "train_fraction": train_fraction, "preset": preset,
              "pretrain": {k: pre[k] for k in ("best_val_loss", "val_loss_mean_rate", "best_epoch", "epochs")},
              "rows": rows,
              "total_seconds": round(time.time() - t0, 1)}
    (workdir / "results.json").write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    lines = [f"target: {result['target']}   splits: {result['splits']}",
             f"{'decoder':<28} {'test R²':>8} {'val R²':>8} {'seconds':>8}",
             "-" * 56]
    for r in result["rows"]:
        val = "" if r["val_r2"] is None else f"{r['val_r2']:.4f}"
        lines.append(f"{r['decoder']:<28} {r['test_r2']:>8.4f} {val:>8} {r['seconds']:>8.1f}")
    pre = result.get("pretrain") or {}
    if pre.get("val_loss_mean_rate") is not None:
        lines.append(f"pretraining validation Poisson NLL {pre['best_val_loss']:.4f} "
                     f"(a mean-rate-only predictor: {pre['val_loss_mean_rate']:.4f})")
    lines.append(f"total {result['total_seconds']:.0f} s")
    return "\n".join(lines)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="a real labelled session to decode instead of a simulated one")
    p.add_argument("--workdir", default=None, help="where checkpoints and results go (default: a temp dir)")
    p.add_argument("--preset", choices=["small", "paper"], default="small", help="model size (default small)")
    p.add_argument("--pretrain-epochs", type=int, default=6, help="pretraining epochs (default 6)")
    p.add_argument("--steps-per-epoch", type=int, default=40, help="pretraining steps per epoch (default 40)")
    p.add_argument("--finetune-epochs", type=int, default=25, help="finetuning epochs (default 25)")
    p.add_argument("--train-fraction", type=float, default=0.2, help="few-shot train split (default 0.2)")
    p.add_argument("--baselines", default="wiener,kalman,gru", help="comma list (default wiener,kalman,gru)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    p.add_argument("--quiet", action="store_true", help="print only the tables")


def offline_part(a: argparse.Namespace) -> tuple[dict, DemoData, Path]:
    """Run the offline half from parsed arguments; returns (result, data, workdir)."""
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="rpnt-demo-"))
    data = demo_data(data=a.data, seed=a.seed, train_fraction=a.train_fraction)
    result = run_demo(workdir=workdir, data=data, seed=a.seed, preset=a.preset, pretrain_epochs=a.pretrain_epochs,
                      steps_per_epoch=a.steps_per_epoch, finetune_epochs=a.finetune_epochs,
                      baselines=tuple(x for x in a.baselines.split(",") if x), device=a.device,
                      progress=not a.quiet)
    return result, data, workdir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpnt_core.demo", description=(
        "The offline half of rpnt demo (no files needed): simulate → pretrain a small RPNT → few-shot "
        "finetune on a held-out subject → evaluate against classic baselines on the same splits, and "
        "print the results table. --data FILE does the same on a real recording."))
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
