"""The calibration worker: few-shot finetuning jobs, in a process of their own.

    python -m service.calibration_worker JOB_DIR          # one job, then exit (a cold worker)
    python -m service.calibration_worker --serve OPTIONS  # a warm worker: jobs from stdin

Both take their niceness, thread count and CPUs (``OPTIONS``: the
:class:`~service.settings.CalibrationSettings` as JSON; a cold worker reads them from the job)
before torch is imported.  A warm worker then imports torch and the exporters once, writes
``ready`` on stdout and waits: each line on stdin names a job directory; it runs that job and
answers ``done RC`` (0: ``result.json`` says ok, 1: it says why not).  It exits at the end of
stdin (the parent closed it, or died).  While a job runs, the worker's stdout and stderr go to
``JOB_DIR/worker.log``; the protocol has its own descriptor.

A job reads ``JOB_DIR/job.json`` (written by :class:`service.calibration.CalibrationManager`)::

    {"data": "data.npz", "base_checkpoint": ".../checkpoint.safetensors", "base_version": "3",
     "base_step_graph": ".../export/rpnt_step.onnx", "submitted": <unix time>,
     "options": {<CalibrationSettings fields>}, "labels": "recorded" | "refit"}

and does:

1. splits the calibration session in time: train (first ``train_fraction``), validation (next
   ``val_fraction``, early stopping), holdout (last ``holdout_fraction``, the go-live gate: never
   seen by training or early stopping) — every bin used for training, selection and the gate comes
   from the upload; intention labels (``"labels": "refit"``) are put on the live head's scale
   (:func:`intention_on_head_scale`: ReFIT's kept speed would slow each recalibrated decoder);
2. scores the live model on the holdout bins (streamed causally, with the receptive field's
   history before them: exactly what streaming from bin 0 gives);
3. FS-SFT from the live model's checkpoint (:func:`rpnt_core.train.finetune.fit_decoder`): the
   live decoder keeps its head, takes the upload's input statistics and is itself the first
   candidate; its core learns at 0.1× the learning rate (the cross-day transfer recipe); the steps
   are sized to the data (:func:`training_plan`), one line per epoch appended to
   ``JOB_DIR/progress.jsonl``; scores the candidate on the same holdout bins;
4. exports the candidate's step graph (the graph the daemon runs; no window graph) with the
   exporters' parity check over ``parity_bins`` bins, writing the candidate's weights into the
   live version's step graph when it fits instead of tracing a new one
   (:func:`exporters.onnx_export.export_model`, ``template``), so a candidate that would decode
   differently from its checkpoint never reaches the registry;
5. writes ``JOB_DIR/result.json`` (atomically) with the seconds of each phase (``timings``).

Nothing here touches the registry or the daemon: the parent decides (the gate) and swaps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from .settings import CalibrationSettings

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _progress(job: Path, **rec) -> None:
    with open(job / "progress.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), **rec}) + "\n")


def _write_result(job: Path, obj: dict) -> None:
    tmp = job / ".result.json.tmp"
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, job / "result.json")


def confine(opt: CalibrationSettings) -> None:
    """This process's threads, niceness and CPUs as ``opt`` says (before torch is imported)."""
    for var in THREAD_VARS:
        os.environ[var] = str(opt.threads)
    if opt.nice > 0:
        os.nice(opt.nice)
    if opt.affinity and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(opt.affinity))


def import_heavy(threads: int) -> float:
    """Import torch, the model code and the exporters (what a job needs); returns the seconds it took."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    import torch.onnx  # noqa: F401 - the exporter's own imports are most of a first export's time

    import exporters.onnx_export  # noqa: F401
    import rpnt_core.train.finetune  # noqa: F401

    return time.perf_counter() - t0


def training_plan(
    opt: CalibrationSettings, *, train_bins: int, batch_size: int, window_len: int
) -> tuple[int, int]:
    """(epochs, steps per epoch) for ``train_bins`` labelled training bins.

    An epoch is ``steps_per_epoch`` steps, or — when that is None — one pass over the training bins
    (``ceil(train_bins / (batch_size × window_len))`` steps); there are at most ``epochs`` of them and
    at most ``max_steps`` steps in all, so the training grows with the data up to a cap."""
    spe = opt.steps_per_epoch or math.ceil(train_bins / (batch_size * window_len))
    spe = max(1, min(spe, opt.max_steps))
    return max(1, min(opt.epochs, opt.max_steps // spe)), spe


class _Phases:
    """Progress lines and the wall seconds of each phase of one job."""

    def __init__(self, job: Path) -> None:
        self.job = job
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, key: str, **rec: Any) -> Iterator[None]:
        _progress(self.job, phase=name, **rec)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = round(time.perf_counter() - t0, 3)


def holdout_score(model: Any, session: Any, span: tuple[int, int]) -> dict:
    """R² of ``model`` on bins ``span`` of ``session`` (its target), streamed with the receptive
    field's history before them — the same numbers as streaming the session from bin 0."""
    import numpy as np

    from rpnt_core.evaluate.harness import predict_range, score, target_labels

    lo, hi = span
    labels = np.asarray(target_labels(model, session)[lo:hi], dtype=np.float32)
    return score(labels, predict_range(model, session, lo, hi))


