"""exporters: ONNX export (step + window graphs), contract, parity, reduced precision, engines, CLI.

Fast by design: tiny models, a handful of exports shared through module-scoped fixtures, one
small-preset export (the paper preset lives in test_export_paper.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporters import cli
from exporters.contract import STEP_FILE, WINDOW_FILE, ContractError, ModelContract, step_file
from exporters.graph_checks import CONTROL_FLOW, EXPORT_OPSET, TENSORRT_OPS, check_graph, op_types
from exporters.onnx_export import ExportError, add_reduced_precision, export_model
from exporters.parity import ParityError, r2_gate, random_counts, torch_stream
from exporters.runtime import (
    OnnxStepEngine,
    OnnxWindowEngine,
    ProviderUnavailableError,
    load_engine,
    read_contract,
)
from rpnt_core import RPNT, RPNTConfig, save_checkpoint
from rpnt_core.data import Session, save_npz
from rpnt_core.decoder import Decoder, DecoderInfo, decode_stream

REPO = Path(__file__).resolve().parents[1]
N_IN = 14  # channels callers feed (the tiny model maps them onto 10 model channels)
CHANNEL_MAP = (0, 2, 4, 5, 6, 7, 9, 10, 12, 13)


def tiny_config(**kw) -> RPNTConfig:
    base = dict(
        n_channels=10,
        input_channels=N_IN,
        channel_map=CHANNEL_MAP,
        n_outputs=2,
        d_model=16,
        n_layers=2,
        n_heads=2,
        window=8,
        kernel_q=3,
        kernel_k=3,
        kernel_hidden=8,
        ff_mult=2,
        bin_s=0.05,
        subjects=("s1", "s2"),
        sessions=("a",),
        tasks=("reach",),
    )
    base.update(kw)
    return RPNTConfig(**base)


def tiny_model(seed: int = 0, **kw) -> RPNT:
    torch.manual_seed(seed)
    return RPNT(tiny_config(**kw)).eval()


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint + parity session, exported once through the CLI with --int8 --fp16."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_model()
    ckpt = root / "tiny.safetensors"
    meta = save_checkpoint(model, ckpt, meta={"kind": "scratch", "data_fingerprint": "fp-tiny-0001"})
    counts = random_counts(400, N_IN, seed=7).astype(np.int64)
    # A behaviour target the model can "decode": its own fp32 output plus noise, so R² vs the
    # target is meaningful (≈0.9) and the int8 gate is decided by quantisation error only.
    with torch.no_grad():
        pred = model.predict_stream(
            torch.from_numpy(counts.astype(np.float32))[None], model.metadata_for(subject="s1")
        )["velocity"][0].numpy()
    rng = np.random.default_rng(3)
    target = (pred + 0.3 * pred.std(0) * rng.standard_normal(pred.shape)).astype(np.float32)
    npz = save_npz(Session(counts=counts, bin_s=0.05, velocity=target), root / "session.npz")
    out = root / "export"
    rc = cli.main(
        [
            str(ckpt),
            "--out",
            str(out),
            "--int8",
            "--fp16",
            "--parity-data",
            str(npz),
            "--parity-bins",
            "120",
            "--subject",
            "s1",
            "-q",
        ]
    )
    return {
        "root": root,
        "ckpt": ckpt,
        "meta": meta,
        "model": model,
        "out": out,
        "rc": rc,
        "npz": npz,
        "counts": counts,
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small preset (random weights, 96 channels) exported through the API."""
    out = tmp_path_factory.mktemp("small") / "export"
    torch.manual_seed(1)
    model = RPNT(RPNTConfig.preset("small", n_channels=96)).eval()
    res = export_model(model, out, int8=True, parity_bins=100, window_bins=64)
    return {"model": model, "out": out, "result": res}


# ---------------------------------------------------------------------- CLI + files
def test_cli_help_is_for_newcomers(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "rpnt export",
        "--out",
        "--int8",
        "--fp16",
        "--window-bins",
        "--parity-data",
        "--tolerance",
        "rpnt_step.onnx",
        "exit status",
    ):
        assert needle in text


def test_cli_export_writes_everything(tiny):
    assert tiny["rc"] == cli.EXIT_OK
    out = tiny["out"]
    for name in (STEP_FILE, WINDOW_FILE, step_file("int8"), step_file("fp16"), "export.json"):
        assert (out / name).is_file(), name
    for stem in ("rpnt_step", "rpnt_window", "rpnt_step.int8", "rpnt_step.fp16"):
        assert (out / f"{stem}.parity.json").is_file() and (out / f"{stem}.parity.txt").is_file()
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["files"]) == {"step", "window", "step.int8", "step.fp16"}
    assert manifest["weights_sha"] == tiny["meta"]["weights_sha"]
    assert not list(out.glob(".export-staging-*"))


