"""Finding an exported graph and reading its contract (ONNX Runtime only; no torch, no onnx).

The engines (:mod:`exporters.runtime`, :mod:`exporters.torch_engine`,
:mod:`exporters.openvino_engine`) and the service's registry all read export directories
through these two functions.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from .contract import WINDOW_FILE, ModelContract, step_file


def resolve_model_path(
    path_or_dir: str | os.PathLike[str], *, precision: str = "fp32", graph: str = "step"
) -> Path:
    """An export directory → the file of ``graph``/``precision`` in it; a file → itself.

    Raises:
        FileNotFoundError: no such file, or the directory has no graph of that kind (the message
            lists the ``.onnx`` files it has).
        ValueError: an unknown ``precision``.
    """
    p = Path(path_or_dir)
    if p.is_dir():
        name = step_file(precision) if graph == "step" else WINDOW_FILE
        f = p / name
        if not f.is_file():
            have = sorted(x.name for x in p.glob("*.onnx"))
            raise FileNotFoundError(
                f"{p}: no {name} (graph={graph!r}, precision={precision!r}); this export has {have}"
            )
        return f
    if not p.is_file():
        raise FileNotFoundError(f"model: no such file or directory: {p}")
    return p


def read_contract(path_or_session: str | os.PathLike[str] | ort.InferenceSession) -> ModelContract:
    """The rpnt contract stored in an exported ONNX file, or in the file behind an open session.

    Raises:
        ContractError: the metadata is missing or malformed (not an rpnt export).
    """
    if isinstance(path_or_session, ort.InferenceSession):
        sess, source = path_or_session, "session"
    else:
        source = str(path_or_session)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    return ModelContract.from_props(sess.get_modelmeta().custom_metadata_map, source=source)
