"""Behaviour targets beyond velocity, and the bin-width check wherever data meets a model.

A session carries every behaviour series it has (``Session.targets``) and a chosen one
(``Session.target``); finetuning records the choice in the model's config, and evaluation, export
and the engines read it from there.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from rpnt_core import RPNT, load_checkpoint, save_checkpoint
from rpnt_core.cli import main as rpnt
from rpnt_core.data import Session, save_npz
from rpnt_core.data.session import check_bin_width
from rpnt_core.evaluate.harness import target_labels

T, N = 1200, 7
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


def session(*, bin_s: float = 0.05, seed: int = 0, **kw) -> Session:
    rng = np.random.default_rng(seed)
    t = np.arange(T) * bin_s
    velocity = np.stack([np.sin(t), np.cos(t)], axis=1)
    position = np.stack([np.cos(0.3 * t), np.sin(0.5 * t)], axis=1)
    counts = rng.poisson(np.exp(1.5 + 0.5 * (velocity @ rng.normal(size=(2, N)))) * bin_s)
    return Session(counts=counts, bin_s=bin_s, velocity=velocity, position=position, session="day1", **kw)


def test_targets_choice_and_fingerprint():
    s = session(behaviour={"emg": np.ones((T, 3))})
    assert list(s.targets) == ["velocity", "position", "emg"] and s.target == "velocity" and s.n_outputs == 2
    e = s.with_target("emg")
    assert e.target == "emg" and e.n_outputs == 3 and e.labels is s.behaviour["emg"]
    assert s.with_target(None) is s and e.slice_bins(10, 20).labels.shape == (10, 3)
    with pytest.raises(ValueError, match=r"^target: day1 has no 'force' \(it has velocity, position, emg\)$"):
        s.with_target("force")
    # velocity keeps the fingerprint it always had (checkpoints match their data); another target changes it
    assert s.fingerprint() == replace(s, position=None, behaviour={}).fingerprint()
    assert len({s.fingerprint(), s.with_target("position").fingerprint(), e.fingerprint()}) == 3


def test_behaviour_series_are_validated():
    from rpnt_core.data import validate_session

    with pytest.raises(ValueError, match=r"^emg: length 5 does not match counts length 1200$"):
        validate_session(session(behaviour={"emg": np.ones((5, 2))}))
    with pytest.raises(
        ValueError, match=r"^behaviour: names must be identifiers other than velocity/position"
    ):
        validate_session(session(behaviour={"velocity": np.ones((T, 2))}))
    assert (
        validate_session(session(behaviour={"force": np.ones((T, 2))})).behaviour["force"].dtype == np.float32
    )


def test_model_labels_need_the_models_target_and_width():
    model = RPNT(tiny_config(n_channels=N, n_outputs=3, target="emg"))
    with pytest.raises(ValueError, match=r"^target: day1 has no 'emg' \(it has velocity, position\)$"):
        target_labels(model, session())
    with pytest.raises(ValueError, match=r"^target: day1's emg has 2 dimensions, the model decodes 3$"):
        target_labels(
            model, session(behaviour={"emg": np.ones((T, 2))})
        )  # e.g. 14 muscles on a 16-muscle model
    assert target_labels(model, session(behaviour={"emg": np.ones((T, 3))})).shape == (T, 3)


def test_finetune_position_then_evaluate_uses_the_checkpoints_target(tmp_path, capsys):
    data = save_npz(session(), tmp_path / "day1.npz")
    ft = tmp_path / "ft.safetensors"
    assert (
        rpnt(
            [
                "finetune",
                "--data",
                str(data),
                "--target",
                "position",
                "--out",
                str(ft),
                "--train-fraction",
                "0.5",
                *FAST,
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"] == "position"
    cfg = load_checkpoint(ft).config
    assert (cfg.target, cfg.n_outputs) == ("position", 2)
    assert rpnt(["evaluate", "--ckpt", str(ft), "--data", str(data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["target"] == "position" and res["splits_source"] == "checkpoint"  # the fingerprint matched
    assert res["r2"] == pytest.approx(summary["test_r2"], abs=1e-6)
    assert rpnt(["evaluate", "--ckpt", str(ft), "--data", str(data), "--target", "velocity"]) == 2
    assert (
        capsys.readouterr().err
        == "rpnt evaluate: error: target: the checkpoint decodes 'position', not 'velocity'\n"
    )
    no_position = save_npz(replace(session(), position=None), tmp_path / "day2.npz")
    assert rpnt(["evaluate", "--ckpt", str(ft), "--data", str(no_position)]) == 2
    assert (
        capsys.readouterr().err == "rpnt evaluate: error: target: day1 has no 'position' (it has velocity)\n"
    )


def test_finetune_on_a_missing_target_is_one_line(tmp_path, capsys):
    data = save_npz(session(), tmp_path / "day1.npz")
    assert (
        rpnt(
            [
                "finetune",
                "--data",
                str(data),
                "--target",
                "force",
                "--out",
                str(tmp_path / "x.safetensors"),
                *FAST,
            ]
        )
        == 2
    )
    assert (
        capsys.readouterr().err
        == "rpnt finetune: error: target: day1 has no 'force' (it has velocity, position)\n"
    )


# ------------------------------------------------------------------------------------ bin width

MISMATCH = "bin_s: data bin width 50 ms does not match the model's 20 ms"


@pytest.fixture()
def model_20ms(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "m20.safetensors"
    save_checkpoint(RPNT(tiny_config(n_channels=N, bin_s=0.02)).eval(), path, meta={"kind": "scratch"})
    return path


def test_check_bin_width():
    check_bin_width(data_bin_s=0.05, model_bin_s=0.05 * (1 + 1e-9))
    with pytest.raises(ValueError, match=f"^{MISMATCH}$"):
        check_bin_width(data_bin_s=0.05, model_bin_s=0.02)


def test_evaluate_refuses_data_at_another_bin_width(model_20ms, tmp_path, capsys):
    data = save_npz(session(bin_s=0.05), tmp_path / "d.npz")
    assert rpnt(["evaluate", "--ckpt", str(model_20ms), "--data", str(data)]) == 2
    assert capsys.readouterr().err == f"rpnt evaluate: error: {MISMATCH}\n"


def test_finetune_from_a_checkpoint_refuses_data_at_another_bin_width(model_20ms, tmp_path, capsys):
    data = save_npz(session(bin_s=0.05), tmp_path / "d.npz")
    out = tmp_path / "ft.safetensors"
    assert rpnt(["finetune", "--init", str(model_20ms), "--data", str(data), "--out", str(out), *FAST]) == 2
    assert capsys.readouterr().err == f"rpnt finetune: error: {MISMATCH}\n" and not out.exists()


def test_export_refuses_parity_data_at_another_bin_width(model_20ms, tmp_path, capsys):
    from exporters import cli

    data = save_npz(session(bin_s=0.05), tmp_path / "d.npz")
    out = tmp_path / "export"
    assert cli.main([str(model_20ms), "--out", str(out), "--parity-data", str(data), "-q"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"rpnt export: error: {MISMATCH}\n" and not out.exists()


# ------------------------------------------------------------------------------------ export contract


def test_contract_carries_the_target(tmp_path):
    from exporters.contract import STEP_FILE, ModelContract
    from exporters.onnx_export import export_checkpoint
    from exporters.runtime import load_engine, read_contract

    torch.manual_seed(0)
    ckpt = tmp_path / "pos.safetensors"
    save_checkpoint(RPNT(tiny_config(n_channels=N, target="position", bin_s=0.05)).eval(), ckpt)
    data = save_npz(replace(session(), velocity=None), tmp_path / "d.npz")  # position only
    export_checkpoint(ckpt, tmp_path / "export", parity_data=data, parity_bins=30, window_bins=24)
    c = read_contract(tmp_path / "export" / STEP_FILE)
    assert c.target == "position" and "outputs 2 (position)" in c.describe()
    assert load_engine(tmp_path / "export").info.extra["target"] == "position"  # what /status reports
    parity = json.loads((tmp_path / "export" / "rpnt_step.parity.json").read_text())
    assert parity["streams"][1]["r2_target_torch"] is not None  # scored against the session's position
    props = c.to_props()
    assert props["rpnt.target"] == "position" and ModelContract.from_props(props).target == "position"
    del props["rpnt.target"]  # an export from before the key existed decodes velocity
    assert ModelContract.from_props(props).target == "velocity"


def test_torch_engine_reports_the_target(tmp_path):
    from exporters.torch_engine import TorchEngine

    model = RPNT(tiny_config(n_channels=N, target="force")).eval()
    assert TorchEngine(model, warmup_bins=0).info.extra["target"] == "force"
