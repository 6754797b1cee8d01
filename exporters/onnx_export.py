"""Export an RPNT checkpoint to ONNX: a step graph, a window graph, parity, reduced precision.

Output directory (``rpnt export CKPT --out DIR``)::

    DIR/rpnt_step.onnx              step graph, fp32: one bin + state → outputs + next state
    DIR/rpnt_window.onnx            window graph, fp32: a fixed T-bin window (offline/batch)
    DIR/rpnt_step.int8.onnx         --int8, only if it passed the R² gate (ORT CPU only)
    DIR/rpnt_step.fp16.onnx         --fp16, only if it passed the R² gate (for GPUs)
    DIR/<model>.parity.json|.txt    parity report of each graph (also for rejected variants)
    DIR/export.json                 manifest: files, sha256, precision, gate outcomes

This module checks an export's inputs and runs it in order — torch reference, step graph and
its parity, window graph and its parity, publish, reduced-precision variants, manifest — over
the pieces that do each job: :mod:`exporters.graphs` (tracing), :mod:`exporters.stages` (each
graph made and checked), :mod:`exporters.parity` (reports and the R² gate),
:mod:`exporters.quantize` (int8 / fp16) and :mod:`exporters.publish` (staging, publishing,
manifest).  The graphs themselves (I/O, opset, exporter) are described in :mod:`exporters.graphs`;
their names (``export_step_graph``, ``ExportError``, ...) are importable from here too.

Metadata bias
-------------
The metadata bias for the export's metadata (``--subject/--session/--task/--date-days``; all
unknown by default) is baked into the file's **metadata** (``rpnt.meta_bias``), not the graph:
engines use it as the initial ``state.meta_bias`` on ``reset()`` and may be given another.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from rpnt_core.checkpoint import CheckpointError, load_checkpoint, require_trained_head
from rpnt_core.config import RPNTConfig, same_config
from rpnt_core.data.session import METADATA_FIELDS
from rpnt_core.model.rpnt import RPNT

from .contract import DEFAULT_PARITY_BINS, DEFAULT_R2_GATE, DEFAULT_TOLERANCE, step_file
from .graphs import (
    ExportError,
    default_window_bins,
    export_step_graph,
    export_window_graph,
    prepare_model,
    weights_into_template,
)
from .parity import Stream, random_counts, torch_stream
from .publish import ExportResult, publish_fp32, staging_dir, write_manifest
from .stages import Fp32Checks, Log, Stopwatch, checked_step_graph, checked_variant, checked_window_graph

__all__ = [
    "ExportError",
    "ExportResult",
    "add_reduced_precision",
    "export_checkpoint",
    "export_model",
    "export_step_graph",
    "export_window_graph",
    "resolve_metadata",
    "weights_into_template",
]


def _no_log(msg: str) -> None:
    """The default ``log``: say nothing."""


# ---------------------------------------------------------------------- inputs of an export
def _metadata_tensors(model: RPNT, metadata: Mapping[str, Any]) -> dict[str, Tensor] | None:
    """``metadata`` (names) as the model's metadata index tensors; None when empty.

    Raises:
        ExportError: a field that is not one of ``METADATA_FIELDS``.
    """
    if not metadata:
        return None
    unknown = set(metadata) - set(METADATA_FIELDS)
    if unknown:
        raise ExportError(f"metadata: unknown fields {sorted(unknown)}")
    return model.metadata_for(batch_size=1, **{k: v for k, v in metadata.items() if v is not None})


def _baked_metadata(
    model: RPNT, metadata: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Tensor] | None, np.ndarray]:
    """The metadata an export bakes in (empty values dropped), as the model's index tensors, and
    its metadata bias (d,) float32."""
    baked = {k: v for k, v in dict(metadata or {}).items() if v not in (None, "")}
    meta_t = _metadata_tensors(model, baked)
    with torch.no_grad():
        meta_bias = model.metadata_bias(meta_t, 1)[0].numpy().astype(np.float32)
    return baked, meta_t, meta_bias


def _parity_streams(
    c: RPNTConfig,
    parity_counts: np.ndarray | None,
    parity_target: np.ndarray | None,
    parity_source: str,
    parity_bins: int,
    seed: int,
    log: Log,
) -> list[Stream]:
    """The random stream, plus the held-out end (last ``parity_bins`` bins) of the real session
    when one is given; a target of the wrong shape is dropped with a log line.

    Raises:
        ExportError: ``parity_counts`` is not (T, ``c.n_input_channels``).
    """
    streams = [
        Stream(
            "random", random_counts(parity_bins, c.n_input_channels, seed=seed), None, f"poisson seed {seed}"
        )
    ]
    if parity_counts is None:
        return streams
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
    real = Stream(
        "real",
        pc[lo:].astype(np.float32),
        None if tgt is None else tgt[lo:],
        f"{parity_source} bins [{lo}, {pc.shape[0]})",
    )
    return [*streams, real]


# ---------------------------------------------------------------------- the whole export
def _check_limits(*, tolerance: float, r2_gate_limit: float, parity_bins: int) -> None:
    if tolerance <= 0 or r2_gate_limit < 0:
        raise ExportError(f"tolerance/r2_gate: must be positive, got {tolerance}, {r2_gate_limit}")
    if parity_bins < 2:
        raise ExportError(f"parity_bins: need at least 2 bins, got {parity_bins}")


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
    log: Log | None = None,
    window: bool = True,
    template: str | Path | None = None,
) -> ExportResult:
    """Export ``model`` into ``out_dir`` (see the module docstring); returns what was written.

    ``window=False`` writes the step graph alone (what the daemon runs).  ``template``: a step graph
    of a model with the same config; when it fits, the step graph is it with ``model``'s weights
    written in instead of a new trace, and is traced after all if that graph fails parity
    (``result.step_source`` says which; ``result.timings`` holds the seconds of each stage).

    Parity runs over a random stream of ``parity_bins`` bins and, when ``parity_counts`` (T, N_in)
    is given, over its last ``parity_bins`` bins (the held-out end of a session) with
    ``parity_target`` (T, D) as behaviour target.  Raises :class:`~exporters.parity.ParityError`
    (nothing is published; the failing reports go to ``out_dir/export-failed/``) when a float32
    graph is off by more than ``tolerance``.  ``int8``/``fp16`` variants are written only if their
    R² drop is ≤ ``r2_gate_limit``; otherwise they are listed in ``result.rejected``.
    """
    t_start = time.perf_counter()
    log = log or _no_log
    model = prepare_model(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_limits(tolerance=tolerance, r2_gate_limit=r2_gate_limit, parity_bins=parity_bins)
    window_bins = default_window_bins(model) if window_bins is None else int(window_bins)
    metadata, meta_t, meta_bias = _baked_metadata(model, metadata)
    streams = _parity_streams(
        model.config, parity_counts, parity_target, parity_source, parity_bins, seed, log
    )
    result = ExportResult(out_dir=out_dir)
    with staging_dir(out_dir) as staging:
        clock = Stopwatch(result.timings)
        log("parity: torch reference ...")
        with clock("torch_reference"), torch.no_grad():
            refs = [torch_stream(model, s.counts, meta_t) for s in streams]
        job = Fp32Checks(
            model=model,
            meta_bias=meta_bias,
            metadata=metadata,
            checkpoint=checkpoint,
            streams=streams,
            refs=refs,
            staging=staging,
            out_dir=out_dir,
            tolerance=tolerance,
            log=log,
            clock=clock,
        )
        checked_step_graph(job, result, template)  # fail fast: before the window graph is traced
        if window:
            checked_window_graph(job, result, window_bins)
        publish_fp32(staging, result, window=window)
        for prec in [p for p, wanted in (("int8", int8), ("fp16", fp16)) if wanted]:
            checked_variant(prec, result, staging, streams, refs, r2_gate_limit, log)
        result.seconds = time.perf_counter() - t_start
        write_manifest(
            result, streams, tolerance=tolerance, r2_gate_limit=r2_gate_limit, checkpoint=checkpoint
        )
    return result


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
    log: Log | None = None,
) -> ExportResult:
    """Add an ``int8``/``fp16`` step graph to an existing export of ``model`` (same gate and
    report as ``export_model(..., int8=True)``); the fp32 export is not redone.

    Raises:
        ExportError: ``out_dir`` has no fp32 step graph, or one of a model with another config.
    """
    from .model_files import read_contract  # onnxruntime only on this path

    t_start = time.perf_counter()
    log = log or _no_log
    model = prepare_model(model)
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
    with staging_dir(out_dir) as staging:
        checked_variant(precision, result, staging, streams, refs, r2_gate_limit, log)
    result.files.pop("step")
    result.seconds = time.perf_counter() - t_start
    write_manifest(result, streams, tolerance=None, r2_gate_limit=r2_gate_limit, checkpoint="")
    return result


# ---------------------------------------------------------------------- from a checkpoint
def resolve_metadata(
    stored: Mapping[str, Any] | None, given: Mapping[str, Any], *, force: bool
) -> dict[str, Any]:
    """The metadata an export bakes in: the checkpoint's finetuning metadata (``stored``), with the
    fields named in ``given`` replacing theirs.

    A change that names only some of the stored fields is refused without ``force``: the model
    would be served under metadata it was never evaluated with (a subject from the command line,
    the session, task and date left at "unknown").  Naming every stored field, or none, is fine.

    Raises:
        ExportError: a partial change without ``force``.
    """
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


def _parity_session(parity_data: str | Path, model: RPNT) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(counts (T, N), the model's target series or None, source) of a session file for parity.

    Raises:
        ExportError: a multi-site session, or another channel count than the model's.
        ValueError: another bin width than the model's.
    """
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
    return sess.counts, sess.targets.get(model.config.target), str(parity_data)


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
    be the model's (``rpnt_core.data.session.check_bin_width``).  ``kwargs``: as
    :func:`export_model`."""
    checkpoint = Path(checkpoint)
    model = load_checkpoint(checkpoint)
    meta = cast("dict[str, Any]", model.checkpoint_meta)  # set by load_checkpoint
    try:
        require_trained_head(meta, checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    if metadata is None:
        metadata = meta.get("metadata") or {}
    counts, target, source = None, None, ""
    if parity_data is not None:
        counts, target, source = _parity_session(parity_data, model)
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
