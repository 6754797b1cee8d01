"""Exporting a finetuned model by writing its weights into its parent's step graph (``template``),
with the parity check deciding, and the step-graph-only export (``window=False``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomise_kernels, tiny_config

from exporters.onnx_export import export_model, weights_into_template
from exporters.parity import engine_stream, random_counts, torch_stream
from exporters.runtime import OnnxStepEngine
from rpnt_core import RPNT


def _model(seed: int, *, distinct_norms: bool) -> RPNT:
    torch.manual_seed(seed)
    m = RPNT(tiny_config()).eval()
    randomise_kernels(m)
    if distinct_norms:  # a trained model's norms all differ; a fresh one's are all ones and zeros
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.add_(0.05 * torch.randn_like(p))
    return m


def _perturbed(m: RPNT, seed: int) -> RPNT:
    """``m`` after 'finetuning': every weight moved."""
    import copy

    out = copy.deepcopy(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return out


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A model with distinct weights everywhere and its (traced) step graph."""
    m = _model(0, distinct_norms=True)
    out = tmp_path_factory.mktemp("parent")
    export_model(m, out, window=False)
    return m, out / "rpnt_step.onnx"


def test_a_finetuned_model_is_exported_into_its_parents_step_graph(parent, tmp_path):
    parent, template = parent
    child = _perturbed(parent, 1)
    counts = random_counts(150, child.config.n_input_channels, seed=3)
    res = export_model(child, tmp_path / "child", window=False, template=template, parity_counts=counts)
    assert res.step_source == "template" and res.reports["step"]["passed"]
    assert set(res.files) == {"step"} and not (tmp_path / "child" / "rpnt_window.onnx").exists()
    assert {"torch_reference", "step_graph", "step_parity"} <= set(res.timings)
    # the graph computes the child, not the parent
    with torch.no_grad():
        want = torch_stream(child, counts)["velocity"]
        parent_out = torch_stream(parent, counts)["velocity"]
    got = engine_stream(OnnxStepEngine(res.files["step"], warmup_bins=0), counts)["velocity"]
    assert np.abs(got - want).max() < 1e-4 < np.abs(parent_out - want).max()


def test_a_template_with_shared_weights_fails_parity_and_the_graph_is_traced(tmp_path):
    parent = _model(0, distinct_norms=False)  # identical norm weights: the exporter shares one initializer
    export_model(parent, tmp_path / "parent", window=False)
    child = _perturbed(parent, 1)  # now they differ: the shared initializer cannot hold them all
    template = tmp_path / "parent" / "rpnt_step.onnx"
    assert weights_into_template(template, child, *_io(template)) is not None  # it fits by name and shape ...
    res = export_model(child, tmp_path / "child", window=False, template=template)
    assert res.step_source == "traced" and res.reports["step"]["passed"]  # ... but computes another model


def test_a_template_that_does_not_fit_is_not_used(parent, tmp_path):
    model, template = parent
    torch.manual_seed(2)
    other = RPNT(tiny_config(d_model=24)).eval()
    assert weights_into_template(template, other, *_io(template)) is None  # another config
    assert weights_into_template(template, model, *_io(template)) is not None
    names_in, names_out = _io(template)
    assert weights_into_template(template, model, names_in[::-1], names_out) is None  # other inputs
    assert weights_into_template(tmp_path / "missing.onnx", model, names_in, names_out) is None


def _io(path) -> tuple[list[str], list[str]]:
    import onnx

    g = onnx.load(str(path)).graph
    return [i.name for i in g.input], [o.name for o in g.output]
