"""The calibration worker: one few-shot finetuning job, in its own process.

    python -m service.calibration_worker JOB_DIR

Reads ``JOB_DIR/job.json`` (written by :class:`service.calibration.CalibrationManager`)::

    {"data": "data.npz", "base_checkpoint": ".../checkpoint.safetensors", "base_version": "3",
     "options": {<CalibrationSettings fields>}}

and does, at the niceness and thread count it is given (before torch is imported):

1. splits the calibration session in time: train (first ``train_fraction``), validation (next
   ``val_fraction``, early stopping), holdout (last ``holdout_fraction``, the go-live gate: never
   seen by training or early stopping);
2. FS-SFT from the live model's checkpoint (:func:`rpnt_core.train.finetune.finetune`), one line
   per epoch appended to ``JOB_DIR/progress.jsonl``;
3. scores the live model and the candidate on the holdout bins, both streamed causally from bin 0
   of the calibration session;
4. exports the candidate to ONNX with the exporters' parity check (``candidate/export``), so a
   candidate that would decode differently from its checkpoint never reaches the registry;
5. writes ``JOB_DIR/result.json`` (atomically) and exits 0; any failure: ``result.json`` with
   ``error`` and exit 1.

Nothing here touches the registry or the daemon: the parent decides (the gate) and swaps.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def _progress(job: Path, **rec) -> None:
    with open(job / "progress.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), **rec}) + "\n")


def _write_result(job: Path, obj: dict) -> None:
    tmp = job / ".result.json.tmp"
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, job / "result.json")


def run_job(job: Path) -> dict:
    spec = json.loads((job / "job.json").read_text())
    opt = spec["options"]
    threads = int(opt.get("threads", 1))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if int(opt.get("nice", 0)) > 0:
        os.nice(int(opt["nice"]))
    if opt.get("affinity") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(int(c) for c in opt["affinity"]))
    policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
    _progress(job, phase="starting", nice=os.nice(0), policy=policy, pid=os.getpid())
    _progress(job, phase="loading")
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    from exporters.onnx_export import export_checkpoint
    from rpnt_core import load_checkpoint
    from rpnt_core.data import Splits, load_session
    from rpnt_core.evaluate.harness import evaluate_model
    from rpnt_core.train.finetune import FinetuneOptions, finetune

    session = load_session(job / spec["data"])
    n = session.n_bins
    a = int(n * opt["train_fraction"])
    b = a + int(n * opt["val_fraction"])
    c = n - int(n * opt["holdout_fraction"])
    splits = Splits(train=(0, a), val=(a, b), test=(max(b, c), n))
    base = Path(spec["base_checkpoint"])

    _progress(job, phase="scoring live model")
    live = load_checkpoint(base)
    live_holdout = evaluate_model(live, session, splits)
    del live

    _progress(job, phase="finetuning", epochs=opt["epochs"])
    cand = job / "candidate"
    cand.mkdir(exist_ok=True)
    fo = FinetuneOptions(mode=opt["mode"], epochs=opt["epochs"], steps_per_epoch=opt["steps_per_epoch"],
                         patience=opt["patience"], lr=opt["lr"], seed=opt["seed"], device="cpu", progress=False,
                         train_fraction=opt["train_fraction"], val_fraction=opt["val_fraction"],
                         test_fraction=opt["holdout_fraction"], window_len=min(100, a))
    r = finetune(session, init=base, options=fo, out=cand / "checkpoint.safetensors", splits=splits,
                 on_epoch=lambda e: _progress(job, phase="finetuning", **e))
    Path(str(cand / "checkpoint.safetensors") + ".history.json").unlink(missing_ok=True)

    _progress(job, phase="exporting")
    exp = export_checkpoint(cand / "checkpoint.safetensors", cand / "export", parity_data=job / spec["data"])
    return {"splits": splits.as_dict(), "n_bins": n, "live_holdout_r2": live_holdout["r2"],
            "live_holdout_r2_per_dim": live_holdout["r2_per_dim"], "candidate_holdout_r2": r["test_r2"],
            "candidate_holdout_r2_per_dim": r["test_r2_per_dim"], "candidate_val_r2": r["val_r2"],
            "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"], "train_seconds": r["train_seconds"],
            "weights_version": exp.contract.weights_sha if exp.contract is not None else None,
            "history": r["history"]}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m service.calibration_worker JOB_DIR", file=sys.stderr)
        return 2
    job = Path(argv[0])
    t0 = time.time()
    try:
        res = run_job(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent through result.json
        _write_result(job, {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(limit=8), "seconds": time.time() - t0})
        _progress(job, phase="failed")
        return 1
    _write_result(job, {"ok": True, **res, "seconds": round(time.time() - t0, 2)})
    _progress(job, phase="done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
