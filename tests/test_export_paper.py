"""Export of the paper-size preset (d_model 512, 4 layers, 16 heads, W = 50; random weights)."""

from __future__ import annotations

import time

import torch

from exporters.graph_checks import check_graph
from exporters.onnx_export import export_model
from rpnt_core import RPNT, RPNTConfig


def test_paper_preset_exports_with_parity(tmp_path):
    torch.manual_seed(2)
    model = RPNT(RPNTConfig.preset("paper", n_channels=196)).eval()
    t0 = time.perf_counter()
    res = export_model(model, tmp_path / "paper", parity_bins=50, window_bins=32)
    seconds = time.perf_counter() - t0
    rep = res.reports["step"]
    assert rep["passed"]
    s = rep["streams"][0]
    assert s["n_bins"] == 50 and s["max_abs_velocity"] <= 1e-4 and s["max_abs_log_rates"] <= 1e-4
    assert res.reports["window"]["passed"]
    assert check_graph(res.files["step"]) == []
    assert res.contract.n_channels == 196 and res.contract.window == 50
    assert res.files["step"].stat().st_size > 50e6  # ~13.6 M float32 weights embedded, no side file
    assert not list(res.out_dir.glob("*.data"))
    print(f"paper export + parity: {seconds:.1f} s")
