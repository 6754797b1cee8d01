"""Config validation, presets, metadata conditioning, multi-site model, rotary module."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_kernels, tiny_config

from rpnt_core import RPNT, ConfigError, RPNTConfig
from rpnt_core.model.rotary import MultiAxisRotary


def test_presets_match_the_paper_and_the_cpu_target():
    paper = RPNTConfig.preset("paper", n_channels=100)
    assert (paper.d_model, paper.n_layers, paper.n_heads, paper.window) == (512, 4, 16, 50)
    small = RPNTConfig.preset("small", n_channels=100)
    assert small.d_model < paper.d_model
    with pytest.raises(ConfigError, match="preset"):
        RPNTConfig.preset("huge", n_channels=3)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(d_model=12, n_heads=4), "n_heads"),  # head dim 3 is odd
        (dict(kernel_k=2), "kernel_k"),
        (dict(kernel_q=9, window=4), "kernel_q"),
        (dict(dropout=1.5), "dropout"),
        (dict(n_channels=0), "n_channels"),
        (dict(bin_s=0.0), "bin_s"),
        (dict(window=0), "window"),
        (dict(channel_map=(0, 1), input_channels=3), "channel_map"),
        (dict(input_channels=9), "input_channels"),
        (dict(subjects=("a", "a")), "subjects"),
    ],
)
def test_impossible_configs_fail_at_construction_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(**kw)


def test_config_json_round_trip():
    cfg = tiny_config(subjects=("m1", "m2"), tasks=("co",), channel_map=tuple(range(7)), input_channels=9)
    assert RPNTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        RPNTConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_a_config_of_the_removed_kernel_mode_reads_at_add_and_is_refused_otherwise():
    old = tiny_config().to_dict()
    assert RPNTConfig.from_dict({**old, "kernel_mode": "add"}) == RPNTConfig.from_dict(old)
    for ablation in ("replace", "none"):
        with pytest.raises(ConfigError, match="kernel_mode"):
            RPNTConfig.from_dict({**old, "kernel_mode": ablation})


def test_wrong_input_shape_is_a_clear_error():
    model = RPNT(tiny_config())
    with pytest.raises(ValueError, match="N=7"):
        model(torch.zeros(1, 5, 6))
    with pytest.raises(ValueError, match="counts"):
        model.step(torch.zeros(1, 5, 7), model.init_state(1))


@pytest.mark.parametrize(
    "field,a,b", [("subject", "m1", "m2"), ("session", "s1", "s2"), ("task", "co", "rt")]
)
def test_metadata_reaches_the_output(field, a, b):
    torch.manual_seed(0)
    model = RPNT(tiny_config(subjects=("m1", "m2"), sessions=("s1", "s2"), tasks=("co", "rt"))).eval()
    x = torch.poisson(torch.rand(1, 12, 7) * 3)
    with torch.no_grad():
        ya = model(x, model.metadata_for(**{field: a}))["velocity"]
        yb = model(x, model.metadata_for(**{field: b}))["velocity"]
        # and through step() the same way
        sa = model.init_state(1, model.metadata_for(**{field: a}))
        out_a, _ = model.step(x[:, 0], sa)
    assert (ya - yb).abs().max() > 1e-4
    assert torch.allclose(out_a["velocity"], ya[:, 0], atol=1e-5)


def test_date_reaches_the_output_and_unknown_names_map_to_index_zero():
    torch.manual_seed(0)
    model = RPNT(tiny_config(subjects=("m1",))).eval()
    x = torch.poisson(torch.rand(1, 10, 7) * 3)
    with torch.no_grad():
        d0 = model(x, model.metadata_for(date_days=0.0))["velocity"]
        d30 = model(x, model.metadata_for(date_days=30.0))["velocity"]
    assert (d0 - d30).abs().max() > 1e-4
    assert int(model.metadata_for(subject="never-seen")["subject"][0]) == 0
    with pytest.raises(ValueError, match="out of range"):
        model(x, {"subject": torch.tensor([5])})


def test_rotary_dot_products_depend_only_on_relative_position():
    rot = MultiAxisRotary(dims=[4, 6, 2], bases=[100.0, 10.0, 1000.0])
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 14, generator=g)  # (1, F) each
    p1, p2 = torch.tensor([[3.0, -1.0, 7.0]]), torch.tensor([[1.0, 2.5, 4.0]])
    shift = torch.tensor([[123.0, -50.0, 1e6]])

    def dot(pa, pb):
        ca, sa = rot.angles(pa)
        cb, sb = rot.angles(pb)
        return (rot.rotate(q, ca, sa) * rot.rotate(k, cb, sb)).sum()

    assert torch.allclose(dot(p1, p2), dot(p1 + shift, p2 + shift), atol=1e-4)
    assert not torch.allclose(dot(p1, p2), dot(p1, p2 + 1.0), atol=1e-3)
    # features beyond sum(dims) pass through unrotated
    c, s = rot.angles(p1)
    assert torch.equal(rot.rotate(q, c, s)[..., 12:], q[..., 12:])
    with pytest.raises(ValueError, match="even"):
        MultiAxisRotary(dims=[3], bases=[10.0])


def test_multisite_model_step_equals_forward_and_is_causal():
    torch.manual_seed(0)
    model = RPNT(tiny_config(n_channels=5, d_model=16, n_heads=2, spatial_layers=2, spatial_heads=2)).eval()
    randomise_kernels(model)
    xy = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-0.5, 2.0]])
    x = torch.poisson(torch.rand(2, 3, 20, 5) * 3)
    with torch.no_grad():
        full = model(x, site_xy=xy)
        state = model.init_state(2, site_xy=xy)
        for t in range(20):
            out, state = model.step(x[:, :, t], state)
            assert (out["velocity"] - full["velocity"][:, t]).abs().max() <= 1e-4
            assert (out["log_rates"] - full["log_rates"][:, :, t]).abs().max() <= 1e-4
        y = x.clone()
        y[:, :, 11:] += 3
        assert torch.equal(model(y, site_xy=xy)["velocity"][:, :11], full["velocity"][:, :11])
        # site coordinates matter (rotary on x/y inside the spatial encoder)
        moved = model(x, site_xy=xy * 3.0)["velocity"]
    assert (moved - full["velocity"]).abs().max() > 1e-5
    assert full["connectivity"].shape == (2, 20, 3, 3)
    with pytest.raises(ValueError, match="site_xy"):
        model(x)
