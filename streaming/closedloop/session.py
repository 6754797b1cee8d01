"""One closed-loop session, end to end (what ``rpnt closedloop`` and ``bench/bench_closedloop.py`` run):
observation block → decoder → served by the real daemon → closed-loop block(s) with recalibration.

:func:`run_closedloop` returns ``{"encoding", "decoder", "blocks": [block summary, …]}`` and writes,
into ``workdir``, ``trials.json`` (per trial, all blocks), ``summary.json`` and ``closedloop.png``.
The pieces (:func:`make_participant`, :func:`start_backend`, :func:`run_block`,
:func:`recalibrate`) are what the benchmark composes into drift and latency sweeps.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .backends import BASELINE_TRAIN_FRACTION, ServeBackend, ThreadBackend, fit_baseline, train_rpnt
from .controller import ControllerConfig
from .participant import EncodingModel, default_encoding, synthetic_encoding
from .refit import on_head_scale, refit_labels
from .report import plot_blocks, write_trials
from .runner import ClosedLoop, LoopConfig, simulate_observation
from .task import TaskConfig

BIN_S = 0.02


@dataclass(frozen=True, kw_only=True)
class ClosedLoopSpec:
    decoder: str = "rpnt"
    seconds: float = 60.0
    observe_s: float = 180.0
    recalibrate: str | None = "refit"
    extra_latency_s: float = 0.0
    task_kind: str = "center_out"
    radius: float = 1.5
    distance: float = 8.0
    hold_s: float = 0.3
    timeout_s: float = 6.0
    feedback_delay_s: float = 0.1
    recording: Path | None = None
    synthetic: bool = False
    preset: str = "small"
    rpnt_epochs: int = 10
    rpnt_steps: int = 20
    seed: int = 0

    @property
    def task(self) -> TaskConfig:
        return TaskConfig(
            kind=self.task_kind,
            radius=self.radius,
            distance=self.distance,
            hold_s=self.hold_s,
            timeout_s=self.timeout_s,
        )

    @property
    def controller(self) -> ControllerConfig:
        return ControllerConfig(feedback_delay_s=self.feedback_delay_s)


def make_participant(spec: ClosedLoopSpec) -> EncodingModel:
    return (
        synthetic_encoding(seed=spec.seed)
        if spec.synthetic
        else default_encoding(spec.recording, seed=spec.seed)
    )


def initial_stamp(spec: ClosedLoopSpec, enc: EncodingModel) -> str:
    """What identifies an initial RPNT: the participant, the observation block and the recipe."""
    return json.dumps(
        {
            "encoding": enc.source,
            "fit": enc.fit,
            "observe_s": spec.observe_s,
            "seed": spec.seed,
            "preset": spec.preset,
            "epochs": spec.rpnt_epochs,
            "steps": spec.rpnt_steps,
            "task": asdict(spec.task),
            "controller": asdict(spec.controller),
        },
        sort_keys=True,
    )


def fit_initial(spec: ClosedLoopSpec, enc: EncodingModel, *, workdir: Path, log: Callable = print) -> dict:
    """The observation block and the decoder fitted on it: ``{"decoder"|"export", "fit_s", ...}``.
    An RPNT trained in ``workdir`` before on the same observation block and recipe is reused."""
    counts, intent = simulate_observation(
        encoding=enc,
        task=spec.task,
        controller=spec.controller,
        seconds=spec.observe_s,
        bin_s=BIN_S,
        seed=spec.seed + 100,
    )
    t0 = time.perf_counter()
    if spec.decoder == "rpnt":
        stamp = initial_stamp(spec, enc)
        cached = workdir / "initial" / "spec.json"
        if cached.exists() and cached.read_text() == stamp and (workdir / "initial" / "export").is_dir():
            log(f"[closedloop] reusing the RPNT trained on this observation block ({workdir / 'initial'})")
            prev = json.loads((workdir / "initial" / "result.json").read_text())
            return {"export": workdir / "initial" / "export", **prev, "reused": True}
        log(
            f"[closedloop] training RPNT ({spec.preset}) from scratch on the {spec.observe_s:g} s observation "
            "block and exporting it to ONNX …"
        )
        r = train_rpnt(
            counts,
            intent,
            bin_s=BIN_S,
            workdir=workdir / "initial",
            preset=spec.preset,
            epochs=spec.rpnt_epochs,
            steps_per_epoch=spec.rpnt_steps,
            seed=spec.seed,
        )
        out = {"fit_s": r["seconds"], "offline_test_r2": r["test_r2"]}
        (workdir / "initial" / "result.json").write_text(json.dumps(out))
        cached.write_text(stamp)
        return {"export": r["export"], **out}
    dec = fit_baseline(spec.decoder, counts, intent, bin_s=BIN_S, seed=spec.seed)
    head_scale = (intent.mean(0), intent.std(0) + 1e-6)  # as a fresh RPNT head normalises its target
    return {"decoder": dec, "head_scale": head_scale, "fit_s": round(time.perf_counter() - t0, 2)}


def start_backend(spec: ClosedLoopSpec, initial: dict, *, workdir: Path, env: dict | None = None):
    if spec.decoder == "rpnt":
        return ServeBackend(export=initial["export"], workdir=workdir / "serve", env=env)
    return ThreadBackend(decoder=initial["decoder"], bin_s=BIN_S, head_scale=initial["head_scale"])


def run_block(
    backend,
    enc: EncodingModel,
    spec: ClosedLoopSpec,
    *,
    seconds: float,
    seed: int,
    labels: str | None,
    extra_latency_s: float | None = None,
    during: Callable[[ClosedLoop], Any] | None = None,
) -> ClosedLoop:
    """One real-time block against ``backend``; ``during(loop)`` runs in this thread while the loop
    runs in its own (e.g. a recalibration or a drift schedule)."""
    cfg = LoopConfig(
        seconds=seconds,
        bin_s=BIN_S,
        seed=seed,
        labels=labels,
        extra_latency_s=spec.extra_latency_s if extra_latency_s is None else extra_latency_s,
    )
    loop = ClosedLoop(
        ingest=backend.ingest,
        publish=backend.publish,
        encoding=enc,
        task=spec.task,
        controller=spec.controller,
        config=cfg,
    ).start()
    if during is not None:
        during(loop)
    loop.join()
    return loop


def labels_of(
    loop: ClosedLoop, kind: str, lo: int = 0, hi: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(counts, labels) of bins [lo, hi) that had a prediction, labelled by ``kind``."""
    rec = loop.record
    sl = slice(lo, loop.n_bins if hi is None else hi)
    ok = rec.received[sl] & np.all(np.isfinite(rec.cursor_at_apply[sl]), axis=1)
    if kind == "refit":
        lab = refit_labels(
            decoded=rec.decoded[sl][ok],
            cursor=rec.cursor_at_apply[sl][ok],
            target=rec.target_at_apply[sl][ok],
            radius=loop.task.config.radius,
        )
    elif kind == "intended":
        lab = rec.intent[sl][ok]
    else:
        lab = rec.decoded[sl][ok]
    return rec.counts[sl][ok].astype(np.int64), np.asarray(lab, dtype=np.float64)


