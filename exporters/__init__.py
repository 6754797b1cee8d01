"""exporters: ONNX export of RPNT (step + window graphs), parity checks, reduced precision, and the
inference engines behind the decoder contract.

Modules (import what you need; this package imports nothing heavy by itself):

- :mod:`exporters.runtime` — ``load_engine``, ``OnnxStepEngine``, ``OnnxWindowEngine`` (numpy +
  onnxruntime only: the daemon imports this without torch);
- :mod:`exporters.contract` — the model contract stored in each ONNX file's metadata;
- :mod:`exporters.onnx_export` — ``export_checkpoint``, ``export_model`` (torch), over
  :mod:`exporters.graphs` (tracing), :mod:`exporters.stages` (each graph checked) and
  :mod:`exporters.publish` (staging, publishing, manifest);
- :mod:`exporters.parity` — ``ParityError`` and the parity report;
- :mod:`exporters.quantize` — int8 / fp16 variants;
- :mod:`exporters.graph_checks` — static-shape and TensorRT op allow-list checks;
- :mod:`exporters.cli` — ``rpnt export``.

Names below are also available lazily as ``exporters.<name>``.
"""

from __future__ import annotations

from rpnt_core.lazy import lazy_exports

_LAZY = {
    "load_engine": "runtime",
    "OnnxStepEngine": "runtime",
    "OnnxWindowEngine": "runtime",
    "ProviderUnavailableError": "runtime",
    "read_contract": "runtime",
    "ModelContract": "contract",
    "ContractError": "contract",
    "export_checkpoint": "onnx_export",
    "export_model": "onnx_export",
    "export_step_graph": "onnx_export",
    "export_window_graph": "onnx_export",
    "add_reduced_precision": "onnx_export",
    "ExportResult": "onnx_export",
    "ExportError": "onnx_export",
    "ParityError": "parity",
    "GraphCheckError": "graph_checks",
    "check_graph": "graph_checks",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, {k: f".{v}" for k, v in _LAZY.items()}, globals())