def test_cli_bad_inputs_are_clear(tmp_path, tiny, capsys):
    assert cli.main([str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == cli.EXIT_USAGE
    assert "checkpoint not found" in capsys.readouterr().err
    wrong = save_npz(Session(counts=np.ones((50, N_IN + 3), np.int64), bin_s=0.05), tmp_path / "wrong.npz")
    rc = cli.main([str(tiny["ckpt"]), "--out", str(tmp_path / "o"), "--parity-data", str(wrong), "-q"])
    assert rc == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{N_IN + 3} channels" in err and f"takes {N_IN}" in err


# ---------------------------------------------------------------------- graph inspection
def _static_dims(model: onnx.ModelProto) -> list[str]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    bad = []
    for vi in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        dims = vi.type.tensor_type.shape.dim
        if not dims and vi.type.tensor_type.HasField("shape") is False:
            bad.append(vi.name)
        for d in dims:
            if not d.HasField("dim_value") or d.dim_value < 1:
                bad.append(vi.name)
    return bad


@pytest.mark.parametrize("name", [STEP_FILE, WINDOW_FILE, step_file("fp16")])
def test_graph_is_static_with_tensorrt_ops(tiny, name):
    model = onnx.load(str(tiny["out"] / name))
    assert _static_dims(model) == []
    ops = op_types(model)
    assert set(ops) <= TENSORRT_OPS, set(ops) - TENSORRT_OPS
    assert not set(ops) & CONTROL_FLOW
    assert [(i.domain, i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")] == [
        ("", EXPORT_OPSET)
    ]
    assert check_graph(model) == []


def test_small_preset_graph_and_parity(small):
    res = small["result"]
    assert set(res.files) == {"step", "window", "step.int8"}, res.rejected
    assert check_graph(res.files["step"]) == []
    assert check_graph(res.files["window"]) == []
    rep = res.reports["step"]
    assert rep["passed"] and rep["streams"][0]["max_abs_velocity"] <= 1e-4
    assert res.reports["step.int8"]["gate"]["passed"]


def test_graph_check_catches_dynamic_dims_and_foreign_ops(tiny, tmp_path):
    model = onnx.load(str(tiny["out"] / STEP_FILE))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    problems = check_graph(model)
    assert any("non-static" in p for p in problems)
    assert any("custom domain" in p for p in check_graph(tiny["out"] / step_file("int8"))) or any(
        "allow-list" in p for p in check_graph(tiny["out"] / step_file("int8"))
    )


# ---------------------------------------------------------------------- contract
def test_contract_round_trip(tiny):
    model = tiny["model"]
    c = read_contract(tiny["out"] / STEP_FILE)
    cfg = model.config
    assert c.graph == "step" and c.precision == "fp32"
    assert c.n_channels == cfg.n_input_channels == N_IN and c.n_model_channels == cfg.n_channels
    assert c.n_outputs == 2 and c.bin_s == pytest.approx(0.05) and c.window == cfg.window
    assert c.receptive_field == model.receptive_field and c.opset == EXPORT_OPSET
    assert c.weights_sha == tiny["meta"]["weights_sha"] and c.data_fingerprint == "fp-tiny-0001"
    assert c.checkpoint == str(tiny["ckpt"].resolve())
    assert [(s.key, s.shape) for s in c.state] == [(k, tuple(v)) for k, v in model.state_shapes(1).items()]
    assert [s.output for s in c.state if s.key == "meta_bias"] == [None]
    assert all(s.output == f"next_state.{s.key}" for s in c.state if s.key != "meta_bias")
    assert {t.name for t in c.inputs} == {"counts"} | {s.input for s in c.state}
    assert all(t.units for t in c.outputs if t.name in ("velocity", "log_rates"))
    with torch.no_grad():
        bias = model.metadata_bias(model.metadata_for(subject="s1"), 1)[0].numpy()
    np.testing.assert_array_equal(c.meta_bias, bias)
    assert c.metadata == {"subject": "s1"}
    assert json.loads(c.config_json)["channel_map"] == list(CHANNEL_MAP)
    # serialisation is lossless and strict
    again = ModelContract.from_props(c.to_props())
    assert again.to_props() == c.to_props()
    props = c.to_props()
    del props["rpnt.n_channels"]
    with pytest.raises(ContractError, match="rpnt.n_channels"):
        ModelContract.from_props(props)
    assert read_contract(tiny["out"] / step_file("int8")).precision == "int8"
    w = read_contract(tiny["out"] / WINDOW_FILE)
    assert w.graph == "window" and w.window_bins == model.receptive_field + 127


# ---------------------------------------------------------------------- parity
def test_parity_reports(tiny):
    out = tiny["out"]
    rep = json.loads((out / "rpnt_step.parity.json").read_text())
    assert rep["passed"] and rep["tolerance"] == pytest.approx(1e-4)
    assert [s["stream"] for s in rep["streams"]] == ["random", "real"]
    for s in rep["streams"]:
        assert s["n_bins"] == 120
        assert s["max_abs_velocity"] <= 1e-4 and s["max_abs_log_rates"] <= 1e-4
        assert s["r2_velocity_vs_torch"] > 0.999999
    real = rep["streams"][1]
    assert real["r2_target_torch"] > 0.5 and abs(real["r2_target_delta"]) < 1e-5
    assert "CPUExecutionProvider" in rep["checked_on"]
    for prec in ("int8", "fp16"):
        r = json.loads((out / f"rpnt_step.{prec}.parity.json").read_text())
        assert r["written"] and r["gate"]["metric"] == "r2_drop_vs_target" and r["gate"]["value"] <= 0.005
    assert "PASSED" in (out / "rpnt_step.parity.txt").read_text()


def test_int8_gate_rejects_a_model_past_the_limit(tmp_path, tiny):
    """A model whose int8 R² drop exceeds the gate is not written (gate forced to 0); a stale
    int8 file from an earlier export is removed, the report says why, the manifest agrees."""
    out = tmp_path / "export"
    shutil.copytree(tiny["out"], out)
    assert (out / step_file("int8")).is_file()
    res = add_reduced_precision(tiny["model"], out, "int8", r2_gate_limit=0.0, parity_bins=40)
    assert "int8" in res.rejected and "step.int8" not in res.files
    assert not (out / step_file("int8")).exists()
    rep = json.loads((out / "rpnt_step.int8.parity.json").read_text())
    assert rep["written"] is False and rep["gate"]["passed"] is False and rep["gate"]["value"] > 0
    assert "NOT written" in (out / "rpnt_step.int8.parity.txt").read_text()
    manifest = json.loads((out / "export.json").read_text())
    assert (
        "int8" in manifest["rejected"]
        and "step.int8" not in manifest["files"]
        and "step" in manifest["files"]
    )
    with pytest.raises(FileNotFoundError, match="int8"):
        load_engine(out, precision="int8")
    # with the default gate the same model passes and is written again
    res = add_reduced_precision(tiny["model"], out, "int8", parity_bins=40)
    assert res.files["step.int8"].is_file() and not res.rejected


def test_r2_gate_uses_the_target_only_when_fp32_has_skill():
    s = {"stream": "real", "r2_target_torch": 0.7, "r2_target_delta": -0.01, "r2_velocity_vs_torch": 0.999}
    g = r2_gate([s], 0.005)
    assert g["metric"] == "r2_drop_vs_target" and g["value"] == pytest.approx(0.01) and not g["passed"]
    g = r2_gate([dict(s, r2_target_torch=-200.0)], 0.005)  # untrained head: R² vs target meaningless
    assert g["metric"] == "r2_loss_vs_fp32_outputs" and g["passed"] and "no skill" in g["note"]
    g = r2_gate([{"stream": "random", "r2_target_delta": None, "r2_velocity_vs_torch": 0.99}], 0.005)
    assert g["metric"] == "r2_loss_vs_fp32_outputs" and g["value"] == pytest.approx(0.01) and not g["passed"]


def test_cli_exit_status_when_a_variant_is_rejected(tmp_path, tiny, monkeypatch, capsys):
    import exporters.onnx_export as ox

    def fake(*args, **kw):
        return ox.ExportResult(out_dir=tmp_path, rejected={"int8": "r2_loss = 0.1 exceeds 0.005"})

    monkeypatch.setattr(ox, "export_checkpoint", fake)
    assert cli.main([str(tiny["ckpt"]), "--out", str(tmp_path / "o"), "--int8", "-q"]) == cli.EXIT_REJECTED
    assert "int8" in capsys.readouterr().err


def test_multisite_model_is_rejected(tmp_path):
    model = RPNT(tiny_config(channel_map=(), input_channels=0, spatial_layers=1, spatial_heads=2, d_model=16))
    with pytest.raises(ExportError, match="multi-site"):
        export_model(model, tmp_path / "x")


# ---------------------------------------------------------------------- engines
def test_step_engine_equals_torch_and_window_graph(tiny):
    model, out = tiny["model"], tiny["out"]
    counts = random_counts(150, N_IN, seed=11)  # > receptive field: the window engine chunks
    onnx_eng = load_engine(out)
    torch_eng = load_engine(out, backend="torch")  # finds the checkpoint through the contract
    win_eng = load_engine(out, graph="window")
    ref = torch_stream(model, counts, model.metadata_for(subject="s1"))["velocity"]
    a = decode_stream(onnx_eng, counts)
    b = decode_stream(torch_eng, counts)
    c = win_eng.predict(counts)
    assert a.dtype == np.float32 and a.shape == (150, 2)
    np.testing.assert_allclose(a, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(b, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(c, ref, atol=1e-4, rtol=0)
    for eng in (onnx_eng, torch_eng):
        assert isinstance(eng, Decoder) and isinstance(eng.info, DecoderInfo)
        assert (
            eng.info.n_channels == N_IN and eng.info.n_outputs == 2 and eng.info.bin_s == pytest.approx(0.05)
        )
        assert eng.info.version == tiny["meta"]["weights_sha"]
    assert onnx_eng.info.fingerprint == "fp-tiny-0001"


def test_step_engine_reduced_precision_and_plain_run(tiny):
    counts = random_counts(60, N_IN, seed=12)
    ref = decode_stream(load_engine(tiny["out"]), counts)
    plain = decode_stream(load_engine(tiny["out"], io_binding=False), counts)
    np.testing.assert_array_equal(plain, ref)
    for prec in ("int8", "fp16"):
        eng = load_engine(tiny["out"], precision=prec)
        assert eng.info.extra["precision"] == prec
        got = decode_stream(eng, counts)
        assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_engine_reset_restores_initial_state(tiny):
    eng = load_engine(tiny["out"])
    c = eng.contract
    s0 = eng.state
    assert set(s0) == {s.key for s in c.state}
    np.testing.assert_array_equal(s0["meta_bias"][0], c.meta_bias)
    assert all(not v.any() for k, v in s0.items() if k != "meta_bias")
    counts = random_counts(30, N_IN, seed=13)
    first = [eng.step(x) for x in counts]
    assert eng.state["valid"].sum() == c.window
    eng.reset()
    for k, v in eng.state.items():
        np.testing.assert_array_equal(v, s0[k])
    np.testing.assert_array_equal(np.stack([eng.step(x) for x in counts]), np.stack(first))
    # another metadata bias at load changes the initial state
    other = load_engine(tiny["out"], meta_bias=np.zeros_like(c.meta_bias))
    assert not other.state["meta_bias"].any()


def test_engine_state_round_trip_with_torch(tiny):
    """The ONNX state layout is RPNT's: a torch state can be loaded into the engine."""
    model = tiny["model"]
    counts = random_counts(20, N_IN, seed=14)
    state = model.init_state(1, model.metadata_for(subject="s1"))
    with torch.no_grad():
        for x in counts[:10]:
            _, state = model.step(torch.from_numpy(x)[None], state)
        ref = [model.step(torch.from_numpy(x)[None], state)[0]["velocity"][0].numpy() for x in counts[10:11]]
    eng = load_engine(tiny["out"])
    eng.set_state({k: v.numpy() for k, v in state.items()})
    np.testing.assert_allclose(eng.step(counts[10]), ref[0], atol=1e-5)


@pytest.mark.parametrize(
    "bad", [np.ones(N_IN - 1), np.ones((1, N_IN)), -np.ones(N_IN), np.full(N_IN, np.nan)]
)
def test_engine_rejects_bad_counts(tiny, bad):
    eng = load_engine(tiny["out"])
    with pytest.raises(ValueError, match="counts"):
        eng.step(bad)
    win = load_engine(tiny["out"], graph="window")
    with pytest.raises(ValueError, match="counts"):
        win.run(np.ones((3, N_IN)))


def test_short_window_graph_untouched_model_and_failed_reexport(tmp_path):
    """One export, three properties:
    - T < receptive field: ``predict`` refuses, one window from the stream start is still exact;
    - export works on a private copy (train mode, float64 rotary tables, eager step intact);
    - a later export that fails parity raises, publishes nothing, and this export survives."""
    out = tmp_path / "export"
    model = tiny_model(seed=6).train()
    freq = model.blocks[0].attn.rotary.freq_matrix.clone()
    first = export_model(model, out, parity_bins=10, window_bins=12)  # receptive field is 19
    assert first.reports["window"]["passed"] and "first T bins" in first.reports["window"]["note"]
    assert model.training and model.blocks[0].attn.rotary.freq_matrix.dtype == torch.float64
    assert torch.equal(model.blocks[0].attn.rotary.freq_matrix, freq)
    model.eval()
    eng = OnnxWindowEngine(first.files["window"])
    with pytest.raises(ValueError, match="receptive field"):
        eng.predict(np.ones((30, N_IN)))
    counts = random_counts(12, N_IN, seed=15)
    ref = torch_stream(model, counts)["velocity"]  # eager step still works after tracing
    np.testing.assert_allclose(eng.run(counts)["velocity"], ref, atol=1e-4)

    sha = json.loads((out / "export.json").read_text())["files"]["step"]["sha256"]
    with pytest.raises(ParityError, match="tolerance"):
        export_model(tiny_model(seed=9), out, tolerance=1e-12, parity_bins=10, window_bins=12)
    assert json.loads((out / "export.json").read_text())["files"]["step"]["sha256"] == sha
    assert read_contract(first.files["step"]).created == first.contract.created
    failed = json.loads((out / "export-failed" / "rpnt_step.parity.json").read_text())
    assert failed["passed"] is False and failed["tolerance"] == 1e-12
    assert not list(out.glob(".export-staging-*"))


def test_engine_module_does_not_import_torch(tiny):
    code = (
        "import sys\n"
        "import numpy as np\n"
        "import exporters.runtime as rt\n"
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules\n"
        f"e = rt.load_engine({str(tiny['out'])!r})\n"
        f"v = e.step(np.ones({N_IN}))\n"
        "assert v.shape == (2,)\n"
        "assert 'torch' not in sys.modules, 'torch imported while decoding'\n"
        "import rpnt_core\n"  # the package imported later still sees the same decoder module
        "assert rpnt_core.decoder.DecoderInfo is type(e.info)\n"
        "assert isinstance(e, rpnt_core.Decoder)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "backend,provider",
    [("onnx-cuda", "CUDAExecutionProvider"), ("onnx-tensorrt", "TensorrtExecutionProvider")],
)
def test_missing_gpu_provider_is_a_clear_error(tiny, backend, provider):
    if provider in ort.get_available_providers():
        pytest.skip(f"{provider} is available on this host")
    with pytest.raises(ProviderUnavailableError) as exc:
        load_engine(tiny["out"], backend=backend)
    msg = str(exc.value)
    assert provider in msg and "rpnt[gpu]" in msg and "onnxruntime-gpu" in msg


def test_load_engine_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="backend"):
        load_engine(tiny["out"], backend="tpu")
    with pytest.raises(FileNotFoundError):
        load_engine(tmp_path / "nothing")
    with pytest.raises(ContractError, match="window graph"):
        OnnxStepEngine(tiny["out"] / WINDOW_FILE)
    eng = load_engine(tiny["ckpt"], backend="torch", metadata={"subject": "s1"})
    assert eng.info.n_channels == N_IN and eng.info.extra["backend"] == "torch"


def test_step_graph_writes_ring_caches_in_place(tiny):
    """The step graph keeps its caches as ring buffers: each k/v/pooling state input is read by
    exactly one ScatterElements (this bin's slot written), never sliced and concatenated."""
    g = onnx.load(str(tiny["out"] / "rpnt_step.onnx")).graph
    users: dict[str, list[str]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n.op_type)
    ring = [i.name for i in g.input if i.name.rsplit(".", 1)[-1] in ("k", "v", "pool_x", "pool_logit")]
    assert ring
    for name in ring:
        assert users.get(name) == ["ScatterElements"], (name, users.get(name))
    assert "state.write_index" in {i.name for i in g.input}


@pytest.mark.parametrize("io_binding", [True, False])
def test_prewarm_does_not_advance_the_stream(tiny, io_binding):
    """``prewarm()`` between bins (what a paced caller does to re-warm caches) changes nothing."""
    eng = OnnxStepEngine(tiny["out"] / "rpnt_step.onnx", io_binding=io_binding)
    x = tiny["counts"][:40]
    plain = np.stack([eng.step(r) for r in x])
    eng.reset()
    warmed = []
    for r in x:
        eng.prewarm()
        eng.prewarm()
        warmed.append(eng.step(r))
    np.testing.assert_array_equal(np.stack(warmed), plain)
