"""Classic baselines (rpnt_core.evaluate.baselines): the Decoder contract, causality, closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rpnt_core.decoder import Decoder, decode_stream
from rpnt_core.evaluate.baselines import BASELINES, GRUDecoder, GRUOptions, KalmanFilter, WienerFilter
from rpnt_core.evaluate.metrics import r2_score

BIN_S = 0.02
N_CH, N_OUT = 24, 2
# A small, fast GRU for the tests (the defaults are sized for ~10k-bin sessions).  One torch
# thread during fit keeps the tests fast on a busy 2-core host (see GRUDecoder's docstring).
GRU_TEST_HYPER = dict(
    hidden=32, window=48, batch_size=16, steps_per_epoch=15, max_epochs=12, patience=4, num_threads=1
)
HYPER = {"wiener": {}, "kalman": {}, "gru": GRU_TEST_HYPER}


def _synthetic(
    *, seed: int, n_bins: int, n_channels: int = N_CH, n_outputs: int = N_OUT
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A linear-Gaussian-ish system: smooth velocity v (T, D), known tuning H (N, D),
    Poisson counts (T, N) with log-rate = baseline + H v.  Returns (counts, velocity, H)."""
    rng = np.random.default_rng(seed)
    v = np.zeros((n_bins, n_outputs))
    e = rng.normal(size=(n_bins, n_outputs))
    for t in range(2, n_bins):  # AR(2) low-pass noise: a smooth reach-like velocity
        v[t] = 1.9 * v[t - 1] - 0.905 * v[t - 2] + 0.05 * e[t]
    v /= v.std(axis=0)
    h = rng.normal(size=(n_channels, n_outputs)) * 0.4
    log_base = np.log(rng.uniform(10.0, 40.0, size=n_channels) * BIN_S)
    counts = rng.poisson(np.exp(log_base + v @ h.T))
    return counts, v.astype(np.float32), h


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    counts, vel, _ = _synthetic(seed=7, n_bins=4600)
    return {
        "train": (counts[:3000], vel[:3000]),
        "val": (counts[3000:3800], vel[3000:3800]),
        "test": (counts[3800:], vel[3800:]),
    }


@pytest.fixture(scope="module")
def fitted(data) -> dict:
    (tc, tv), (vc, vv) = data["train"], data["val"]
    return {
        name: cls.fit(
            train_counts=tc,
            train_velocity=tv,
            val_counts=vc,
            val_velocity=vv,
            bin_s=BIN_S,
            seed=0,
            **HYPER[name],
        )
        for name, cls in BASELINES.items()
    }


def _random_counts(seed: int, n_bins: int, n_channels: int = N_CH) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.poisson(rng.uniform(0.1, 3.0, size=n_channels), size=(n_bins, n_channels))


NAMES = list(BASELINES)


# --- contract ------------------------------------------------------------------------------------


def test_registry() -> None:
    assert {"wiener": WienerFilter, "kalman": KalmanFilter, "gru": GRUDecoder} == BASELINES


