"""The contract everything downstream relies on: causal, streaming-exact, position-free."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import randomise_kernels, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpnt_core import RPNT
from rpnt_core.decoder import decode_stream
from rpnt_core.model.attention import ContextKernelAttention, conv_band
from rpnt_core.model.torch_decoder import TorchDecoder

configs = st.fixed_dictionaries(
    {
        "n_heads": st.sampled_from([1, 2, 4]),
        "head_dim": st.sampled_from([2, 4, 8]),
        "n_layers": st.integers(1, 3),
        "window": st.integers(1, 9),
        "kernel_q": st.integers(1, 4),
        "kernel_k": st.sampled_from([1, 3, 5]),
        "kernel_mode": st.sampled_from(["add", "replace", "none"]),
        "n_channels": st.integers(1, 9),
        "seed": st.integers(0, 2**16),
    }
)


def ablated(model: RPNT, kernel_mode: str) -> RPNT:
    """``model`` with every temporal block's attention rebuilt as the ``kernel_mode`` ablation
    ("replace": context scores only, "none": plain causal band attention); "add" is the model as
    the config builds it.  The ablations are no config option: tests build them here."""
    if kernel_mode == "add":
        return model
    c = model.config
    for blk in model.blocks:
        blk.attn = ContextKernelAttention(
            d_model=c.d_model,
            n_heads=c.n_heads,
            window=c.window,
            kernel_q=c.kernel_q,
            kernel_k=c.kernel_k,
            kernel_hidden=c.kernel_hidden,
            rope_base=c.rope_base,
            dropout=c.dropout,
            kernel_mode=kernel_mode,
        )
    return model


def build(p: dict) -> RPNT:
    torch.manual_seed(p["seed"])
    kq = min(p["kernel_q"], p["window"])
    config = tiny_config(
        n_channels=p["n_channels"],
        d_model=p["n_heads"] * p["head_dim"],
        n_heads=p["n_heads"],
        n_layers=p["n_layers"],
        window=p["window"],
        kernel_q=kq,
        kernel_k=p["kernel_k"],
    )
    model = ablated(RPNT(config), p["kernel_mode"]).eval()
    randomise_kernels(model)
    return model


def test_an_unknown_kernel_mode_is_refused():
    with pytest.raises(ValueError, match="kernel_mode"):
        ablated(RPNT(tiny_config()), "sideways")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=configs, t_len=st.integers(2, 30), data=st.data())
def test_changing_the_future_leaves_the_past_bit_identical(p, t_len, data):
    model = build(p)
    t = data.draw(st.integers(0, t_len - 2), label="t")
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.poisson(torch.rand(2, t_len, p["n_channels"], generator=g) * 4, generator=g)
    y = x.clone()
    y[:, t + 1 :] = (
        torch.poisson(torch.rand(2, t_len - t - 1, p["n_channels"], generator=g) * 9, generator=g) + 1
    )
    with torch.no_grad():
        a, b = model(x), model(y)
    for key in ("velocity", "log_rates", "latent"):
        assert torch.equal(a[key][:, : t + 1], b[key][:, : t + 1]), key
    # and the test is not vacuous: the future inputs do reach later outputs
    assert not torch.equal(a["latent"][:, t + 1 :], b["latent"][:, t + 1 :])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=configs, t_len=st.integers(1, 40))
def test_step_equals_full_forward(p, t_len):
    model = build(p)
    g = torch.Generator().manual_seed(p["seed"] + 1)
    x = torch.poisson(torch.rand(3, t_len, p["n_channels"], generator=g) * 4, generator=g)
    with torch.no_grad():
        full = model(x)
        state = model.init_state(3)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        for t in range(t_len):
            out, state = model.step(x[:, t], state)
            for key in ("velocity", "log_rates"):
                err = (out[key] - full[key][:, t]).abs().max().item()
                assert err <= 1e-4, (key, t, err)
        assert {k: tuple(v.shape) for k, v in state.items()} == shapes  # constant-size state


def test_step_equals_forward_paper_preset_long_stream():
    from rpnt_core import RPNTConfig

    torch.manual_seed(0)
    model = RPNT(RPNTConfig.preset("paper", n_channels=24, dropout=0.0)).eval()
    randomise_kernels(model, std=0.05)
    x = torch.poisson(torch.rand(1, 130, 24) * 3)
    with torch.no_grad():
        full = model(x)["velocity"][0]
        dec = TorchDecoder(model)
        stepped = torch.from_numpy(decode_stream(dec, x[0].numpy()))
    assert (stepped - full).abs().max().item() <= 1e-4


def test_same_window_at_stream_position_zero_and_ten_million():
    model = build(
        dict(
            n_heads=2,
            head_dim=8,
            n_layers=2,
            window=8,
            kernel_q=3,
            kernel_k=3,
            kernel_mode="add",
            n_channels=5,
            seed=3,
        )
    )
    x = torch.poisson(torch.rand(2, 40, 5) * 4)
    with torch.no_grad():
        at0 = model(x, start_position=0)["velocity"]
        at1e7 = model(x, start_position=10**7)["velocity"]
    assert (at0 - at1e7).abs().max().item() <= 1e-5


def test_rotary_angles_keep_their_phase_at_ten_million():
    """Angles formed in float32 lose the phase at 10^7 bins; ours (float64, reduced mod 2π) do not."""
    from rpnt_core.model.rotary import MultiAxisRotary

    rot = MultiAxisRotary(dims=[16], bases=[10000.0])
    pos = torch.tensor([[10**7]], dtype=torch.float64)
    cos, sin = rot.angles(pos)
    exact = (10**7 * rot.freq_matrix[0]) % (2 * math.pi)  # float64 reference
    assert torch.allclose(cos[0].double(), torch.cos(exact), atol=1e-6)
    assert torch.allclose(sin[0].double(), torch.sin(exact), atol=1e-6)
    naive = torch.tensor(10**7, dtype=torch.float32) * rot.freq_matrix[0].float()
    assert (torch.cos(naive).double() - torch.cos(exact)).abs().max() > 1e-2  # what the float64 path avoids


def test_step_does_not_depend_on_how_long_the_stream_has_run():
    """After a warm-up longer than the receptive field, outputs depend only on the recent window."""
    model = build(
        dict(
            n_heads=2,
            head_dim=4,
            n_layers=2,
            window=5,
            kernel_q=2,
            kernel_k=3,
            kernel_mode="add",
            n_channels=4,
            seed=5,
        )
    )
    r = model.receptive_field
    tail = torch.poisson(torch.rand(1, r + 10, 4) * 3)
    short = torch.cat([torch.poisson(torch.rand(1, 50, 4) * 3), tail], dim=1)
    long = torch.cat([torch.poisson(torch.rand(1, 3000, 4) * 3), tail], dim=1)
    with torch.no_grad():
        a = model.predict_stream(short)["velocity"][:, -10:]
        b = model.predict_stream(long, chunk=257)["velocity"][:, -10:]
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_predict_stream_equals_step(chunk):
    model = build(
        dict(
            n_heads=2,
            head_dim=4,
            n_layers=3,
            window=6,
            kernel_q=3,
            kernel_k=3,
            kernel_mode="add",
            n_channels=6,
            seed=11,
        )
    )
    x = np.random.default_rng(0).poisson(3, (300, 6))
    dec = TorchDecoder(model)
    stepped = decode_stream(dec, x)
    fast = model.predict_stream(torch.from_numpy(x).float()[None], chunk=chunk)["velocity"][0].numpy()
    assert np.abs(stepped - fast).max() <= 1e-4


def naive_context_conv(S: torch.Tensor, K: torch.Tensor, window: int) -> torch.Tensor:
    """The spec's formula, literally: Ŝ[t,s] = Σ_i Σ_j K_t[i,j] · S[t−i, s+j], zero outside bands."""
    t_len = S.shape[0]
    kq, kk = K.shape[1:]
    r = (kk - 1) // 2

    def s_at(t, s):
        if t < 0 or s < 0 or s > t or s <= t - window:
            return 0.0
        return float(S[t, s])

    out = torch.zeros(t_len, t_len, dtype=torch.float64)
    for t in range(t_len):
        for s in range(max(0, t - window + 1), t + 1):
            out[t, s] = sum(
                float(K[t, i, j + r]) * s_at(t - i, s + j) for i in range(kq) for j in range(-r, r + 1)
            )
    return out


