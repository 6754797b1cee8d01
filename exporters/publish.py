"""Publishing an export: staged files into the output directory, the failure path, the manifest.

An export writes every graph and report into a private staging directory first
(:func:`staging_dir`); only graphs that passed their checks are moved into the output directory,
so a failed export leaves a previous one untouched (its reports go to ``DIR/export-failed/``,
:func:`fail_parity`).  ``export.json`` (:func:`write_manifest`) lists what was published: files,
sha256, precision, gate outcomes, parity streams.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .contract import MANIFEST_FILE, STEP_FILE, WINDOW_FILE, ModelContract, step_file
from .parity import ParityError, Report, Stream, format_report, write_report

#: Every file an export writes at the top of its directory (replaced by the next export).
OUR_FILES = (STEP_FILE, step_file("int8"), step_file("fp16"), WINDOW_FILE, MANIFEST_FILE)
FAILED_DIR = "export-failed"


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        out_dir: the export directory.
        files: published graphs by key: ``step``, ``window``, ``step.int8``, ``step.fp16``.
        reports: the parity report of each graph checked, same keys (also for a rejected variant).
        rejected: precision → why its variant was not written (failed the R² gate).
        contract: the fp32 step graph's contract.
        seconds: wall time of the export.
        step_source: ``traced``, or ``template`` (weights written into a template step graph).
        timings: seconds per stage (``torch_reference``, ``step_graph``, ``step_parity``, ...).
    """

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    reports: dict[str, Report] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    contract: ModelContract | None = None
    seconds: float = 0.0
    step_source: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """Human-readable lines: where, how long, the contract, each report, each rejection."""
        lines = [f"exported to {self.out_dir} in {self.seconds:.1f} s"]
        if self.contract is not None:
            lines += ["  " + ln for ln in self.contract.describe().splitlines()]
        for rep in self.reports.values():
            lines += ["", *format_report(rep).splitlines()]
        for prec, why in self.rejected.items():
            lines.append(f"\n{prec}: NOT written — {why}")
        return "\n".join(lines)


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh private staging directory inside ``out_dir``, removed on exit (whatever happens)."""
    staging = out_dir / f".export-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fail_parity(reports: Sequence[Report], *, staging: Path, out_dir: Path, tolerance: float) -> NoReturn:
    """Move the staged reports to ``out_dir/export-failed/`` and raise.

    Raises:
        ParityError: always, naming the graphs, the worst error and where the reports are.
    """
    dest = out_dir / FAILED_DIR
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    for f in staging.glob("*.parity.*"):
        os.replace(f, dest / f.name)
    worst = max(
        max(s["max_abs_velocity"], s.get("max_abs_log_rates", 0.0)) for r in reports for s in r["streams"]
    )
    raise ParityError(
        f"parity: {', '.join(r['model'] for r in reports)} differ from the torch model by "
        f"up to {worst:.3g} (tolerance {tolerance:g}); nothing was written to {out_dir} — "
        f"reports in {dest}"
    )


def publish_fp32(staging: Path, result: ExportResult, *, window: bool) -> None:
    """Replace any previous export in ``result.out_dir`` with the staged fp32 graphs and reports."""
    out_dir = result.out_dir
    for name in OUR_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for f in out_dir.glob("rpnt_*.parity.*"):
        f.unlink()
    shutil.rmtree(out_dir / FAILED_DIR, ignore_errors=True)
    for f in sorted(staging.iterdir()):
        if f.suffix in (".onnx", ".json", ".txt"):
            os.replace(f, out_dir / f.name)
    result.files["step"] = out_dir / STEP_FILE
    if window:
        result.files["window"] = out_dir / WINDOW_FILE


def publish_variant(
    report: Report, path: Path, precision: str, result: ExportResult, log: Callable[[str], None]
) -> None:
    """Write the report of a checked reduced-precision graph ``path``; publish the graph if it
    passed its gate (``report["gate"]``), else delete it and record why in ``result.rejected``."""
    out_dir = result.out_dir
    gate = report["gate"]
    write_report(report, out_dir / path.stem)
    key = f"step.{precision}"
    result.reports[key] = report
    (out_dir / path.name).unlink(missing_ok=True)
    if gate["passed"]:
        os.replace(path, out_dir / path.name)
        result.files[key] = out_dir / path.name
        result.rejected.pop(precision, None)
    else:
        path.unlink(missing_ok=True)
        result.files.pop(key, None)
        result.rejected[precision] = (
            f"{gate['metric']} = {gate['value']:.5f} on the {gate['stream']} stream exceeds {gate['limit']:g}"
        )
        log(f"{precision}: NOT written ({result.rejected[precision]})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_files(result: ExportResult, old: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``files``: the previous entries, updated by this run's files and rejections."""
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
    return files


def write_manifest(
    result: ExportResult,
    streams: Sequence[Stream],
    *,
    tolerance: float | None,
    r2_gate_limit: float,
    checkpoint: str,
) -> None:
    """Write (or update) ``export.json`` in ``result.out_dir`` for what this run published.

    Entries of an earlier run that this one did not redo are kept (adding a variant to an export
    keeps its fp32 entries); ``tolerance=None`` keeps the earlier tolerance.
    """
    path = result.out_dir / MANIFEST_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    c = result.contract
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
        "files": _manifest_files(result, old),
        "rejected": rejected,
        "tolerance": tolerance if tolerance is not None else old.get("tolerance"),
        "r2_gate": r2_gate_limit,
        "parity_streams": [{"stream": s.name, "source": s.source, "n_bins": len(s.counts)} for s in streams],
        "seconds": round(result.seconds, 2),
    }
    if result.step_source:
        manifest["step_source"] = result.step_source
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
