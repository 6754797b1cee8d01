"""The replay report: R² against the recorded velocity, exact latency percentiles per stage and end
to end, bins lost, flags; written as ``report.json`` plus two PNG plots and the raw arrays.

Stages (exact percentiles over the received bins, in ms)::

    ingest        client send of the bin-closing packet → daemon took it off its socket   (two clocks*)
    parse         daemon: off the socket → bin counts final
    infer         daemon: counts final → decoder.step returned                       (the model)
    publish       daemon: step returned → prediction stamped for sending
    deliver       daemon stamp → client took the prediction off its socket          (two clocks*)
    daemon        daemon: off the socket → stamped for sending (parse + infer + publish)
    daemon_overhead  daemon − infer, per bin: what the daemon adds to the model
    end_to_end    client send of the bin-closing packet → client receipt of the prediction (one clock)

(*) the client's and the daemon's CLOCK_MONOTONIC: comparable only when both run on one host
(always, with the loopback endpoints this project binds by default).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .latency import percentiles_ms
from .protocol import PredFlag
from .replay import ReplayResult

STAGE_ORDER = ("ingest", "parse", "infer", "publish", "deliver", "daemon", "daemon_overhead", "end_to_end")


def timed_bins(res: ReplayResult) -> np.ndarray:
    """(T,) bool: the bins whose stage durations mean something -- received, and closed by their
    packet.  STALLED bins are left out: the deadline, not the replay's packet, closed them (their
    packet came later, or never), so "send → receipt" means nothing for them; they are counted in the
    report's flags instead."""
    return res.received & ((res.flags & int(PredFlag.STALLED)) == 0)


def stage_arrays(res: ReplayResult, *, per_bin: bool = False) -> dict[str, np.ndarray]:
    """Per-bin stage durations in ns over the :func:`timed_bins` (each (T',) int64); ``per_bin``:
    over every bin instead (each (T,) int64, −1 where the bin is not timed)."""
    if per_bin:
        timed = timed_bins(res)
        full = stage_arrays(res)
        out = {}
        for k, v in full.items():
            col = np.full(res.n_bins, -1, np.int64)
            col[timed] = v
            out[k] = col
        return out
    r = timed_bins(res)
    send, recv = res.t_send[r], res.t_client_recv[r]
    d_recv, d_close, d_infer, d_pub = (res.t_daemon[r, i] for i in range(4))
    return {
        "ingest": d_recv - send,
        "parse": d_close - d_recv,
        "infer": d_infer - d_close,
        "publish": d_pub - d_infer,
        "deliver": recv - d_pub,
        "daemon": d_pub - d_recv,
        "daemon_overhead": (d_pub - d_recv) - (d_infer - d_close),
        "end_to_end": recv - send,
    }


def _r2(recorded: np.ndarray, pred: np.ndarray) -> dict:
    from rpnt_core.evaluate.metrics import r2_per_dim, r2_score

    try:
        return {
            "r2": float(r2_score(recorded, pred)),
            "r2_per_dim": [float(x) for x in r2_per_dim(recorded, pred)],
        }
    except ValueError as exc:
        return {"r2": None, "r2_error": str(exc)}


#: the daemon status fields a report repeats
_DAEMON_FIELDS = (
    "model_version",
    "fingerprint",
    "decoder",
    "n_channels",
    "n_outputs",
    "bin_ns",
    "ingest",
    "publish",
)
_LATENCY_NOTE = (
    "ingest/deliver compare the client's and the daemon's CLOCK_MONOTONIC (same host); "
    "end_to_end is one clock: client send of the bin-closing packet → client receipt of "
    "the prediction; STALLED bins are not in the latency statistics (see flags)"
)


def build_report(
    res: ReplayResult,
    *,
    recorded_velocity: np.ndarray | None = None,
    meta: dict | None = None,
    daemon_snapshot: dict | None = None,
    test_range: tuple[int, int] | None = None,
) -> dict:
    """The report as a plain dict (what ``report.json`` holds).

    Args:
        res: the replay's result.
        recorded_velocity: (T, D) the recorded series to score the predictions against (``score``).
        meta: entries copied in first (what was replayed, how the daemon ran).
        daemon_snapshot: the daemon's snapshot after the replay, kept as ``daemon_snapshot``.
        test_range: also score bins [lo, hi) of the replayed range alone (``score_test``;
            ``rpnt evaluate``'s test split when replaying from bin 0).
    """
    r = res.received
    flags = res.flags[r]
    rep: dict = {
        "format": "rpnt-replay-report/1",
        **(meta or {}),
        "pace": res.pace,
        "bin_ms": res.bin_ns / 1e6,
        "bins": res.n_bins,
        "bins_received": int(r.sum()),
        "bins_lost": res.bins_lost,
        "events_sent": int(res.events_sent),
        "wall_s": res.wall_s,
        "flags": {f.name.lower(): int(((flags & f) != 0).sum()) for f in PredFlag},
        "model_versions": res.model_versions,
        "decoder_generations": res.generations,
        "daemon": {k: res.status.get(k) for k in _DAEMON_FIELDS},
        "latency_ms": {k: percentiles_ms(v) for k, v in stage_arrays(res).items()},
        "latency_note": _LATENCY_NOTE,
        "notes": list(res.notes),
    }
    if res.extra_predictions:
        rep["extra_predictions_ignored"] = int(res.extra_predictions)
    if recorded_velocity is not None and r.any():
        rep.update(_scores(res, np.asarray(recorded_velocity, dtype=np.float64), test_range))
    if daemon_snapshot is not None:
        rep["daemon_snapshot"] = daemon_snapshot
    return rep


