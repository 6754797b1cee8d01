"""Markdown tables of the benchmarks' result files (``bench/results/*.json``), for
``make_benchmarks_doc.py``: each function takes one loaded result file and returns table lines.
Nothing here trains or times anything; every number printed is read from, or averaged over, the
file given."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

SESSION_LABELS = {
    "stevenson": "Stevenson (196 ch, 50 ms)",
    "contdata95": "contdata95 (95 ch, 50 ms)",
    "synthetic-heldout-sim00": "synthetic held-out, 57 s (20 ms)",
    "synthetic-heldout-sim00-10min": "synthetic held-out, 10 min (20 ms)",
}


# ------------------------------------------------------------------------------------------ helpers


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted, or an em dash where the file has no value."""
    return "—" if x is None else format(x, spec)


def pair(a: float | None, b: float | None, spec: str) -> str:
    """``a / b`` (e.g. a median and a p99), a dash for a missing one."""
    return "—" if a is None and b is None else f"{fmt(a, spec)} / {fmt(b, spec)}"


def mean_sd(values: Sequence[float], spec: str = ".3f") -> str:
    """Mean ± sample sd of ``values`` (one value: itself)."""
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(float(np.mean(values)), spec)} ± {format(float(np.std(values, ddof=1)), spec)}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1) -> list[str]:
    """A Markdown table; the first ``left`` columns left-aligned, the others right-aligned."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * left + "---:|" * (len(header) - left),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _get(d: dict | None, *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d  # type: ignore[return-value]


def checks(result: dict) -> list[str]:
    """The file's own ``checks`` (bar → met or not) as a list."""
    return [
        f"- {'met' if ok else '**not met**'}: {name}" for name, ok in (result.get("checks") or {}).items()
    ]


# ------------------------------------------------------------------------------------------ transfer


def transfer_summary(result: dict) -> dict[tuple[str, str], dict[float, list[float]]]:
    """{(scenario, decoder): {label_seconds: [per-seed mean over test days, ...]}} in row order."""
    by: dict = {}
    for r in result["rows"]:
        key = (r["scenario"], r["decoder"], r["label_seconds"], r["seed"])
        by.setdefault(key, []).append(r["test_r2"])
    out: dict = {}
    for (sc, dec, sec, _), vals in by.items():
        out.setdefault((sc, dec), {}).setdefault(sec, []).append(float(np.mean(vals)))
    return out


def transfer_table(result: dict, *, scenario: str, decoders: Sequence[str] | None = None) -> list[str]:
    """Decoder × seconds of labels: mean ± sd over seeds of the mean over test days (``decoders``:
    these rows in this order, those the file has; default every row)."""
    summary = {dec: cells for (sc, dec), cells in transfer_summary(result).items() if sc == scenario}
    names = [d for d in decoders if d in summary] if decoders is not None else list(summary)
    secs = sorted({s for d in names for s in summary[d]})
    rows = [
        [d, str(max(len(v) for v in summary[d].values()))]
        + [mean_sd(summary[d][s]) if s in summary[d] else "" for s in secs]
        for d in names
    ]
    return table(["decoder", "seeds", *(f"{s:g} s" for s in secs)], rows)


def transfer_pretraining(result: dict) -> list[str]:
    rows = [
        [
            p["scenario"],
            p["variant"],
            str(p["pool_days"]),
            str(p["seed"]),
            fmt(p.get("best_val_loss"), ".4f"),
            fmt(p.get("val_loss_mean_rate"), ".4f"),
            fmt(p.get("seconds"), ".0f"),
        ]
        for p in result.get("pretraining") or []
    ]
    header = ["scenario", "variant", "days", "seed", "val loss", "mean-rate floor", "s"]
    return table(header, rows, left=2) if rows else []


def transfer_budget(result: dict) -> str:
    b = result["budget"]
    return (
        f"Budget: pretraining {b['pre_epochs']} × {b['pre_steps']} steps of {b['batch']} × {b['window']} "
        f"bins, preset {b['preset']}; finetuning ≤ {b['ft_epochs']} epochs × ≤ {b['ft_steps_max']} steps "
        f"(one step per {b['ft_bins_per_step']} labelled train bins), patience {b['patience']}; seeds "
        f"{result['seeds']}; wall time {result['stages'].get('total_seconds', '—')} s with "
        f"{result.get('jobs', 1)} processes."
    )


# ------------------------------------------------------------------------------------------ decoding


