"""Command-line front ends of rpnt_core: ``rpnt simulate | inspect | pretrain | finetune | evaluate``.

Each ``*_main(argv) -> int`` parses its own arguments; errors in the user's input (a bad file, a
channel-count mismatch, an impossible option) print one clear line and exit with status 2.  The
pretrain and finetune flags are derived from the fields of ``PretrainOptions`` / ``FinetuneOptions``
(:mod:`rpnt_core.flags`), so an option's default and help are declared once.  Importing this
module does not import torch (``--help`` stays fast); a command imports it when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError
from .flags import add_option_flags, option_values
from .train.choices import pretraining_objective
from .train.options import FinetuneOptions, PretrainOptions


def _threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")


def _target_arg(p: argparse.ArgumentParser, *, default: str | None, what: str) -> None:
    """``--target NAME``, the behaviour series a command reads (``None``: the checkpoint's)."""
    shown = default or "the checkpoint's target"
    p.add_argument(
        "--target",
        metavar="NAME",
        default=default,
        help=f"behaviour series {what} (velocity, position, force or emg, as the data has them; "
        f"default: {shown})",
    )


def _allow_flagged_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-flagged",
        action="store_true",
        help="use sessions that quality control flags as unfit to train on (see rpnt inspect)",
    )


def _refuse_flagged(session, *, labels: bool) -> None:
    """Raise ``ValueError`` naming the reasons when quality control flags ``session``."""
    from .data.quality import assess_session

    q = assess_session(session, labels=labels)
    if q.flagged:
        raise ValueError(
            f"data: {q.session} is flagged unfit to train on: {q.reason} (--allow-flagged uses it anyway)"
        )


def _drop_flagged(cmd: str, sessions: list) -> list:
    """The sessions quality control passes; one stderr line per skipped session, with the reason."""
    from .data.quality import split_flagged

    kept, flagged = split_flagged(sessions)
    for q in flagged:
        print(f"rpnt {cmd}: skipping {q.session}: {q.reason} (--allow-flagged keeps it)", file=sys.stderr)
    if not kept:
        raise ValueError(
            "data: every session is flagged unfit to train on (reasons above); --allow-flagged keeps them"
        )
    return kept


def _load_many(paths: list[str]):
    from .data import load_session, session_files

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = session_files(p)
            if not found:
                raise ValueError(f"data: directory {p} holds no .npz/.mat/.nwb files")
            files += found
        else:
            files.append(p)
    return [_load_named(f, load_session) for f in files]


def _load_named(path: Path, load):
    """``load(path)``, its errors naming the file (one of many: say which) where they do not already."""
    try:
        return load(path)
    except ValueError as exc:
        if path.name in str(exc):
            raise
        raise ValueError(f"{path.name}: {exc}") from None


def _fail(cmd: str, exc: BaseException) -> int:
    print(f"rpnt {cmd}: error: {exc}", file=sys.stderr)
    return 2


USER_ERRORS = (ValueError, ConfigError, FileNotFoundError, KeyError)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


# ---------------------------------------------------------------------------------------- simulate
def simulate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="rpnt simulate",
        description=(
            "Write synthetic sessions with ground truth as NPZ files (the interchange format) plus a "
            "manifest.json: several subjects with different channel counts and identities, slow drift "
            "across sessions, two task types, and multi-site recordings with site coordinates."
        ),
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--subjects", type=int, default=4, help="number of subjects (default 4)")
    p.add_argument("--sessions-per-subject", type=int, default=4, help="sessions per subject (default 4)")
    p.add_argument("--bin-s", type=float, default=0.02, help="bin width in seconds (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    a = p.parse_args(argv)
    from .data import SimulationSpec, write_simulated

    try:
        spec = SimulationSpec(
            n_subjects=a.subjects, sessions_per_subject=a.sessions_per_subject, bin_s=a.bin_s
        )
        paths = write_simulated(a.out, spec, seed=a.seed)
    except USER_ERRORS as exc:
        return _fail("simulate", exc)
    print(f"wrote {len(paths)} sessions to {a.out} (manifest.json lists them)")
    return 0


# ---------------------------------------------------------------------------------------- pretrain
def _pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rpnt pretrain",
        description=(
            "Pretraining on earlier recordings of the array. Where every session has the --target series it "
            "is supervised (core and head learn the earlier days' decoder, which finetuning starts from); "
            "otherwise self-supervised: random neuron and time masks with ratios drawn from U(0,1) per batch, "
            "the causal encoder forecasts the hidden counts (Poisson NLL). Sessions quality control flags are "
            "skipped. Keeps the checkpoint with the best validation loss (last 10% of each recording), logs "
            "one JSON line per epoch to OUT.log.jsonl, shows one progress bar with the run's ETA, and can "
            "resume. Runs under torchrun for multi-GPU."
        ),
        epilog="example: rpnt pretrain --data day18.mat day19.mat --target position --out pre.safetensors",
    )
    p.add_argument(
        "--data", nargs="+", required=True, help="session files (.npz/.mat/.nwb) or directories of them"
    )
    p.add_argument("--out", required=True, help="checkpoint path to write (.safetensors)")
    add_option_flags(
        p, PretrainOptions, unset={"objective": "supervised when every session has --target, else masked"}
    )
    _target_arg(p, default="velocity", what="that --objective supervised learns")
    _threads_arg(p)
    _allow_flagged_arg(p)
    return p


