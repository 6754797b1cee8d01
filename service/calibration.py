"""Calibration jobs: one at a time, each in a lower-priority worker process.

:class:`CalibrationManager` is the parent side (no torch here).  ``submit()`` takes a validated
calibration session (already written as NPZ), hands it to the worker and returns the job id at
once.  With ``calibration.warm_worker`` (the default) the worker is started ahead of the jobs
(:class:`~service.calibration_process.WarmWorker`: ``python -m service.calibration_worker --serve``, which renices itself,
bounds its threads and imports torch and the exporters once, then waits for jobs on its stdin),
so a job starts without a process start or an import; a worker that dies — a crash, or killed by
a cancel or the timeout — fails only the job it ran, and a new one is started at once.  Without
it, each job starts ``python -m service.calibration_worker JOB`` (the same renicing, before
torch is imported).  The worker's priority is bounded, not idle: niceness ``calibration.nice`` gives it a
smaller share of a busy host's cores than the decode loop, never none, so a job on a host that is
also training models runs slower but always finishes.  A monitor thread watches the worker — its
CPU share over the last ``starved_window_s`` (``GET /calibrate/{id}`` says ``waiting for CPU``
while it is below ``starved_share`` of one core), the job timeout, a cancel request — then:

- publishes the candidate (checkpoint + parity-checked export) as a new registry version —
  every candidate is kept, live or not, so one that missed the gate can still be activated by hand;
- applies the gate: the candidate goes live only if its holdout R² ≥ the live model's on the same
  holdout bins, or the request said ``force``;
- asks ``activate(version, reason)`` (the control plane: load + warm the engine, swap it into the
  daemon at a bin boundary, record it in the registry).

``GET /calibrate/{id}`` also gives ``timings``: the seconds of each phase (reading and checking the data, the
wait for the worker, its imports, loading, scoring, finetuning, saving, export and parity, the
registry write, the swap) and ``total_s`` from the upload's arrival to the job's end.

Job states: ``running`` → ``succeeded`` (live) | ``rejected`` (kept, not live: the gate said no) |
``failed`` (an error, the timeout or a cancel; nothing changed).  A second submit while one runs raises
:class:`CalibrationBusy` (HTTP 409).  Each job's record is ``jobs/<id>/status.json`` (atomic
writes) plus the worker's ``progress.jsonl``; a job found ``running`` when the service starts was
cut off by a crash or restart and is marked ``failed``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from rpnt_core.child_env import child_env

from .calibration_process import ColdWorker, WarmWorker
from .calibration_worker import THREAD_VARS
from .cpu_share import CpuShare, process_cpu_seconds
from .registry import CHECKPOINT, STEP_FILE, ModelRegistry, read_json, write_json_atomic
from .settings import CalibrationSettings

JOB_ID = re.compile(r"^[0-9a-f]{12}$")
FINAL_STATES = ("succeeded", "rejected", "failed")
POLL_S = 0.5  # how often the monitor samples the worker's CPU time
# the worker's result fields a candidate version's registry metadata keeps
RESULT_METRICS = (
    "candidate_holdout_r2",
    "live_holdout_r2",
    "candidate_val_r2",
    "best_epoch",
    "epochs_run",
    "splits",
    "n_bins",
)
# … and those it keeps when the job has them (``label_scale``: intention labels were rescaled)
OPTIONAL_METRICS = ("label_scale",)
log = logging.getLogger("rpnt.calibration")


def passes_gate(candidate_r2: float, live_r2: float) -> bool:
    """The go-live rule: the candidate's holdout R² is at least the live model's."""
    return candidate_r2 >= live_r2


class CalibrationBusy(RuntimeError):
    """A calibration job is already running (one at a time, never interleaved)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"calibration job {job_id} is still running; one job runs at a time — "
            f"poll GET /calibrate/{job_id} and submit again when it has finished"
        )
        self.job_id = job_id


