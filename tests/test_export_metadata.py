"""Evaluated = streamed, metadata included: an export conditions the model exactly as `rpnt evaluate`
scored it, and a checkpoint with an untrained head never reaches the daemon."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporters import cli
from exporters.onnx_export import ExportError, resolve_metadata
from exporters.runtime import load_engine, read_contract
from rpnt_core import RPNT, RPNTConfig, save_checkpoint
from rpnt_core.data import Session, save_npz
from rpnt_core.data.session import conditioning_metadata
from rpnt_core.decoder import decode_stream
from rpnt_core.evaluate.harness import predict_session
from rpnt_core.train.finetune import FinetuneOptions, finetune

META = {"subject": "monkeyA", "session": "day3", "task": "reach", "date_days": 41.0}
TINY = dict(
    n_channels=6,
    n_outputs=2,
    d_model=16,
    n_layers=1,
    n_heads=2,
    window=8,
    kernel_q=2,
    kernel_hidden=8,
    dropout=0.0,
    bin_s=0.02,
)


def _session(T: int = 240, **meta) -> Session:
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.5, size=(T, 6)).astype(np.int64)
    vel = rng.standard_normal((T, 2)).astype(np.float32)
    return Session(counts=counts, bin_s=0.02, velocity=vel, **meta)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A 'finetuned' checkpoint whose metadata embeddings matter (large, random) and that records the
    metadata of its finetuning session, as `rpnt finetune` does."""
    root = tmp_path_factory.mktemp("meta")
    torch.manual_seed(0)
    model = RPNT(RPNTConfig(**TINY, subjects=("monkeyA",), sessions=("day3",), tasks=("reach",))).eval()
    for emb in model.meta_embed.values():
        torch.nn.init.normal_(emb.weight, std=0.5)
    sess = _session(**META)
    ckpt = root / "ft.safetensors"
    save_checkpoint(model, ckpt, meta={"kind": "finetuned", "metadata": conditioning_metadata(sess)})
    npz = save_npz(sess, root / "day3.npz")
    return {"root": root, "ckpt": ckpt, "model": model, "session": sess, "npz": npz}


# ------------------------------------------------------------------ the rule
def test_resolve_metadata_takes_the_stored_and_refuses_a_partial_change():
    assert resolve_metadata(META, {}, force=False) == META
    assert (
        resolve_metadata(META, {"subject": "monkeyA", "task": None}, force=False) == META
    )  # same value: no change
    full = {"subject": "b", "session": "d", "task": "t", "date_days": 1.0}
    assert resolve_metadata(META, full, force=False) == full  # every field named: deliberate
    with pytest.raises(ExportError) as exc:
        resolve_metadata(META, {"subject": "sim00"}, force=False)
    msg = str(exc.value)
    assert "--subject" in msg and "date_days, session, task" in msg and "--force" in msg, msg
    assert resolve_metadata(META, {"subject": "sim00"}, force=True) == META | {"subject": "sim00"}
    assert resolve_metadata(None, {"subject": "s1"}, force=False) == {"subject": "s1"}  # nothing stored


# ------------------------------------------------------------------ the served model is the evaluated one
def test_default_export_streams_exactly_what_evaluate_scored(finetuned, tmp_path):
    out = tmp_path / "export"
    assert (
        cli.main(
            [
                str(finetuned["ckpt"]),
                "--out",
                str(out),
                "--parity-data",
                str(finetuned["npz"]),
                "--parity-bins",
                "60",
                "-q",
            ]
        )
        == cli.EXIT_OK
    )
    assert read_contract(out / "rpnt_step.onnx").metadata == META
    sess = finetuned["session"]
    evaluated = predict_session(finetuned["model"], sess)  # what `rpnt evaluate` scores
    streamed = decode_stream(load_engine(out), sess.counts)
    np.testing.assert_allclose(streamed, evaluated, atol=1e-4)
    # the check has teeth: under "unknown" metadata (the old default) the same model decodes differently
    bare = predict_session(
        finetuned["model"], Session(counts=sess.counts, bin_s=0.02, velocity=sess.velocity)
    )
    assert np.abs(bare - evaluated).max() > 1e-2


def test_cli_partial_metadata_override_is_refused_without_force(finetuned, tmp_path, capsys):
    rc = cli.main([str(finetuned["ckpt"]), "--out", str(tmp_path / "o"), "--subject", "sim00", "-q"])
    assert rc == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--subject" in err and "--force" in err, err
    assert not (tmp_path / "o" / "rpnt_step.onnx").exists()
    assert (
        cli.main(
            [
                str(finetuned["ckpt"]),
                "--out",
                str(tmp_path / "f"),
                "--subject",
                "sim00",
                "--force",
                "--parity-bins",
                "20",
                "-q",
            ]
        )
        == cli.EXIT_OK
    )
    assert read_contract(tmp_path / "f" / "rpnt_step.onnx").metadata == META | {"subject": "sim00"}


def test_finetune_records_the_metadata_it_trained_under(tmp_path):
    sess = _session(T=300, **META)
    opts = FinetuneOptions(
        epochs=1,
        steps_per_epoch=1,
        batch_size=2,
        window_len=20,
        device="cpu",
        progress=False,
        config_overrides=tuple(TINY.items() - {("n_channels", 6), ("n_outputs", 2), ("bin_s", 0.02)}),
    )
    finetune(sess, init=None, options=opts, out=tmp_path / "ft.safetensors")
    from rpnt_core.checkpoint import read_header

    assert read_header(tmp_path / "ft.safetensors")[1]["metadata"] == META


# ------------------------------------------------------------------ an untrained head is refused
def test_a_pretraining_checkpoint_is_refused_by_export_and_by_serve(finetuned, tmp_path, capsys):
    pre = tmp_path / "pre.safetensors"
    save_checkpoint(finetuned["model"], pre, meta={"kind": "pretrained"})
    rc = cli.main([str(pre), "--out", str(tmp_path / "o"), "-q"])
    assert rc == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "pretraining checkpoint" in err and "rpnt finetune --init" in err and len(err.splitlines()) == 1, (
        err
    )
    assert not (tmp_path / "o" / "rpnt_step.onnx").exists()

    from rpnt_core.commands import evaluate_main  # nor scored as a decoder

    assert evaluate_main(["--ckpt", str(pre), "--data", str(finetuned["npz"])]) == 2
    assert "pretraining checkpoint" in capsys.readouterr().err

    from service.registry import ModelRegistry, RegistryError  # `rpnt serve --model pre.safetensors` seeds so

    reg = ModelRegistry(root=tmp_path / "registry")
    with pytest.raises(RegistryError, match="pretraining checkpoint"):
        reg.import_model(pre)
    assert reg.versions() == []
