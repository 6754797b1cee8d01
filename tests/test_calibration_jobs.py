"""Calibration jobs on a busy host: bounded priority, the CPU-share signal, timeout and cancel.

A worker that gets no CPU is made deterministically with SIGSTOP (a stopped process gets exactly
none, however busy or idle the machine is), so nothing here depends on free CPU or on timing:
the waits are liveness guards only.
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
from service.cpu_share import CpuShare, process_cpu_seconds
from service.settings import CalibrationSettings

LIVE = 120.0  # liveness guard, never a timing assertion
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


# ------------------------------------------------------------------ the pure share window
def test_cpu_share_needs_a_full_window_then_measures_it():
    w = CpuShare(window_s=10.0)
    assert w.share() is None
    w.add(0.0, 5.0)
    w.add(4.0, 6.0)
    assert w.share() is None  # 4 s of the 10 s window
    w.add(10.0, 7.5)
    assert w.share() == pytest.approx(2.5 / 10.0)
    for t in range(11, 31):  # a stretch with no CPU at all: the old samples age out
        w.add(float(t), 7.5)
    assert w.share() == 0.0
    w.add(40.0, 17.5)  # then a whole core
    assert w.share() == pytest.approx(10.0 / 10.0)
    with pytest.raises(ValueError):
        CpuShare(window_s=0)


@linux_only
def test_process_cpu_seconds_reads_this_process_and_none_for_a_missing_one():
    t0 = process_cpu_seconds(os.getpid())
    x = 0
    while process_cpu_seconds(os.getpid()) == t0:  # burn CPU until the kernel's tick accounting moves
        x += 1
    assert process_cpu_seconds(os.getpid()) > t0 >= 0.0
    assert process_cpu_seconds(2**22 + 12345) is None


# ------------------------------------------------------------------ the manager with a real worker
@pytest.fixture
def manager_factory(tmp_path_factory, tmp_path):
    tiny = tiny_export(tmp_path_factory)
    reg, version = seeded_registry(tiny, tmp_path / "registry")
    made: list[CalibrationManager] = []

    def make(**settings) -> tuple[CalibrationManager, str, Path]:
        cal = CalibrationSettings(epochs=1, steps_per_epoch=2, patience=1, **settings)
        m = CalibrationManager(
            registry=reg, settings=cal, activate=lambda v, why: {"version": v, "reason": why}
        )
        made.append(m)
        data = tmp_path / f"data{len(made)}.npz"
        shutil.copy(tiny["npz"], data)
        return m, version, data

    yield make
    for m in made:
        m.shutdown()


def _wait(cond, what: str):
    deadline = time.monotonic() + LIVE
    while not cond():
        assert time.monotonic() < deadline, f"not within {LIVE} s: {what}"
        time.sleep(0.05)


def _started_pid(m: CalibrationManager) -> int:
    proc = m._proc
    assert proc is not None
    return proc.pid


@linux_only
def test_a_starved_job_says_waiting_for_cpu_and_the_timeout_names_the_cause(manager_factory):
    m, base, data = manager_factory(starved_window_s=0.5, timeout_s=3.0, nice=0)
    job = m.submit(data=data, source="upload", force=False, base_version=base, n_bins=400)
    os.kill(_started_pid(m), signal.SIGSTOP)  # from here the worker gets no CPU at all
    _wait(lambda: m.get(job)["phase"] == "waiting for CPU", "phase 'waiting for CPU'")
    st = m.get(job)
    assert (
        st["state"] == "running" and st["cpu"]["waiting_for_cpu"] is True and st["cpu"]["recent_share"] == 0.0
    )
    assert st["worker_phase"] in (
        "starting",
        "loading",
    )  # what the worker was doing when it stopped getting CPU
    assert m.wait_idle(LIVE)
    st = m.get(job)
    assert st["state"] == "failed" and st["phase"] != "waiting for CPU"
    assert "timed out after 3 s" in st["error"] and "busy with other work" in st["error"], st["error"]
    assert "niceness +0" in st["error"] and m.totals["failed"] == 1


@linux_only
def test_a_cancelled_job_ends_failed_and_frees_the_slot(manager_factory):
    m, base, data = manager_factory(starved_window_s=0.5)
    job = m.submit(data=data, source="upload", force=False, base_version=base, n_bins=400)
    os.kill(_started_pid(m), signal.SIGSTOP)  # a stuck job: cancel must not wait for it
    assert m.cancel("0123456789ab", "no such job") is False
    assert m.cancel(job, "DELETE /calibrate/x") is True
    assert m.wait_idle(LIVE) and m.busy() is None
    st = m.get(job)
    assert st["state"] == "failed" and st["error"] == "cancelled: DELETE /calibrate/x"
    assert m.cancel(job, "again") is False  # finished jobs cannot be cancelled


@linux_only
def test_the_worker_runs_niced_under_the_normal_policy_and_finishes_on_a_busy_core(manager_factory):
    """Bounded priority: niceness added, never SCHED_IDLE; a CPU hog on the worker's own core
    slows it but cannot stop it (the job ends, whatever its outcome)."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs sched_setaffinity")
    core = sorted(os.sched_getaffinity(0))[0]
    m, base, data = manager_factory(nice=5, affinity=[core], timeout_s=600.0)
    hog = _hog_on(core)
    try:
        job = m.submit(data=data, source="upload", force=False, base_version=base, n_bins=400)
        pid = _started_pid(m)
        _wait(lambda: _progress_has(m, job, "nice"), "the worker's first progress line")
        first = next(p for p in _progress(m, job) if "nice" in p)
        assert first["nice"] == os.nice(0) + 5 and first["policy"] == os.SCHED_OTHER
        assert m.wait_idle(LIVE * 5), "a niced job next to a CPU hog must still finish"
    finally:
        hog.kill()
        hog.wait()
    st = m.get(job)
    assert st["state"] in ("succeeded", "rejected"), st
    assert st["cpu"]["cpu_seconds"] > 0 and pid > 0


def _hog_on(core: int):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"]
    )


def _progress(m: CalibrationManager, job: str) -> list[dict]:
    from service.calibration import _read_progress

    return _read_progress(m.registry.jobs_dir / job / "progress.jsonl")


def _progress_has(m: CalibrationManager, job: str, key: str) -> bool:
    return any(key in p for p in _progress(m, job))
