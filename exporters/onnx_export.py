"""Export an RPNT checkpoint to ONNX: a step graph, a window graph, parity, reduced precision.

Output directory (``rpnt export CKPT --out DIR``)::

    DIR/rpnt_step.onnx              step graph, fp32: one bin + state → outputs + next state
    DIR/rpnt_window.onnx            window graph, fp32: a fixed T-bin window (offline/batch)
    DIR/rpnt_step.int8.onnx         --int8, only if it passed the R² gate (ORT CPU only)
    DIR/rpnt_step.fp16.onnx         --fp16, only if it passed the R² gate (for GPUs)
    DIR/<model>.parity.json|.txt    parity report of each graph (also for rejected variants)
    DIR/export.json                 manifest: files, sha256, precision, gate outcomes

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
``external_data=False``).  Measured on this model in torch 2.13: the small preset's step graph
has 169 nodes (dynamo) vs 399 (legacy TorchScript, ``dynamo=False``), and the legacy graph
disagreed with ``RPNT.step`` by up to 0.14 in velocity from the first bin, while the dynamo
graph agrees to < 1e-6.  The dynamo exporter only emits opset ≥ 18 (down-conversion to 17 fails),
hence opset 18.  After tracing, :mod:`exporters.graph_opt` applies two exact rewrites that ONNX
Runtime's CPU kernels need (row-wise instead of element-wise Gather; a GELU form ORT fuses).

Metadata bias
-------------
The metadata bias for the export's metadata (``--subject/--session/--task/--date-days``; all
unknown by default) is baked into the file's **metadata** (``rpnt.meta_bias``), not the graph:
engines use it as the initial ``state.meta_bias`` on ``reset()`` and may be given another.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from rpnt_core.checkpoint import CheckpointError, load_checkpoint, package_version, require_trained_head
from rpnt_core.config import same_config
from rpnt_core.data.session import METADATA_FIELDS
from rpnt_core.model.rpnt import RPNT

from . import graph_checks, graph_opt
from .contract import (
    COUNTS,
    LOG_RATES,
    MANIFEST_FILE,
    META_BIAS,
    UNITS,
    VELOCITY,
    WINDOW_FILE,
    ModelContract,
    StateEntry,
    TensorSpec,
    state_input,
    state_output,
    step_file,
)
from .parity import (
    ParityError,
    Stream,
    compare,
    device_note,
    engine_stream,
    r2_gate,
    random_counts,
    torch_stream,
    write_report,
)

DEFAULT_TOLERANCE = 1e-4
DEFAULT_R2_GATE = 0.005
DEFAULT_PARITY_BINS = 300


class ExportError(ValueError):
    """A model or request that cannot be exported (multi-site model, bad parity data, ...)."""


# ---------------------------------------------------------------------- traced wrappers
class StepGraph(nn.Module):
    """``forward(counts (1, N_in), *state) -> (velocity, log_rates, *next_state)`` = ``RPNT.step``."""

    def __init__(self, model: RPNT, keys: list[str], carried: list[str]) -> None:
        super().__init__()
        self.model, self.keys, self.carried = model, keys, carried

    def forward(self, counts: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        out, new = self.model.step(counts, dict(zip(self.keys, state)))
        return (out["velocity"], out["log_rates"], *[new[k] for k in self.carried])


class WindowGraph(nn.Module):
    """``forward(counts (1, T, N_in), meta_bias (1, d)) -> (velocity, log_rates)`` over the window.

    ``RPNT.forward`` for a single-site model, with the metadata bias as an input instead of
    metadata indices (so the graph has no embedding look-ups with range checks)."""

    def __init__(self, model: RPNT) -> None:
        super().__init__()
        self.model = model

    def forward(self, counts: Tensor, meta_bias: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        h = m._embed(counts, None) + meta_bias[:, None, :]
        for blk in m.blocks:
            h = blk(h)
        out = m._heads(m.norm(h))
        return out["velocity"], out["log_rates"]


@contextlib.contextmanager
def _quiet_export():
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
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _torch_export(
    module: nn.Module, args: tuple, input_names: list[str], output_names: list[str]
) -> onnx.ModelProto:
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
def _prepare(model: RPNT) -> RPNT:
    if getattr(model, "_rpnt_export_copy", False):
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
    # A private copy: export must not change the caller's model (device, train/eval mode).
    # Never .to(dtype): the rotary frequency buffers are float64 on purpose.
    model = copy.deepcopy(model).to("cpu").eval()
    model._rpnt_export_copy = True
    return model


def default_window_bins(model: RPNT) -> int:
    return model.receptive_field + 127


def _base_contract(
    model: RPNT, *, meta_bias: np.ndarray, metadata: Mapping[str, Any], checkpoint: str
) -> dict:
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
        meta_bias=meta_bias,
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


def _finish(proto: onnx.ModelProto, contract: ModelContract, path: Path, doc: str) -> None:
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, contract.to_props())
    proto.doc_string = doc
    proto.producer_name = "rpnt"
    proto.producer_version = contract.exporter_version
    onnx.save(proto, str(path))


def export_step_graph(
    model: RPNT,
    path: str | Path,
    *,
    meta_bias: np.ndarray | None = None,
    metadata: Mapping[str, Any] | None = None,
    checkpoint: str = "",
) -> ModelContract:
    """Trace ``RPNT.step`` to ``path`` (static shapes, batch 1) and embed the contract."""
    return _step_graph(model, path, meta_bias=meta_bias, metadata=metadata, checkpoint=checkpoint)[0]


def _step_graph(
    model: RPNT,
    path: str | Path,
    *,
    meta_bias: np.ndarray | None,
    metadata: Mapping[str, Any] | None,
    checkpoint: str,
    template: str | Path | None = None,
) -> tuple[ModelContract, str]:
    """:func:`export_step_graph`, and how the graph was made: ``"traced"``, or ``"template"`` — the
    step graph ``template`` with this model's weights written in (:func:`weights_into_template`),
    when it fits.  A template graph computes the model only if the template's initializers are its
    weights as such (not folded or shared), so its caller must check parity (:func:`export_model`)."""
    model = _prepare(model)
    c = model.config
    shapes = model.state_shapes(1)
    keys = list(shapes)
    with torch.no_grad():
        state = model.init_state(1)
        _, new = model.step(torch.zeros(1, c.n_input_channels), state)
    carried = [
        k for k in keys if new[k] is not state[k]
    ]  # entries step() passes through unchanged have no output
    if meta_bias is None:
        with torch.no_grad():
            meta_bias = model.metadata_bias(None, 1)[0].numpy()
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
    names_in, names_out = [t.name for t in inputs], [t.name for t in outputs]
    proto = None if template is None else weights_into_template(template, model, names_in, names_out)
    source = "template" if proto is not None else "traced"
    if proto is None:
        proto = _torch_export(StepGraph(model, keys, carried), example, names_in, names_out)
    contract = ModelContract(
        graph="step",
        inputs=inputs,
        outputs=outputs,
        state=entries,
        window_bins=0,
        **_base_contract(
            model, meta_bias=np.asarray(meta_bias, np.float32), metadata=metadata or {}, checkpoint=checkpoint
        ),
    )
    _finish(
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
    """The fp32 step graph ``template`` with ``model``'s weights in its initializers, or None when it
    does not fit: unreadable, another graph or precision, another config, other inputs/outputs, or an
    initializer named after a weight (``model.<state key>``, as the traced graph names them) whose
    shape or dtype differs.  Initializers not named after a weight (shape constants, ...) are kept.

    Only the values change, never the graph, so the result computes ``model`` exactly when the
    template's initializers are the weights themselves; an optimiser that folded or shared weights
    in the template breaks that, which only a parity check against ``model`` shows."""
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


def export_window_graph(
    model: RPNT,
    path: str | Path,
    *,
    window_bins: int,
    meta_bias: np.ndarray | None = None,
    metadata: Mapping[str, Any] | None = None,
    checkpoint: str = "",
) -> ModelContract:
    """Trace the full forward over a fixed ``window_bins``-bin window to ``path``."""
    model = _prepare(model)
    c = model.config
    if not isinstance(window_bins, int) or window_bins < 1:
        raise ExportError(f"window_bins: must be a positive integer, got {window_bins!r}")
    if meta_bias is None:
        with torch.no_grad():
            meta_bias = model.metadata_bias(None, 1)[0].numpy()
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
    proto = _torch_export(WindowGraph(model), example, [t.name for t in inputs], [t.name for t in outputs])
    contract = ModelContract(
        graph="window",
        inputs=inputs,
        outputs=outputs,
        window_bins=window_bins,
        **_base_contract(
            model, meta_bias=np.asarray(meta_bias, np.float32), metadata=metadata or {}, checkpoint=checkpoint
        ),
    )
    _finish(
        proto,
        contract,
        Path(path),
        f"RPNT window graph: {window_bins} bins of counts (bin 0 = stream "
        "start) + metadata bias -> velocity, log_rates per bin. Contract in metadata_props (rpnt.*).",
    )
    return contract


# ---------------------------------------------------------------------- the whole export
@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # "step", "window", "step.int8", "step.fp16"
    reports: dict[str, dict] = field(default_factory=dict)  # same keys → parity report
    rejected: dict[str, str] = field(default_factory=dict)  # precision → reason
    contract: ModelContract | None = None
    seconds: float = 0.0
    step_source: str = ""  # "traced", or "template" (weights written into a template step graph)
    timings: dict[str, float] = field(
        default_factory=dict
    )  # seconds per stage (step_graph, step_parity, ...)

    def summary(self) -> str:
        from .parity import format_report

        lines = [f"exported to {self.out_dir} in {self.seconds:.1f} s"]
        if self.contract is not None:
            lines += ["  " + ln for ln in self.contract.describe().splitlines()]
        for key, rep in self.reports.items():
            lines += ["", *format_report(rep).splitlines()]
        for prec, why in self.rejected.items():
            lines.append(f"\n{prec}: NOT written — {why}")
        return "\n".join(lines)


_OUR_FILES = ("rpnt_step.onnx", "rpnt_step.int8.onnx", "rpnt_step.fp16.onnx", WINDOW_FILE, MANIFEST_FILE)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _metadata_tensors(model: RPNT, metadata: Mapping[str, Any]) -> dict[str, Tensor] | None:
    if not metadata:
        return None
    unknown = set(metadata) - set(METADATA_FIELDS)
    if unknown:
        raise ExportError(f"metadata: unknown fields {sorted(unknown)}")
    return model.metadata_for(batch_size=1, **{k: v for k, v in metadata.items() if v is not None})


def _parity_streams(
    c: Any,
    parity_counts: np.ndarray | None,
    parity_target: np.ndarray | None,
    parity_source: str,
    parity_bins: int,
    seed: int,
    log: Callable[[str], None],
) -> list[Stream]:
    """The random stream, plus the held-out end of the real session when one is given."""
    streams = [
        Stream(
            "random", random_counts(parity_bins, c.n_input_channels, seed=seed), None, f"poisson seed {seed}"
        )
    ]
    if parity_counts is not None:
        pc = np.asarray(parity_counts)
        if pc.ndim != 2 or pc.shape[1] != c.n_input_channels:
            raise ExportError(
                f"parity data: counts {pc.shape} do not match the model's (T, {c.n_input_channels}) "
                f"input ({parity_source or 'given array'})"
            )
        tgt = None if parity_target is None else np.asarray(parity_target, dtype=np.float32)
        if tgt is not None and tgt.shape != (pc.shape[0], c.n_outputs):
            log(f"parity data: target {tgt.shape} does not match (T, {c.n_outputs}); R² vs target skipped")
            tgt = None
        lo = max(0, pc.shape[0] - parity_bins)
        streams.append(
            Stream(
                "real",
                pc[lo:].astype(np.float32),
                None if tgt is None else tgt[lo:],
                f"{parity_source} bins [{lo}, {pc.shape[0]})",
            )
        )
    return streams


def export_model(
    model: RPNT,
    out_dir: str | Path,
    *,
    int8: bool = False,
    fp16: bool = False,
    window_bins: int | None = None,
    parity_counts: np.ndarray | None = None,
    parity_target: np.ndarray | None = None,
    parity_source: str = "",
    parity_bins: int = DEFAULT_PARITY_BINS,
    tolerance: float = DEFAULT_TOLERANCE,
    r2_gate_limit: float = DEFAULT_R2_GATE,
    metadata: Mapping[str, Any] | None = None,
    checkpoint: str = "",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    window: bool = True,
    template: str | Path | None = None,
) -> ExportResult:
    """Export ``model`` into ``out_dir`` (see the module docstring); returns what was written.

    ``window=False`` writes the step graph alone (what the daemon runs).  ``template``: a step graph
    of a model with the same config; when it fits, the step graph is it with ``model``'s weights
    written in instead of a new trace (seconds instead of a trace's), and is traced after all if
    that graph fails parity (:func:`_step_graph`).  ``result.step_source`` says which;
    ``result.timings`` holds the seconds of each stage.

    Parity runs over a random stream of ``parity_bins`` bins and, when ``parity_counts`` (T, N_in)
    is given, over its last ``parity_bins`` bins (the held-out end of a session) with
    ``parity_target`` (T, D) as behaviour target.  Raises :class:`ParityError` (nothing is
    published; the failing reports go to ``out_dir/export-failed/``) when a float32 graph is off
    by more than ``tolerance``.  ``int8``/``fp16`` variants are written only if their R² drop is
    ≤ ``r2_gate_limit``; otherwise they are listed in ``result.rejected``.
    """
    t_start = time.perf_counter()
    log = log or (lambda s: None)
    model = _prepare(model)
    c = model.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tolerance <= 0 or r2_gate_limit < 0:
        raise ExportError(f"tolerance/r2_gate: must be positive, got {tolerance}, {r2_gate_limit}")
    if parity_bins < 2:
        raise ExportError(f"parity_bins: need at least 2 bins, got {parity_bins}")
    window_bins = default_window_bins(model) if window_bins is None else int(window_bins)
    metadata = {k: v for k, v in dict(metadata or {}).items() if v not in (None, "")}
    meta_t = _metadata_tensors(model, metadata)
    with torch.no_grad():
        meta_bias = model.metadata_bias(meta_t, 1)[0].numpy().astype(np.float32)

    streams = _parity_streams(c, parity_counts, parity_target, parity_source, parity_bins, seed, log)

    staging = out_dir / f".export-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    result = ExportResult(out_dir=out_dir)
    try:
        # ---- fp32 graphs: step first, checked before the window graph is even traced (fail fast)
        from .runtime import OnnxStepEngine

        def fail(reports: list[dict]) -> None:
            dest = out_dir / "export-failed"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            for f in staging.glob("*.parity.*"):
                os.replace(f, dest / f.name)
            worst = max(
                max(s["max_abs_velocity"], s.get("max_abs_log_rates", 0.0))
                for r in reports
                for s in r["streams"]
            )
            raise ParityError(
                f"parity: {', '.join(r['model'] for r in reports)} differ from the torch model by "
                f"up to {worst:.3g} (tolerance {tolerance:g}); nothing was written to {out_dir} — "
                f"reports in {dest}"
            )

        step_path = staging / step_file("fp32")
        clock = _Stopwatch(result.timings)
        log("parity: torch reference ...")
        with clock("torch_reference"), torch.no_grad():
            refs = [torch_stream(model, s.counts, meta_t) for s in streams]
        for attempt in [template, None] if template is not None else [None]:
            log("exporting step graph" + (" (weights into the template) ..." if attempt else " ..."))
            with clock("step_graph"):
                contract, result.step_source = _step_graph(
                    model,
                    step_path,
                    meta_bias=meta_bias,
                    metadata=metadata,
                    checkpoint=checkpoint,
                    template=attempt,
                )
                graph_checks.assert_graph_ok(step_path, what=step_path.name)
            result.contract = contract
            log("parity: ONNX Runtime step graph ...")
            with clock("step_parity"):
                eng = OnnxStepEngine(step_path, warmup_bins=2)
                rep = _step_report(step_path.name, "fp32", eng, streams, refs, tolerance=tolerance)
                del eng
            if rep["passed"] or result.step_source == "traced":
                break
            log("the template graph failed parity: tracing the step graph")
        write_report(rep, staging / step_path.stem)
        result.reports["step"] = rep
        if not rep["passed"]:
            fail([rep])

        win_path = staging / WINDOW_FILE
        if window:
            with clock("window_graph"):
                _window_graph(
                    model,
                    win_path,
                    window_bins,
                    meta_bias,
                    metadata,
                    checkpoint,
                    streams,
                    refs,
                    result,
                    tolerance=tolerance,
                    log=log,
                )
            if not result.reports["window"]["passed"]:
                fail([result.reports["window"]])

        # ---- publish fp32 (replace any previous export in out_dir)
        for name in _OUR_FILES:
            (out_dir / name).unlink(missing_ok=True)
        for f in out_dir.glob("rpnt_*.parity.*"):
            f.unlink()
        shutil.rmtree(out_dir / "export-failed", ignore_errors=True)
        for f in sorted(staging.iterdir()):
            if f.suffix in (".onnx", ".json", ".txt"):
                os.replace(f, out_dir / f.name)
        result.files["step"] = out_dir / step_path.name
        if window:
            result.files["window"] = out_dir / win_path.name

        # ---- reduced precision
        for prec, wanted in (("int8", int8), ("fp16", fp16)):
            if wanted:
                _reduced_precision(prec, result, staging, streams, refs, r2_gate_limit, log)

        result.seconds = time.perf_counter() - t_start
        _write_manifest(
            result, streams, tolerance=tolerance, r2_gate_limit=r2_gate_limit, checkpoint=checkpoint
        )
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Stopwatch:
    """``with clock("stage"):`` adds the stage's wall seconds to ``timings[stage]``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - t0, 4)


def _window_graph(
    model: RPNT,
    path: Path,
    window_bins: int,
    meta_bias: np.ndarray,
    metadata: Mapping[str, Any],
    checkpoint: str,
    streams: list[Stream],
    refs: list[dict],
    result: ExportResult,
    *,
    tolerance: float,
    log: Callable[[str], None],
) -> None:
    """Trace the window graph to ``path`` and check it against the torch reference (its report in
    ``result.reports["window"]``, written beside it)."""
    from .runtime import OnnxWindowEngine

    log(f"exporting window graph (T={window_bins}) ...")
    export_window_graph(
        model, path, window_bins=window_bins, meta_bias=meta_bias, metadata=metadata, checkpoint=checkpoint
    )
    graph_checks.assert_graph_ok(path, what=path.name)
    log("parity: ONNX Runtime window graph ...")
    weng = OnnxWindowEngine(path)
    rep_w = _window_report(path.name, weng, streams, refs, tolerance=tolerance)
    write_report(rep_w, path.with_suffix(""))
    result.reports["window"] = rep_w


def _reduced_precision(
    prec: str,
    result: ExportResult,
    staging: Path,
    streams: list[Stream],
    refs: list[dict],
    r2_gate_limit: float,
    log: Callable[[str], None],
) -> None:
    """Convert the published fp32 step graph to ``prec``, check it, publish it only if it passes the gate."""
    from . import quantize
    from .runtime import OnnxStepEngine

    out_dir = result.out_dir
    log(f"{prec}: converting and checking ...")
    vpath = staging / step_file(prec)
    if prec == "int8":
        quantize.quantize_int8(result.files["step"], vpath)
    elif prec == "fp16":
        quantize.convert_fp16(result.files["step"], vpath)
        graph_checks.assert_graph_ok(vpath, what=vpath.name)
    else:
        raise ExportError(f"precision: expected 'int8' or 'fp16', got {prec!r}")
    veng = OnnxStepEngine(vpath, warmup_bins=2)
    vrep = _step_report(vpath.name, prec, veng, streams, refs, tolerance=None)
    del veng
    gate = r2_gate(vrep["streams"], r2_gate_limit)
    vrep["gate"] = gate
    vrep["passed"] = vrep["written"] = bool(gate["passed"])
    vrep["note"] = {
        "fp16": (
            "fp16 checked with ONNX Runtime's CPU provider (fp16 kernels where ORT has them, float32 "
            "casts elsewhere); on a GPU the numbers can differ slightly"
        ),
        "int8": "dynamic int8 (weights int8 per channel, 7-bit range; activations uint8 per call); ORT CPU only",
    }[prec]
    write_report(vrep, out_dir / vpath.stem)
    result.reports[f"step.{prec}"] = vrep
    key = f"step.{prec}"
    (out_dir / vpath.name).unlink(missing_ok=True)
    if gate["passed"]:
        os.replace(vpath, out_dir / vpath.name)
        result.files[key] = out_dir / vpath.name
        result.rejected.pop(prec, None)
    else:
        vpath.unlink(missing_ok=True)
        result.files.pop(key, None)
        result.rejected[prec] = (
            f"{gate['metric']} = {gate['value']:.5f} on the {gate['stream']} stream exceeds {gate['limit']:g}"
        )
        log(f"{prec}: NOT written ({result.rejected[prec]})")


def _write_manifest(
    result: ExportResult,
    streams: list[Stream],
    *,
    tolerance: float | None,
    r2_gate_limit: float,
    checkpoint: str,
) -> None:
    path = result.out_dir / MANIFEST_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    c = result.contract
    files = dict(old.get("files", {}))
    for k, p in result.files.items():
        rep = result.reports.get(k) or {}
        files[k] = {
            "file": p.name,
            "sha256": _sha256(p),
            "bytes": p.stat().st_size,
            "precision": rep.get("precision", files.get(k, {}).get("precision")),
            "graph": rep.get("graph", files.get(k, {}).get("graph")),
        }
    for prec in result.rejected:
        files.pop(f"step.{prec}", None)
    rejected = {**old.get("rejected", {}), **result.rejected}
    for k in result.files:
        rejected.pop(k.split(".", 1)[1] if "." in k else "", None)
    manifest = {
        **old,
        "format": "rpnt-export/1",
        "created": old.get("created", c.created if c else ""),
        "weights_sha": c.weights_sha if c else old.get("weights_sha", ""),
        "data_fingerprint": c.data_fingerprint if c else old.get("data_fingerprint", ""),
        "checkpoint": checkpoint or old.get("checkpoint", ""),
        "files": files,
        "rejected": rejected,
        "tolerance": tolerance if tolerance is not None else old.get("tolerance"),
        "r2_gate": r2_gate_limit,
        "parity_streams": [{"stream": s.name, "source": s.source, "n_bins": len(s.counts)} for s in streams],
        "seconds": round(result.seconds, 2),
    }
    if result.step_source:
        manifest["step_source"] = result.step_source
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def add_reduced_precision(
    model: RPNT,
    out_dir: str | Path,
    precision: str,
    *,
    parity_counts: np.ndarray | None = None,
    parity_target: np.ndarray | None = None,
    parity_source: str = "",
    parity_bins: int = DEFAULT_PARITY_BINS,
    r2_gate_limit: float = DEFAULT_R2_GATE,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Add an ``int8``/``fp16`` step graph to an existing export of ``model`` (same gate and
    report as ``export_model(..., int8=True)``); the fp32 export is not redone."""
    from .runtime import read_contract

    t_start = time.perf_counter()
    log = log or (lambda s: None)
    model = _prepare(model)
    out_dir = Path(out_dir)
    fp32 = out_dir / step_file("fp32")
    if not fp32.is_file():
        raise ExportError(f"{out_dir}: no {fp32.name}; run the fp32 export first")
    contract = read_contract(fp32)
    if not same_config(contract.config_json, model.config):
        raise ExportError(f"{fp32}: exported from a model with another config than the one given")
    streams = _parity_streams(
        model.config, parity_counts, parity_target, parity_source, parity_bins, seed, log
    )
    meta_t = _metadata_tensors(model, contract.metadata)
    refs = [torch_stream(model, s.counts, meta_t) for s in streams]
    result = ExportResult(out_dir=out_dir, files={"step": fp32}, contract=contract)
    staging = out_dir / f".export-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _reduced_precision(precision, result, staging, streams, refs, r2_gate_limit, log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.files.pop("step")
    result.seconds = time.perf_counter() - t_start
    _write_manifest(result, streams, tolerance=None, r2_gate_limit=r2_gate_limit, checkpoint="")
    return result


def _step_report(
    name: str,
    precision: str,
    engine: Any,
    streams: list[Stream],
    refs: list[dict],
    *,
    tolerance: float | None,
) -> dict[str, Any]:
    per = [compare(s, ref, engine_stream(engine, s.counts)) for s, ref in zip(streams, refs)]
    passed = True
    if tolerance is not None:
        passed = all(p["max_abs_velocity"] <= tolerance and p["max_abs_log_rates"] <= tolerance for p in per)
    return {
        "model": name,
        "graph": "step",
        "precision": precision,
        "checked_on": device_note(engine),
        "tolerance": tolerance,
        "streams": per,
        "passed": bool(passed),
        "written": bool(passed),
    }


def _window_report(
    name: str, engine: Any, streams: list[Stream], refs: list[dict], *, tolerance: float
) -> dict[str, Any]:
    """Window graph vs the torch *step* reference: exact chunked ``predict`` when T ≥ receptive
    field, else the first T bins of each stream (one window from the stream start)."""
    c = engine.contract
    per = []
    for s, ref in zip(streams, refs):
        if c.window_bins >= c.receptive_field:
            got = engine.predict(s.counts, outputs=(VELOCITY, LOG_RATES))
        else:
            n = min(c.window_bins, len(s.counts))
            win = np.zeros((c.window_bins, c.n_channels), np.float32)
            win[:n] = s.counts[:n]
            o = engine.run(win)
            got = {k: v[:n] for k, v in o.items()}
        per.append(compare(s, ref, got))
    passed = all(p["max_abs_velocity"] <= tolerance and p["max_abs_log_rates"] <= tolerance for p in per)
    return {
        "model": name,
        "graph": "window",
        "precision": "fp32",
        "checked_on": device_note(engine),
        "tolerance": tolerance,
        "streams": per,
        "passed": bool(passed),
        "written": bool(passed),
        "note": (
            f"window T={c.window_bins}; "
            + (
                "chunked exact predict over each stream"
                if c.window_bins >= c.receptive_field
                else "first T bins of each stream"
            )
        ),
    }


def resolve_metadata(stored: Mapping[str, Any] | None, given: Mapping[str, Any], *, force: bool) -> dict:
    """The metadata an export bakes in: the checkpoint's finetuning metadata (``stored``), with the
    fields named in ``given`` replacing theirs.

    A change that names only some of the stored fields is refused without ``force``: the model
    would be served under metadata it was never evaluated with (a subject from the command line,
    the session, task and date left at "unknown").  Naming every stored field, or none, is fine."""
    stored = dict(stored or {})
    given = {k: v for k, v in given.items() if v is not None}
    out = stored | given
    changed = sorted(k for k in given if stored.get(k) != given[k])
    left = sorted(k for k in stored if k not in given)
    if changed and left and not force:
        was = ", ".join(f"{k}={stored[k]!r}" for k in sorted(stored))
        raise ExportError(
            f"metadata: --{changed[0].replace('_', '-')} changes the metadata the model was finetuned "
            f"and evaluated with ({was}) but leaves {', '.join(left)} as stored; give all of "
            f"{', '.join(sorted(stored))}, or --force to export under the mix"
        )
    return out


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    parity_data: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> ExportResult:
    """Load ``checkpoint`` (``.safetensors``) and :func:`export_model` it.

    ``metadata``: what to bake in; ``None`` takes the checkpoint's finetuning metadata, so the
    served model conditions exactly as ``rpnt evaluate`` scored it.  A pretraining checkpoint is
    refused (:func:`rpnt_core.checkpoint.require_trained_head`).  ``parity_data``: a session file
    (``rpnt_core.data.load_session``: .npz/.mat/.nwb) whose counts (and its series of the model's
    target, when it has one of the model's width) form the real parity stream.  Its bin width must
    be the model's (``rpnt_core.data.session.check_bin_width``)."""
    checkpoint = Path(checkpoint)
    model = load_checkpoint(checkpoint)
    try:
        require_trained_head(model.checkpoint_meta, checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    if metadata is None:
        metadata = model.checkpoint_meta.get("metadata") or {}
    counts = target = None
    source = ""
    if parity_data is not None:
        from rpnt_core.data import load_session
        from rpnt_core.data.session import check_bin_width

        sess = load_session(parity_data)
        if sess.counts.ndim != 2:
            raise ExportError(
                f"parity data: {parity_data} is a multi-site session {sess.counts.shape}; "
                "need single-site (T, N) counts"
            )
        if sess.n_channels != model.config.n_input_channels:
            raise ExportError(
                f"parity data: {parity_data} has {sess.n_channels} channels but the model takes "
                f"{model.config.n_input_channels} (config.n_input_channels)"
            )
        check_bin_width(data_bin_s=sess.bin_s, model_bin_s=model.config.bin_s)
        counts, target, source = sess.counts, sess.targets.get(model.config.target), str(parity_data)
    return export_model(
        model,
        out_dir,
        parity_counts=counts,
        parity_target=target,
        parity_source=source,
        checkpoint=str(checkpoint.resolve()),
        metadata=metadata,
        **kwargs,
    )