def time_splits(n_bins: int, opt: CalibrationSettings) -> Any:
    """The calibration session's :class:`~rpnt_core.data.Splits` in time: train (first
    ``train_fraction``), validation (next ``val_fraction``), holdout (last ``holdout_fraction``)."""
    from rpnt_core.data import Splits

    a = int(n_bins * opt.train_fraction)
    b = a + int(n_bins * opt.val_fraction)
    c = n_bins - int(n_bins * opt.holdout_fraction)
    return Splits(train=(0, a), val=(a, b), test=(max(b, c), n_bins))


def finetune_options(opt: CalibrationSettings, *, train_bins: int) -> Any:
    """The :class:`~rpnt_core.train.finetune.FinetuneOptions` of a job with ``train_bins`` training
    bins: ``opt``'s recipe, on the CPU, its steps sized by :func:`training_plan`."""
    from rpnt_core.train.finetune import FinetuneOptions

    defaults = FinetuneOptions()
    window_len = min(defaults.window_len, train_bins)
    epochs, steps = training_plan(
        opt, train_bins=train_bins, batch_size=defaults.batch_size, window_len=window_len
    )
    return FinetuneOptions(
        mode=opt.mode,
        epochs=epochs,
        steps_per_epoch=steps,
        patience=opt.patience,
        lr=opt.lr,
        seed=opt.seed,
        device="cpu",
        progress=False,
        train_fraction=opt.train_fraction,
        val_fraction=opt.val_fraction,
        test_fraction=opt.holdout_fraction,
        window_len=window_len,
    )


def run_job(job: Path, phase: _Phases) -> dict:
    """The job in ``job`` (see the module docstring); its result, without ``ok``/``timings``."""
    spec = json.loads((job / "job.json").read_text())
    opt = CalibrationSettings.model_validate(spec["options"])
    from exporters.onnx_export import export_checkpoint
    from rpnt_core import load_checkpoint
    from rpnt_core.data import load_session

    base = Path(spec["base_checkpoint"])
    with phase("loading", "loading_s"):
        live = load_checkpoint(base)
        session, splits, label_scale = job_session(
            load_session(job / spec["data"]).with_target(None),
            live,
            opt,
            labels=spec.get("labels", "recorded"),
        )
    with phase("scoring live model", "scoring_live_s"):
        live_holdout = holdout_score(live, session, splits.test)
        del live
    model, fit, fo, cand_holdout = fit_candidate(
        session,
        splits,
        base=base,
        opt=opt,
        phase=phase,
        on_epoch=lambda e: _progress(job, phase="finetuning", **e),
    )
    cand = job / "candidate"
    cand.mkdir(exist_ok=True)
    with phase("saving", "saving_s"):
        ckpt = save_candidate(
            cand, model, fit=fit, holdout=cand_holdout, session=session, splits=splits, options=fo
        )
    with phase("exporting", "export_s"):
        exp = export_checkpoint(
            ckpt,
            cand / "export",
            parity_data=job / spec["data"],
            window=False,
            parity_bins=opt.parity_bins,
            template=spec.get("base_step_graph"),
        )
    phase.timings.update({f"export.{k}_s": v for k, v in exp.timings.items()})
    return {
        "splits": splits.as_dict(),
        "n_bins": session.n_bins,
        **_scores("live", live_holdout),
        **_scores("candidate", cand_holdout),
        "candidate_val_r2": fit["val_r2"],
        "best_epoch": fit["best_epoch"],
        "epochs_run": fit["epochs_run"],
        "epochs": fo.epochs,
        "steps_per_epoch": fo.steps_per_epoch,
        "train_seconds": fit["train_seconds"],
        "step_graph": exp.step_source,
        "weights_version": exp.contract.weights_sha if exp.contract is not None else None,
        "history": fit["history"],
        **({"label_scale": round(label_scale, 4)} if label_scale is not None else {}),
    }


def job_session(
    session: Any, live: Any, opt: CalibrationSettings, *, labels: str
) -> tuple[Any, Any, float | None]:
    """What a job trains and is gated on: ``session`` with its :func:`time_splits` — intention labels
    (``labels="refit"``) put on ``live``'s head scale first — and the labels' factor (None: recorded
    labels, trained on as they are)."""
    splits = time_splits(session.n_bins, opt)
    if labels != "refit":
        return session, splits, None
    session, factor = intention_on_head_scale(session, live, fit_bins=splits.val[1])
    return session, splits, factor


