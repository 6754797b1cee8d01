"""Calibration uploads parsed in a child process (service.upload_parse): the real child, real
files (good, zip bombs, one that never ends), its memory cap and its time limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import crafted
import numpy as np
import pytest
from conftest import REPO

from rpnt_core.data import Session, load_npz, save_npz
from rpnt_core.data.npz import NOT_NPZ
from service.upload_parse import BASE_ADDRESS_SPACE, ParseLimits, parse_upload
from service.uploads import CalibrationInputError

MB = 1 << 20
CHECKS = {
    "target": "velocity",
    "n_channels": 8,
    "n_outputs": 2,
    "bin_s": 0.02,
    "min_bins": 200,
    "holdout_fraction": 0.2,
}
LIMITS = ParseLimits(max_bytes=512 * MB, memory_bytes=BASE_ADDRESS_SPACE + 3 * 512 * MB, timeout_s=300.0)
CHILD_FILES = ("parse.json", "parse-result.json", "parse.log")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """2.2 GB of zeros as ``counts``, in about 2.3 MB: the review's bomb."""
    return crafted.npz_zip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.npz", 2253)


def _session(T: int = 400, N: int = 8, **kw) -> Session:
    t = np.arange(T) * 0.02
    vel = np.stack([np.sin(2 * np.pi * 0.3 * t), np.cos(2 * np.pi * 0.5 * t)], 1)
    return Session(counts=np.random.default_rng(0).poisson(1.5, (T, N)), bin_s=0.02, velocity=vel, **kw)


def _staged(tmp_path: Path, data: bytes | Path) -> Path:
    """The upload as the route stages it: ``upload.bin`` in a directory of its own."""
    work = tmp_path / "staging"
    work.mkdir()
    raw = work / "upload.bin"
    raw.write_bytes(data if isinstance(data, bytes) else data.read_bytes())
    return raw


def _refusal(raw: Path, limits: ParseLimits = LIMITS) -> str:
    with pytest.raises(CalibrationInputError) as e:
        parse_upload(
            raw, out=raw.parent / "data.npz", bin_s=0.02, checks=CHECKS, live_metadata={}, limits=limits
        )
    assert not any((raw.parent / f).exists() for f in CHILD_FILES)
    assert not (raw.parent / "data.npz").exists()
    return str(e.value)


def test_a_good_upload_becomes_the_canonical_npz(tmp_path):
    session = _session()
    raw = _staged(tmp_path, save_npz(session, tmp_path / "s.npz"))
    out = raw.parent / "data.npz"
    summary = parse_upload(
        raw, out=out, bin_s=0.02, checks=CHECKS, live_metadata={"subject": "m7", "task": "co"}, limits=LIMITS
    )
    assert summary == {"n_bins": 400, "n_channels": 8, "target": "velocity", "n_outputs": 2}
    back = load_npz(out)
    np.testing.assert_array_equal(back.counts, session.counts)
    np.testing.assert_allclose(back.velocity, session.velocity, rtol=1e-6)
    assert (back.subject, back.task) == ("m7", "co")  # inherited from the live model
    assert sorted(p.name for p in raw.parent.iterdir()) == [
        "data.npz"
    ]  # the upload and the child's files are gone


def test_the_checks_against_the_live_model_run_in_the_child(tmp_path):
    raw = _staged(tmp_path, save_npz(_session(N=5), tmp_path / "s.npz"))
    assert _refusal(raw) == "counts: 5 channels, the live model takes 8"


def test_a_file_that_is_not_npz_gets_the_line_the_cli_gives(tmp_path):
    raw = _staged(tmp_path, b"\x80\x04K\x01.")  # a pickle, which numpy.load would try to unpickle
    assert _refusal(raw) == NOT_NPZ


def test_the_zip_bomb_is_refused_on_what_it_declares_inside_a_small_memory_cap(tmp_path, bomb):
    # 1 GB of address space: had the child inflated the 2.2 GB it would have failed for memory instead
    raw = _staged(tmp_path, bomb)
    assert (
        _refusal(raw, ParseLimits(max_bytes=512 * MB, memory_bytes=BASE_ADDRESS_SPACE, timeout_s=300.0))
        == "counts: declares 2.2 GB uncompressed, over the 512 MB limit"
    )