def decoding_table(result: dict, *, per_seed: bool = False) -> list[str]:
    """Decoder × session, test R² mean ± sd over seeds (``per_seed``: each seed's value too)."""
    cells: dict = {}
    for r in sorted(result["rows"], key=lambda r: r.get("seed", 0)):
        cells.setdefault((r["decoder"], r["session"]), []).append(r["test_r2"])
    decoders = list(dict.fromkeys(r["decoder"] for r in result["rows"]))
    sessions = list(dict.fromkeys(r["session"] for r in result["rows"]))

    def cell(v: list[float]) -> str:
        seeds = f" ({' / '.join(f'{x:.3f}' for x in v)})" if per_seed and len(v) > 1 else ""
        return mean_sd(v) + seeds

    rows = [[d, *(cell(cells[(d, s)]) if (d, s) in cells else "" for s in sessions)] for d in decoders]
    return table(["decoder", *(SESSION_LABELS.get(s, s) for s in sessions)], rows)


def decoding_probes(result: dict) -> list[str]:
    cells: dict = {}
    for r in sorted(result.get("probes") or [], key=lambda r: r.get("seed", 0)):
        cells.setdefault((r["features"], r["session"]), []).append(r["test_r2"])
    feats = list(dict.fromkeys(f for f, _ in cells))
    sessions = list(dict.fromkeys(s for _, s in cells))
    rows = [[f, *(mean_sd(cells[(f, s)]) if (f, s) in cells else "" for s in sessions)] for f in feats]
    return table(["features", *(SESSION_LABELS.get(s, s) for s in sessions)], rows) if rows else []


# ------------------------------------------------------------------------------------------ engines


def engines_table(result: dict, *, engines: Sequence[str] | None = None) -> list[str]:
    """Preset × engine: back to back, CPU time, paced, paced + prewarm, floor, R² loss (µs)."""
    rows = []
    for preset, r in result["presets"].items():
        names = [e for e in engines if e in r["engines"]] if engines is not None else list(r["engines"])
        for name in names:
            st = r["engines"][name]
            rows.append(
                [
                    preset,
                    name,
                    pair(st.get("median_us"), st.get("p99_us"), ".0f"),
                    fmt(_get(st, "cpu", "median_us"), ".0f"),
                    pair(_get(st, "paced", "median_us"), _get(st, "paced", "p99_us"), ".0f"),
                    pair(_get(st, "paced_prewarm", "median_us"), _get(st, "paced_prewarm", "p99_us"), ".0f"),
                    fmt(st.get("floor_us"), ".0f"),
                    fmt(st.get("r2_loss_vs_fp32_torch"), ".1e"),
                ]
            )
    header = [
        "preset",
        "engine",
        "back to back median / p99",
        "CPU median",
        "paced (20 ms) median / p99",
        "paced + prewarm median / p99",
        "floor",
        "R² loss vs fp32 torch",
    ]
    return table(header, rows, left=2)


def engines_bars(result: dict) -> list[str]:
    """Per preset: its p99 bar against the best paced p99 of its step engines."""
    out = []
    for preset, r in result["presets"].items():
        bar = r.get("bar_p99_us")
        paced = {
            f"{name} ({key.replace('_', ' ')})": st[key]["p99_us"]
            for name, st in r["engines"].items()
            for key in ("paced", "paced_prewarm")
            if "step" in name and "@" not in name and key in st
        }
        if bar is None or not paced:
            continue
        best = min(paced, key=paced.__getitem__)
        verdict = "met" if paced[best] <= bar else "**not met**"
        out.append(f"- {verdict}: {preset}, paced p99 ≤ {bar:g} µs (best: {best}, {paced[best]:.0f} µs)")
    return out


def engines_machine(result: dict) -> str:
    m, s = result.get("machine", {}), result.get("settings", {})
    before, after = (m.get("load_before") or [None])[0], (m.get("load_after") or [None])[0]
    return (
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, one thread; load average before / after "
        f"{fmt(before, '.1f')} / {fmt(after, '.1f')}; {'`--quick` run; ' if s.get('quick') else ''}µs."
    )


# ------------------------------------------------------------------------------------------ streaming


def streaming_table(result: dict) -> list[str]:
    """Preset × model alone (paced), daemon infer, daemon overhead, end to end (ms), bins lost."""
    rows = []
    for r in result["results"]:
        lat = r.get("latency_ms", {})
        rows.append(
            [
                r["preset"],
                pair(
                    _get(r, "model_alone_paced_ms", "p50_ms"),
                    _get(r, "model_alone_paced_ms", "p99_ms"),
                    ".2f",
                ),
                pair(_get(lat, "infer", "p50_ms"), _get(lat, "infer", "p99_ms"), ".2f"),
                pair(_get(lat, "daemon_overhead", "p50_ms"), _get(lat, "daemon_overhead", "p99_ms"), ".2f"),
                pair(_get(lat, "end_to_end", "p50_ms"), _get(lat, "end_to_end", "p99_ms"), ".2f"),
                f"{r.get('bins_lost', '—')} of {r.get('bins', '—')}",
            ]
        )
    header = [
        "preset",
        "model alone, paced p50 / p99",
        "daemon infer p50 / p99",
        "daemon overhead p50 / p99",
        "end to end p50 / p99",
        "bins lost",
    ]
    return table(header, rows)