@pytest.mark.parametrize("name", NAMES)
def test_info_and_protocol(fitted, name: str) -> None:
    model = fitted[name]
    assert isinstance(model, Decoder)
    assert model.info.n_channels == N_CH and model.info.n_outputs == N_OUT
    assert model.info.bin_s == BIN_S and model.info.name == name
    assert np.isfinite(model.info.extra["val_r2"])
    model.reset()
    out = model.step(np.zeros(N_CH, dtype=np.int64))
    assert out.shape == (N_OUT,) and out.dtype == np.float32


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("source", ["random", "test"])
def test_step_equals_predict(fitted, data, name: str, source: str) -> None:
    """(a) reset + one step per bin == the vectorised predict."""
    model = fitted[name]
    counts = _random_counts(11, 300) if source == "random" else data["test"][0]
    pred = model.predict(counts)  # (T, D)
    streamed = decode_stream(model, counts)  # (T, D)
    assert pred.shape == streamed.shape == (counts.shape[0], N_OUT) and pred.dtype == np.float32
    scale = float(np.abs(pred).max())
    np.testing.assert_allclose(streamed, pred, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_predict_leaves_stream_state_alone(fitted, name: str) -> None:
    model = fitted[name]
    counts = _random_counts(12, 80)
    ref = decode_stream(model, counts)
    model.reset()
    first = [model.step(c) for c in counts[:40]]
    model.predict(_random_counts(13, 25))  # in the middle of a stream
    rest = [model.step(c) for c in counts[40:]]
    np.testing.assert_array_equal(np.stack(first + rest), ref)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_causality(fitted, name: str, seed: int) -> None:
    """(b) changing counts at times > t leaves every output at ≤ t unchanged (bit for bit)."""
    model = fitted[name]
    rng = np.random.default_rng(100 + seed)
    counts = _random_counts(200 + seed, 70)
    for t in rng.integers(0, counts.shape[0] - 1, size=4):
        changed = counts.copy()
        changed[t + 1 :] = rng.poisson(5.0, size=changed[t + 1 :].shape)
        np.testing.assert_array_equal(model.predict(changed)[: t + 1], model.predict(counts)[: t + 1])
        np.testing.assert_array_equal(
            decode_stream(model, changed)[: t + 1], decode_stream(model, counts)[: t + 1]
        )


@pytest.mark.parametrize(("name", "min_r2"), [("wiener", 0.6), ("kalman", 0.6), ("gru", 0.5)])
def test_decodes_synthetic_system(fitted, data, name: str, min_r2: float) -> None:
    """(c) held-out R² (streamed, as evaluation will score it) well above 0."""
    counts, vel = data["test"]
    r2 = r2_score(vel, decode_stream(fitted[name], counts))
    assert r2 > min_r2, f"{name}: held-out R² {r2:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_reset_forgets(fitted, name: str) -> None:
    """(d) two identical streams give identical outputs, whatever ran before the reset."""
    model = fitted[name]
    counts = _random_counts(21, 60)
    first = decode_stream(model, counts)
    decode_stream(model, _random_counts(22, 45), reset=True)  # unrelated history
    second = decode_stream(model, counts)
    np.testing.assert_array_equal(first, second)
    # and without reset the history does matter (so the test above is not vacuous)
    decode_stream(model, _random_counts(23, 45) * 3, reset=True)
    assert not np.array_equal(decode_stream(model, counts, reset=False), first)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises(fitted, name: str) -> None:
    """(e) step and predict validate their input (via check_counts)."""
    model = fitted[name]
    model.reset()
    for bad in (np.zeros(N_CH + 1), np.zeros((1, N_CH)), np.zeros(N_CH - 1), np.float32(0.0)):
        with pytest.raises(ValueError, match="shape"):
            model.step(bad)
    with pytest.raises(ValueError, match="NaN"):
        model.step(np.full(N_CH, np.nan))
    with pytest.raises(ValueError, match="negative"):
        model.step(-np.ones(N_CH))
    for bad in (np.zeros((5, N_CH + 1)), np.zeros(N_CH), np.zeros((2, 5, N_CH))):
        with pytest.raises(ValueError, match="shape"):
            model.predict(bad)


@pytest.mark.parametrize("name", NAMES)
def test_fit_validates_splits(data, name: str) -> None:
    (tc, tv), (vc, vv) = data["train"], data["val"]
    cls = BASELINES[name]
    with pytest.raises(ValueError, match="bins"):
        cls.fit(train_counts=tc, train_velocity=tv[:-1], val_counts=vc, val_velocity=vv, bin_s=BIN_S)
    with pytest.raises(ValueError, match=r"\(T, "):
        cls.fit(train_counts=tc, train_velocity=tv, val_counts=vc[:, :-1], val_velocity=vv, bin_s=BIN_S)
    with pytest.raises(ValueError, match="dims"):
        cls.fit(train_counts=tc, train_velocity=tv, val_counts=vc, val_velocity=vv[:, :1], bin_s=BIN_S)
    with pytest.raises(ValueError, match="bin_s"):
        cls.fit(train_counts=tc, train_velocity=tv, val_counts=vc, val_velocity=vv, bin_s=0.0)


# --- Wiener --------------------------------------------------------------------------------------


def test_wiener_recovers_exact_linear_map() -> None:
    """Noise-free y_t = b + Σ_l sqrt(x_{t-l}) W_l (zero history before bin 0) is recovered."""
    rng = np.random.default_rng(3)
    n_lags, n = 3, 5
    w_true = rng.normal(size=(n_lags, n, N_OUT))
    b_true = np.array([0.5, -1.0])
    truth = WienerFilter(weights=w_true, bias=b_true, bin_s=BIN_S)
    counts = _random_counts(4, 900, n_channels=n)
    vel = truth.predict(counts).astype(np.float64)
    # the zero-history convention, by hand for the first two bins
    s = np.sqrt(counts.astype(np.float64))
    np.testing.assert_allclose(vel[0], b_true + s[0] @ w_true[0], rtol=1e-6)
    np.testing.assert_allclose(vel[1], b_true + s[1] @ w_true[0] + s[0] @ w_true[1], rtol=1e-6)
    model = WienerFilter.fit(
        train_counts=counts[:600],
        train_velocity=vel[:600],
        val_counts=counts[600:],
        val_velocity=vel[600:],
        bin_s=BIN_S,
        n_lags=n_lags,
        rel_alphas=(1e-12,),
    )
    np.testing.assert_allclose(model.weights, w_true, atol=1e-4)
    np.testing.assert_allclose(model.bias, b_true, atol=1e-4)


def test_wiener_alpha_chosen_by_validation(fitted) -> None:
    extra = fitted["wiener"].info.extra
    scores = extra["val_r2_by_rel_alpha"]
    assert set(scores) == set(WienerFilter.DEFAULT_REL_ALPHAS)
    assert extra["rel_alpha"] == max(scores, key=scores.get)
    assert extra["val_r2"] == max(scores.values())


def test_wiener_val_r2_is_streamed_score(fitted, data) -> None:
    vc, vv = data["val"]
    model = fitted["wiener"]
    assert r2_score(vv, decode_stream(model, vc)) == pytest.approx(model.info.extra["val_r2"], abs=1e-6)


# --- Kalman --------------------------------------------------------------------------------------


def _textbook_kalman(kf: KalmanFilter, counts: np.ndarray) -> np.ndarray:
    """Standard predict/update with K = P Hᵀ (H P Hᵀ + Q)⁻¹, starting from (x0, P0)."""
    z = np.sqrt(counts.astype(np.float64))
    x, p = kf.x0.copy(), kf.P0.copy()
    out = []
    for t in range(z.shape[0]):
        if t > 0:
            x, p = kf.A @ x + kf.a, kf.A @ p @ kf.A.T + kf.W
        k = p @ kf.H.T @ np.linalg.inv(kf.H @ p @ kf.H.T + kf.Q)
        x = x + k @ (z[t] - kf.c - kf.H @ x)
        p = (np.eye(len(x)) - k @ kf.H) @ p
        out.append(x)
    return np.array(out)


def test_kalman_prior_is_training_mean_not_truth(fitted, data) -> None:
    """(f) the first output is the training-mean prior updated with bin 0, whatever the truth."""
    kf = fitted["kalman"]
    tc, tv = data["train"]
    np.testing.assert_allclose(kf.x0, tv.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(kf.P0, np.cov(tv.astype(np.float64), rowvar=False, bias=True), rtol=1e-12)
    test_counts, test_vel = data["test"]
    z0 = np.sqrt(test_counts[0].astype(np.float64))
    k0 = kf.P0 @ kf.H.T @ np.linalg.inv(kf.H @ kf.P0 @ kf.H.T + kf.Q)
    expected = kf.x0 + k0 @ (z0 - kf.c - kf.H @ kf.x0)
    kf.reset()
    first = kf.step(test_counts[0])
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(first, test_vel[0], atol=1e-3)  # it is not handed the truth
    # two sessions with the same counts but different velocity decode identically
    kf2 = KalmanFilter.fit(
        train_counts=tc, train_velocity=tv, val_counts=test_counts, val_velocity=-test_vel, bin_s=BIN_S
    )
    np.testing.assert_array_equal(kf2.predict(test_counts[:5]), kf.predict(test_counts[:5]))


def test_kalman_matches_textbook_filter(fitted, data) -> None:
    kf = fitted["kalman"]
    counts = data["test"][0][:200]
    np.testing.assert_allclose(kf.predict(counts), _textbook_kalman(kf, counts), rtol=1e-5, atol=1e-5)


def test_kalman_recovers_dynamics_and_tuning() -> None:
    """Least squares on a long synthetic session finds A close to the AR fit and H's direction."""
    counts, vel, h_true = _synthetic(seed=5, n_bins=20000)
    kf = KalmanFilter.fit(
        train_counts=counts[:18000],
        train_velocity=vel[:18000],
        val_counts=counts[18000:],
        val_velocity=vel[18000:],
        bin_s=BIN_S,
    )
    v = vel[:18000].astype(np.float64)
    a_ls = np.linalg.lstsq(np.hstack([v[:-1], np.ones((len(v) - 1, 1))]), v[1:], rcond=None)[0]
    np.testing.assert_allclose(kf.A, a_ls[:N_OUT].T, rtol=1e-8, atol=1e-10)
    # sqrt of a log-linear rate is monotone in H v: the fitted tuning correlates with the true one
    assert np.corrcoef(kf.H.ravel(), h_true.ravel())[0, 1] > 0.9


# --- GRU -----------------------------------------------------------------------------------------


_TINY = dict(hidden=16, window=32, batch_size=8, steps_per_epoch=5, max_epochs=3, patience=2, num_threads=1)


def test_gru_deterministic_and_leaves_global_torch_state(data) -> None:
    (tc, tv), (vc, vv) = data["train"], data["val"]
    threads = torch.get_num_threads()
    rng_state = torch.random.get_rng_state()
    fit = (
        lambda seed: GRUDecoder.fit(  # noqa: E731
            train_counts=tc[:800],
            train_velocity=tv[:800],
            val_counts=vc[:200],
            val_velocity=vv[:200],
            bin_s=BIN_S,
            seed=seed,
            **_TINY,
        )
    )
    m1, m2, m3 = fit(0), fit(0), fit(1)
    probe = data["test"][0][:100]
    np.testing.assert_array_equal(m1.predict(probe), m2.predict(probe))
    assert m1.info.fingerprint == m2.info.fingerprint != m3.info.fingerprint
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_state)


def test_gru_keeps_best_validation_weights(fitted, data) -> None:
    model = fitted["gru"]
    extra = model.info.extra
    assert extra["val_r2"] == max(extra["val_r2_history"])
    assert extra["best_epoch"] == 1 + int(np.argmax(extra["val_r2_history"]))
    assert extra["epochs_run"] <= GRU_TEST_HYPER["max_epochs"]
    vc, vv = data["val"]
    assert r2_score(vv, model.predict(vc)) == pytest.approx(extra["val_r2"], abs=1e-6)


def test_gru_num_threads_is_scoped_to_fit(data) -> None:
    (tc, tv), (vc, vv) = data["train"], data["val"]
    threads = torch.get_num_threads()
    kwargs = dict(
        train_counts=tc[:300],
        train_velocity=tv[:300],
        val_counts=vc[:100],
        val_velocity=vv[:100],
        bin_s=BIN_S,
        **{**_TINY, "max_epochs": 1},
    )
    kwargs["num_threads"] = threads + 1
    assert GRUDecoder.fit(**kwargs).info.extra["torch_threads"] == threads + 1
    assert torch.get_num_threads() == threads
    kwargs["num_threads"] = None
    assert GRUDecoder.fit(**kwargs).info.extra["torch_threads"] == threads
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="num_threads"):
        GRUDecoder.fit(**{**kwargs, "num_threads": 0})


def test_gru_options_object_and_keyword_overrides_fit_the_same_weights(data) -> None:
    (tc, tv), (vc, vv) = data["train"], data["val"]
    common = dict(
        train_counts=tc[:300],
        train_velocity=tv[:300],
        val_counts=vc[:100],
        val_velocity=vv[:100],
        bin_s=BIN_S,
    )
    tiny = {**_TINY, "max_epochs": 1}
    by_options = GRUDecoder.fit(**common, options=GRUOptions(**tiny))
    by_keywords = GRUDecoder.fit(**common, **tiny)
    mixed = GRUDecoder.fit(**common, options=GRUOptions(**{**tiny, "hidden": 99}), hidden=tiny["hidden"])
    assert by_options.info.fingerprint == by_keywords.info.fingerprint == mixed.info.fingerprint
    assert GRUOptions().hidden == 128 and GRUOptions().num_threads is None
    with pytest.raises(ValueError, match="hidden"):
        GRUOptions(hidden=0)
    with pytest.raises(TypeError):
        GRUDecoder.fit(**common, hiddn=8)