def pretrain_main(argv: list[str]) -> int:
    a = _pretrain_parser().parse_args(argv)
    out = Path(a.out)
    files = (out, _resume_state_path(out))
    before = [_stamp(f) for f in files]
    try:
        return _run_pretrain(a)
    except KeyboardInterrupt:
        fresh = [
            now is not None and (a.resume or now != then)
            for now, then in zip(map(_stamp, files), before, strict=True)
        ]
        print(
            ("\n" if a.progress else "")
            + _pretrain_interrupted(out, best_saved=fresh[0], resumable=fresh[1]),
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def _run_pretrain(a: argparse.Namespace) -> int:
    _threads(a.threads)
    from .train.pretrain import pretrain

    try:
        sessions = _load_many(a.data)
        objective = a.objective or pretraining_objective(sessions, a.target)
        if objective == "supervised":
            sessions = [s.with_target(a.target) for s in sessions]
        if not a.allow_flagged:
            sessions = _drop_flagged("pretrain", sessions)
        if a.objective is None and a.progress:
            print(
                f"rpnt pretrain: objective {objective} ({_objective_reason(objective, a.target)})",
                file=sys.stderr,
            )
        opts = PretrainOptions(**{**option_values(PretrainOptions, a), "objective": objective})
        res = pretrain(sessions, options=opts, out=a.out)
    except USER_ERRORS as exc:
        return _fail("pretrain", exc)
    print(json.dumps(res, indent=2))
    return 0


def _objective_reason(objective: str, target: str) -> str:
    """Why ``rpnt pretrain`` chose ``objective`` when no --objective was given."""
    if objective == "supervised":
        return f"every session has {target!r} labels"
    return f"not every session has {target!r} labels; self-supervised"


def _resume_state_path(out: Path) -> Path:
    """Where :func:`rpnt_core.train.pretrain.pretrain` keeps its resumable training state."""
    return out.with_suffix(".resume.safetensors")


def _stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of ``path``, None if missing: a file rewritten (atomically replaced) since has another."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _pretrain_interrupted(out: Path, *, best_saved: bool, resumable: bool) -> str:
    """What a Ctrl-C leaves behind.  ``best_saved``: ``out`` holds this run's best checkpoint so far
    (or the resumed run's); ``resumable``: its training state is there to ``--resume`` from."""
    if not best_saved:
        return "rpnt pretrain: interrupted before the first epoch ended; nothing was saved (run the command again)"
    lines = [f"rpnt pretrain: interrupted; the best checkpoint so far is {out}{_best_epoch(out)}"]
    if resumable:
        lines.append(
            f"to continue after the last finished epoch, run the same command with --resume "
            f"(training state: {_resume_state_path(out)})"
        )
    return "\n".join(lines)


def _best_epoch(out: Path) -> str:
    """`` (epoch E, validation loss L)`` from the checkpoint's metadata; empty if it does not say."""
    from .checkpoint import read_header

    try:
        m = read_header(out)[1].get("metrics", {})
        return f" (epoch {int(m['epoch']) + 1}, validation loss {float(m['val_poisson_nll']):.4f})"
    except Exception:  # noqa: BLE001 - a detail of the message, never a reason to fail it
        return ""


# ---------------------------------------------------------------------------------------- finetune
_BUDGETED = ("epochs", "steps_per_epoch", "batch_size", "window_len", "patience")  # sized by --label-seconds


def _finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rpnt finetune",
        description=(
            "Supervised finetuning of the decoder of one behaviour target (--target) on one labelled session. "
            "Sessions that quality control flags are refused (rpnt inspect says why). The session is split in "
            "time: test = last 20%, validation = the 10% before it, train = the first --train-fraction "
            "(few-shot: a short prefix). Early-stops on validation R² and reports the test R² of the "
            "best-validation weights."
        ),
        epilog="example: rpnt finetune --init pre.safetensors --data day21.mat --target position --label-seconds 60 "
        "--out ft.safetensors",
    )
    p.add_argument("--data", required=True, help="one labelled session (.npz/.mat/.nwb)")
    _target_arg(p, default="velocity", what="to decode")
    _allow_flagged_arg(p)
    p.add_argument("--init", default=None, help="pretrained checkpoint (omit to train from scratch)")
    p.add_argument("--out", required=True, help="checkpoint path to write (.safetensors)")
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--label-seconds",
        type=float,
        default=None,
        metavar="S",
        help="calibrate a new day from its first S seconds of labels: train on the first 80 %% of "
        "them, validate (early stopping) on the rest, test on the last 20 %% of the session; "
        "training is sized to the labels unless the flags below say otherwise",
    )
    add_option_flags(
        p,
        FinetuneOptions,
        unset=dict.fromkeys(_BUDGETED, "{default}; with --label-seconds: sized to the labels"),
        groups={"train_fraction": split},
    )
    _threads_arg(p)
    return p