def load_note(result: dict) -> str:
    """The load average a file recorded (1-minute), as a phrase."""
    m = result.get("machine") or result.get("meta") or {}
    for key in ("load_avg_at_end", "load_after", "load_end", "load_avg_end"):
        if m.get(key):
            cpus = m.get("cpus", m.get("cores"))
            on = f" on {cpus} CPUs" if cpus else ""
            if isinstance(m[key][0], list):  # merged runs: one load record per part
                ones = [x[0] for x in m[key]]
                return f"load average {min(ones):.1f}–{max(ones):.1f}{on} at the ends of its runs"
            return f"load average {m[key][0]:.1f}{on} at the end"
    return "load not recorded"


def hotpath_table(result: dict) -> list[str]:
    rows = [
        [label, pair(_get(result, key, "p50_ms"), _get(result, key, "p99_ms"), ".3f")]
        for key, label in (
            ("back_to_back_ms", "back to back"),
            ("paced_20ms_ms", "one message per 20 ms, sleeping"),
            ("paced_20ms_spinning_ms", "one message per 20 ms, spinning"),
        )
        if key in result
    ]
    return table(["daemon per-message work", "p50 / p99 ms"], rows)


# ------------------------------------------------------------------------------------------ service


def phases_table(
    result: dict, phase_counts: str, *, measures: Sequence[str] = ("daemon", "end_to_end")
) -> list[str]:
    """Phase × measure p50 / p99 / p99.9 (ms) of a service or live-page file."""
    rows = []
    for ph, lat in result["latency_ms"].items():
        row = [ph.replace("_", " "), str(result.get(phase_counts, {}).get(ph, "—"))]
        for m in measures:
            row.append(
                f"{fmt(_get(lat, m, 'p50_ms'), '.3f')} / {fmt(_get(lat, m, 'p99_ms'), '.3f')} / "
                f"{fmt(_get(lat, m, 'p99.9_ms'), '.3f')}"
            )
        rows.append(row)
    header = ["phase", "bins", *(f"{m.replace('_', ' ')} p50 / p99 / p99.9" for m in measures)]
    return table(header, rows, left=1)


def ratios(result: dict, key: str) -> str:
    return ", ".join(f"{m.replace('_', ' ')} {v:.2f}" for m, v in (result.get(key) or {}).items())


# ------------------------------------------------------------------------------------------ calibration


def calibration_table(result: dict) -> list[str]:
    """Arm × POST→live (s), worker CPU, decode loop p99 at rest / during (ms)."""
    rows = []
    for arm in result["arms"]:
        ptl = arm.get("post_to_live_s", {})
        lat = arm.get("decode_latency_ms", {})
        rows.append(
            [
                f"{arm['arm']} ({arm.get('code', '')})",
                f"{arm.get('succeeded', '—')}/{arm.get('runs', '—')}",
                fmt(ptl.get("median"), ".1f"),
                pair(ptl.get("min"), ptl.get("max"), ".1f"),
                fmt(arm.get("worker_cpu_s_median"), ".1f"),
                pair(
                    _get(lat, "at_rest", "daemon", "p99_ms"),
                    _get(lat, "during_calibration", "daemon", "p99_ms"),
                    ".2f",
                ),
            ]
        )
    header = [
        "code",
        "runs ok",
        "POST→live median s",
        "min / max s",
        "worker CPU s",
        "daemon p99 ms rest / during",
    ]
    return table(header, rows)


def calibration_phases(result: dict) -> list[str]:
    arm = result["arms"][-1]
    rows = [[p.removesuffix("_s"), f"{v:.3f}"] for p, v in (arm.get("phase_median_s") or {}).items()]
    return table(["phase (median, server side)", "s"], rows) if rows else []


# ------------------------------------------------------------------------------------------ adapters

ADAPTER_LABELS = {
    "native": "native (rpnt protocol)",
    "lsl": "LSL spike events in",
    "redis": "Redis stream in",
    "openephys": "Open Ephys ZMQ Interface in",
    "lsl-out": "LSL outlet out",
    "redis-out": "Redis stream out",
}


def adapters_table(result: dict) -> list[str]:
    added = result.get("added_vs_native_ms") or {}
    rows = []
    for path, r in result["results_ms"].items():
        a = added.get(path)
        rows.append(
            [
                ADAPTER_LABELS.get(path, path),
                fmt(r.get("p50_ms"), ".2f"),
                fmt(r.get("p99_ms"), ".2f"),
                "—" if a is None else f"{a['p50_ms']:+.2f}",
                "—" if a is None else f"{a['p99_ms']:+.2f}",
                f"{r.get('bins_lost', '—')} of {r.get('bins', '—')}",
            ]
        )
    return table(["path", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "bins lost"], rows)


