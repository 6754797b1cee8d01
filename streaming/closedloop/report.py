"""The closed loop's files: per-trial JSON, summary JSON, and one PNG (trajectories + metrics over time)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_trials(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, default=float))
    return path


def plot_blocks(path: Path, blocks: list[dict], *, radius: float, window_s: float = 20.0) -> Path | None:
    """Left: each block's cursor trajectories (successes solid, failures dotted) with the targets;
    right: success rate and median time to target over time in ``window_s`` windows, one line per
    block, swaps marked.  ``blocks``: ``{"name", "cursor" (K, 2), "trials" (rows), "swaps_s"}``.
    None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(blocks)
    fig, axes = plt.subplots(n, 2, figsize=(11, 4.2 * n), squeeze=False)
    for i, b in enumerate(blocks):
        ax, ax2 = axes[i]
        cur = np.asarray(b["cursor"])
        for tr in b["trials"]:
            k0, k1 = int(tr["start_s"] / b["bin_s"]), int(tr["end_s"] / b["bin_s"])
            seg = cur[k0:k1]
            if len(seg):
                ax.plot(
                    seg[:, 0],
                    seg[:, 1],
                    "-" if tr["success"] else ":",
                    lw=0.7,
                    color="tab:blue" if tr["success"] else "tab:red",
                    alpha=0.6,
                )
        for t in {tuple(tr["target"]) for tr in b["trials"]}:
            ax.add_patch(plt.Circle(t, radius, fill=False, color="k", lw=0.8))
        ax.set_aspect("equal")
        ax.set_title(f"{b['name']}: trajectories (red dotted: failed)", fontsize=9)
        rows = b["trials"]
        if rows:
            end = max(r["end_s"] for r in rows)
            edges = np.arange(0.0, end + window_s, window_s)
            mids, sr, tt = [], [], []
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                w = [r for r in rows if lo <= r["end_s"] < hi]
                if not w:
                    continue
                mids.append((lo + hi) / 2)
                sr.append(np.mean([r["success"] for r in w]))
                ok = [r["time_to_target_s"] for r in w if r["success"]]
                tt.append(np.median(ok) if ok else np.nan)
            ax2.plot(mids, sr, "o-", color="tab:blue", label="success rate")
            ax2.set_ylim(-0.05, 1.05)
            ax2.set_xlabel("time (s)")
            ax2.set_ylabel("success rate", color="tab:blue")
            ax3 = ax2.twinx()
            ax3.plot(mids, tt, "s--", color="tab:orange", label="median time to target")
            ax3.set_ylabel("time to target (s)", color="tab:orange")
            for s in b.get("swaps_s", []):
                ax2.axvline(s, color="tab:green", lw=1)
            for s in b.get("stages_s", []):
                ax2.axvline(s, color="grey", lw=0.8, ls=":")
        ax2.set_title(f"{b['name']}: over time ({window_s:g} s windows; green: model swap)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