@pytest.mark.parametrize("kq,kk,window", [(1, 1, 4), (3, 3, 5), (4, 5, 6), (2, 3, 2)])
def test_conv_band_is_the_spec_formula(kq, kk, window):
    g = torch.Generator().manual_seed(kq * 100 + kk * 10 + window)
    t_len = 12
    S = torch.randn(t_len, t_len, generator=g, dtype=torch.float64)
    K = torch.randn(t_len, kq, kk, generator=g, dtype=torch.float64)
    # band layout of S: band[t, a] = S[t, t−a] inside the band, 0 elsewhere
    band = torch.zeros(t_len, window, dtype=torch.float64)
    for t in range(t_len):
        for a in range(window):
            if t - a >= 0:
                band[t, a] = S[t, t - a]
    zero = torch.zeros(window, dtype=torch.float64)
    rows = torch.stack(
        [torch.stack([band[t - i] if t - i >= 0 else zero for i in range(kq)]) for t in range(t_len)]
    )  # (T, kq, W): rows[t, i] = band row t − i
    got = conv_band(rows, K)  # (T, W)
    want = naive_context_conv(S, K, window)
    for t in range(t_len):
        for a in range(window):
            expected = float(want[t, t - a]) if t - a >= 0 else None
            if expected is not None:
                assert abs(float(got[t, a]) - expected) < 1e-9, (t, a)


def test_context_kernel_rows_only_look_backwards():
    """Perturbing score row t+1 never changes the convolved row t."""
    g = torch.Generator().manual_seed(0)
    S = torch.randn(10, 10, generator=g, dtype=torch.float64)
    K = torch.randn(10, 3, 3, generator=g, dtype=torch.float64)
    a = naive_context_conv(S, K, 6)
    S2 = S.clone()
    S2[6:] += 5.0
    b = naive_context_conv(S2, K, 6)
    assert torch.equal(a[:6], b[:6])


def test_step_writes_one_ring_slot_and_shifts_nothing():
    """The k/v/pooling caches are ring buffers: a step changes exactly the slot at ``write_index``
    (which then advances modulo W); entries already written never move."""
    model = build(
        dict(
            n_heads=2,
            head_dim=4,
            n_layers=2,
            window=4,
            kernel_q=2,
            kernel_k=3,
            kernel_mode="add",
            n_channels=5,
            seed=3,
        )
    )
    w = model.config.window
    x = torch.poisson(torch.rand(1, 2 * w + 1, 5) * 3)
    with torch.no_grad():
        state = model.init_state(1)
        for t in range(2 * w + 1):
            p = int(state["write_index"].item())
            assert p == t % w
            _, new = model.step(x[:, t], state)
            for key, axis in (("k", 2), ("v", 2), ("pool_x", 1), ("pool_logit", 1)):
                before, after = state[f"layer1.{key}"], new[f"layer1.{key}"]
                changed = (before != after).movedim(axis, 0).reshape(w, -1).any(dim=1)
                assert changed.nonzero().flatten().tolist() == [p], (key, t)
            state = new
