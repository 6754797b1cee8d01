"""The model registry on disk: versions, activation history, start-up order, crash leftovers."""

from __future__ import annotations

import json

from service.registry import ModelRegistry, RegistryError


def _stage(reg: ModelRegistry, tag: str):
    d = reg.new_staging(tag)
    (d / "export").mkdir()
    (d / "export" / "rpnt_step.onnx").write_bytes(b"not really onnx: the registry does not open it")
    return d


def test_relative_root_is_made_absolute(tmp_path, monkeypatch):
    # child processes (calibration worker, exporter) run in another directory: relative paths broke them
    monkeypatch.chdir(tmp_path)
    reg = ModelRegistry(root="reg")
    assert reg.root.is_absolute() and reg.root == tmp_path / "reg"
    assert reg.jobs_dir.is_absolute() and reg.export_dir(reg.add(_stage(reg, "a"), meta={})).is_absolute()


def test_versions_activation_history_and_start_order(tmp_path):
    reg = ModelRegistry(root=tmp_path)
    assert reg.versions() == [] and reg.active() is None and reg.candidates_for_start() == []
    v1, v2, v3 = (reg.add(_stage(reg, t), meta={"source": t}) for t in ("a", "b", "c"))
    assert (v1, v2, v3) == ("1", "2", "3") and reg.versions() == ["1", "2", "3"]
    assert reg.meta("2")["source"] == "b" and reg.checkpoint("2") is None
    for v in ("1", "3", "2", "3"):
        reg.activate(v, reason="test")
    assert reg.active() == "3"
    assert reg.candidates_for_start() == [
        "3",
        "2",
        "1",
    ]  # active first, then earlier active ones, newest first
    assert [r["version"] for r in reg.activation_history()] == ["1", "3", "2", "3"]
    listing = {m["version"]: m["active"] for m in reg.listing()}
    assert listing == {"1": False, "2": False, "3": True}


def test_unknown_version_and_leftovers(tmp_path):
    reg = ModelRegistry(root=tmp_path)
    for bad in ("7", "../x", "", "1a"):
        try:
            reg.activate(bad, reason="x")
        except RegistryError as exc:
            assert "no model version" in str(exc)
        else:
            raise AssertionError(f"activate({bad!r}) should fail")
    half = reg.new_staging("crashed")  # a version half-built when the process died
    (half / "junk").write_text("x")
    reg2 = ModelRegistry(root=tmp_path)
    assert list(reg2.staging_dir.iterdir()) == []
    (tmp_path / "active.json").write_text("{ torn")  # damaged from outside: treated as absent
    assert reg2.active() is None and reg2.activation_history() == []
    (tmp_path / "active.json").write_text(json.dumps({"version": "9", "history": []}))  # names no version
    assert reg2.active() is None
