"""Tracing an RPNT to its two ONNX graphs, each with the contract in its metadata.

:func:`export_step_graph` and :func:`export_window_graph` trace; :func:`weights_into_template`
writes another model's weights into an existing step graph of the same config instead.  Nothing
here checks parity: :mod:`exporters.onnx_export` does, before it publishes anything.

Step graph
----------
Inputs ``counts`` (1, N_in) float32 and one input per state entry, ``state.<key>``, in
``RPNT.state_shapes`` order; outputs ``velocity`` (1, D), ``log_rates`` (1, N) and one
``next_state.<key>`` per entry that changes (``meta_bias`` is constant per stream and has no
output).  Batch 1, every dimension static, no control flow, ai.onnx opset
:data:`~exporters.graph_checks.EXPORT_OPSET` (18; TensorRT 10.x parses 9–20, ORT any).  The graph
is ``RPNT.step`` itself, traced — not a re-implementation — so it cannot drift from the model.

Window graph
------------
Inputs ``counts`` (1, T, N_in) and ``meta_bias`` (1, d); outputs ``velocity`` (1, T, D) and
``log_rates`` (1, T, N) for every bin, bin 0 being the start of a stream (``RPNT.forward``).
T defaults to ``receptive_field + 127`` so that exact chunked decoding
(:meth:`~exporters.runtime.OnnxWindowEngine.predict`) yields 128 new bins per window.

Exporter choice
---------------
``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter; weights embedded with
``external_data=False``): its step graph matches ``RPNT.step`` within the parity tolerance and is
smaller than the legacy TorchScript exporter's, whose graph did not (``docs/engines.md``).  The
dynamo exporter only emits opset ≥ 18, hence opset 18.  After tracing, :mod:`exporters.graph_opt`
applies two exact rewrites that ONNX Runtime's CPU kernels need (row-wise instead of element-wise
Gather; a GELU form ORT fuses).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from rpnt_core.checkpoint import package_version
from rpnt_core.config import same_config
from rpnt_core.model.rpnt import RPNT

from . import graph_checks, graph_opt
from .contract import (
    COUNTS,
    LOG_RATES,
    META_BIAS,
    UNITS,
    VELOCITY,
    ModelContract,
    StateEntry,
    TensorSpec,
    state_input,
    state_output,
)

_EXPORT_COPY = "_rpnt_export_copy"  # attribute marking a model prepare_model already copied


class ExportError(ValueError):
    """A model or request that cannot be exported (multi-site model, bad parity data, ...)."""


# ---------------------------------------------------------------------- traced wrappers
class StepGraph(nn.Module):
    """``RPNT.step`` with the state as positional tensors, as the step graph takes it.

    Args:
        model: the (prepared) model.
        keys: every state key, in ``RPNT.state_shapes`` order (the graph's state inputs).
        carried: the keys whose next value is an output (``step`` changes them).

    Shape:
        ``forward(counts (1, N_in), *state) -> (velocity (1, D), log_rates (1, N), *next_state)``.
    """

    def __init__(self, *, model: RPNT, keys: list[str], carried: list[str]) -> None:
        super().__init__()
        self.model, self.keys, self.carried = model, keys, carried

    def forward(self, counts: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        out, new = self.model.step(counts, dict(zip(self.keys, state, strict=True)))
        return (out["velocity"], out["log_rates"], *[new[k] for k in self.carried])


class WindowGraph(nn.Module):
    """``RPNT.forward`` for a single-site model over one window, bin 0 being the stream start.

    The metadata bias is an input instead of metadata indices (so the graph has no embedding
    look-ups with range checks).

    Shape:
        ``forward(counts (1, T, N_in), meta_bias (1, d)) -> (velocity (1, T, D), log_rates (1, T, N))``.
    """

    def __init__(self, *, model: RPNT) -> None:
        super().__init__()
        self.model = model

    def forward(self, counts: Tensor, meta_bias: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        h = m._embed(counts, None) + meta_bias[:, None, :]  # (1, T, d)
        for blk in m.blocks:
            h = blk(h)
        out = m._heads(m.norm(h))
        return out["velocity"], out["log_rates"]


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporter's progress prints and warnings."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _torch_export(
    module: nn.Module, args: tuple[Tensor, ...], input_names: list[str], output_names: list[str]
) -> onnx.ModelProto:
    """``module`` traced with the dynamo exporter and rewritten by :mod:`exporters.graph_opt`.

    Raises:
        ExportError: the traced graph's I/O names are not ``input_names`` → ``output_names``.
    """
    module.eval()
    with _quiet_export(), torch.no_grad():
        prog = torch.onnx.export(
            module,
            args,
            dynamo=True,
            external_data=False,
            optimize=True,
            opset_version=graph_checks.EXPORT_OPSET,
            input_names=input_names,
            output_names=output_names,
            verbose=False,
            report=False,
            verify=False,
        )
    if prog is None:  # only the legacy exporter (dynamo=False) returns nothing
        raise ExportError("export: torch.onnx.export returned no ONNX program")
    proto = prog.model_proto
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != input_names or got_out != output_names:
        raise ExportError(
            f"export: graph I/O {got_in} → {got_out} differs from the requested "
            f"{input_names} → {output_names}"
        )
    graph_opt.optimize(proto)  # exact latency rewrites (see exporters/graph_opt.py)
    return proto


# ---------------------------------------------------------------------- preparation
def prepare_model(model: RPNT) -> RPNT:
    """A private float32 CPU copy of ``model`` in eval mode (returned as is if it already is one).

    Export never changes the caller's model (device, train/eval mode).

    Raises:
        ExportError: not an RPNT, a multi-site model, or parameters that are not float32.
    """
    if getattr(model, _EXPORT_COPY, False):
        return model
    if not isinstance(model, RPNT):
        raise ExportError(f"model: expected an RPNT, got {type(model).__name__}")
    c = model.config
    if c.spatial_layers:
        raise ExportError(
            f"export: multi-site models (config.spatial_layers={c.spatial_layers}) are not "
            "exported — the daemon decodes one site; export a single-site model "
            "(spatial_layers=0)"
        )
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if bad:
        raise ExportError(
            f"model: parameters must be float32 (export converts precision itself), found {bad}"
        )
    # Never .to(dtype): the rotary frequency buffers are float64 on purpose.
    model = copy.deepcopy(model).to("cpu").eval()
    model.__dict__[_EXPORT_COPY] = True
    return model


def default_window_bins(model: RPNT) -> int:
    """The window graph's default T: ``receptive_field + 127`` (128 new bins per exact window)."""
    return model.receptive_field + 127


def default_meta_bias(model: RPNT) -> np.ndarray:
    """The metadata bias (d,) for unknown metadata."""
    with torch.no_grad():
        return model.metadata_bias(None, 1)[0].numpy()


def _base_contract(
    model: RPNT, *, meta_bias: np.ndarray, metadata: Mapping[str, Any], checkpoint: str
) -> dict[str, Any]:
    """The :class:`ModelContract` fields both graphs share (everything but graph, I/O, state)."""
    c = model.config
    meta = getattr(model, "checkpoint_meta", None) or {}
    return dict(
        precision="fp32",
        n_channels=c.n_input_channels,
        n_model_channels=c.n_channels,
        n_outputs=c.n_outputs,
        target=c.target,
        bin_s=float(c.bin_s),
        window=c.window,
        receptive_field=model.receptive_field,
        meta_bias=np.asarray(meta_bias, np.float32),
        opset=graph_checks.EXPORT_OPSET,
        metadata=dict(metadata),
        weights_sha=str(meta.get("weights_sha", "")),
        data_fingerprint=str(meta.get("data_fingerprint", "")),
        rpnt_version=str(meta.get("rpnt_version", "")),
        exporter_version=package_version(),
        torch_version=torch.__version__,
        config_json=c.to_json(),
        checkpoint=checkpoint,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _save(proto: onnx.ModelProto, contract: ModelContract, path: Path, doc: str) -> None:
    """Write ``proto`` to ``path`` with ``contract`` as its only ``metadata_props``."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, contract.to_props())
    proto.doc_string = doc
    proto.producer_name = "rpnt"
    proto.producer_version = contract.exporter_version
    onnx.save(proto, str(path))


# ---------------------------------------------------------------------- step graph
@dataclass(frozen=True, kw_only=True)
class _StepLayout:
    """The step graph's I/O: state entries, tensor specs and the example inputs of the trace."""

    keys: list[str]
    carried: list[str]
    state: tuple[StateEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example: tuple[Tensor, ...]


def _step_layout(model: RPNT, meta_bias: np.ndarray) -> _StepLayout:
    """State layout in ``RPNT.state_shapes`` order; entries ``step`` passes through unchanged
    (``meta_bias``) are inputs only."""
    c = model.config
    shapes = model.state_shapes(1)
    keys = list(shapes)
    with torch.no_grad():
        state = model.init_state(1)
        _, new = model.step(torch.zeros(1, c.n_input_channels), state)
    carried = [k for k in keys if new[k] is not state[k]]
    entries = tuple(
        StateEntry(
            key=k,
            input=state_input(k),
            output=state_output(k) if k in carried else None,
            shape=tuple(shapes[k]),
            init=META_BIAS if k == META_BIAS else "zeros",
        )
        for k in keys
    )
    inputs = (TensorSpec(COUNTS, (1, c.n_input_channels), units=UNITS[COUNTS]),) + tuple(
        TensorSpec(e.input, e.shape, units=UNITS[META_BIAS] if e.key == META_BIAS else "model state")
        for e in entries
    )
    outputs = (
        TensorSpec(VELOCITY, (1, c.n_outputs), units=UNITS[VELOCITY]),
        TensorSpec(LOG_RATES, (1, c.n_channels), units=UNITS[LOG_RATES]),
    ) + tuple(TensorSpec(e.output, e.shape, units="model state") for e in entries if e.output)
    example = (
        torch.zeros(1, c.n_input_channels),
        *[
            torch.from_numpy(np.broadcast_to(meta_bias, shapes[k]).copy())
            if k == META_BIAS
            else torch.zeros(shapes[k])
            for k in keys
        ],
    )
    return _StepLayout(
        keys=keys, carried=carried, state=entries, inputs=inputs, outputs=outputs, example=example
    )


def export_step_graph(
    model: RPNT,
    path: str | Path,
    *,
    meta_bias: np.ndarray | None = None,
    metadata: Mapping[str, Any] | None = None,
    checkpoint: str = "",
) -> ModelContract:
    """Trace ``RPNT.step`` to ``path`` (static shapes, batch 1) and embed the contract.

    Args:
        model: a single-site float32 RPNT (not changed).
        path: the ``.onnx`` file to write.
        meta_bias: (d,) the initial ``state.meta_bias`` stored in the contract; default: the
            bias of unknown metadata.
        metadata: the metadata ``meta_bias`` was computed for (stored in the contract).
        checkpoint: the source checkpoint's path (informational).

    Returns:
        The contract written into the file.
    """
    return step_graph(model, path, meta_bias=meta_bias, metadata=metadata, checkpoint=checkpoint)[0]


def step_graph(
    model: RPNT,
    path: str | Path,
    *,
    meta_bias: np.ndarray | None,
    metadata: Mapping[str, Any] | None,
    checkpoint: str,
    template: str | Path | None = None,
) -> tuple[ModelContract, str]:
    """:func:`export_step_graph`, and how the graph was made: ``"traced"``, or ``"template"``.

    ``"template"``: the step graph ``template`` with this model's weights written in
    (:func:`weights_into_template`), when it fits.  A template graph computes the model only if the
    template's initializers are its weights as such (not folded or shared), so its caller must
    check parity (:func:`exporters.onnx_export.export_model` does).
    """
    model = prepare_model(model)
    if meta_bias is None:
        meta_bias = default_meta_bias(model)
    lay = _step_layout(model, meta_bias)
    names_in, names_out = [t.name for t in lay.inputs], [t.name for t in lay.outputs]
    proto = None if template is None else weights_into_template(template, model, names_in, names_out)
    source = "template" if proto is not None else "traced"
    if proto is None:
        step = StepGraph(model=model, keys=lay.keys, carried=lay.carried)
        proto = _torch_export(step, lay.example, names_in, names_out)
    contract = ModelContract(
        graph="step",
        inputs=lay.inputs,
        outputs=lay.outputs,
        state=lay.state,
        window_bins=0,
        **_base_contract(model, meta_bias=meta_bias, metadata=metadata or {}, checkpoint=checkpoint),
    )
    _save(
        proto,
        contract,
        Path(path),
        "RPNT step graph: one bin of counts + state -> velocity, "
        "log_rates, next state. Contract in metadata_props (rpnt.*).",
    )
    return contract, source


def weights_into_template(
    template: str | Path, model: RPNT, input_names: list[str], output_names: list[str]
) -> onnx.ModelProto | None:
    """The fp32 step graph ``template`` with ``model``'s weights in its initializers, or None.

    None when it does not fit: unreadable, another graph or precision, another config, other
    inputs/outputs, or an initializer named after a weight (``model.<state key>``, as the traced
    graph names them) whose shape or dtype differs.  Initializers not named after a weight (shape
    constants, ...) are kept.

    Only the values change, never the graph, so the result computes ``model`` exactly when the
    template's initializers are the weights themselves; an optimiser that folded or shared weights
    in the template breaks that, which only a parity check against ``model`` shows.
    """
    from onnx import numpy_helper

    try:
        proto = onnx.load(str(template))
    except Exception:  # noqa: BLE001 - a missing or damaged template just means: trace
        return None
    props = {p.key: p.value for p in proto.metadata_props}
    if (
        props.get("rpnt.graph") != "step"
        or props.get("rpnt.precision") != "fp32"
        or not same_config(props.get("rpnt.config", "null"), model.config)
        or [i.name for i in proto.graph.input] != input_names
        or [o.name for o in proto.graph.output] != output_names
    ):
        return None
    state = model.state_dict()
    for init in proto.graph.initializer:
        key = init.name.removeprefix("model.")
        if key == init.name or key not in state:
            continue
        new = state[key].detach().cpu().numpy()
        old = numpy_helper.to_array(init)
        if new.shape != old.shape or new.dtype != old.dtype:
            return None
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), init.name))
    return proto


