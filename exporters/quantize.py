"""Reduced-precision variants of an exported step graph.

- :func:`quantize_int8`: ONNX Runtime dynamic quantisation for CPU — weights of the Gemm/MatMul
  layers with a constant weight become int8 (per output channel), activations are quantised to
  uint8 on the fly (``DynamicQuantizeLinear`` + ``MatMulInteger``).  The attention's
  activation×activation MatMuls stay float32.  ORT-CPU only (TensorRT does not parse
  ``DynamicQuantizeLinear``/``MatMulInteger``).

  ``reduce_range=True`` (7-bit weights) by default: on x86 CPUs without VNNI (AVX2 only, like the
  EPYC Milan dev box) ORT's u8s8 kernel uses ``vpmaddubsw``, whose int16 pair sums saturate with
  full-range weights.  Measured on random-weight presets against the fp32 outputs (400 bins of
  StevensonV2 counts): full range R² 0.65 (small) / −0.08 (paper); reduced range 0.998 / 0.997.
  The read-in and velocity head stay float32 (:data:`FP32_LAYERS`).
- :func:`quantize_int8_static`: static int8 in QDQ form — weights int8 per channel, each weight
  matmul's input activation uint8 with a scale calibrated on the step graph's own inputs over a
  real stream (:func:`calibration_feeds`).  Measured in ``bench/bench_engines.py`` beside the
  dynamic graph; not written by ``rpnt export``.
- :func:`convert_fp16`: a small cast-based float16 conversion for GPUs (no onnxconverter-common):
  every float32 initializer / constant / Cast target becomes float16 (values clipped to the
  float16 range, so the attention's −1e9 mask becomes −65504, still exactly 0 after softmax);
  graph inputs and outputs stay float32, with a Cast at each boundary, so the engine and the
  state layout do not change.

Both copy the rpnt contract with ``precision`` updated.  Whether a variant is *written* is
decided by the export's parity gate (:mod:`exporters.onnx_export`), not here.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .contract import PREFIX

FP16_MAX = float(np.finfo(np.float16).max)


def _set_precision(model: onnx.ModelProto, precision: str, src: onnx.ModelProto) -> None:
    props = {p.key: p.value for p in src.metadata_props}
    props[PREFIX + "precision"] = precision
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    model.doc_string = src.doc_string


#: Layers kept in float32 by :func:`quantize_int8` (matched against weight initializer names):
#: the read-in and the velocity head, the model's first and last layers on the velocity path
#: (measured on random-weight presets, velocity R² loss vs fp32 over 400 bins of StevensonV2:
#: everything int8 0.0029 (paper) / 0.0018 (small); these two in fp32 0.0016 / 0.0010), and the
#: 1-output context-pooling score (512 weights: nothing to gain, and quantising it makes its input
#: quantisation shared with the qkv projection, which stops ORT fusing DynamicQuantizeMatMul).
FP32_LAYERS = ("read_in.", "velocity_head.", "pool_score.")


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    *,
    per_channel: bool = True,
    reduce_range: bool = True,
    fp32_layers: tuple[str, ...] = FP32_LAYERS,
    exclude_nodes: tuple[str, ...] = (),
) -> Path:
    """Dynamic int8 quantisation of ``src`` into ``dst`` (weights int8, MatMul/Gemm only).

    ``fp32_layers``: substrings of weight names whose Gemm/MatMul stay float32;
    ``exclude_nodes``: node names to leave alone as well."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        # The quantiser rewrites nodes and re-runs strict shape inference; the exporter's
        # value_info annotations would then conflict, so hand it a copy without them.
        plain = onnx.load(str(src))
        del plain.graph.value_info[:]
        keep = list(exclude_nodes)
        for n in plain.graph.node:
            if n.op_type in ("Gemm", "MatMul") and any(pat in i for i in n.input for pat in fp32_layers):
                keep += [
                    n.name,
                    f"{n.name}_MatMul",
                ]  # the quantiser renames a Gemm it splits into MatMul + Add
        inp = Path(tmp) / "in.onnx"
        onnx.save(plain, str(inp))
        out = Path(tmp) / "q.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # "consider pre-processing" warning: not applicable to our graphs
        try:
            quantize_dynamic(
                str(inp),
                str(out),
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                reduce_range=reduce_range,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_exclude=keep,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            root.setLevel(level)
        model = onnx.load(str(out))
    _set_precision(model, "int8", onnx.load(str(src), load_external_data=False))
    onnx.save(model, str(dst))
    return dst


def calibration_feeds(src: str | Path, counts: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The step graph's inputs at every bin of ``counts`` (T, N), stepping it from ``reset()``:
    what :func:`quantize_int8_static` calibrates activation ranges on."""
    from .contract import COUNTS
    from .runtime import OnnxStepEngine

    eng = OnnxStepEngine(src, warmup_bins=0)
    entries = eng.contract.state
    feeds = []
    for row in np.asarray(counts, dtype=np.float32):
        state = eng.state
        feeds.append({COUNTS: row[None].copy(), **{e.input: state[e.key] for e in entries}})
        eng.step(row)
    return feeds


def quantize_int8_static(
    src: str | Path,
    dst: str | Path,
    feeds: list[dict[str, np.ndarray]],
    *,
    per_channel: bool = True,
    fp32_layers: tuple[str, ...] = FP32_LAYERS,
) -> Path:
    """Static int8 (QDQ) quantisation of the weight Gemm/MatMul layers of ``src`` into ``dst``:
    weights int8 per output channel, each layer's input activation uint8 with a fixed scale
    calibrated (min/max) on ``feeds`` (:func:`calibration_feeds`).  No per-call
    ``DynamicQuantizeLinear``: ORT fuses each Q/DQ pair around a weight matmul into one integer
    kernel at load.  ``fp32_layers`` as in :func:`quantize_int8`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self._it, None)

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        plain = onnx.load(str(src))
        del plain.graph.value_info[:]
        keep = [
            n.name
            for n in plain.graph.node
            if n.op_type in ("Gemm", "MatMul") and any(pat in i for i in n.input for pat in fp32_layers)
        ]
        inp = Path(tmp) / "in.onnx"
        onnx.save(plain, str(inp))
        out = Path(tmp) / "q.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_static(
                str(inp),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=per_channel,
                reduce_range=False,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=keep,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            root.setLevel(level)
        model = onnx.load(str(out))
    _set_precision(model, "int8", onnx.load(str(src), load_external_data=False))
    onnx.save(model, str(dst))
    return dst


def _f16_tensor(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float32)
    arr = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(arr, t.name)


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """float32 → float16 weights and compute; float32 graph I/O (see module docstring)."""
    model = onnx.load(str(src))
    g = model.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(_f16_tensor(init))
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_f16_tensor(attr.t))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    # float32 boundaries: cast inputs to fp16 after entry, outputs to fp32 before exit
    new_nodes = []
    renames: dict[str, str] = {}
    for inp in g.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = inp.name + "__fp16"
            renames[inp.name] = inner
            new_nodes.append(
                helper.make_node(
                    "Cast", [inp.name], [inner], to=TensorProto.FLOAT16, name=f"cast_in_{inp.name}"
                )
            )
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
    out_renames: dict[str, str] = {}
    for out in g.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT:
            out_renames[out.name] = out.name + "__fp16"
    for node in g.node:
        for k, name in enumerate(node.output):
            if name in out_renames:
                node.output[k] = out_renames[name]
        for k, name in enumerate(node.input):
            if name in out_renames:
                node.input[k] = out_renames[name]
    tail = []
    for out in g.output:
        if out.name in out_renames:
            src_name = out_renames[out.name]
            # an output that is directly a (renamed) graph input
            src_name = renames.get(out.name, src_name)
            tail.append(
                helper.make_node(
                    "Cast", [src_name], [out.name], to=TensorProto.FLOAT, name=f"cast_out_{out.name}"
                )
            )
    nodes = new_nodes + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    _set_precision(model, "fp16", onnx.load(str(src), load_external_data=False))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return Path(dst)