def _untimed(name: str, key: str, **rec: Any) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def fit_candidate(
    session: Any,
    splits: Any,
    *,
    base: Path,
    opt: CalibrationSettings,
    phase: Callable[..., contextlib.AbstractContextManager] = _untimed,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[Any, dict, Any, dict]:
    """The candidate: FS-SFT from the checkpoint ``base`` on ``splits`` (steps by
    :func:`finetune_options`), then scored on the holdout → (model, fit, options, holdout score).
    ``phase`` times the finetuning and scoring phases (a job's :class:`_Phases`; untimed by default)."""
    from rpnt_core.train.finetune import fit_decoder

    fo = finetune_options(opt, train_bins=splits.train[1])
    with phase("finetuning", "finetuning_s", epochs=fo.epochs, steps_per_epoch=fo.steps_per_epoch):
        model, fit = fit_decoder(session, init=base, options=fo, splits=splits, on_epoch=on_epoch)
    with phase("scoring candidate", "scoring_candidate_s"):
        holdout = holdout_score(model, session, splits.test)
    return model, fit, fo, holdout


def intention_on_head_scale(session: Any, live: Any, *, fit_bins: int) -> tuple[Any, float]:
    """``session`` with its intention (ReFIT) velocity labels on ``live``'s head scale
    (:func:`streaming.closedloop.refit.on_head_scale`, measured on the first ``fit_bins`` bins), and
    the factor applied."""
    from dataclasses import replace

    from streaming.closedloop.refit import on_head_scale

    labels, factor = on_head_scale(
        session.velocity,
        mean=live.velocity_mean.numpy(),
        scale=live.velocity_scale.numpy(),
        fit_bins=fit_bins,
    )
    return replace(session, velocity=labels), factor


def _scores(who: str, holdout: dict) -> dict:
    return {f"{who}_holdout_r2": holdout["r2"], f"{who}_holdout_r2_per_dim": holdout["r2_per_dim"]}


def save_candidate(
    cand: Path, model: Any, *, fit: dict, holdout: dict, session: Any, splits: Any, options: Any
) -> Path:
    """Save the finetuned ``model`` as ``cand/checkpoint.safetensors`` with its fit's metrics
    (``holdout``: its holdout score, reported as test) and provenance; the checkpoint's path."""
    from rpnt_core.train.finetune import save_finetuned

    ckpt = cand / "checkpoint.safetensors"
    metrics = {
        "val_r2": fit["val_r2"],
        "best_epoch": fit["best_epoch"],
        "epochs_run": fit["epochs_run"],
        "test_r2": holdout["r2"],
        "test_r2_per_dim": holdout["r2_per_dim"],
        "train_seconds": fit["train_seconds"],
    }
    provenance = {k: v for k, v in fit.items() if k not in (*metrics, "history")}
    save_finetuned(
        model, ckpt, session=session, options=options, splits=splits, metrics=metrics, provenance=provenance
    )
    return ckpt


def run_one(job: Path, *, started: float, imports_s: float) -> int:
    """Run ``job`` and write its ``result.json`` (``ok``, ``timings``, and the result or the error);
    the exit status a cold worker gives: 0 ok, 1 failed.  ``started``: when this worker process
    began (cold) or took the job (warm); ``imports_s``: the heavy imports this job waited for."""
    t0 = time.time()
    phase = _Phases(job)
    try:
        spec = json.loads((job / "job.json").read_text())
        phase.timings["worker_start_s"] = round(max(0.0, started - float(spec.get("submitted", started))), 3)
    except (OSError, ValueError):
        pass
    phase.timings["imports_s"] = round(imports_s, 3)
    try:
        res = run_job(job, phase)
    except Exception as exc:  # noqa: BLE001 - reported to the parent through result.json
        _write_result(
            job,
            {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8),
                "seconds": time.time() - t0,
                "timings": phase.timings,
            },
        )
        _progress(job, phase="failed")
        return 1
    _write_result(job, {"ok": True, **res, "seconds": round(time.time() - t0, 2), "timings": phase.timings})
    _progress(job, phase="done")
    return 0


def _start_record(job: Path) -> None:
    policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
    _progress(job, phase="starting", nice=os.nice(0), policy=policy, pid=os.getpid())


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (descriptors 1 and 2) to ``path`` for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for x in (fd, *saved):
            os.close(x)


def serve(options: CalibrationSettings) -> int:
    """The warm worker's loop (see the module docstring)."""
    confine(options)
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own descriptor
    os.dup2(2, 1)  # anything printed goes to the log, never into the protocol
    import_heavy(options.threads)
    proto.write("ready\n")
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        job = Path(name)
        started = time.time()
        with _output_to(job / "worker.log"):
            _start_record(job)
            rc = run_one(job, started=started, imports_s=0.0)
        proto.write(f"done {rc}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--serve":
        return serve(CalibrationSettings.model_validate_json(argv[1]))
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m service.calibration_worker JOB_DIR | --serve OPTIONS_JSON", file=sys.stderr)
        return 2
    started = time.time()
    job = Path(argv[0])
    try:
        opt = CalibrationSettings.model_validate(json.loads((job / "job.json").read_text())["options"])
    except (OSError, ValueError, KeyError) as exc:  # pydantic's ValidationError is a ValueError
        _write_result(job, {"ok": False, "error": f"job.json: {exc}"})
        return 1
    confine(opt)
    _start_record(job)
    _progress(job, phase="loading")
    imports_s = import_heavy(opt.threads)
    return run_one(job, started=started, imports_s=imports_s)


if __name__ == "__main__":
    raise SystemExit(main())
