"""Parity of an exported graph with the torch model, and the report written beside the model.

Every export runs it before reporting success (:mod:`exporters.onnx_export`):

- the **reference** is the torch model run step by step (``RPNT.step`` from ``init_state``) over
  each stream — the exact streaming semantics the daemon has;
- the **engine** is the exported graph in ONNX Runtime (:class:`~exporters.runtime.OnnxStepEngine`
  for step graphs, :class:`~exporters.runtime.OnnxWindowEngine` for the window graph);
- per stream: max abs error of velocity and log-rates, R² of engine vs torch outputs (pooled,
  variance-weighted — :func:`rpnt_core.evaluate.metrics.r2_score`), and, when the stream has a
  behaviour target, R² vs the target for torch and engine and their difference.

Float32 graphs fail (:class:`ParityError`) when a max abs error exceeds the tolerance (1e-4 by
default).  Reduced-precision graphs are not held to an abs tolerance; they pass the **R² gate**:
the drop in R² vs the fp32 torch model on the held-out stream must be ≤ ``r2_gate`` (0.005) —
against the behaviour target when the stream has one and the fp32 model decodes it (R² > 0),
else against the fp32 outputs (``1 − R²(fp32 outputs, engine outputs)``).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rpnt_core.evaluate.metrics import r2_score
from rpnt_core.model.rpnt import RPNT

from .contract import LOG_RATES, VELOCITY

if TYPE_CHECKING:
    from .engine_base import StepEngineBase
    from .runtime import OnnxWindowEngine

#: A parity report (JSON-ready): model, graph, precision, checked_on, tolerance, streams (one
#: :func:`compare` dict each), passed, written; reduced precision adds gate and note.
Report = dict[str, Any]


class ParityError(RuntimeError):
    """The exported graph disagrees with the torch model beyond the tolerance."""


@dataclass
class Stream:
    """A named stream of counts (T, N) with an optional behaviour target (T, D)."""

    name: str
    counts: np.ndarray
    target: np.ndarray | None = None
    source: str = ""


def random_counts(n_bins: int, n_channels: int, *, seed: int = 0) -> np.ndarray:
    """Poisson counts with heterogeneous, slowly modulated rates (T, N) float32: spike-like input
    with silent channels, bursts and a few high-rate units (0–~20 spikes/bin)."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.2, 1.0, size=n_channels)  # mean ~1.2 spikes/bin, heavy right tail
    base[rng.random(n_channels) < 0.05] = 0.0  # some silent channels
    t = np.arange(n_bins)[:, None]
    phase = rng.uniform(0, 2 * np.pi, size=n_channels)
    period = rng.uniform(20, 200, size=n_channels)
    mod = 1.0 + 0.6 * np.sin(2 * np.pi * t / period + phase)  # (T, N)
    return rng.poisson(base * mod).astype(np.float32)


@torch.no_grad()
def torch_stream(
    model: RPNT, counts: np.ndarray, metadata: Mapping[str, torch.Tensor] | None = None
) -> dict[str, np.ndarray]:
    """The torch model stepped over ``counts`` (T, N) from an empty state."""
    x = torch.from_numpy(np.asarray(counts, dtype=np.float32))
    state = model.init_state(1, metadata)
    vel, rates = [], []
    for t in range(x.shape[0]):
        out, state = model.step(x[t : t + 1], state)
        vel.append(out["velocity"][0])
        rates.append(out["log_rates"][0])
    return {VELOCITY: torch.stack(vel).numpy(), LOG_RATES: torch.stack(rates).numpy()}


def engine_stream(engine: StepEngineBase, counts: np.ndarray) -> dict[str, np.ndarray]:
    """A step engine (ONNX Runtime, OpenVINO) stepped over ``counts`` (T, N) from ``reset()``.

    Returns:
        ``{"velocity": (T, D), "log_rates": (T, N_model)}``.
    """
    engine.reset()
    vel, rates = [], []
    for t in range(counts.shape[0]):
        o = engine.step_outputs(counts[t])
        vel.append(o[VELOCITY])
        rates.append(o[LOG_RATES])
    return {VELOCITY: np.stack(vel), LOG_RATES: np.stack(rates)}


