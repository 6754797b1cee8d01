"""Cross-day transfer recipes in the product: per-day input normalisation, supervised pretraining
and label-free re-alignment of the read-in."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_config

from rpnt_core import RPNT, load_checkpoint, read_header, save_checkpoint
from rpnt_core.data import SimulationSpec, simulate_sessions
from rpnt_core.data.normalise import SCALE_FLOOR, sqrt_count_stats
from rpnt_core.data.splits import Splits
from rpnt_core.train.finetune import FinetuneOptions, build_model, fit_decoder
from rpnt_core.train.pretrain import PretrainOptions, pretrain
from rpnt_core.train.realign import RealignOptions, realign_input

TINY = (("d_model", 16), ("n_heads", 2), ("window", 8), ("kernel_hidden", 8), ("input_norm", True))


@pytest.fixture(scope="module")
def days():
    """Four days of one simulated array (the same 20 channels), 50 ms bins, position labels."""
    spec = SimulationSpec(
        n_subjects=1,
        sessions_per_subject=4,
        bins_per_session=(800, 800),
        bin_s=0.05,
        channels_per_session=(20, 20),
        population_size=(20, 20),
        n_multisite_subjects=0,
    )
    return [s.with_target("position") for s in simulate_sessions(spec, seed=5)]


def test_sqrt_count_stats_floor_the_scale_of_a_silent_channel():
    counts = np.stack([np.arange(10) % 3, np.zeros(10)], axis=1)
    mean, scale = sqrt_count_stats(counts)
    s = np.sqrt(counts[:, 0])
    assert mean[0] == pytest.approx(s.mean()) and scale[0] == pytest.approx(s.std())
    assert mean[1] == 0 and scale[1] == SCALE_FLOOR
    with pytest.raises(ValueError, match="^counts: must be finite and non-negative"):
        sqrt_count_stats(-counts)


def test_input_norm_standardises_sqrt_counts_before_the_read_in_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = RPNT(tiny_config(input_norm=True)).eval()
    x = torch.poisson(torch.full((1, 30, 7), 2.0))
    before = model(x)["velocity"]
    mean, scale = torch.linspace(0.5, 1.5, 7), torch.linspace(0.2, 2.0, 7)
    model.set_input_normalisation(mean, scale)
    h = model._embed(x, None)
    torch.testing.assert_close(h, model.read_in((torch.sqrt(x) - mean) / scale))
    assert not torch.allclose(model(x)["velocity"], before)
    save_checkpoint(model, tmp_path / "m.safetensors", meta={"kind": "scratch"})
    again = load_checkpoint(tmp_path / "m.safetensors")
    torch.testing.assert_close(again.input_scale, scale)
    # streaming step = full forward with the statistics applied
    state, outs = again.init_state(1), []
    for t in range(x.shape[1]):
        out, state = again.step(x[:, t], state)
        outs.append(out["velocity"])
    torch.testing.assert_close(torch.stack(outs, 1), again(x)["velocity"], atol=1e-5, rtol=1e-4)


def test_a_model_without_input_norm_has_no_statistics():
    model = RPNT(tiny_config(input_norm=False))
    assert not any(k.startswith("input_") for k in model.state_dict())
    with pytest.raises(ValueError, match="^input_norm:"):
        model.set_input_normalisation(torch.zeros(7), torch.ones(7))


def test_input_norm_exports_with_step_parity(tmp_path):
    from exporters.onnx_export import export_model

    torch.manual_seed(2)
    model = RPNT(tiny_config(input_norm=True, bin_s=0.05)).eval()
    model.set_input_normalisation(torch.linspace(0.5, 1.5, 7), torch.linspace(0.3, 2.0, 7))
    res = export_model(model, tmp_path / "export", parity_bins=60, window_bins=16)
    assert res.reports["step"]["passed"], res.reports["step"]


def test_fit_decoder_takes_input_statistics_from_the_bins_before_the_test_part_only(days):
    day = days[0]
    splits = Splits(train=(0, 200), val=(200, 260), test=(640, 800))
    wild = replace(day, counts=day.counts.copy())
    wild.counts[640:] = 50  # the test part: must not move the statistics
    opts = FinetuneOptions(
        epochs=1,
        steps_per_epoch=1,
        batch_size=2,
        window_len=16,
        device="cpu",
        progress=False,
        config_overrides=TINY,
    )
    model, _ = fit_decoder(wild, init=None, options=opts, splits=splits)
    mean, scale = sqrt_count_stats(day.counts[:640])
    np.testing.assert_allclose(model.input_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(model.input_scale.numpy(), scale, rtol=1e-6)


@pytest.fixture(scope="module")
def supervised_ckpt(days, tmp_path_factory):
    out = tmp_path_factory.mktemp("sup") / "sup.safetensors"
    res = pretrain(
        days[:3],
        out=out,
        options=PretrainOptions(
            epochs=3,
            steps_per_epoch=6,
            batch_size=4,
            window_len=40,
            warmup_steps=2,
            objective="supervised",
            seed=0,
            device="cpu",
            progress=False,
            config_overrides=TINY,
        ),
    )
    return out, res


def test_supervised_pretraining_trains_the_head_on_the_pool_and_finetuning_keeps_it(days, supervised_ckpt):
    path, res = supervised_ckpt
    cfg, meta = read_header(path)
    assert meta["supervised"] is True and cfg.target == "position" and cfg.input_norm
    log = [__import__("json").loads(line) for line in path.with_suffix(".log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[0]["val_loss"]  # the supervised validation loss went down
    pooled = np.concatenate([d.labels[:720] for d in days[:3]])  # each day's train bins (val = last 10 %)
    core = load_checkpoint(path)
    np.testing.assert_allclose(core.velocity_mean.numpy(), pooled.mean(0), rtol=1e-4, atol=1e-4)
    model, fresh, prov = build_model(days[3], path, FinetuneOptions(device="cpu"))
    assert prov["head"] == "pretrained" and not fresh
    torch.testing.assert_close(model.velocity_head.weight, core.velocity_head.weight)


def test_a_supervised_head_is_not_kept_for_another_unit_set(days, supervised_ckpt):
    other = replace(days[3], counts=days[3].counts[:, :17])  # 17 units: met through a channel map
    model, _, prov = build_model(other, supervised_ckpt[0], FinetuneOptions(device="cpu"))
    assert prov["head"] == "fresh" and model.config.channel_map


def test_masked_pretraining_leaves_the_head_fresh(days, tmp_path):
    out = tmp_path / "ssl.safetensors"
    pretrain(
        days[:2],
        out=out,
        options=PretrainOptions(
            epochs=1,
            steps_per_epoch=2,
            batch_size=2,
            window_len=32,
            device="cpu",
            progress=False,
            config_overrides=TINY,
        ),
    )
    assert read_header(out)[1]["supervised"] is False
    assert build_model(days[3], out, FinetuneOptions(device="cpu"))[2]["head"] == "fresh"


def test_supervised_pretraining_needs_labels(days, tmp_path):
    bare = [replace(d, position=None, velocity=None, behaviour={}) for d in days[:2]]
    with pytest.raises(ValueError, match="^objective: supervised pretraining needs sessions with labels"):
        pretrain(
            bare,
            out=tmp_path / "x.safetensors",
            options=PretrainOptions(
                objective="supervised", device="cpu", progress=False, config_overrides=TINY
            ),
        )


def test_realign_refits_only_the_read_in_and_lowers_the_masked_loss(days, supervised_ckpt):
    path, _ = supervised_ckpt
    model = load_checkpoint(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shuffled = days[3].counts[
        :, np.random.default_rng(0).permutation(20)
    ]  # the units moved to other channels
    info = realign_input(
        model, shuffled, options=RealignOptions(steps=60, batch_size=8, window_len=40, lr=3e-3)
    )
    assert info["nll_after"] < info["nll_before"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= {"read_in.weight", "read_in.bias", "input_mean", "input_scale"}, changed
    mean, _ = sqrt_count_stats(shuffled)
    np.testing.assert_allclose(model.input_mean.numpy(), mean, rtol=1e-6)


def test_realign_refuses_counts_of_another_width(supervised_ckpt):
    model = load_checkpoint(supervised_ckpt[0])
    with pytest.raises(ValueError, match=r"^counts: expected \(T, 20\)"):
        realign_input(model, np.zeros((50, 19)), options=RealignOptions())


def test_cli_supervised_pretraining_with_input_norm_then_finetuning(days, tmp_path, capsys):
    import json

    from rpnt_core.cli import main as rpnt
    from rpnt_core.data import save_npz

    files = [str(save_npz(d, tmp_path / f"day{i}.npz")) for i, d in enumerate(days)]
    pre = tmp_path / "pre.safetensors"
    fast = [
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "2",
        "--window-len",
        "40",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert (
        rpnt(
            [
                "pretrain",
                "--data",
                *files[:3],
                "--out",
                str(pre),
                "--objective",
                "supervised",
                "--target",
                "position",
                *fast,
            ]
        )
        == 0
    )
    cfg, meta = read_header(pre)
    assert meta["supervised"] and cfg.input_norm and cfg.target == "position"
    capsys.readouterr()
    assert (
        rpnt(
            [
                "finetune",
                "--init",
                str(pre),
                "--data",
                files[3],
                "--target",
                "position",
                "--out",
                str(tmp_path / "ft.safetensors"),
                *fast,
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["head"] == "pretrained" and res["mode"] == "full"
    assert (
        rpnt(
            [
                "pretrain",
                "--data",
                *files[:2],
                "--out",
                str(pre),
                "--objective",
                "supervised",
                "--target",
                "force",
                *fast,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target:" in err[0] and "Traceback" not in err[0]


def test_input_norm_is_on_by_default_and_a_config_written_before_it_existed_reads_as_off():
    from rpnt_core import RPNTConfig

    assert tiny_config().input_norm is True
    old = tiny_config().to_dict()
    old.pop("input_norm")
    assert RPNTConfig.from_dict(old).input_norm is False


def test_a_config_of_the_removed_mask_token_reads_when_off_and_is_refused_when_on():
    from rpnt_core import RPNTConfig
    from rpnt_core.config import ConfigError

    old = tiny_config().to_dict()
    assert RPNTConfig.from_dict({**old, "mask_token": False}) == RPNTConfig.from_dict(old)
    with pytest.raises(ConfigError, match="mask_token"):
        RPNTConfig.from_dict({**old, "mask_token": True})
