"""Checkpoints: safetensors + JSON, round trip, never unpickle, clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import randomise_kernels, tiny_config

from rpnt_core import RPNT, load_checkpoint, read_header, save_checkpoint
from rpnt_core.checkpoint import CheckpointError


def test_round_trip_gives_identical_outputs_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = RPNT(tiny_config(subjects=("m1",), channel_map=(0, 1, 2, 0, 1, 2, 3), input_channels=4)).eval()
    randomise_kernels(model)
    model.set_velocity_normalisation(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 3.0]))
    meta = save_checkpoint(
        model, tmp_path / "m.safetensors", meta={"kind": "finetuned", "metrics": {"test_r2": 0.5}}
    )
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.checkpoint_meta["weights_sha"] == meta["weights_sha"]
    assert loaded.checkpoint_meta["metrics"] == {"test_r2": 0.5}
    x = torch.poisson(torch.rand(2, 15, 4) * 3)
    with torch.no_grad():
        assert torch.equal(model(x)["velocity"], loaded(x)["velocity"])
    cfg, hdr = read_header(tmp_path / "m.safetensors")
    assert cfg == model.config and hdr["kind"] == "finetuned"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left nothing behind


def test_extra_tensors_travel_with_the_checkpoint_but_are_not_the_model(tmp_path):
    from rpnt_core.checkpoint import read_extra_tensors

    torch.manual_seed(0)
    model = RPNT(tiny_config()).eval()
    extra = {"readin.s1.read_in.weight": torch.randn(3, 5), "other.x": torch.ones(2)}
    plain = save_checkpoint(model, tmp_path / "a.safetensors")
    with_extra = save_checkpoint(model, tmp_path / "b.safetensors", extra=extra)
    assert plain["weights_sha"] == with_extra["weights_sha"]  # the model's identity ignores extras
    loaded = load_checkpoint(tmp_path / "b.safetensors")  # strict: extras are not unexpected weights
    assert loaded.state_dict().keys() == model.state_dict().keys()
    got = read_extra_tensors(tmp_path / "b.safetensors", "readin.")
    assert list(got) == ["readin.s1.read_in.weight"] and torch.equal(
        got["readin.s1.read_in.weight"], extra["readin.s1.read_in.weight"]
    )
    assert read_extra_tensors(tmp_path / "a.safetensors") == {}


def test_weights_sha_identifies_the_weights(tmp_path):
    a = save_checkpoint(RPNT(tiny_config()), tmp_path / "a.safetensors")
    b = save_checkpoint(RPNT(tiny_config()), tmp_path / "b.safetensors")
    assert a["weights_sha"] != b["weights_sha"]


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


@pytest.mark.parametrize("payload", [b"", b"not a checkpoint at all", pickle.dumps(Boom())])
def test_corrupt_or_pickled_files_are_rejected_without_executing_anything(tmp_path, payload):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(payload)
    with pytest.raises(CheckpointError, match="checkpoint"):
        load_checkpoint(p)


def test_missing_file_and_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / "other.safetensors")