class CalibrationManager:
    """See the module docstring.

    Args:
        registry: where job directories and candidate versions go.
        settings: :class:`~service.settings.CalibrationSettings` (niceness, threads, epochs, splits, …).
        activate: ``activate(version, reason) -> dict`` — swaps a registry version in (the control plane).
    """

    def __init__(
        self, *, registry: ModelRegistry, settings: CalibrationSettings, activate: Callable[[str, str], dict]
    ) -> None:
        self.registry = registry
        self.settings = settings
        self._activate = activate
        self._lock = threading.Lock()
        self._current: str | None = None
        self._proc: subprocess.Popen | None = None  # the process running the current job
        self._warm: WarmWorker | None = None
        self._closed = False
        self._cpu: dict = {}  # the running job's CPU share, written by its monitor
        self._cancelled: str | None = None  # why the running job was cancelled
        self._threads: list[threading.Thread] = []
        self.totals = dict.fromkeys(FINAL_STATES, 0)
        for d in registry.jobs_dir.iterdir():  # jobs a crash or restart cut off
            if not d.is_dir():  # a stray file (an operator's note, a backup tool's) is no job
                continue
            st = read_json(d / "status.json")
            if isinstance(st, dict) and st.get("state") not in FINAL_STATES:
                self._save(
                    d,
                    st
                    | {
                        "state": "failed",
                        "finished": time.time(),
                        "error": "interrupted: the service stopped while the job ran; nothing changed",
                    },
                )
        if settings.warm_worker:
            self._warm = self._spawn_warm()

    # ------------------------------------------------------------------ queries
    def busy(self) -> str | None:
        """The running job's id, or None."""
        return self._current

    def get(self, job_id: str) -> dict | None:
        """Job ``job_id``'s record with its phase, per-epoch losses, progress and CPU share; None
        for an unknown (or malformed) id."""
        if not JOB_ID.match(job_id):
            return None
        d = self.registry.jobs_dir / job_id
        st = read_json(d / "status.json")
        if not isinstance(st, dict):
            return None
        progress = _read_progress(d / "progress.jsonl")
        epochs = [p for p in progress if "epoch" in p]
        st["phase"] = progress[-1]["phase"] if progress else st.get("phase", "starting")
        st["losses"] = [
            {"epoch": p["epoch"] + 1, "train_mse": p["train_mse"], "val_r2": p["val_r2"]} for p in epochs
        ]
        if epochs:
            st["progress"] = {
                "epoch": epochs[-1]["epoch"] + 1,
                "epochs": epochs[-1]["epochs"],
                "best_val_r2": max(p["val_r2"] for p in epochs),
            }
        cpu = dict(self._cpu) if self._current == job_id else st.get("cpu")
        if cpu:
            st["cpu"] = cpu
            if st["state"] == "running" and cpu.get("waiting_for_cpu"):
                st["worker_phase"], st["phase"] = st["phase"], "waiting for CPU"
        return st

    def jobs(self) -> list[dict]:
        """Every job's summary (``id``, ``state``, ``created``, ``source``, ``version``, ``live``),
        oldest first."""
        out = []
        for d in self.registry.jobs_dir.iterdir():
            st = read_json(d / "status.json") if d.is_dir() else None
            if isinstance(st, dict):
                out.append({k: st.get(k) for k in ("id", "state", "created", "source", "version", "live")})
        return sorted(out, key=lambda j: float(j.get("created") or 0.0))

    # ------------------------------------------------------------------ submit
    def _env(self) -> dict:
        """The worker's environment: this process's, the package root on ``PYTHONPATH``, and the BLAS
        thread counts at ``calibration.threads``."""
        return child_env() | dict.fromkeys(THREAD_VARS, str(self.settings.threads))

    def _spawn_warm(self) -> WarmWorker:
        return WarmWorker(
            options=self.settings,
            env=self._env(),
            log=self.registry.jobs_dir / "warm-worker.log",
        )

    def worker_pid(self) -> int | None:
        """The warm worker's process id (None without one)."""
        w = self._warm
        return w.proc.pid if w is not None and w.alive() else None

    def worker_status(self) -> dict:
        """``{"warm": bool, "pid": int | None, "ready": bool}``: whether a warm worker is started
        and has imported what jobs need (a job then starts at once)."""
        with self._lock:
            w = self._warm
            if w is None or not w.alive():
                return {"warm": bool(self.settings.warm_worker), "pid": None, "ready": False}
            if self._current is None and not w.ready:
                w.wait_job(0.0)  # idle: only its "ready" line can be waiting
            return {"warm": True, "pid": w.proc.pid, "ready": w.ready}

    def submit(
        self,
        *,
        data: Path,
        source: str,
        force: bool,
        base_version: str,
        n_bins: int,
        detail: dict | None = None,
        timings: dict | None = None,
    ) -> str:
        """Start a job on the calibration session ``data`` (NPZ, validated by the caller; moved into
        the job directory).

        Args:
            data: the session as canonical NPZ.
            source: where it came from (``upload`` / ``recent``), for the job record.
            force: the candidate goes live even if it misses the gate.
            base_version: the registry version finetuned from (the live one).
            n_bins: the session's bins, for the job record.
            detail: what the job record says about the data (file name, seconds, …).
            timings: seconds the caller spent before (``input_s``: reading and checking the data),
                reported with the job's.

        Returns:
            the job id.  Raises :class:`CalibrationBusy` while a job runs, ``ValueError`` when
            ``base_version`` has no checkpoint.
        """
        ckpt = self.registry.checkpoint(base_version)
        if ckpt is None:
            raise ValueError(
                f"the live model (version {base_version}) has no checkpoint in the registry, and "
                "calibration finetunes from one; import the model from its .safetensors checkpoint"
            )
        with self._lock:
            if self._current is not None:
                raise CalibrationBusy(self._current)
            job_id = uuid.uuid4().hex[:12]
            d = self.registry.jobs_dir / job_id
            d.mkdir()
            shutil.move(str(data), d / "data.npz")
            st = {
                "id": job_id,
                "state": "running",
                "created": time.time(),
                "source": source,
                "force": bool(force),
                "base_version": base_version,
                "n_bins": int(n_bins),
                "detail": detail or {},
                "version": None,
                "live": False,
                "timings": dict(timings or {}),
            }
            self._write_job(d, st, base_checkpoint=ckpt)
            self._start(job_id, d, st)
        log.info(
            "calibration job %s started (%s, %d bins, base version %s)", job_id, source, n_bins, base_version
        )
        return job_id

    def _write_job(self, d: Path, st: dict, *, base_checkpoint: Path) -> None:
        """The job's spec for the worker (``job.json``) and its first status record."""
        write_json_atomic(
            d / "job.json",
            {
                "data": "data.npz",
                "base_checkpoint": str(base_checkpoint),
                "base_version": st["base_version"],
                "submitted": st["created"],
                "base_step_graph": str(self.registry.export_dir(st["base_version"]) / STEP_FILE),
                "options": self.settings.model_dump(),
                "labels": st["detail"].get("labels", "recorded"),
            },
        )
        self._save(d, st)

    def _start(self, job_id: str, d: Path, st: dict) -> None:
        """Hand job ``d`` to a worker (the warm one, started anew if it died; else a cold one) and
        start its monitor thread.  Called with the lock held."""
        worker: WarmWorker | ColdWorker
        if self.settings.warm_worker:
            if self._warm is None or not self._warm.alive():
                self._warm = self._spawn_warm()
            try:
                self._warm.start(d)
            except OSError:  # it died since the check above (a broken pipe): one new worker, once
                self._warm = self._spawn_warm()
                self._warm.start(d)
            worker = self._warm
        else:
            worker = ColdWorker(job=d, env=self._env())
        self._proc = worker.proc
        self._current = job_id
        self._cpu, self._cancelled = {}, None
        t = threading.Thread(
            target=self._monitor, args=(job_id, d, worker, st), name=f"calibration-{job_id}", daemon=True
        )
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job runs (tests, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in list(self._threads):
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._current is None

    def cancel(self, job_id: str, reason: str) -> bool:
        """Kill the running job ``job_id`` (it ends ``failed`` with ``reason``); False if it is not running."""
        with self._lock:
            if self._current != job_id or self._proc is None:
                return False
            self._cancelled = reason
            if self._proc.poll() is None:
                self._proc.kill()
        return True

    def shutdown(self) -> None:
        """Kill a running worker (its job is marked failed by the monitor) and stop the warm one."""
        self._closed = True
        p = self._proc
        if p is not None and p.poll() is None:
            p.kill()
        self.wait_idle(10.0)
        with self._lock:
            warm, self._warm = self._warm, None
        if warm is not None:
            warm.close()

    # ------------------------------------------------------------------ the monitor thread
    def _monitor(self, job_id: str, d: Path, worker: WarmWorker | ColdWorker, st: dict) -> None:
        try:
            rc = self._watch(worker)
            if self._cancelled is not None:
                self._finish(d, st, "failed", error=f"cancelled: {self._cancelled}")
                return
            if rc is None:
                self._finish(d, st, "failed", error=self._timeout_reason())
                return
            res = read_json(d / "result.json")
            if isinstance(res, dict):
                st["timings"] = {**st.get("timings", {}), **res.get("timings", {})}
            if rc != 0 or not isinstance(res, dict) or not res.get("ok"):
                err = res.get("error") if isinstance(res, dict) else None
                self._finish(
                    d, st, "failed", error=err or f"worker exited with {rc} (see {d / 'worker.log'})"
                )
                return
            self._publish(job_id, d, st, res)
        except Exception as exc:  # noqa: BLE001 - a job failure must never take the service down
            log.exception("calibration job %s", job_id)
            self._finish(d, st, "failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._current = None
                self._proc = None
                if worker is self._warm and not worker.reusable() and not self._closed:
                    log.warning("the calibration worker exited during job %s; starting a new one", job_id)
                    self._warm = self._spawn_warm()

    def _watch(self, worker: WarmWorker | ColdWorker) -> int | None:
        """Wait for the worker's job, keeping ``self._cpu`` current; its status, or None after a timeout
        (the worker killed)."""
        s = self.settings
        proc = worker.proc
        window = CpuShare(window_s=s.starved_window_s)
        t0 = time.monotonic()
        cpu0 = process_cpu_seconds(proc.pid) or 0.0  # a warm worker's CPU time before this job
        cpu_s = 0.0
        while True:
            rc = worker.wait_job(POLL_S)
            now = time.monotonic()
            cpu = process_cpu_seconds(proc.pid)
            cpu_s = cpu - cpu0 if cpu is not None else cpu_s
            if rc is not None:
                self._cpu = {**self._cpu, "cpu_seconds": round(cpu_s, 2), "wall_seconds": round(now - t0, 1)}
                return rc
            window.add(now, cpu_s)
            share = window.share()
            self._cpu = {
                "cpu_seconds": round(cpu_s, 2),
                "wall_seconds": round(now - t0, 1),
                "recent_share": None if share is None else round(share, 3),
                "waiting_for_cpu": share is not None and share < s.starved_share,
            }
            if now - t0 > s.timeout_s:
                proc.kill()
                proc.wait()
                return None

    def _timeout_reason(self) -> str:
        s, cpu = self.settings, self._cpu
        why = f"timed out after {s.timeout_s:g} s (calibration.timeout_s; killed)"
        if cpu.get("wall_seconds"):
            share = cpu["cpu_seconds"] / cpu["wall_seconds"]
            why += f": the worker got {100 * share:.0f} % of one core on average"
            if share < s.starved_share:
                why += (
                    f" — the host's cores were busy with other work (the worker runs at niceness "
                    f"+{s.nice}, calibration.nice)"
                )
        return why

    def _publish(self, job_id: str, d: Path, st: dict, res: dict) -> None:
        """The worker's candidate → a registry version, then the gate: live (``succeeded``, or
        ``failed`` if it cannot go live) or kept aside (``rejected``)."""
        cand, live = float(res["candidate_holdout_r2"]), float(res["live_holdout_r2"])
        passed = passes_gate(cand, live)
        metrics = {k: res[k] for k in RESULT_METRICS} | {k: res[k] for k in OPTIONAL_METRICS if k in res}
        version = self._register(job_id, d, st, metrics=metrics, passed=passed)
        result = {
            **metrics,
            "gate": {
                "passed": passed,
                "forced": bool(st["force"]) and not passed,
                "rule": "candidate holdout R² ≥ live holdout R²",
            },
            "seconds": res.get("seconds"),
        }
        if not (passed or st["force"]):
            self._finish(
                d,
                st,
                "rejected",
                version=version,
                live=False,
                result=result,
                error=f"candidate holdout R² {cand:.4f} < live model's {live:.4f}: kept as version "
                f"{version}, not activated (force=true, or POST /models/{version}/activate)",
            )
            return
        t_swap = time.perf_counter()
        try:
            swap = self._activate(version, f"calibration {job_id}" + (" (forced)" if not passed else ""))
            st["timings"]["swap_s"] = round(time.perf_counter() - t_swap, 3)
        except Exception as exc:  # noqa: BLE001 - the candidate stays in the registry, not live
            self._finish(
                d,
                st,
                "failed",
                version=version,
                live=False,
                result=result,
                error=f"candidate kept as version {version} but it could not go live: {exc}",
            )
            return
        self._finish(d, st, "succeeded", version=version, live=True, result=result, swap=swap)

    def _register(self, job_id: str, d: Path, st: dict, *, metrics: dict, passed: bool) -> str:
        """Move the job's candidate (checkpoint + export) into the registry as a new version."""
        t_reg = time.perf_counter()
        staged = self.registry.new_staging(f"cal-{job_id}")
        shutil.move(str(d / "candidate" / "export"), staged / "export")
        shutil.move(str(d / "candidate" / CHECKPOINT), staged / CHECKPOINT)
        version = self.registry.add(
            staged,
            meta={
                "source": "calibration",
                "parent": st["base_version"],
                "job": job_id,
                "calibration_source": st["source"],
                "metrics": metrics,
                "gate_passed": passed,
            },
        )
        st["timings"]["registry_s"] = round(time.perf_counter() - t_reg, 3)
        return version

    def _finish(self, d: Path, st: dict, state: str, **kw: Any) -> None:
        st.update(state=state, finished=time.time(), **kw)
        timings = st.setdefault("timings", {})
        timings["total_s"] = round(st["finished"] - st["created"] + timings.get("input_s", 0.0), 3)
        if self._cpu:
            st["cpu"] = dict(self._cpu)
        self._save(d, st)
        self.totals[state] += 1
        log.info("calibration job %s: %s%s", st["id"], state, f" — {kw['error']}" if kw.get("error") else "")

    @staticmethod
    def _save(d: Path, st: dict) -> None:
        write_json_atomic(d / "status.json", st)


def _read_progress(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written right now
            out.append(json.loads(line))
    return out
