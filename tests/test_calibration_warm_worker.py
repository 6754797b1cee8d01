"""The warm calibration worker: started ahead, reused across jobs, replaced when it dies.

Real worker processes (torch imported in them) and the real exporters; a crash is a SIGKILL of the
worker (what the kernel's OOM killer or a segfault looks like from the parent).  No timing
assertions: the waits are liveness guards only.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from test_streaming_support import seeded_registry, tiny_export

from service.calibration import CalibrationManager
from service.calibration_worker import training_plan
from service.settings import CalibrationSettings

LIVE = 300.0  # liveness guard, never a timing assertion
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
WORKER_PHASES = (
    "worker_start_s",
    "imports_s",
    "loading_s",
    "scoring_live_s",
    "finetuning_s",
    "scoring_candidate_s",
    "saving_s",
    "export_s",
)


def test_training_grows_with_the_labelled_bins_up_to_the_cap():
    opt = CalibrationSettings(max_steps=24, epochs=12)
    small = training_plan(opt, train_bins=1600, batch_size=16, window_len=100)
    large = training_plan(opt, train_bins=3600, batch_size=16, window_len=100)
    huge = training_plan(opt, train_bins=10**6, batch_size=16, window_len=100)
    assert small == (12, 1)  # one pass per epoch: 1600 bins = one step of 16 × 100; 12 epochs at most
    assert large == (8, 3)  # 3 steps per pass; 24 // 3 epochs
    assert huge[0] * huge[1] <= 24 and huge == (1, 24)  # never past max_steps
    fixed = CalibrationSettings(steps_per_epoch=5, max_steps=24, epochs=12)
    assert training_plan(fixed, train_bins=3600, batch_size=16, window_len=100) == (4, 5)


@pytest.fixture
def manager(tmp_path_factory, tmp_path):
    tiny = tiny_export(tmp_path_factory)
    reg, version = seeded_registry(tiny, tmp_path / "registry")
    m = CalibrationManager(
        registry=reg,
        settings=CalibrationSettings(epochs=1, steps_per_epoch=2, patience=1, nice=0),
        activate=lambda v, why: {"version": v, "reason": why},
    )
    n = [0]

    def data() -> Path:
        n[0] += 1
        p = tmp_path / f"data{n[0]}.npz"
        shutil.copy(tiny["npz"], p)
        return p

    yield m, version, data
    m.shutdown()


def _wait(cond, what: str):
    deadline = time.monotonic() + LIVE
    while not cond():
        assert time.monotonic() < deadline, f"not within {LIVE} s: {what}"
        time.sleep(0.05)


def _run(m: CalibrationManager, base: str, data: Path, detail: dict | None = None) -> dict:
    job = m.submit(
        data=data,
        source="upload",
        force=True,
        base_version=base,
        n_bins=400,
        detail=detail,
        timings={"input_s": 0.25},
    )
    assert m.wait_idle(LIVE)
    return m.get(job)


def _job_pid(m: CalibrationManager, job: str) -> int:
    from service.calibration import _read_progress

    return next(p["pid"] for p in _read_progress(m.registry.jobs_dir / job / "progress.jsonl") if "pid" in p)


@linux_only
def test_sequential_jobs_run_in_the_same_warm_worker_and_report_their_timings(manager):
    m, base, data = manager
    pid = m.worker_pid()
    assert pid is not None  # started with the manager, before any job
    _wait(lambda: m.worker_status() == {"warm": True, "pid": pid, "ready": True}, "the worker's imports done")
    first = _run(m, base, data())
    second = _run(m, first["version"], data())
    assert first["state"] == second["state"] == "succeeded", (first.get("error"), second.get("error"))
    assert _job_pid(m, first["id"]) == _job_pid(m, second["id"]) == pid == m.worker_pid()
    for st in (first, second):
        t = st["timings"]
        assert set(WORKER_PHASES) <= set(t) and {"registry_s", "swap_s", "total_s", "input_s"} <= set(t), t
        assert all(v >= 0 for v in t.values())
        assert t["input_s"] == 0.25 and t["total_s"] >= 0.25  # the caller's time is part of the total
        assert t["imports_s"] == 0.0  # the warm worker had imported everything before the job
        assert st["result"]["epochs_run"] == 1
        assert "label_scale" not in st["result"]  # recorded labels are trained on as they are
    # the second candidate's step graph: its parent's (the first candidate's) with new weights
    assert (m.registry.export_dir(second["version"]) / "rpnt_step.onnx").is_file()
    assert not (m.registry.export_dir(second["version"]) / "rpnt_window.onnx").exists()


@linux_only
def test_intention_labels_are_trained_on_at_the_live_heads_scale(manager):
    import numpy as np

    from rpnt_core import load_checkpoint
    from rpnt_core.data import load_session
    from service.calibration_worker import time_splits
    from streaming.closedloop.refit import on_head_scale

    m, base, data = manager
    path = data()
    session = load_session(path)
    live = load_checkpoint(m.registry.checkpoint(base))
    fit_bins = time_splits(session.n_bins, m.settings).val[1]
    _, want = on_head_scale(
        session.velocity,
        mean=live.velocity_mean.numpy(),
        scale=live.velocity_scale.numpy(),
        fit_bins=fit_bins,
    )
    st = _run(m, base, path, detail={"labels": "refit"})
    assert st["state"] == "succeeded", st.get("error")
    assert st["result"]["label_scale"] == pytest.approx(want, rel=1e-3) and not np.isclose(want, 1.0)


def test_a_crashed_warm_worker_fails_only_its_job_and_is_replaced(manager):
    m, base, data = manager
    job = m.submit(data=data(), source="upload", force=True, base_version=base, n_bins=400)
    old = m.worker_pid()
    os.kill(old, signal.SIGKILL)  # the worker dies mid-job
    assert m.wait_idle(LIVE)
    st = m.get(job)
    assert st["state"] == "failed" and "worker exited with -9" in st["error"], st
    assert m.totals["failed"] == 1 and m.busy() is None
    new = m.worker_pid()
    assert new is not None and new != old  # a new warm worker, started at once
    after = _run(m, base, data())
    assert after["state"] == "succeeded", after.get("error")
    assert _job_pid(m, after["id"]) == new


@linux_only
def test_cancel_kills_the_warm_worker_and_the_next_job_gets_a_new_one(manager):
    m, base, data = manager
    job = m.submit(data=data(), source="upload", force=True, base_version=base, n_bins=400)
    old = m.worker_pid()
    os.kill(old, signal.SIGSTOP)  # a stuck job: cancel must not wait for it
    assert m.cancel(job, "DELETE /calibrate/x") is True
    assert m.wait_idle(LIVE)
    assert m.get(job)["error"] == "cancelled: DELETE /calibrate/x"
    _wait(lambda: m.worker_pid() not in (None, old), "a new warm worker")
    after = _run(m, base, data())
    assert after["state"] == "succeeded", after.get("error")


@linux_only
def test_a_worker_that_died_while_idle_is_replaced_at_the_next_submit(manager):
    m, base, data = manager
    old = m.worker_pid()
    os.kill(old, signal.SIGKILL)
    _wait(lambda: m.worker_pid() is None, "the dead worker seen as dead")
    st = _run(m, base, data())
    assert st["state"] == "succeeded", st.get("error")
    assert _job_pid(m, st["id"]) != old


@linux_only
def test_shutdown_stops_the_idle_warm_worker(manager):
    m, _, _ = manager
    pid = m.worker_pid()
    proc = m._warm.proc
    m.shutdown()
    assert proc.wait(LIVE) is not None and m.worker_pid() is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@linux_only
def test_without_a_warm_worker_each_job_gets_its_own_process(tmp_path_factory, tmp_path):
    tiny = tiny_export(tmp_path_factory)
    reg, base = seeded_registry(tiny, tmp_path / "registry")
    m = CalibrationManager(
        registry=reg,
        settings=CalibrationSettings(epochs=1, steps_per_epoch=2, patience=1, nice=0, warm_worker=False),
        activate=lambda v, why: {"version": v, "reason": why},
    )
    try:
        assert m.worker_pid() is None and m.worker_status() == {"warm": False, "pid": None, "ready": False}
        data = tmp_path / "data.npz"
        shutil.copy(tiny["npz"], data)
        st = _run(m, base, data)
        assert st["state"] == "succeeded", st.get("error")
        assert st["timings"]["imports_s"] > 0 and set(WORKER_PHASES) <= set(st["timings"])
        assert m.worker_pid() is None
    finally:
        m.shutdown()