def _r2(y: np.ndarray, yhat: np.ndarray) -> float | None:
    try:
        return r2_score(y, yhat)
    except ValueError:  # zero-variance reference dimension: R² undefined
        return None


def compare(stream: Stream, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per-stream parity numbers (JSON-ready)."""
    n = min(len(ref[VELOCITY]), len(got[VELOCITY]))
    rv, gv = ref[VELOCITY][:n], got[VELOCITY][:n]
    out: dict[str, Any] = {
        "stream": stream.name,
        "source": stream.source,
        "n_bins": int(n),
        "max_abs_velocity": float(np.max(np.abs(rv - gv))) if n else 0.0,
        "r2_velocity_vs_torch": _r2(rv, gv),
        "r2_target_torch": None,
        "r2_target_engine": None,
        "r2_target_delta": None,
    }
    if LOG_RATES in got and LOG_RATES in ref:
        rr, gr = ref[LOG_RATES][:n], got[LOG_RATES][:n]
        out["max_abs_log_rates"] = float(np.max(np.abs(rr - gr))) if n else 0.0
        out["r2_log_rates_vs_torch"] = _r2(rr.reshape(n, -1), gr.reshape(n, -1))
    if stream.target is not None and stream.target.shape == (len(stream.counts), rv.shape[1]):
        tgt = stream.target[:n]
        a, b = _r2(tgt, rv), _r2(tgt, gv)
        out.update(
            r2_target_torch=a, r2_target_engine=b, r2_target_delta=None if a is None or b is None else b - a
        )
    return out


def r2_gate(streams: list[dict[str, Any]], limit: float) -> dict[str, Any]:
    """The reduced-precision gate over the per-stream numbers (see module docstring).

    The held-out stream is the last one (the real data stream when one was given).  The gate is
    the R² drop vs the behaviour target when the stream has one *and* the fp32 model has skill on
    it (R² > 0); otherwise the R² loss vs the fp32 outputs (a model without skill — e.g. a
    pretrained checkpoint whose velocity head is untrained, R² ≪ 0 — makes R² differences vs the
    target meaningless: they scale with 1/variance of the target, not with the precision loss)."""
    s = streams[-1]
    note = ""
    if s.get("r2_target_delta") is not None and (s.get("r2_target_torch") or 0.0) > 0.0:
        metric, drop = "r2_drop_vs_target", -float(s["r2_target_delta"])
    else:
        if s.get("r2_target_delta") is not None:
            note = (
                f"fp32 R² vs target is {s['r2_target_torch']:.3g} (no skill): gated on R² vs the fp32 "
                "outputs instead"
            )
        r2 = s.get("r2_velocity_vs_torch")
        metric, drop = "r2_loss_vs_fp32_outputs", (float("inf") if r2 is None else 1.0 - float(r2))
    out = {
        "metric": metric,
        "stream": s["stream"],
        "value": drop,
        "limit": float(limit),
        "passed": drop <= limit,
    }
    if note:
        out["note"] = note
    return out


def device_note(engine: StepEngineBase | OnnxWindowEngine) -> str:
    """What checked a graph: runtime, version, provider and CPU (the report's ``checked_on``)."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    if getattr(engine, "backend", "") == "openvino-cpu":
        import openvino

        return f"openvino {openvino.__version__} CPU on {cpu} ({platform.system()})"
    provs = engine.session.get_providers() if hasattr(engine, "session") else ["torch"]
    return f"onnxruntime {ort.__version__} {provs[0]} on {cpu} ({platform.system()})"


def step_report(
    name: str,
    precision: str,
    engine: StepEngineBase,
    streams: Sequence[Stream],
    refs: Sequence[Mapping[str, np.ndarray]],
    *,
    tolerance: float | None,
) -> Report:
    """The step graph in ``engine`` stepped over each stream vs the torch reference ``refs``.

    Args:
        name: the graph's file name (the report's ``model``).
        precision: ``fp32`` | ``int8`` | ``fp16``.
        engine: the graph loaded (its state is reset per stream).
        streams, refs: the parity streams and :func:`torch_stream` over each, in the same order.
        tolerance: max abs error of velocity and log-rates for ``passed``; None: not held to one
            (reduced precision, gated by :func:`r2_gate` instead).
    """
    per = [compare(s, ref, engine_stream(engine, s.counts)) for s, ref in zip(streams, refs, strict=True)]
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


def window_report(
    name: str,
    engine: OnnxWindowEngine,
    streams: Sequence[Stream],
    refs: Sequence[Mapping[str, np.ndarray]],
    *,
    tolerance: float,
) -> Report:
    """The window graph vs the torch *step* reference, as :func:`step_report` (fp32 only).

    Exact chunked ``predict`` when T ≥ receptive field, else the first T bins of each stream (one
    window from the stream start).
    """
    c = engine.contract
    exact = c.window_bins >= c.receptive_field
    per = []
    for s, ref in zip(streams, refs, strict=True):
        if exact:
            got = engine.predict_outputs(s.counts, outputs=(VELOCITY, LOG_RATES))
        else:
            n = min(c.window_bins, len(s.counts))
            win = np.zeros((c.window_bins, c.n_channels), np.float32)
            win[:n] = s.counts[:n]
            got = {k: v[:n] for k, v in engine.run(win).items()}
        per.append(compare(s, ref, got))
    passed = all(p["max_abs_velocity"] <= tolerance and p["max_abs_log_rates"] <= tolerance for p in per)
    how = "chunked exact predict over each stream" if exact else "first T bins of each stream"
    return {
        "model": name,
        "graph": "window",
        "precision": "fp32",
        "checked_on": device_note(engine),
        "tolerance": tolerance,
        "streams": per,
        "passed": bool(passed),
        "written": bool(passed),
        "note": f"window T={c.window_bins}; {how}",
    }


def write_report(report: Mapping[str, Any], stem: Path) -> tuple[Path, Path]:
    """``<stem>.parity.json`` and ``<stem>.parity.txt`` (a short human summary)."""
    jpath = stem.with_name(stem.name + ".parity.json")
    tpath = stem.with_name(stem.name + ".parity.txt")
    jpath.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    tpath.write_text(format_report(report) + "\n")
    return jpath, tpath


def _f(x: Any, fmt: str = ".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_report(r: Mapping[str, Any]) -> str:
    """A parity report as a few human-readable lines."""
    lines = [
        f"{r['model']}: {r['graph']} graph, {r['precision']} — "
        f"{'PASSED' if r['passed'] else 'FAILED'}" + ("" if r.get("written", True) else " (NOT written)"),
        f"checked on: {r['checked_on']}",
    ]
    if r.get("tolerance") is not None:
        lines.append(f"tolerance: max abs ≤ {r['tolerance']:g} (velocity and log-rates)")
    for s in r["streams"]:
        line = (
            f"  {s['stream']:<8} {s['n_bins']:>5} bins  max|Δ| velocity {_f(s['max_abs_velocity'])}"
            f"  log-rates {_f(s.get('max_abs_log_rates'))}  R² vs torch {_f(s['r2_velocity_vs_torch'], '.6f')}"
        )
        if s.get("r2_target_delta") is not None:
            line += (
                f"  R² vs target: torch {_f(s['r2_target_torch'], '.4f')} engine "
                f"{_f(s['r2_target_engine'], '.4f')} (Δ {s['r2_target_delta']:+.5f})"
            )
        lines.append(line)
    g = r.get("gate")
    if g:
        lines.append(
            f"R² gate: {g['metric']} on {g['stream']} = {g['value']:.5f} "
            f"(limit {g['limit']:g}) → {'pass' if g['passed'] else 'FAIL'}"
            + (f" — {g['note']}" if g.get("note") else "")
        )
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    return "\n".join(lines)
