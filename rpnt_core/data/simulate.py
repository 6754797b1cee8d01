"""Synthetic multi-subject, multi-session spiking data with known ground truth.

Generative model (per subject ``j``, session ``k`` recorded on day ``d``):

1. **Movement intent** ``u`` (T, 2), cm/s, from the session's task:
   - ``"center-out"``: hold at the centre, reach to one of 8 targets on a circle, hold, return;
     each movement has the bell-shaped (minimum-jerk) speed profile.
   - ``"random-target"``: back-to-back minimum-jerk movements between random targets in a disk,
     with short or no holds (continuous movement).
2. **Latent dynamics** ``x`` (T, K), a linear dynamical system driven by the intent
   ``x[t+1] = A x[t] + B u[t]/v0 + noise``.  ``A`` is block-diagonal: a 2-D low-pass block whose
   state is the (normalised) hand velocity, and (K-2)/2 damped rotations (subject-specific
   frequencies) driven through a random ``B``.  Velocity is read out linearly:
   ``velocity = v0 * x[:, :2]`` (cm/s); ``position`` is its running integral.
3. **Log firing rates** of each neuron ``i`` in the subject's population, linear in the latents:
   ``log λ_i = b_i(d) + m_i * [cos θ_i(d), sin θ_i(d)] · x[:, :2] + c_i · x[:, 2:]`` (λ in Hz),
   with cosine tuning to velocity and loadings on the rotational latents.  Preferred directions
   ``θ_i`` and baselines ``b_i`` drift linearly with the recording date ``d`` (slow drift).
4. **Recording**: each session records a random subset of N channels (N varies per session) in
   random order; counts are Poisson(λ · bin_s).
5. **Multi-site subjects** have S arrays at coordinates ``site_xy`` (mm); each site has its own
   population (its own tuning, gain and rotational loadings) seeing the same latents, and
   ``counts`` is (S, T, N).

Ground truth is kept in ``Session.extra`` (all plain arrays, so ``save_npz(include_extra=True)``
can store it): ``latents`` (T, K), ``intent`` (T, 2), ``rates_hz`` (T, N) or (S, T, N),
``neuron_ids``/``pref_dir``/``baseline_hz``/``modulation`` (N,) or (S, N) for the recorded
channels at this session's date, ``move_onsets`` (M,) bin indices and ``targets`` (M, 2) cm.

Everything is deterministic given ``seed``; subject ``j`` and session ``k`` draw from their own
``SeedSequence([seed, j, ...])``, so a session does not change when other subjects are added.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rpnt_core.data.npz import save_npz
from rpnt_core.data.session import Session
from rpnt_core.data.validate import validate_session

__all__ = ["SimulationSpec", "TASKS", "simulate_sessions", "write_simulated"]

TASKS = ("center-out", "random-target")


@dataclass(frozen=True, kw_only=True)
class SimulationSpec:
    """Knobs of the simulator; the defaults give a small CPU-friendly data set (16 sessions).

    Ranges are inclusive ``(low, high)`` pairs drawn uniformly per subject/session/neuron.
    """

    n_subjects: int = 4
    sessions_per_subject: int = 4
    bins_per_session: tuple[int, int] = (1500, 3000)
    bin_s: float = 0.02
    population_size: tuple[int, int] = (130, 200)  # neurons per subject (per site)
    channels_per_session: tuple[int, int] = (40, 120)
    n_multisite_subjects: int = 1  # the last subjects are implanted with several arrays
    sites_per_multisite_subject: tuple[int, int] = (2, 4)
    latent_dim: int = 8  # 2 velocity latents + (latent_dim - 2) / 2 rotational pairs
    tasks: tuple[str, ...] = TASKS
    session_gap_days: tuple[float, float] = (1.0, 10.0)
    baseline_hz: tuple[float, float] = (5.0, 20.0)  # log-uniform baseline rates
    max_rate_hz: float = 80.0  # log-rates are clipped here
    modulation: tuple[float, float] = (0.5, 1.0)  # log-rate change per unit normalised velocity
    rotational_gain: float = 0.25  # std of the rotational contribution to log-rates
    pd_drift_rad_per_day: float = 0.02  # std across neurons of the preferred-direction drift rate
    baseline_drift_per_day: float = 0.01  # std across neurons of the log-baseline drift rate
    speed_scale_cm_s: float = 20.0  # v0: velocity = v0 * latent velocity
    reach_cm: float = 8.0  # center-out target distance
    workspace_cm: float = 10.0  # random-target disk radius
    latent_noise: float = 0.03  # process-noise std per bin (normalised units)

    def __post_init__(self) -> None:
        for name in ("n_subjects", "sessions_per_subject"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.n_multisite_subjects <= self.n_subjects:
            raise ValueError(
                f"n_multisite_subjects: must be in [0, n_subjects], got {self.n_multisite_subjects}"
            )
        for name in (
            "bins_per_session",
            "population_size",
            "channels_per_session",
            "sites_per_multisite_subject",
            "session_gap_days",
            "baseline_hz",
            "modulation",
        ):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}: expected 0 <= low <= high, got {(lo, hi)}")
        if self.bins_per_session[0] < 10:
            raise ValueError(f"bins_per_session: need at least 10 bins, got {self.bins_per_session}")
        if self.channels_per_session[0] < 1 or self.channels_per_session[1] > self.population_size[0]:
            raise ValueError(
                f"channels_per_session: must be within [1, population_size low={self.population_size[0]}], "
                f"got {self.channels_per_session}"
            )
        if self.sites_per_multisite_subject[0] < 2:
            raise ValueError(
                f"sites_per_multisite_subject: need >= 2 sites, got {self.sites_per_multisite_subject}"
            )
        if self.bin_s <= 0 or not np.isfinite(self.bin_s):
            raise ValueError(f"bin_s: must be > 0, got {self.bin_s}")
        if self.latent_dim < 2 or self.latent_dim % 2:
            raise ValueError(f"latent_dim: must be an even number >= 2, got {self.latent_dim}")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"tasks: must be a non-empty subset of {TASKS}, got {self.tasks}")
        if self.baseline_hz[0] <= 0 or self.max_rate_hz <= self.baseline_hz[1]:
            raise ValueError(f"baseline_hz: must be > 0 and below max_rate_hz, got {self.baseline_hz}")


# --------------------------------------------------------------------------------------------
# movement intent
# --------------------------------------------------------------------------------------------


def _min_jerk(displacement: np.ndarray, n: int, bin_s: float) -> np.ndarray:
    """Velocity (n, 2) of a minimum-jerk move over n bins, sampled at bin centres."""
    s = (np.arange(n) + 0.5) / n  # (n,)
    profile = 30.0 * s**2 * (1.0 - s) ** 2 / (n * bin_s)  # integrates to 1 over the move
    return profile[:, None] * displacement[None, :]


def _intent(task: str, n_bins: int, spec: SimulationSpec, rng: np.random.Generator):
    """Intended velocity (T, 2) in cm/s, movement-onset bins (M,) and targets (M, 2)."""
    bin_s = spec.bin_s
    u = np.zeros((n_bins, 2))  # (T, 2)
    onsets: list[int] = []
    targets: list[np.ndarray] = []
    t = 0
    pos = np.zeros(2)

    def bins(seconds: float) -> int:
        return max(1, int(round(seconds / bin_s)))

    def move(to: np.ndarray, seconds: float) -> None:
        nonlocal t, pos
        n = bins(seconds)
        stop = min(t + n, n_bins)
        onsets.append(t)
        targets.append(to.copy())
        u[t:stop] = _min_jerk(to - pos, n, bin_s)[: stop - t]
        t, pos = t + n, to

    if task == "center-out":
        while t < n_bins:
            t += bins(rng.uniform(0.2, 0.5))  # hold at centre
            if t >= n_bins:
                break
            angle = 2 * np.pi * rng.integers(8) / 8
            move(spec.reach_cm * np.array([np.cos(angle), np.sin(angle)]), rng.uniform(0.5, 0.8))
            t += bins(rng.uniform(0.2, 0.5))  # hold at target
            if t >= n_bins:
                break
            move(np.zeros(2), rng.uniform(0.5, 0.8))
    elif task == "random-target":
        while t < n_bins:
            r = spec.workspace_cm * np.sqrt(rng.uniform())
            a = rng.uniform(0, 2 * np.pi)
            target = np.array([r * np.cos(a), r * np.sin(a)])
            dist = float(np.linalg.norm(target - pos))
            move(target, 0.35 + 0.04 * dist + rng.uniform(0.0, 0.2))
            if rng.uniform() < 0.5:
                t += bins(rng.uniform(0.0, 0.15))  # occasional short hold
    else:  # pragma: no cover - guarded by SimulationSpec
        raise ValueError(f"task: unknown task {task!r}")
    return u, np.asarray(onsets, dtype=np.int32), np.asarray(targets, dtype=np.float32).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# subjects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Subject:
    name: str
    A: np.ndarray  # (K, K)
    B: np.ndarray  # (K, 2)
    site_xy: np.ndarray | None  # (S, 2) mm, None for single-site subjects
    pref_dir: np.ndarray  # (S, M) radians at day 0
    pd_drift: np.ndarray  # (S, M) radians/day
    log_base: np.ndarray  # (S, M) log Hz at day 0
    base_drift: np.ndarray  # (S, M) log units/day
    modulation: np.ndarray  # (S, M)
    rot_loading: np.ndarray  # (S, M, K-2)
    dates: np.ndarray  # (sessions,) days
    tasks: tuple[str, ...]


def _make_subject(j: int, spec: SimulationSpec, seed: int) -> _Subject:
    rng = np.random.default_rng(np.random.SeedSequence([seed, j]))
    K, bin_s = spec.latent_dim, spec.bin_s
    n_rot = K - 2

    # Dynamics: velocity low-pass block + damped rotations driven by the intent.
    A = np.zeros((K, K))
    B = np.zeros((K, 2))
    a_v = np.exp(-bin_s / rng.uniform(0.04, 0.08))
    A[:2, :2] = a_v * np.eye(2)
    B[:2] = (1.0 - a_v) * np.eye(2)
    for p in range(n_rot // 2):
        rho = np.exp(-bin_s / rng.uniform(0.15, 0.4))
        w = 2 * np.pi * rng.uniform(0.5, 2.5) * bin_s
        i = 2 + 2 * p
        A[i : i + 2, i : i + 2] = rho * np.array([[np.cos(w), -np.sin(w)], [np.sin(w), np.cos(w)]])
        B[i : i + 2] = (1.0 - rho) * 2.0 * rng.normal(size=(2, 2))

    multisite = j >= spec.n_subjects - spec.n_multisite_subjects
    n_sites = (
        int(rng.integers(spec.sites_per_multisite_subject[0], spec.sites_per_multisite_subject[1] + 1))
        if multisite
        else 1
    )
    M = int(rng.integers(spec.population_size[0], spec.population_size[1] + 1))
    site_xy = rng.uniform(-4.0, 4.0, size=(n_sites, 2)) if multisite else None

    # Each site: its own preferred-direction bias, gain and rotational loadings.
    if multisite:
        bias = rng.uniform(0, 2 * np.pi, size=(n_sites, 1))
        pref = bias + rng.vonmises(0.0, 1.0, size=(n_sites, M))
        gain = rng.uniform(0.7, 1.2, size=(n_sites, 1))
    else:
        pref = rng.uniform(0, 2 * np.pi, size=(1, M))
        gain = np.ones((1, 1))
    lo, hi = np.log(spec.baseline_hz[0]), np.log(spec.baseline_hz[1])
    log_base = rng.uniform(lo, hi, size=(n_sites, M))
    modulation = gain * rng.uniform(*spec.modulation, size=(n_sites, M))
    rot_loading = rng.normal(scale=spec.rotational_gain / np.sqrt(max(n_rot, 1)), size=(n_sites, M, n_rot))
    pd_drift = rng.normal(scale=spec.pd_drift_rad_per_day, size=(n_sites, M))
    base_drift = rng.normal(scale=spec.baseline_drift_per_day, size=(n_sites, M))

    gaps = rng.uniform(*spec.session_gap_days, size=spec.sessions_per_subject - 1)
    dates = np.concatenate([[0.0], np.cumsum(gaps)])
    first = int(rng.integers(len(spec.tasks)))
    tasks = tuple(spec.tasks[(first + k) % len(spec.tasks)] for k in range(spec.sessions_per_subject))
    return _Subject(
        name=f"sim{j:02d}",
        A=A,
        B=B,
        site_xy=site_xy,
        pref_dir=pref,
        pd_drift=pd_drift,
        log_base=log_base,
        base_drift=base_drift,
        modulation=modulation,
        rot_loading=rot_loading,
        dates=dates,
        tasks=tasks,
    )


# --------------------------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------------------------


def _simulate_session(subj: _Subject, k: int, j: int, spec: SimulationSpec, seed: int) -> Session:
    """Session ``k`` of subject ``j``, drawn from its own ``SeedSequence([seed, j, 1 + k])``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, j, 1 + k]))
    bin_s, v0 = spec.bin_s, spec.speed_scale_cm_s
    T = int(rng.integers(spec.bins_per_session[0], spec.bins_per_session[1] + 1))
    day = float(subj.dates[k])
    task = subj.tasks[k]

    u, onsets, targets = _intent(task, T, spec, rng)  # (T, 2) cm/s
    x = _latents(u, subj, spec, rng)  # (T, K)
    velocity = v0 * x[:, :2]  # (T, 2) cm/s
    position = np.cumsum(velocity, axis=0) * bin_s  # (T, 2) cm
    rec = _recorded_neurons(subj, day, spec, rng)
    rates = _rates_hz(x, rec, spec)  # (S, T, N) Hz
    counts = rng.poisson(rates * bin_s)  # (S, T, N)

    multisite = subj.site_xy is not None
    if not multisite:
        counts, rates = counts[0], rates[0]
        rec = {name: value[0] for name, value in rec.items()}
    extra = {
        "latents": x.astype(np.float32),
        "intent": u.astype(np.float32),
        "rates_hz": rates.astype(np.float32),
        "neuron_ids": rec["ids"].astype(np.int32),
        "pref_dir": rec["pref"].astype(np.float32),
        "baseline_hz": np.exp(rec["log_base"]).astype(np.float32),
        "modulation": rec["mod"].astype(np.float32),
        "move_onsets": onsets,
        "targets": targets,
    }
    session = Session(
        counts=counts.astype(np.int32),
        bin_s=bin_s,
        velocity=velocity.astype(np.float32),
        position=position.astype(np.float32),
        timestamps=np.arange(T, dtype=np.float64) * bin_s,
        site_xy=None if not multisite else subj.site_xy.astype(np.float32),
        subject=subj.name,
        session=f"{subj.name}_s{k:02d}",
        task=task,
        date_days=day,
        source=f"simulate(seed={seed})",
        extra=extra,
    )
    return validate_session(session)


