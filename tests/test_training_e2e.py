"""Pretrain → finetune → evaluate through the CLI on tiny synthetic data; resume; seeds; DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rpnt_core import load_checkpoint, read_header
from rpnt_core.cli import main as rpnt
from rpnt_core.data import SimulationSpec, write_simulated

FAST = [
    "--epochs",
    "1",
    "--steps-per-epoch",
    "3",
    "--batch-size",
    "4",
    "--window-len",
    "40",
    "--quiet",
    "--device",
    "cpu",
]
MASKED = ["--objective", "masked"]  # the simulated sessions are labelled: supervised would be the default


@pytest.fixture(scope="module")
def simdir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    write_simulated(
        out,
        SimulationSpec(
            n_subjects=3, sessions_per_subject=2, bins_per_session=(500, 700), n_multisite_subjects=1
        ),
        seed=0,
    )
    return out


def labelled(simdir: Path) -> Path:
    return sorted(simdir.glob("*.npz"))[0]


def test_pretrain_finetune_evaluate_round_trip(simdir, tmp_path, capsys):
    pre = tmp_path / "pre.safetensors"
    assert rpnt(["pretrain", "--data", str(simdir), "--out", str(pre), *FAST, *MASKED]) == 0
    cfg, meta = read_header(pre)
    assert meta["kind"] == "pretrained" and meta["data_fingerprint"]
    log = [json.loads(line) for line in pre.with_suffix(".log.jsonl").read_text().splitlines()]
    assert log and {"epoch", "train_loss", "val_loss"} <= set(log[0])

    target = labelled(simdir)
    ft = tmp_path / "ft.safetensors"
    capsys.readouterr()
    assert (
        rpnt(
            [
                "finetune",
                "--init",
                str(pre),
                "--data",
                str(target),
                "--train-fraction",
                "0.3",
                "--out",
                str(ft),
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--window-len",
                "40",
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    ft_summary = json.loads(capsys.readouterr().out)
    assert ft_summary["head"] == "fresh"  # a self-supervised checkpoint's head never saw a label
    model = load_checkpoint(ft)
    assert model.checkpoint_meta["parent_weights_sha"] == meta["weights_sha"]

    assert (
        rpnt(["evaluate", "--ckpt", str(ft), "--data", str(target), "--json", "--baselines", "wiener"]) == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert set(res["splits"]) == {"train", "val", "test"} and res["splits_source"] == "checkpoint"
    assert res["splits"] == ft_summary["splits"]
    assert res["r2"] == pytest.approx(ft_summary["test_r2"], abs=1e-6)  # evaluate = what finetune reported
    assert len(res["r2_per_dim"]) == 2 and "wiener" in res["baselines"]
    tr, va, te = (res["splits"][k] for k in ("train", "val", "test"))
    assert tr[1] <= va[0] and va[1] <= te[0]


def test_a_recording_too_short_for_validation_still_trains(tmp_path):
    """A new session's few unlabelled bins (shorter than a validation window) join pretraining as
    training data, and finetuning meets that session through its pretrained read-in."""
    from rpnt_core.data.session import Session
    from rpnt_core.train.finetune_model import seen_in_pretraining
    from rpnt_core.train.pretrain import PretrainOptions, pretrain
    from rpnt_core.train.streams import prepare_streams

    rng = np.random.default_rng(0)
    long = Session(counts=rng.poisson(0.5, (800, 7)), bin_s=0.02, session="long")
    short = Session(counts=rng.poisson(0.5, (150, 5)), bin_s=0.02, session="short")  # val part 15 < window 37
    streams = prepare_streams(
        [long, short], val_fraction=0.1, channels="readin", n_max=7, split_sites=True, seed=0, min_bins=37
    )
    assert [st.session for st in streams] == ["long", "short"]
    assert streams[1].train == (0, 150) and streams[1].val == (150, 150)
    with pytest.raises(ValueError, match="'short' has 150 bins"):
        prepare_streams(
            [long, short],
            val_fraction=0.1,
            channels="readin",
            n_max=7,
            split_sites=True,
            seed=0,
            min_bins=151,
        )
    with pytest.raises(ValueError, match="validation"):
        prepare_streams(
            [short], val_fraction=0.1, channels="readin", n_max=7, split_sites=True, seed=0, min_bins=37
        )
    pre = tmp_path / "pre.safetensors"
    res = pretrain(
        [long, short],
        options=PretrainOptions(
            epochs=1,
            steps_per_epoch=3,
            batch_size=4,
            window_len=30,
            channels="readin",
            device="cpu",
            progress=False,
        ),
        out=pre,
    )
    assert np.isfinite(res["best_val_loss"]) and res["streams"] == 2
    assert seen_in_pretraining(short, read_header(pre)[1]) == {"mode": "readin", "n_channels": 5}


def test_per_session_read_ins_learn_at_their_own_rate(simdir, tmp_path):
    """--adapter-lr-scale: the read-ins/read-outs are their own optimizer group at scale × the core's rate."""
    from safetensors import safe_open

    pre = tmp_path / "pre.safetensors"
    assert (
        rpnt(
            [
                "pretrain",
                "--data",
                str(simdir),
                "--out",
                str(pre),
                "--channels",
                "readin",
                "--adapter-lr-scale",
                "4",
                *FAST,
                *MASKED,
            ]
        )
        == 0
    )
    with safe_open(str(pre.with_suffix(".resume.safetensors")), "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    assert len(groups) == 2
    core, adapters = groups
    assert adapters["lr"] == pytest.approx(4 * core["lr"]) and core["lr"] > 0
    n_named = len(read_header(pre)[1]["session_channels"])  # single-site sessions (each site has one too)
    assert len(adapters["params"]) % 4 == 0 and len(adapters["params"]) >= 4 * n_named  # 2 Linear: w + b


def test_batch_shares_closed_form():
    """By length; per-session weights split over a session's streams by length; target_share for the last."""
    from types import SimpleNamespace as NS

    from rpnt_core.train.pretrain import PretrainOptions, batch_shares

    # session 0: one stream of 300 bins; session 1: two site streams of 100 + 300; session 2 (target): 100
    streams = [
        NS(key="0", train=(0, 300)),
        NS(key="1:0", train=(0, 100)),
        NS(key="1:1", train=(0, 300)),
        NS(key="2", train=(50, 150)),
    ]
    np.testing.assert_allclose(batch_shares(streams, n_sessions=3), [0.375, 0.125, 0.375, 0.125])
    np.testing.assert_allclose(
        batch_shares(streams, n_sessions=3, target_share=0.4), [0.6 * 3 / 7, 0.6 * 1 / 7, 0.6 * 3 / 7, 0.4]
    )
    np.testing.assert_allclose(
        batch_shares(streams, n_sessions=3, weights=[1, 2, 1]), [0.25, 0.5 * 0.25, 0.5 * 0.75, 0.25]
    )
    np.testing.assert_allclose(batch_shares(streams[:1], n_sessions=1, target_share=0.4), [1.0])  # alone: all
    with pytest.raises(ValueError, match="target_share"):
        PretrainOptions(target_share=1.0)
    with pytest.raises(ValueError, match="not both"):
        batch_shares(streams, n_sessions=3, weights=[1, 2, 1], target_share=0.4)


def test_target_share_reaches_the_sampler(simdir, tmp_path):
    """--target-share: the last session's read-in is stepped on that share of the batches.

    AdamW skips a parameter without a gradient, so its step count is the number of batches drawn
    from its stream; the last adapter parameter belongs to the last session's (last) stream.
    """
    from safetensors import safe_open

    from rpnt_core.data import load_session

    files = sorted(str(p) for p in simdir.glob("*.npz"))
    single = next(f for f in files if not load_session(f).multisite)  # one stream (a multi-site one has S)
    files = [f for f in files if f != single] + [single]
    steps = {}
    for share in ("0", "0.9"):
        pre = tmp_path / f"pre-{share}.safetensors"
        assert (
            rpnt(
                [
                    "pretrain",
                    "--data",
                    *files,
                    "--out",
                    str(pre),
                    "--channels",
                    "readin",
                    "--target-share",
                    share,
                    *FAST,
                    *MASKED,
                    "--steps-per-epoch",
                    "20",
                ]
            )
            == 0
        )
        with safe_open(str(pre.with_suffix(".resume.safetensors")), "pt") as f:
            last = json.loads(f.metadata()["param_groups"])[1]["params"][-1]
            steps[share] = int(f.get_tensor(f"opt.{last}.step")) if f"opt.{last}.step" in f.keys() else 0  # noqa: SIM118 - a safetensors handle
    assert steps["0.9"] >= 12 and steps["0.9"] > 2 * steps["0"], steps
    assert (
        rpnt(
            [
                "pretrain",
                "--data",
                *files,
                "--out",
                str(tmp_path / "x.safetensors"),
                "--target-share",
                "1",
                *FAST,
                *MASKED,
            ]
        )
        != 0
    )


@pytest.mark.parametrize("channels", ["resample", "readin"])
def test_finetune_onto_a_session_with_a_different_channel_count(simdir, tmp_path, channels):
    from rpnt_core.data import load_session
    from rpnt_core.train.finetune import FinetuneOptions, finetune

    pre = tmp_path / "pre.safetensors"
    assert (
        rpnt(["pretrain", "--data", str(simdir), "--out", str(pre), "--channels", channels, *FAST, *MASKED])
        == 0
    )
    sessions = [load_session(p) for p in sorted(simdir.glob("*.npz"))]
    pre_cfg, _ = read_header(pre)
    target = next(s for s in sessions if not s.multisite and s.n_channels != pre_cfg.n_channels)
    res = finetune(
        target,
        init=pre,
        options=FinetuneOptions(
            epochs=1,
            batch_size=4,
            window_len=40,
            channels=channels,
            progress=False,
            device="cpu",
            train_fraction=0.3,
        ),
        out=tmp_path / "ft.safetensors",
    )
    model = load_checkpoint(tmp_path / "ft.safetensors")
    assert model.config.n_input_channels == target.n_channels
    assert np.isfinite(res["test_r2"])
    if channels == "resample":
        assert len(model.config.channel_map) == pre_cfg.n_channels
    else:
        assert model.config.n_channels == target.n_channels and not model.config.channel_map


@pytest.mark.parametrize("channels", ["resample", "readin"])
def test_a_session_seen_in_pretraining_keeps_its_channel_alignment(simdir, tmp_path, channels):
    """Finetuning a session whose unlabelled bins were in pretraining reuses how it met the model
    then: its channel map (resample) or its own pretrained read-in/read-out (readin); an unseen
    session (renamed) gets a fresh read-in instead."""
    from dataclasses import replace

    from rpnt_core.checkpoint import read_extra_tensors
    from rpnt_core.data import load_session
    from rpnt_core.train.finetune import FinetuneOptions, build_model
    from rpnt_core.train.pretrain import PretrainOptions, pretrain

    sessions = [s for s in (load_session(p) for p in sorted(simdir.glob("*.npz"))) if not s.multisite]
    widest = max(s.n_channels for s in sessions)
    target = next(s for s in sessions if s.n_channels < widest)
    pool = [s for s in sessions if s is not target] + [
        replace(target.slice_bins(0, 480), velocity=None, position=None)
    ]
    pre = tmp_path / "pre.safetensors"
    pretrain(
        pool,
        options=PretrainOptions(
            epochs=1,
            steps_per_epoch=2,
            batch_size=4,
            window_len=40,
            channels=channels,
            seed=3,
            device="cpu",
            progress=False,
        ),
        out=pre,
    )
    _, meta = read_header(pre)
    seen = meta["session_channels"][target.session]
    assert seen == {
        "mode": channels,
        "n_channels": target.n_channels,
        **({"seed": 3 + len(pool) - 1} if channels == "resample" else {}),
    }
    opts = FinetuneOptions(channels=channels, seed=0, device="cpu", progress=False)
    model, fresh, prov = build_model(target, pre, opts)
    assert not fresh and prov["read_in"] == "pretrained, this session"
    if channels == "resample":
        from rpnt_core.data.channels import ChannelResampler

        rs = ChannelResampler(n_channels=target.n_channels, n_max=widest, seed=seen["seed"])
        assert model.config.channel_map == tuple(int(i) for i in rs.index)
        assert (
            rs.index.tolist()
            != ChannelResampler(n_channels=target.n_channels, n_max=widest, seed=0).index.tolist()
        )
    else:
        stored = read_extra_tensors(pre, f"readin.{target.session}.")
        assert set(stored) == {
            f"readin.{target.session}.{k}"
            for k in ("read_in.weight", "read_in.bias", "rate_out.weight", "rate_out.bias")
        }
        assert torch.equal(model.read_in.weight, stored[f"readin.{target.session}.read_in.weight"])
        assert torch.equal(model.rate_out.bias, stored[f"readin.{target.session}.rate_out.bias"])
    stranger = replace(target, session=target.session + "-unseen")
    _, fresh, prov = build_model(stranger, pre, opts)
    assert prov["read_in"] == ("fresh" if channels == "readin" else "pretrained, shared")
    assert fresh == (channels == "readin")
    assert not any(
        k.startswith("extra") for k in load_checkpoint(pre).state_dict()
    )  # extras are not the model


def test_finetune_from_scratch_learns_and_reports_best_validation_epoch(simdir, tmp_path):
    from rpnt_core.data import load_session
    from rpnt_core.train.finetune import FinetuneOptions, finetune

    s = load_session(labelled(simdir))
    res = finetune(
        s,
        init=None,
        options=FinetuneOptions(
            epochs=6,
            steps_per_epoch=15,
            batch_size=8,
            window_len=50,
            progress=False,
            device="cpu",
            train_fraction=0.5,
            lr=3e-3,
            config_overrides=(("d_model", 32), ("n_heads", 2)),
        ),
        out=None,
    )
    best = max(res["history"], key=lambda h: h["val_r2"])
    assert res["best_epoch"] == best["epoch"] and res["val_r2"] == best["val_r2"]
    assert res["test_r2"] > 0.2  # it learned something real about velocity


def test_pretraining_defaults_to_supervised_only_when_every_session_is_labelled(simdir, tmp_path, capsys):
    from dataclasses import replace

    from rpnt_core.data import load_session
    from rpnt_core.data.npz import save_npz

    files = sorted(simdir.glob("*.npz"))[:2]
    pre = tmp_path / "labelled.safetensors"
    capsys.readouterr()
    assert (
        rpnt(["pretrain", "--data", *map(str, files), "--out", str(pre), *FAST[:-3], "--device", "cpu"]) == 0
    )
    assert "objective supervised" in capsys.readouterr().err
    assert read_header(pre)[1]["supervised"] is True
    unlabelled = tmp_path / "unlabelled.npz"
    s = load_session(files[1])
    save_npz(replace(s, velocity=None, position=None), unlabelled)
    pre2 = tmp_path / "mixed.safetensors"
    assert (
        rpnt(
            [
                "pretrain",
                "--data",
                str(files[0]),
                str(unlabelled),
                "--out",
                str(pre2),
                *FAST[:-3],
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "objective masked" in capsys.readouterr().err
    assert not read_header(pre2)[1].get("supervised")


def test_same_seed_same_weights_and_resume_continues(simdir, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    args = ["--data", str(simdir), *FAST, "--seed", "7"]
    assert rpnt(["pretrain", "--out", str(a), *args]) == 0
    assert rpnt(["pretrain", "--out", str(b), *args]) == 0
    assert read_header(a)[1]["weights_sha"] == read_header(b)[1]["weights_sha"]
    # resume: a second epoch continues from the saved state instead of starting over
    args2 = [x if x != "1" or i != 1 else "2" for i, x in enumerate(FAST)]
    assert rpnt(["pretrain", "--out", str(a), "--data", str(simdir), *args2, "--seed", "7", "--resume"]) == 0
    epochs = [json.loads(line)["epoch"] for line in a.with_suffix(".log.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


def test_spatial_pretraining_on_multisite_recordings(simdir, tmp_path):
    out = tmp_path / "sp.safetensors"
    assert rpnt(["pretrain", "--data", str(simdir), "--out", str(out), "--spatial", *FAST, *MASKED]) == 0
    model = load_checkpoint(out)
    assert model.config.spatial_layers > 0


def test_user_errors_exit_2_with_a_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, counts=np.array([[1, -1], [0, 2]]), velocity=np.zeros((2, 2)), bin_s=0.02)
    assert rpnt(["finetune", "--data", str(bad), "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 2
    assert "negative" in capsys.readouterr().err
    assert rpnt(["evaluate", "--ckpt", str(tmp_path / "none.safetensors"), "--data", str(bad)]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert rpnt(["nonsense"]) == 2


def test_a_file_that_is_not_npz_gets_one_line_not_numpys(tmp_path, capsys):
    from conftest import tiny_config

    from rpnt_core import RPNT, save_checkpoint
    from rpnt_core.data.npz import NOT_NPZ

    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(RPNT(tiny_config()).eval(), ckpt)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(
        b"\x80\x04K\x01."
    )  # a pickle: numpy.load would say "Cannot load file containing pickled data"
    for argv in (
        ["evaluate", "--ckpt", str(ckpt), "--data", str(bad)],
        ["finetune", "--data", str(bad), "--out", str(tmp_path / "x.safetensors"), "--quiet"],
    ):
        assert rpnt(argv) == 2
        assert capsys.readouterr().err == f"rpnt {argv[0]}: error: {NOT_NPZ}\n"  # the line an upload gets


@pytest.mark.parametrize("cmd", ["simulate", "pretrain", "finetune", "evaluate", "demo"])
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        rpnt([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: rpnt " + cmd in capsys.readouterr().out


def test_distributed_pretraining_with_two_gloo_processes(simdir, tmp_path):
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "rpnt_core.cli",
        "pretrain",
        "--data",
        str(simdir),
        "--out",
        str(out),
        *FAST,
        *MASKED,
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_header(out)[1]["kind"] == "pretrained"
    lines = out.with_suffix(".log.jsonl").read_text().splitlines()
    assert len(lines) == 1  # only rank 0 writes


def test_pretrain_names_the_file_of_many_that_does_not_load(tmp_path, capsys):
    from rpnt_core.commands import pretrain_main
    from rpnt_core.data import Session, save_npz

    good = tmp_path / "a.npz"
    rng = np.random.default_rng(0)
    save_npz(Session(counts=rng.poisson(1.0, size=(300, 4)).astype(np.int32), bin_s=0.02), good)
    bad = tmp_path / "b.npz"
    bad.write_bytes(b"not a zip at all")
    assert pretrain_main(["--data", str(good), str(bad), "--out", str(tmp_path / "p.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rpnt pretrain: error: b.npz: file: not an NPZ file"), err
