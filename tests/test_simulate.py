"""The synthetic generator: determinism, diversity, drift, tasks, multi-site, decodability."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from rpnt_core.data import Session, SimulationSpec, load_npz, simulate_sessions, write_simulated
from rpnt_core.data.simulate import TASKS

SMALL = SimulationSpec(n_subjects=2, sessions_per_subject=2, bins_per_session=(200, 300))


@pytest.fixture(scope="module")
def sessions() -> list[Session]:
    return simulate_sessions(SimulationSpec(), seed=0)


def ridge_r2(s: Session, *, lags: int = 5, lam: float = 30.0, train: float = 0.8) -> float:
    """Causal ridge on sqrt counts of bins t-lags+1..t; pooled R² on the last 20 % of bins (held out)."""
    x = np.sqrt(s.counts.astype(np.float64))
    if x.ndim == 3:
        x = x[0]  # first site only: keeps the solve small
    T = len(x)
    feats = [np.vstack([np.zeros((lag, x.shape[1])), x[: T - lag]]) for lag in range(lags)]
    F = np.hstack(feats + [np.ones((T, 1))])  # (T, lags*N + 1)
    y = s.velocity.astype(np.float64)
    n = int(train * T)
    W = np.linalg.solve(F[:n].T @ F[:n] + lam * np.eye(F.shape[1]), F[:n].T @ y[:n])
    pred, yt = F[n:] @ W, y[n:]
    return float(1 - ((pred - yt) ** 2).sum() / ((yt - yt.mean(0)) ** 2).sum())


def test_deterministic_given_seed() -> None:
    a = simulate_sessions(SMALL, seed=7)
    b = simulate_sessions(SMALL, seed=7)
    c = simulate_sessions(SMALL, seed=8)
    assert [s.fingerprint() for s in a] == [s.fingerprint() for s in b]
    for x, y in zip(a, b, strict=True):
        assert x.extra.keys() == y.extra.keys()
        for k in x.extra:
            np.testing.assert_array_equal(x.extra[k], y.extra[k])
    assert all(x.fingerprint() != z.fingerprint() for x, z in zip(a, c, strict=True))
    # a subject's sessions do not depend on how many subjects are simulated
    more = simulate_sessions(
        SimulationSpec(
            n_subjects=3, n_multisite_subjects=0, sessions_per_subject=2, bins_per_session=(200, 300)
        ),
        seed=7,
    )
    assert [s.fingerprint() for s in more[:2]] == [s.fingerprint() for s in a[:2]]


def test_fast_enough() -> None:
    spec = SimulationSpec(n_subjects=2, sessions_per_subject=2)
    t0 = time.perf_counter()
    out = simulate_sessions(spec, seed=1)
    assert (time.perf_counter() - t0) / len(out) < 1.0


def test_many_subjects_sessions_and_channel_sets(sessions: list[Session]) -> None:
    spec = SimulationSpec()
    assert len(sessions) == spec.n_subjects * spec.sessions_per_subject
    assert len({s.subject for s in sessions}) == spec.n_subjects
    assert len({s.session for s in sessions}) == len(sessions)
    widths = [s.n_channels for s in sessions]
    assert min(widths) >= 40 and max(widths) <= 120 and len(set(widths)) >= 8
    for s in sessions:
        assert 1500 <= s.n_bins <= 3000 and s.bin_s == 0.02
        assert s.counts.dtype == np.int32 and s.velocity.shape == (s.n_bins, 2)
        ids = s.extra["neuron_ids"]
        assert ids.shape[-1] == s.n_channels
        assert all(len(np.unique(row)) == len(row) for row in np.atleast_2d(ids))
    # same subject, different sessions: different channel identities / order
    by_subject: dict[str, list[Session]] = {}
    for s in sessions:
        by_subject.setdefault(s.subject, []).append(s)
    for group in by_subject.values():
        first = group[0].extra["neuron_ids"]
        assert any(
            g.extra["neuron_ids"].shape != first.shape or (g.extra["neuron_ids"] != first).any()
            for g in group[1:]
        )


def test_realistic_rates(sessions: list[Session]) -> None:
    for s in sessions:
        per_channel = s.counts.mean(axis=-2) / s.bin_s  # Hz
        assert 5.0 <= np.median(per_channel) <= 30.0
        assert np.percentile(per_channel, 5) >= 3.0 and np.percentile(per_channel, 95) <= 35.0


def test_drift_grows_with_date(sessions: list[Session]) -> None:
    by_subject: dict[str, list[Session]] = {}
    for s in sessions:
        by_subject.setdefault(s.subject, []).append(s)
    for group in by_subject.values():
        dates = [s.date_days for s in group]
        assert dates == sorted(dates) and len(set(dates)) == len(dates)

        def pd_change(a: Session, b: Session) -> float:
            """Mean |Δ preferred direction| over neurons (site, id) recorded in both sessions."""

            def table(x: Session) -> dict:
                ids, pref = np.atleast_2d(x.extra["neuron_ids"]), np.atleast_2d(x.extra["pref_dir"])
                return {
                    (site, int(i)): float(p)
                    for site in range(len(ids))
                    for i, p in zip(ids[site], pref[site], strict=True)
                }

            ta, tb = table(a), table(b)
            common = sorted(ta.keys() & tb.keys())
            assert len(common) >= 5
            return float(np.mean([abs(np.angle(np.exp(1j * (ta[k] - tb[k])))) for k in common]))

        near, far = pd_change(group[0], group[1]), pd_change(group[0], group[-1])
        assert 0.0 < near < far


def test_both_tasks_with_their_movement_statistics(sessions: list[Session]) -> None:
    assert {s.task for s in sessions} == set(TASKS)
    for subject in {s.subject for s in sessions}:
        assert {s.task for s in sessions if s.subject == subject} == set(TASKS)
    still = {t: [] for t in TASKS}
    for s in sessions:
        speed = np.linalg.norm(s.extra["intent"], axis=1)
        still[s.task].append(float(np.mean(speed < 0.5)))
        if s.task == "center-out":
            targets = s.extra["targets"]
            out = targets[np.linalg.norm(targets, axis=1) > 1]
            angles = np.round(np.degrees(np.arctan2(out[:, 1], out[:, 0])) % 360).astype(int) % 360
            assert set(angles) <= set(range(0, 360, 45)) and len(set(angles)) >= 6
            # bell-shaped speed: peak in the middle of a reach, near zero at its edges
            on = s.extra["move_onsets"]
            a, b = int(on[0]), int(on[1])
            seg = speed[a:b]
            peak = int(np.argmax(seg))
            assert seg[0] < 0.2 * seg.max() and 0.2 * len(seg) < peak
    assert np.mean(still["center-out"]) > np.mean(still["random-target"]) + 0.15


def test_latents_drive_velocity_and_rates(sessions: list[Session]) -> None:
    spec = SimulationSpec()
    for s in sessions[::4]:
        lat = s.extra["latents"].astype(np.float64)  # (T, K)
        np.testing.assert_allclose(s.velocity, spec.speed_scale_cm_s * lat[:, :2], rtol=1e-5, atol=1e-4)
        rates = s.extra["rates_hz"]
        sites = rates if rates.ndim == 3 else rates[None]
        design = np.hstack([lat, np.ones((len(lat), 1))])
        for site in sites:  # log-rates are (up to clipping) linear in the shared latents
            y = np.log(site.astype(np.float64))
            coef, *_ = np.linalg.lstsq(design, y, rcond=None)
            resid = y - design @ coef
            assert np.mean(resid**2) < 0.01 * np.var(y) + 1e-6


def test_multisite_shapes_and_per_site_loadings(sessions: list[Session]) -> None:
    multi = [s for s in sessions if s.multisite]
    single = [s for s in sessions if not s.multisite]
    assert multi and single
    for s in single:
        assert s.site_xy is None and s.counts.ndim == 2
    for s in multi:
        S, T, N = s.counts.shape
        assert S >= 2 and s.site_xy.shape == (S, 2)
        assert s.extra["rates_hz"].shape == (S, T, N) and s.extra["neuron_ids"].shape == (S, N)
        # each site has its own tuning: preferred-direction distributions differ between sites
        pref = s.extra["pref_dir"]
        means = np.angle(np.exp(1j * pref).mean(axis=1))
        assert np.ptp(means) > 1e-3


def test_velocity_is_decodable(sessions: list[Session]) -> None:
    scores = [ridge_r2(s) for s in sessions]
    assert min(scores) > 0.55, np.round(scores, 3)
    assert np.median(scores) > 0.65


def test_write_simulated(tmp_path: Path) -> None:
    paths = write_simulated(tmp_path / "sim", SMALL, seed=3)
    assert len(paths) == 4 and all(p.suffix == ".npz" and p.exists() for p in paths)
    manifest = json.loads((tmp_path / "sim" / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["spec"]["n_subjects"] == 2
    again = simulate_sessions(SMALL, seed=3)
    for p, entry, s in zip(paths, manifest["sessions"], again, strict=True):
        back = load_npz(p)
        assert entry["file"] == p.name and entry["fingerprint"] == s.fingerprint() == back.fingerprint()
        assert (back.subject, back.task, back.date_days) == (s.subject, s.task, s.date_days)
        np.testing.assert_array_equal(back.extra["latents"], s.extra["latents"])


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"n_subjects": 0}, "n_subjects"),
        ({"bins_per_session": (300, 200)}, "bins_per_session"),
        ({"channels_per_session": (40, 500)}, "channels_per_session"),
        ({"latent_dim": 5}, "latent_dim"),
        ({"tasks": ("juggling",)}, "tasks"),
        ({"bin_s": 0.0}, "bin_s"),
        ({"n_multisite_subjects": 9}, "n_multisite_subjects"),
    ],
)
def test_spec_validation(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SimulationSpec(**kw)