def _latents(u: np.ndarray, subj: _Subject, spec: SimulationSpec, rng: np.random.Generator) -> np.ndarray:
    """The latent state driven by the intent ``u`` (T, 2) cm/s, from a zero state.

    Shape: (T, K); ``x[t]`` is the state before bin t's drive and noise are applied.
    """
    drive = (u / spec.speed_scale_cm_s) @ subj.B.T  # (T, K)
    noise = spec.latent_noise * rng.normal(size=drive.shape)  # (T, K)
    x = np.zeros_like(drive)  # (T, K) latents
    A = subj.A
    state = np.zeros(A.shape[0])
    for t in range(x.shape[0]):
        x[t] = state
        state = A @ state + drive[t] + noise[t]
    return x


def _recorded_neurons(
    subj: _Subject, day: float, spec: SimulationSpec, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The N channels a session records per site and their tuning on ``day``.

    Returns:
        ``ids``, ``pref`` (radians), ``log_base`` (log Hz), ``mod``: each (S, N); ``rot`` (S, N, K-2).
    """
    S, M = subj.pref_dir.shape
    N = int(rng.integers(spec.channels_per_session[0], spec.channels_per_session[1] + 1))
    ids = np.stack([rng.permutation(M)[:N] for _ in range(S)])  # (S, N)
    take = np.take_along_axis
    log_base = np.clip(
        subj.log_base + subj.base_drift * day,
        np.log(spec.baseline_hz[0]) - 0.3,
        np.log(spec.baseline_hz[1]) + 0.3,
    )  # (S, M)
    return {
        "ids": ids,
        "pref": take(subj.pref_dir + subj.pd_drift * day, ids, axis=1),  # (S, N)
        "log_base": take(log_base, ids, axis=1),  # (S, N)
        "mod": take(subj.modulation, ids, axis=1),  # (S, N)
        "rot": subj.rot_loading[np.arange(S)[:, None], ids],  # (S, N, K-2)
    }


def _rates_hz(x: np.ndarray, rec: dict[str, np.ndarray], spec: SimulationSpec) -> np.ndarray:
    """Firing rates of the recorded neurons given the latents ``x`` (T, K).

    Shape: (S, T, N) Hz, log-rates clipped at ``spec.max_rate_hz``.
    """
    pref = rec["pref"]
    tuning = rec["mod"][..., None] * np.stack([np.cos(pref), np.sin(pref)], axis=-1)  # (S, N, 2)
    loading = np.concatenate([tuning, rec["rot"]], axis=-1)  # (S, N, K)
    log_rate = rec["log_base"][:, None, :] + np.einsum("tk,snk->stn", x, loading)  # (S, T, N)
    return np.exp(np.minimum(log_rate, np.log(spec.max_rate_hz)))  # (S, T, N) Hz


def simulate_sessions(spec: SimulationSpec | None = None, *, seed: int) -> list[Session]:
    """All sessions of ``spec`` (subject-major order), deterministic given ``seed``."""
    spec = SimulationSpec() if spec is None else spec
    out: list[Session] = []
    for j in range(spec.n_subjects):
        subj = _make_subject(j, spec, seed)
        out.extend(_simulate_session(subj, k, j, spec, seed) for k in range(spec.sessions_per_subject))
    return out


def write_simulated(
    out_dir: str | Path, spec: SimulationSpec | None = None, *, seed: int, include_ground_truth: bool = True
) -> list[Path]:
    """Simulate and write one NPZ per session plus ``manifest.json`` into ``out_dir``.

    The manifest records the spec, the seed and one entry per session (file, subject, session,
    task, date, shape, fingerprint).  Ground truth travels as ``extra_*`` keys unless
    ``include_ground_truth`` is false.  Returns the NPZ paths (the manifest is
    ``out_dir / "manifest.json"``).
    """
    spec = SimulationSpec() if spec is None else spec
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    entries = []
    for s in simulate_sessions(spec, seed=seed):
        p = save_npz(s, out / f"{s.session}.npz", include_extra=include_ground_truth)
        paths.append(p)
        entries.append(
            {
                "file": p.name,
                "subject": s.subject,
                "session": s.session,
                "task": s.task,
                "date_days": s.date_days,
                "n_bins": s.n_bins,
                "n_channels": s.n_channels,
                "n_sites": int(s.counts.shape[0]) if s.multisite else 1,
                "bin_s": s.bin_s,
                "fingerprint": s.fingerprint(),
            }
        )
    manifest = {
        "generator": "rpnt_core.data.simulate",
        "seed": seed,
        "spec": asdict(spec),
        "sessions": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return paths
