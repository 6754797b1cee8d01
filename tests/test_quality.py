"""Session quality control: each flag on a synthetic session built to trip it, a clean session that
trips none, and the commands that use it (rpnt inspect, rpnt pretrain, rpnt finetune)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rpnt_core.cli import main as rpnt
from rpnt_core.data import Session, save_npz
from rpnt_core.data.quality import assess_session, format_table, split_flagged

BIN_S = 0.05
T, N = 2000, 20


def clean(seed: int = 0) -> Session:
    """20 channels at 2–40 Hz, stationary, and a smooth 2-D velocity: nothing to flag."""
    rng = np.random.default_rng(seed)
    rates = np.geomspace(2.0, 40.0, N)  # Hz
    t = np.arange(T) * BIN_S
    velocity = np.stack([np.sin(t), np.cos(0.7 * t)], axis=1) + 0.1 * rng.normal(size=(T, 2))
    return Session(
        counts=rng.poisson(rates * BIN_S, size=(T, N)), bin_s=BIN_S, velocity=velocity, session=f"clean{seed}"
    )


def with_counts(s: Session, counts: np.ndarray, name: str) -> Session:
    return replace(s, counts=counts, session=name)


def test_a_clean_session_trips_nothing():
    q = assess_session(clean())
    assert not q.flagged and q.flags == ()
    assert (q.n_bins, q.n_channels, q.duration_s) == (T, N, pytest.approx(T * BIN_S))
    assert q.silent == q.saturated == q.shifted == q.on_off == ()
    assert 2.0 < q.rate_hz_median < 40.0 and q.target == "velocity" and q.target_dims == 2
    assert q.target_idle_fraction == 0.0 and q.target_outlier_bins == 0


def test_low_rate_poisson_noise_is_not_a_rate_shift():
    """Channels at 0.6–1.5 Hz see a few spikes per fifth: ratios of 4× happen by chance, z > 5 does not."""
    rng = np.random.default_rng(5)
    counts = rng.poisson(np.linspace(0.6, 1.5, N) * BIN_S, size=(T, N))
    assert assess_session(with_counts(clean(), counts, "sparse")).shifted == ()


def test_silent_array_is_flagged():
    s = clean()
    counts = s.counts.copy()
    counts[:, 1:] = 0  # 19 of 20 channels never fire
    q = assess_session(with_counts(s, counts, "silent"))
    assert q.silent == tuple(range(1, N))
    assert q.flags == ("19 of 20 channels (95 %) are silent (< 0.5 Hz)",)
    counts[:, 1:3] = s.counts[:, 1:3]  # 17 silent = 85 %: many, but a tenth of the array still fires
    assert not assess_session(with_counts(s, counts, "quiet")).flagged


def test_saturated_and_stuck_channels_are_flagged():
    s = clean()
    rng = np.random.default_rng(1)
    counts = s.counts.copy()
    counts[:, 0] = rng.poisson(600 * BIN_S, size=T)  # 600 Hz: crossing threshold on noise
    counts[:, 1] = 3  # stuck at one count
    counts[:, 2] = rng.poisson(800 * BIN_S, size=T)
    q = assess_session(with_counts(s, counts, "saturated"))
    assert q.saturated == (0, 1, 2)
    assert q.flags == ("3 of 20 channels (15 %) are saturated (≥ 500 Hz or stuck at one count)",)
    counts[:, 2] = s.counts[:, 2]  # 2 of 20 = a tenth: reported, not flagged
    q = assess_session(with_counts(s, counts, "two"))
    assert q.saturated == (0, 1) and not q.flagged


def test_channels_switching_on_late_are_flagged():
    """The Spike 07-20 pattern: channels near-silent for the first 80 % and active at the end."""
    s = clean()
    rng = np.random.default_rng(2)
    counts = s.counts.copy()
    late = int(0.8 * T)
    counts[:late, :5] = rng.poisson(0.1 * BIN_S, size=(late, 5))
    counts[late:, :5] = rng.poisson(30 * BIN_S, size=(T - late, 5))
    counts[:, 5] = np.concatenate(
        [rng.poisson(10 * BIN_S, size=T // 2), rng.poisson(60 * BIN_S, size=T - T // 2)]
    )
    q = assess_session(with_counts(s, counts, "late"))
    assert q.shifted == (0, 1, 2, 3, 4, 5) and q.on_off == (0, 1, 2, 3, 4)  # channel 5 rises 6×, never silent
    assert q.flags == (
        "6 of 20 channels (30 %) change rate more than 4× within the session (5 turn on or off)",
    )
    counts[:, 1:6] = s.counts[:, 1:6]  # one channel of 20 drifting is a unit, not the recording
    q = assess_session(with_counts(s, counts, "one"))
    assert q.shifted == (0,) and not q.flagged


def test_an_idle_target_is_flagged_and_glitch_bins_are_counted():
    s = clean()
    velocity = s.velocity.copy()
    velocity[: int(0.6 * T)] = 0.0  # the cursor did not move for 60 % of the session
    q = assess_session(replace(s, velocity=velocity, session="idle"))
    assert q.target_idle_fraction == pytest.approx(0.6)
    assert q.flags == (
        "target velocity sits at one value in 60 % of bins (not recorded or not performed "
        "for most of the session)",
    )
    glitchy = s.velocity.copy()
    glitchy[[100, 500, 501, 900, 1300, 1301, 1302, 1900], 0] = 5000.0  # 8 glitch bins
    q = assess_session(replace(s, velocity=glitchy, session="glitch"))
    assert q.target_outlier_bins == 8 and q.target_max_abs == 5000.0
    assert not q.flagged  # reported: heavy-tailed kinematics are real behaviour too
    assert assess_session(replace(s, velocity=velocity), labels=False).flags == ()  # counts only


def test_the_chosen_target_is_judged():
    s = clean()
    position = np.zeros((T, 2))  # never recorded
    s = replace(s, position=position)
    assert not assess_session(s).flagged
    q = assess_session(s.with_target("position"))
    assert q.target == "position" and q.target_idle_fraction == 1.0 and q.flagged


def test_split_flagged_and_table():
    good, bad = clean(0), clean(1)
    counts = bad.counts.copy()
    counts[:, 1:] = 0
    bad = with_counts(bad, counts, "bad")
    kept, flagged = split_flagged([good, bad, clean(2)])
    assert [s.session for s in kept] == ["clean0", "clean2"] and [q.session for q in flagged] == ["bad"]
    table = format_table([assess_session(good), assess_session(bad)]).splitlines()
    assert table[0].split()[:3] == ["session", "bins", "ch"]
    assert table[1].split()[0] == "clean0" and table[1].endswith("ok")
    assert table[2].split()[0] == "bad" and table[2].endswith("FLAGGED")
    assert table[3] == "bad: 19 of 20 channels (95 %) are silent (< 0.5 Hz)"


# ------------------------------------------------------------------------------------ commands

FAST = [
    "--epochs",
    "1",
    "--steps-per-epoch",
    "2",
    "--batch-size",
    "4",
    "--window-len",
    "40",
    "--quiet",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quality")
    s = clean(3)
    rng = np.random.default_rng(4)
    counts = s.counts.copy()
    late = int(0.8 * T)
    counts[:late, :8] = 0
    counts[late:, :8] = rng.poisson(30 * BIN_S, size=(T - late, 8))
    return {
        "good": save_npz(clean(0), root / "good.npz"),
        "also": save_npz(clean(1), root / "also.npz"),
        "late": save_npz(
            with_counts(replace(s, position=rng.normal(size=(T, 2))), counts, "late"), root / "late.npz"
        ),
    }


def test_inspect_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        rpnt(["inspect", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rpnt inspect") and "--json" in out and "--target NAME" in out


def test_inspect_prints_a_table_and_json(files, capsys):
    assert rpnt(["inspect", str(files["good"]), str(files["late"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[0] == "clean0" and out[1].endswith("ok")
    assert out[2].split()[0] == "late" and out[2].endswith("FLAGGED")
    assert (
        out[3]
        == "late: 8 of 20 channels (40 %) change rate more than 4× within the session (8 turn on or off)"
    )
    assert rpnt(["inspect", str(files["good"]), str(files["late"]), "--json", "--target", "position"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["flagged"] == ["late"] and [r["session"] for r in rep["sessions"]] == ["clean0", "late"]
    assert rep["sessions"][1]["shifted"] == list(range(8)) and rep["sessions"][1]["target"] == "position"
    assert rep["sessions"][0]["target"] is None  # clean0 has no position: its counts are still assessed
    assert rpnt(["inspect", str(files["good"]), "--target", "force"]) == 2
    assert (
        capsys.readouterr().err
        == "rpnt inspect: error: target: no session has 'force' (they have velocity)\n"
    )


def test_pretrain_skips_flagged_sessions_unless_allowed(files, tmp_path, capsys):
    from rpnt_core import read_header

    out = tmp_path / "pre.safetensors"
    data = [str(files["good"]), str(files["late"]), str(files["also"])]
    assert rpnt(["pretrain", "--data", *data, "--out", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    assert (
        "rpnt pretrain: skipping late: 8 of 20 channels (40 %) change rate more than 4× within the session "
        "(8 turn on or off) (--allow-flagged keeps it)" in err.splitlines()
    )
    assert read_header(out)[1]["sessions"] == [str(files["good"]), str(files["also"])]
    assert rpnt(["pretrain", "--data", *data, "--out", str(out), "--allow-flagged", *FAST]) == 0
    assert "skipping" not in capsys.readouterr().err
    assert read_header(out)[1]["sessions"] == data
    assert (
        rpnt(["pretrain", "--data", str(files["late"]), "--out", str(tmp_path / "none.safetensors"), *FAST])
        == 2
    )
    assert capsys.readouterr().err.splitlines()[-1] == (
        "rpnt pretrain: error: data: every session is flagged unfit to train on (reasons above); "
        "--allow-flagged keeps them"
    )


def test_finetune_refuses_a_flagged_session(files, tmp_path, capsys):
    out = tmp_path / "ft.safetensors"
    assert rpnt(["finetune", "--data", str(files["late"]), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert err == (
        "rpnt finetune: error: data: late is flagged unfit to train on: 8 of 20 channels (40 %) change "
        "rate more than 4× within the session (8 turn on or off) (--allow-flagged uses it anyway)\n"
    )
    assert not out.exists()
    assert rpnt(["finetune", "--data", str(files["late"]), "--out", str(out), "--allow-flagged", *FAST]) == 0
    assert out.is_file()


def test_an_unknown_mat_file_is_one_line_and_exit_2(tmp_path, capsys):
    from scipy.io import savemat

    savemat(tmp_path / "odd.mat", {"rates": np.ones((3, 4))})
    assert rpnt(["inspect", str(tmp_path / "odd.mat")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(
            "rpnt inspect: error: layout: no known MAT layout matches odd.mat, which holds rates 3×4 "
            "double; known layouts: "
        )
        and err.count("\n") == 1
        and "Traceback" not in err
    )