# ---------------------------------------------------------------------- window graph
def export_window_graph(
    model: RPNT,
    path: str | Path,
    *,
    window_bins: int,
    meta_bias: np.ndarray | None = None,
    metadata: Mapping[str, Any] | None = None,
    checkpoint: str = "",
) -> ModelContract:
    """Trace the full forward over a fixed ``window_bins``-bin window to ``path``.

    Args:
        window_bins: T, the window graph's fixed number of bins (≥ 1).
        model, meta_bias, metadata, checkpoint: as :func:`export_step_graph`; ``meta_bias`` is the
            default value of the graph's ``meta_bias`` input, stored in the contract.

    Returns:
        The contract written into the file.

    Raises:
        ExportError: ``window_bins`` is not a positive integer.
    """
    model = prepare_model(model)
    c = model.config
    if not isinstance(window_bins, int) or window_bins < 1:
        raise ExportError(f"window_bins: must be a positive integer, got {window_bins!r}")
    if meta_bias is None:
        meta_bias = default_meta_bias(model)
    inputs = (
        TensorSpec(COUNTS, (1, window_bins, c.n_input_channels), units=UNITS[COUNTS]),
        TensorSpec(META_BIAS, (1, c.d_model), units=UNITS[META_BIAS]),
    )
    outputs = (
        TensorSpec(VELOCITY, (1, window_bins, c.n_outputs), units=UNITS[VELOCITY]),
        TensorSpec(LOG_RATES, (1, window_bins, c.n_channels), units=UNITS[LOG_RATES]),
    )
    example = (
        torch.zeros(1, window_bins, c.n_input_channels),
        torch.from_numpy(np.asarray(meta_bias)[None].copy()),
    )
    names_in, names_out = [t.name for t in inputs], [t.name for t in outputs]
    proto = _torch_export(WindowGraph(model=model), example, names_in, names_out)
    contract = ModelContract(
        graph="window",
        inputs=inputs,
        outputs=outputs,
        window_bins=window_bins,
        **_base_contract(model, meta_bias=meta_bias, metadata=metadata or {}, checkpoint=checkpoint),
    )
    _save(
        proto,
        contract,
        Path(path),
        f"RPNT window graph: {window_bins} bins of counts (bin 0 = stream "
        "start) + metadata bias -> velocity, log_rates per bin. Contract in metadata_props (rpnt.*).",
    )
    return contract