def _scores(res: ReplayResult, rec: np.ndarray, test_range: tuple[int, int] | None) -> dict:
    """``score``: R² of the received bins against ``rec`` (T, D); ``score_test``: of those in ``test_range``."""
    r = res.received
    d = min(rec.shape[1], res.velocity.shape[1])
    out = {
        "score": {
            **_r2(rec[r, :d], res.velocity[r, :d]),
            "bins_scored": int(r.sum()),
            "convention": "pooled over the received bins, variance-weighted across dims "
            "(rpnt_core.evaluate.metrics.r2_score)",
        }
    }
    if test_range is not None:
        lo, hi = test_range
        m = np.zeros_like(r)
        m[lo:hi] = True
        m &= r
        if m.any():
            out["score_test"] = {
                **_r2(rec[m, :d], res.velocity[m, :d]),
                "bins": [int(lo), int(hi)],
                "bins_scored": int(m.sum()),
            }
    return out


def plot_velocity(
    path: Path, res: ReplayResult, recorded: np.ndarray | None, *, max_seconds: float = 60.0
) -> None:
    """PNG at ``path``: per output dimension, decoded vs ``recorded`` (T, D) over the first ``max_seconds``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(res.n_bins, max(1, int(max_seconds * 1e9 / res.bin_ns)))
    t = np.arange(n) * res.bin_ns / 1e9
    D = res.velocity.shape[1]
    fig, axes = plt.subplots(D, 1, figsize=(10, 2.2 * D + 0.6), sharex=True, squeeze=False)
    for d in range(D):
        ax = axes[d, 0]
        if recorded is not None and d < recorded.shape[1]:
            ax.plot(t, recorded[:n, d], lw=1.0, color="0.3", label="recorded")
        ax.plot(t, res.velocity[:n, d], lw=1.0, color="tab:red", label="decoded (daemon)")
        ax.set_ylabel(f"velocity[{d}]")
        if d == 0:
            ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel(f"time (s), first {n} bins of {res.n_bins}")
    fig.suptitle("decoded vs recorded velocity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(path: Path, res: ReplayResult) -> None:
    """PNG at ``path``: histograms (log counts) of the main stages' per-bin latency, over the timed bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = stage_arrays(res)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    series = [
        ("end_to_end", "tab:red"),
        ("daemon", "tab:blue"),
        ("infer", "tab:green"),
        ("ingest", "tab:orange"),
        ("deliver", "tab:purple"),
    ]
    vals = [st[k] / 1e6 for k, _ in series if st[k].size]
    if vals:
        hi = max(float(np.quantile(v, 0.999)) for v in vals) * 1.2 + 1e-3
        bins = np.linspace(0, hi, 120)
        for k, c in series:
            v = st[k] / 1e6
            if v.size:
                p99 = float(np.quantile(v, 0.99))
                ax.hist(
                    np.clip(v, 0, hi),
                    bins=bins,
                    histtype="step",
                    color=c,
                    lw=1.2,
                    label=f"{k} (p50 {np.median(v):.3f}, p99 {p99:.3f} ms)",
                )
        ax.set_yscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("bins")
    ax.set_title(f"per-stage latency, {int(res.received.sum())} bins, {res.pace} pace")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out_dir: str | Path, report: dict, res: ReplayResult, recorded_velocity: np.ndarray | None = None
) -> dict[str, str]:
    """``report.json``, ``velocity.png``, ``latency.png`` and ``predictions.npz`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "velocity_png": out / "velocity.png",
        "latency_png": out / "latency.png",
        "arrays": out / "predictions.npz",
    }
    plot_velocity(paths["velocity_png"], res, recorded_velocity)
    plot_latency(paths["latency_png"], res)
    np.savez_compressed(
        paths["arrays"],
        velocity=res.velocity,
        received=res.received,
        flags=res.flags,
        n_spikes=res.n_spikes,
        t_send=res.t_send,
        t_client_recv=res.t_client_recv,
        t_daemon=res.t_daemon,
    )
    report = {**report, "files": {k: str(v.name) for k, v in paths.items()}}
    paths["json"].write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    return {k: str(v) for k, v in paths.items()}


def summary_lines(report: dict) -> list[str]:
    """A short human-readable table of a report."""
    lines = [
        f"replayed {report['bins']} bins ({report['pace']} pace, {report['bin_ms']:g} ms bins) in "
        f"{report['wall_s']:.1f} s: {report['bins_received']} predictions, {report['bins_lost']} lost"
    ]
    sc = report.get("score")
    if sc:
        r2 = sc.get("r2")
        what = report.get("target") or "target"
        lines.append(
            f"R² vs recorded {what}: {r2:.4f}" if r2 is not None else f"R²: n/a ({sc.get('r2_error')})"
        )
        st = report.get("score_test")
        if st and st.get("r2") is not None:
            lines.append(
                f"R² on bins {st['bins'][0]}–{st['bins'][1]} (rpnt evaluate's default test split): "
                f"{st['r2']:.4f}"
            )
    fl = {k: v for k, v in report["flags"].items() if v}
    if fl:
        lines.append("flags: " + ", ".join(f"{k} {v}" for k, v in fl.items()))
    lines.append(f"{'stage':<16}{'p50':>9}{'p99':>9}{'p99.9':>9}{'max':>9}  (ms)")
    for k in STAGE_ORDER:
        s = report["latency_ms"].get(k, {})
        if s.get("count"):
            lines.append(
                f"{k:<16}{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}{s['p99.9_ms']:>9.3f}{s['max_ms']:>9.3f}"
            )
    return lines