def recalibrate(
    backend,
    loop: ClosedLoop,
    kind: str,
    *,
    seconds: float | None = None,
    upload: bool = False,
    force: bool = False,
    seed: int = 0,
    log: Callable = print,
) -> dict:
    """Recalibrate ``backend``'s decoder from ``loop``'s last ``seconds`` (all: None) labelled by ``kind``.

    RPNT: ``POST /calibrate`` — ``source=recent`` (the labels the loop streamed as KINEMATICS;
    ``kind`` must be what it streamed; ``refit`` is sent as ``labels=refit``) or, with ``upload``,
    an NPZ upload (``labels=refit`` with the task streams, else the labels as velocity); ``force``: live whatever the gate says (a model
    trained on decoded-velocity labels can never beat the live model at reproducing its own
    output).  Baselines: refit on (counts, labels) and hot swap; ReFIT labels first on the
    observation block's speed scale (:func:`~.refit.on_head_scale`), as the service does for RPNT.
    Returns what happened (job state, holdout R², swap bin, seconds)."""
    t0 = time.perf_counter()
    hi = loop.k
    lo = 0 if seconds is None else max(0, hi - int(round(seconds / BIN_S)))
    if isinstance(backend, ThreadBackend):
        counts, lab = labels_of(loop, kind, lo, hi)
        if kind == "refit":  # as the calibration worker does for RPNT (refit.on_head_scale)
            mean, scale = backend.head_scale
            lab, _ = on_head_scale(
                lab, mean=mean, scale=scale, fit_bins=int(len(lab) * BASELINE_TRAIN_FRACTION)
            )
        dec = fit_baseline(backend.name, counts, lab, bin_s=BIN_S, seed=seed)
        out = backend.swap(dec)
        return {
            "state": "succeeded",
            "labels": kind,
            "n_bins": int(len(counts)),
            **out,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    if upload:
        if kind == "refit":
            payload = {**loop.refit_streams(lo, hi), "bin_s": np.float64(BIN_S)}
            code, job = backend.calibrate(upload=payload, labels="refit", force=force)
        else:
            counts, lab = labels_of(loop, kind, lo, hi)
            code, job = backend.calibrate(
                upload={
                    "counts": counts.astype(np.int32),
                    "bin_s": np.float64(BIN_S),
                    "velocity": lab.astype(np.float32),
                },
                force=force,
            )
    else:
        code, job = backend.calibrate(
            seconds=(hi - lo) * BIN_S, force=force, labels="refit" if kind == "refit" else "recorded"
        )
    if code != 202:
        return {"state": f"http {code}", "detail": job.get("detail"), "labels": kind}
    log(f"[closedloop] POST /calibrate ({kind} labels, {job.get('n_bins')} bins) → job {job['job_id']}")
    st = backend.wait_job(job["job_id"])
    res = st.get("result") or {}
    return {
        "state": st.get("state"),
        "labels": kind,
        "n_bins": job.get("n_bins"),
        "candidate_holdout_r2": res.get("candidate_holdout_r2"),
        "live_holdout_r2": res.get("live_holdout_r2"),
        "swap": st.get("swap") or st.get("activation"),
        "epochs": res.get("epochs"),
        "steps_per_epoch": res.get("steps_per_epoch"),
        "timings": st.get("timings"),
        "error": st.get("error"),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def block_summary(name: str, loop: ClosedLoop) -> dict:
    return {"name": name, **loop.summary()}


def run_closedloop(spec: ClosedLoopSpec, *, workdir: Path, log: Callable = print) -> dict:
    """See the module docstring."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    enc = make_participant(spec)
    log(
        f"[closedloop] participant: {enc.n_channels} channels, encoding from {enc.source or 'synthetic'} "
        f"(mean rate at rest {float(enc.rates_hz(np.zeros(2)).mean()):.1f} Hz)"
    )
    initial = fit_initial(spec, enc, workdir=workdir, log=log)
    backend = start_backend(spec, initial, workdir=workdir)
    blocks, loops, cal = [], [], None
    try:
        log(
            f"[closedloop] block 1: {spec.seconds:g} s closed loop, {spec.decoder} fitted on the observation block"
        )
        loop = run_block(backend, enc, spec, seconds=spec.seconds, seed=spec.seed, labels=spec.recalibrate)
        blocks.append(block_summary("observation-fit", loop))
        loops.append(loop)
        if spec.recalibrate:
            cal = recalibrate(backend, loop, spec.recalibrate, seed=spec.seed, log=log)
            log(f"[closedloop] recalibration from {spec.recalibrate} labels: {cal}")
            log(f"[closedloop] block 2: {spec.seconds:g} s closed loop on the recalibrated decoder")
            loop2 = run_block(
                backend, enc, spec, seconds=spec.seconds, seed=spec.seed + 1, labels=spec.recalibrate
            )
            blocks.append(block_summary(f"recalibrated ({spec.recalibrate})", loop2))
            loops.append(loop2)
    finally:
        backend.close()
    rows = [{"block": b["name"], **r} for b, lp in zip(blocks, loops, strict=True) for r in lp.trial_rows()]
    write_trials(workdir / "trials.json", rows)
    plot_blocks(
        workdir / "closedloop.png",
        [
            {
                "name": f"{spec.decoder} — {b['name']}",
                "cursor": lp.record.cursor,
                "trials": lp.trial_rows(),
                "bin_s": BIN_S,
                "swaps_s": [s * BIN_S for s in lp.swaps()],
            }
            for b, lp in zip(blocks, loops, strict=True)
        ],
        radius=spec.radius,
    )
    result = {
        "spec": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()},
        "encoding": {"source": enc.source or "synthetic", "n_channels": enc.n_channels, **enc.fit},
        "initial": {k: v for k, v in initial.items() if k in ("fit_s", "offline_test_r2")},
        "recalibration": cal,
        "blocks": blocks,
    }
    (workdir / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    return result
