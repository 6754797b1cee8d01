"""The stages of an export: each makes one graph, checks it against the torch reference and
stages or publishes it (:func:`exporters.onnx_export.export_model` runs them in order).

- :func:`checked_step_graph` / :func:`checked_window_graph`: the fp32 graphs, held to the
  float32 tolerance; a failure raises :class:`~exporters.parity.ParityError` before anything is
  published;
- :func:`checked_variant`: an int8 / fp16 variant of the published fp32 step graph, written only
  if it passes the R² gate (:func:`~exporters.parity.r2_gate`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rpnt_core.model.rpnt import RPNT

from . import graph_checks
from .contract import WINDOW_FILE, step_file
from .graphs import ExportError, export_window_graph, step_graph
from .parity import Stream, r2_gate, step_report, window_report, write_report
from .publish import ExportResult, fail_parity, publish_variant

Log = Callable[[str], None]

#: The ``note`` of a reduced-precision variant's parity report.
_VARIANT_NOTES = {
    "fp16": (
        "fp16 checked with ONNX Runtime's CPU provider (fp16 kernels where ORT has them, float32 "
        "casts elsewhere); on a GPU the numbers can differ slightly"
    ),
    "int8": "dynamic int8 (weights int8 per channel, 7-bit range; activations uint8 per call); ORT CPU only",
}


class Stopwatch:
    """``with clock("stage"):`` adds the stage's wall seconds to ``timings[stage]``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - t0, 4)


# ---------------------------------------------------------------------- fp32 graphs
@dataclass(frozen=True, kw_only=True)
class Fp32Checks:
    """What the fp32 stages of one export share: the model, what to bake in, the parity streams
    with their torch reference, the staging directory, the tolerance."""

    model: RPNT
    meta_bias: np.ndarray  # (d,) float32
    metadata: dict[str, Any]
    checkpoint: str
    streams: list[Stream]
    refs: list[dict[str, np.ndarray]]
    staging: Path
    out_dir: Path
    tolerance: float
    log: Log
    clock: Stopwatch

    def require_passed(self, report: dict[str, Any]) -> None:
        """Raise :class:`ParityError` (reports to ``export-failed/``) unless ``report`` passed."""
        if not report["passed"]:
            fail_parity([report], staging=self.staging, out_dir=self.out_dir, tolerance=self.tolerance)


def checked_step_graph(job: Fp32Checks, result: ExportResult, template: str | Path | None) -> None:
    """Make the fp32 step graph (from ``template`` when it fits, traced otherwise or if the template
    graph fails parity), check it and stage its report.

    Raises:
        GraphCheckError: the graph breaks the static-graph / op contract.
        ParityError: the traced graph is off by more than the tolerance.
    """
    from .runtime import OnnxStepEngine

    path = job.staging / step_file("fp32")
    for attempt in [template, None] if template is not None else [None]:
        job.log("exporting step graph" + (" (weights into the template) ..." if attempt else " ..."))
        with job.clock("step_graph"):
            result.contract, result.step_source = step_graph(
                job.model,
                path,
                meta_bias=job.meta_bias,
                metadata=job.metadata,
                checkpoint=job.checkpoint,
                template=attempt,
            )
            graph_checks.assert_graph_ok(path, what=path.name)
        job.log("parity: ONNX Runtime step graph ...")
        with job.clock("step_parity"):
            eng = OnnxStepEngine(path, warmup_bins=2)
            rep = step_report(path.name, "fp32", eng, job.streams, job.refs, tolerance=job.tolerance)
            del eng
        if rep["passed"] or result.step_source == "traced":
            break
        job.log("the template graph failed parity: tracing the step graph")
    write_report(rep, job.staging / path.stem)
    result.reports["step"] = rep
    job.require_passed(rep)


def checked_window_graph(job: Fp32Checks, result: ExportResult, window_bins: int) -> None:
    """Trace the window graph, check it against the torch reference and stage its report.

    Raises:
        GraphCheckError, ParityError: as :func:`checked_step_graph`.
    """
    from .runtime import OnnxWindowEngine

    path = job.staging / WINDOW_FILE
    with job.clock("window_graph"):
        job.log(f"exporting window graph (T={window_bins}) ...")
        export_window_graph(
            job.model,
            path,
            window_bins=window_bins,
            meta_bias=job.meta_bias,
            metadata=job.metadata,
            checkpoint=job.checkpoint,
        )
        graph_checks.assert_graph_ok(path, what=path.name)
        job.log("parity: ONNX Runtime window graph ...")
        rep = window_report(path.name, OnnxWindowEngine(path), job.streams, job.refs, tolerance=job.tolerance)
        write_report(rep, path.with_suffix(""))
        result.reports["window"] = rep
    job.require_passed(rep)


# ---------------------------------------------------------------------- reduced precision
def _convert(precision: str, src: Path, dst: Path) -> None:
    """The ``precision`` variant of the fp32 step graph ``src`` into ``dst``."""
    from . import quantize

    if precision == "int8":
        quantize.quantize_int8(src, dst)
    elif precision == "fp16":
        quantize.convert_fp16(src, dst)
        graph_checks.assert_graph_ok(dst, what=dst.name)
    else:
        raise ExportError(f"precision: expected 'int8' or 'fp16', got {precision!r}")


def checked_variant(
    prec: str,
    result: ExportResult,
    staging: Path,
    streams: list[Stream],
    refs: list[dict[str, np.ndarray]],
    r2_gate_limit: float,
    log: Log,
) -> None:
    """Convert the published fp32 step graph to ``prec``, check it, publish it only if it passes the gate."""
    from .runtime import OnnxStepEngine

    log(f"{prec}: converting and checking ...")
    vpath = staging / step_file(prec)
    _convert(prec, result.files["step"], vpath)
    veng = OnnxStepEngine(vpath, warmup_bins=2)
    vrep = step_report(vpath.name, prec, veng, streams, refs, tolerance=None)
    del veng
    gate = r2_gate(vrep["streams"], r2_gate_limit)
    vrep["gate"] = gate
    vrep["passed"] = vrep["written"] = bool(gate["passed"])
    vrep["note"] = _VARIANT_NOTES[prec]
    publish_variant(vrep, vpath, prec, result, log)