def finetune_main(argv: list[str]) -> int:
    a = _finetune_parser().parse_args(argv)
    _threads(a.threads)
    from .data import load_session
    from .data.splits import label_budget_splits
    from .train.finetune import finetune

    try:
        session = load_session(a.data).with_target(a.target)
        if not a.allow_flagged:
            _refuse_flagged(session, labels=True)
        chosen = option_values(FinetuneOptions, a)
        splits = None
        if a.label_seconds is not None:
            splits = label_budget_splits(session.n_bins, bin_s=session.bin_s, seconds=a.label_seconds)
            opts = FinetuneOptions.for_labels(splits.train[1] - splits.train[0], **chosen)
        else:
            opts = FinetuneOptions(**chosen)
        res = finetune(session, init=a.init, options=opts, out=a.out, splits=splits)
    except USER_ERRORS as exc:
        return _fail("finetune", exc)
    res.pop("history", None)
    print(json.dumps(res, indent=2))
    return 0


# ---------------------------------------------------------------------------------------- evaluate
def _evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rpnt evaluate",
        description=(
            "Stream a session causally through a checkpoint (what the online decoder would have said) and "
            "print R² on the test split: pooled over the test bins, variance-weighted across output "
            "dimensions. The splits are the checkpoint's own when it was finetuned on this session, otherwise "
            "contiguous splits with --train-fraction. --baselines fits classic decoders on the same splits. The "
            "target is the checkpoint's; the data's bin width must be the model's."
        ),
        epilog="example: rpnt evaluate --ckpt ft.safetensors --data sim/sim00_s00.npz --json",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint (.safetensors)")
    p.add_argument("--data", required=True, help="labelled session (.npz/.mat/.nwb)")
    _target_arg(p, default=None, what="to score, which must be the one the checkpoint decodes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--split", choices=["train", "val", "test"], default="test", help="split to score (default test)"
    )
    p.add_argument(
        "--train-fraction",
        type=float,
        default=0.2,
        help="used only when the checkpoint carries no splits for this session (default 0.2)",
    )
    p.add_argument(
        "--baselines", default="", help="comma list of baselines to run on the same splits: wiener,kalman,gru"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for baselines that train (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    return p


def evaluate_main(argv: list[str]) -> int:
    a = _evaluate_parser().parse_args(argv)
    _threads(a.threads)
    try:
        res = _evaluate(a)
    except USER_ERRORS as exc:
        return _fail("evaluate", exc)
    if a.json:
        print(json.dumps(res))
        return 0
    print(
        f"R² {res['target']} ({a.split}, {res['splits'][a.split]}) = {res['r2']:.4f}   per dim: "
        + ", ".join(f"{x:.4f}" for x in res["r2_per_dim"])
    )
    for n, r in res.get("baselines", {}).items():
        print(f"  {n:<8} R² = {r['r2']:.4f}")
    return 0


def _evaluate(a: argparse.Namespace) -> dict:
    """The ``rpnt evaluate`` result for parsed arguments ``a`` (raises the user's errors)."""
    from .checkpoint import load_checkpoint, require_trained_head
    from .evaluate.harness import evaluate_baseline, evaluate_model

    model = load_checkpoint(a.ckpt)
    require_trained_head(model.checkpoint_meta, a.ckpt)
    session = _evaluation_session(model, a.data, a.target)
    splits, source = _evaluation_splits(model.checkpoint_meta, session, a.train_fraction)
    res = evaluate_model(model, session, splits, split=a.split)
    res.update(
        checkpoint=str(a.ckpt),
        data=str(a.data),
        splits_source=source,
        model_version=model.checkpoint_meta.get("weights_sha", ""),
    )
    names = [n for n in a.baselines.split(",") if n]
    if names:
        res["baselines"] = {n: evaluate_baseline(n, session, splits, seed=a.seed) for n in names}
    return res


def _evaluation_session(model, data: str, target: str | None):
    """The session at ``data`` with ``model``'s target, checked against the model (target, bin width,
    channel count)."""
    from .data import load_session
    from .data.session import check_bin_width

    decoded = model.config.target
    if target is not None and target != decoded:
        raise ValueError(f"target: the checkpoint decodes {decoded!r}, not {target!r}")
    session = load_session(data).with_target(decoded)
    check_bin_width(data_bin_s=session.bin_s, model_bin_s=model.config.bin_s)
    if session.n_channels != model.config.n_input_channels:
        raise ValueError(
            f"data: the session has {session.n_channels} channels, the checkpoint expects "
            f"{model.config.n_input_channels}"
        )
    return session


def _evaluation_splits(meta: dict, session, train_fraction: float):
    """(splits, source): the checkpoint's own splits when it was trained on ``session`` (same data
    fingerprint), else contiguous splits with ``train_fraction``."""
    from .data import Splits, contiguous_splits

    if meta.get("splits") and meta.get("data_fingerprint") == session.fingerprint():
        return Splits.from_dict(meta["splits"]), "checkpoint"
    return contiguous_splits(session.n_bins, train_fraction=train_fraction), "default"


# ---------------------------------------------------------------------------------------- inspect
def inspect_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="rpnt inspect",
        description=(
            "Load sessions and report quality-control facts per session: bins, channels, duration, channel "
            "rates, silent and saturated channels, channels whose rate shifts within the session, and the "
            "target's idle share and outlier bins. FLAGGED sessions are unfit to train on (the reasons follow "
            "the table); rpnt pretrain skips them and rpnt finetune refuses them unless --allow-flagged. The "
            "rules are in rpnt_core/data/quality.py."
        ),
        epilog="example: rpnt inspect data/limblab_spike_wf_2012 --target position",
    )
    p.add_argument(
        "data", nargs="+", metavar="DATA", help="session files (.npz/.mat/.nwb) or directories of them"
    )
    _target_arg(p, default="velocity", what="whose labels to check")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = p.parse_args(argv)
    from .data.quality import assess_session, format_json, format_table

    try:
        sessions = _load_many(a.data)
        if not any(a.target in s.targets for s in sessions):
            have = sorted({name for s in sessions for name in s.targets})
            raise ValueError(
                f"target: no session has {a.target!r} (they have {', '.join(have) or 'no behaviour'})"
            )
        # a session without the target (force before it was recorded) gets the neural facts only
        reports = [
            assess_session(s.with_target(a.target))
            if a.target in s.targets
            else assess_session(s, labels=False)
            for s in sessions
        ]
    except USER_ERRORS as exc:
        return _fail("inspect", exc)
    print(format_json(reports) if a.json else format_table(reports))
    return 0