# ------------------------------------------------------------------------------------------ closed loop


def _by_seed_groups(blocks: Iterable[dict], key: Sequence[str]) -> dict[tuple, list[dict]]:
    """Blocks grouped by ``key`` fields (one block per seed in each group), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for b in blocks:
        groups.setdefault(tuple(b.get(k) for k in key), []).append(b)
    return groups


def _seed_stats(blocks: list[dict], field: str, spec: str) -> str:
    values = [b[field] for b in blocks if b.get(field) is not None]
    return mean_sd(values, spec) if values else "—"


def closedloop_table(result: dict) -> list[str]:
    """(decoder, block) × trials (summed over seeds), success, time to target, bitrate (mean ± sd
    over seeds), bins lost (summed)."""
    rows = [
        [
            decoder,
            name,
            str(sum(b.get("n_trials", 0) for b in bs)),
            _seed_stats(bs, "success_rate", ".2f"),
            _seed_stats(bs, "median_time_to_target_s", ".2f"),
            _seed_stats(bs, "bitrate_bps", ".2f"),
            str(sum(b.get("bins_lost", 0) for b in bs)),
        ]
        for (decoder, name), bs in _by_seed_groups(result.get("decoders") or [], ("decoder", "name")).items()
    ]
    header = [
        "decoder",
        "block",
        "trials",
        "success",
        "median time to target s",
        "bitrate bits/s",
        "bins lost",
    ]
    return table(header, rows, left=2)


def closedloop_latency(result: dict) -> list[str]:
    groups = _by_seed_groups(result.get("latency") or [], ("decoder", "extra_latency_ms"))
    rows = [
        [
            decoder,
            fmt(extra, "g"),
            _seed_stats(bs, "success_rate", ".2f"),
            _seed_stats(bs, "median_time_to_target_s", ".2f"),
            _seed_stats(bs, "bitrate_bps", ".2f"),
            str(sum(b.get("n_trials", 0) for b in bs)),
        ]
        for (decoder, extra), bs in groups.items()
    ]
    header = ["decoder", "added latency ms", "success", "median time to target s", "bitrate bits/s", "trials"]
    return table(header, rows) if rows else []


def closedloop_drift(result: dict) -> list[str]:
    """Per drift arm: success before the drift, after it, after ÷ before and in the last third (mean
    ± sd over seeds), time to target before / after, recalibrations live / run, bins lost (summed)."""
    runs = (result.get("drift") or {}).get("runs") or []
    rows = []
    for arm in sorted({r["arm"] for r in runs}):
        ar = [r for r in runs if r["arm"] == arm]
        cal = [c for r in ar for c in r.get("calibrations", [])]

        def stat(part: str, field: str, ar: list = ar) -> str:
            return _seed_stats([r[part] for r in ar], field, ".2f")

        rows.append(
            [
                arm,
                str(len(ar)),
                stat("before", "success_rate"),
                stat("after", "success_rate"),
                _seed_stats([{"ratio": r.get("ratio")} for r in ar], "ratio", ".2f"),
                stat("last_third", "success_rate"),
                f"{stat('before', 'median_time_to_target_s')} / {stat('after', 'median_time_to_target_s')}",
                f"{sum(c.get('state') == 'succeeded' for c in cal)} / {len(cal)}" if cal else "—",
                str(sum(r["summary"]["bins_lost"] for r in ar)),
            ]
        )
    header = [
        "drift arm",
        "seeds",
        "success before drift",
        "after",
        "after ÷ before",
        "last third",
        "time to target before / after s",
        "recalibrations live / run",
        "bins lost",
    ]
    return table(header, rows) if rows else []


def seeds_note(result: dict) -> str:
    """Which seeds a (possibly merged) result holds."""
    meta = result.get("meta") or {}
    seeds = meta.get("seeds") or ([meta["seed"]] if "seed" in meta else [])
    return ("seeds " + ", ".join(str(x) for x in seeds) + " (mean ± sd)") if seeds else "seeds not recorded"


# ------------------------------------------------------------------------------------------ steps


def steps_table(result: dict) -> list[str]:
    rows = [
        [
            s["step"],
            f"`{s['command']}`",
            fmt(s.get("seconds"), ".0f"),
            fmt(s.get("cpu_seconds"), ".0f"),
            fmt((s.get("load_before") or [None])[0], ".1f"),
        ]
        for s in result["steps"]
    ]
    return table(["step", "command", "wall s", "CPU s", "load average"], rows, left=2)