def test_the_memory_cap_holds_what_the_size_limit_lets_through(tmp_path, bomb):
    raw = _staged(tmp_path, bomb)
    limits = ParseLimits(max_bytes=4096 * MB, memory_bytes=BASE_ADDRESS_SPACE, timeout_s=300.0)
    assert _refusal(raw, limits) == "file: the upload needs more memory than the parser may use (1 GB)"


def test_a_parse_that_never_ends_is_killed_at_the_time_limit(tmp_path):
    work = tmp_path / "staging"
    work.mkdir()
    raw = work / "upload.bin"
    os.mkfifo(raw)  # nothing ever writes: the child blocks opening it, whatever the machine's speed
    limits = ParseLimits(max_bytes=512 * MB, memory_bytes=LIMITS.memory_bytes, timeout_s=1.0)
    assert (
        _refusal(raw, limits) == "file: parsing the upload took longer than 1 s (http.upload_parse_timeout_s)"
    )


def test_a_parser_that_dies_gives_one_line_and_logs_why(tmp_path, caplog):
    raw = _staged(tmp_path, save_npz(_session(), tmp_path / "s.npz"))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output's directory should be")
    with pytest.raises(CalibrationInputError) as e, caplog.at_level("WARNING", logger="rpnt.uploads"):
        parse_upload(
            raw, out=blocker / "data.npz", bin_s=0.02, checks=CHECKS, live_metadata={}, limits=LIMITS
        )
    assert (
        str(e.value)
        == "file: the parser stopped without an answer (it may use 2.5 GB of memory); the server "
        "log has details"
    )
    assert (
        "exited 1" in caplog.text and "Traceback" in caplog.text
    )  # the operator sees why; the client does not
    assert not any((raw.parent / f).exists() for f in CHILD_FILES)


def test_the_child_never_imports_torch(tmp_path):
    raw = _staged(tmp_path, save_npz(_session(), tmp_path / "s.npz"))
    spec = raw.parent / "parse.json"
    spec.write_text(
        json.dumps(
            {
                "upload": raw.name,
                "out": str(raw.parent / "data.npz"),
                "bin_s": 0.02,
                "checks": CHECKS,
                "live_metadata": {},
                "limits": {
                    "max_bytes": LIMITS.max_bytes,
                    "memory_bytes": LIMITS.memory_bytes,
                    "timeout_s": 60,
                    "nice": 0,
                    "affinity": None,
                },
            }
        )
    )
    code = (
        "import sys, service.upload_parse as u; rc = u.main(sys.argv[1:]); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnxruntime', 'zmq', 'fastapi'}))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(spec)],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert json.loads((raw.parent / "parse-result.json").read_text()) == {
        "summary": {"n_bins": 400, "n_channels": 8, "target": "velocity", "n_outputs": 2}
    }


def test_calibration_data_is_read_as_the_live_models_target():
    """A position decoder is recalibrated on position (never silently on velocity), from an upload
    or from the rig's KINEMATICS; an upload without that series is one line naming it."""
    import numpy as np

    from rpnt_core.data import Session
    from service.uploads import CalibrationInputError, check_session, recent_session

    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, size=(400, 8))
    vel, pos = rng.normal(size=(400, 2)).astype(np.float32), rng.normal(size=(400, 2)).astype(np.float32)
    checks = CHECKS | {"target": "position"}
    s = check_session(Session(counts=counts, bin_s=0.02, velocity=vel, position=pos), **checks)
    assert s.target == "position" and np.array_equal(s.labels, pos)
    with pytest.raises(CalibrationInputError) as exc:
        check_session(Session(counts=counts, bin_s=0.02, velocity=vel), **checks)
    assert str(exc.value).startswith("position: calibration needs the live model's target series")
    for target in ("position", "force"):
        r = recent_session(counts, pos, bin_s=0.02, target=target)
        assert r.target == target and np.array_equal(
            check_session(r, **CHECKS | {"target": target}).labels, pos
        )
