"""The ``openvino-cpu`` back-end: OpenVINO's CPU runtime on the exported step graph.

Runs only where the ``openvino`` package is installed (the [openvino] extra, in [dev]); the
"absent package" error is checked everywhere.  Nothing here times anything.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import randomise_kernels, tiny_config

from exporters.onnx_export import export_step_graph
from exporters.parity import random_counts
from exporters.runtime import OnnxStepEngine, ProviderUnavailableError, load_engine
from rpnt_core import RPNT
from rpnt_core.evaluate.metrics import r2_score


@pytest.fixture(scope="module")
def step_graph(tmp_path_factory):
    torch.manual_seed(0)
    model = RPNT(tiny_config()).eval()
    randomise_kernels(model)
    out = tmp_path_factory.mktemp("ov")
    export_step_graph(model, out / "rpnt_step.onnx")
    return out


@pytest.fixture(scope="module")
def ov_compiles(step_graph):
    """Skip unless OpenVINO is installed and compiles the step graph in a child process: OpenVINO
    2026.4 segfaults compiling it at f32 inference precision (the fallback on CPUs without bf16),
    which must not take the test run down with it."""
    pytest.importorskip("openvino")
    probe = (
        "import sys; from exporters.openvino_engine import OpenVinoStepEngine; "
        "OpenVinoStepEngine(sys.argv[1], warmup_bins=1)"
    )
    rc = subprocess.run(
        [sys.executable, "-c", probe, str(step_graph / "rpnt_step.onnx")],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ).returncode
    if rc != 0:
        pytest.skip(f"OpenVINO cannot compile the step graph on this CPU (child exit status {rc})")


def test_missing_openvino_is_one_clear_error(step_graph, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    with pytest.raises(ProviderUnavailableError, match=r"rpnt\[openvino\]"):
        load_engine(step_graph, backend="openvino-cpu")


def test_openvino_steps_like_onnx_runtime(step_graph, ov_compiles):
    ov = load_engine(step_graph, backend="openvino-cpu")
    ref = OnnxStepEngine(step_graph / "rpnt_step.onnx")
    assert ov.info.extra["backend"] == "openvino-cpu"
    x = random_counts(80, ov.info.n_channels, seed=1)
    a = np.stack([ref.step(r) for r in x])
    b = np.stack([ov.step(r) for r in x])
    assert b.shape == a.shape and b.dtype == np.float32
    # bf16 inference by default: the export's R² gate bar, not float32 parity
    assert 1.0 - r2_score(a, b) < 0.005
    assert set(ov.state) == set(ref.state)
    ov.reset()
    again = np.stack([ov.step(r) for r in x])
    np.testing.assert_array_equal(again, b)  # reset() really forgets the stream


def test_openvino_refuses_the_window_graph(step_graph):
    with pytest.raises(ValueError, match="step graphs only"):
        load_engine(step_graph, backend="openvino-cpu", graph="window")


def test_openvino_prewarm_does_not_advance_the_stream(step_graph, ov_compiles):
    ov = load_engine(step_graph, backend="openvino-cpu")
    x = random_counts(30, ov.info.n_channels, seed=2)
    plain = np.stack([ov.step(r) for r in x])
    ov.reset()
    warmed = []
    for r in x:
        ov.prewarm()
        warmed.append(ov.step(r))
    np.testing.assert_array_equal(np.stack(warmed), plain)
