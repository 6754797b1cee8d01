"""The benchmarks as ``make_benchmarks_doc.py`` presents them: for each, the files its README
table is built from, that table (``compact``) and its part of docs/benchmarks.md (``detail``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import _result_tables as T

RESULTS = Path(__file__).resolve().parent / "results"

# the README's transfer rows: the product's recipe and what it is compared with
TRANSFER_README_ROWS = (
    "supervised+norm, full FT core lr ×0.1 [2 pretraining days]",
    "supervised+norm, full FT core lr ×0.1",
    "RPNT from scratch +norm",
    "baseline: gru",
    "baseline: wiener",
    "baseline: kalman",
    "last day's decoder, unchanged",
    "last day's decoder, re-aligned (no labels)",
    "pool decoder (earlier days' labels), day's input statistics",
)
ENGINES_README_ROWS = ("torch window", "ort step fp32", "ort step int8")


class Results:
    """The result files of ``folder`` by name; with ``allowed``, only those (a section's sources)."""

    def __init__(self, folder: Path = RESULTS, allowed: Collection[str] | None = None) -> None:
        self.folder, self.allowed = folder, allowed

    def __call__(self, name: str) -> dict:
        if self.allowed is not None and name not in self.allowed:
            raise KeyError(f"{name}: not among this section's sources {sorted(self.allowed)}")
        return json.loads((self.folder / name).read_text())

    def has(self, name: str) -> bool:
        return (self.allowed is None or name in self.allowed) and (self.folder / name).is_file()


@dataclass(frozen=True, kw_only=True)
class Section:
    """One benchmark: its README table (``compact``) and its part of docs/benchmarks.md (``detail``)."""

    key: str
    title: str
    command: str
    sources: tuple[str, ...]  # the files the README table is built from
    compact: Callable[[Results], list[str]]
    detail: Callable[[Results], list[str]]
    plot: str | None = None

    @property
    def anchor(self) -> str:
        return re.sub(r"[^\w\- ]", "", self.title.lower()).replace(" ", "-")


def doc_link(name: str) -> str:
    return f"[`{name}`](../bench/results/{name})"


# ------------------------------------------------------------------------------------------ sections


def steps_compact(r: Results) -> list[str]:
    return T.steps_table(r("steps.json"))


def transfer_compact(r: Results) -> list[str]:
    return T.transfer_table(r("transfer-pooldays.json"), scenario="spike", decoders=TRANSFER_README_ROWS)


def transfer_detail(r: Results) -> list[str]:
    out = [
        "A new Spike day decoded from its first N seconds of labels after pretraining on earlier days. The "
        "Spike days sorted by date; quality control drops the days it flags (and says why); the first 15 "
        "clean days are the pool (a recipe may use only its last K: `[K pretraining days]`), the later clean "
        "days are the test days. Every decoder spends only the first N s of a test day's labels: train on "
        "their first 80 %, validation (early stopping, model selection, ridge penalty) on their last 20 %, "
        "fitted on a view of the day that ends where the test part starts and holds NaN for every later "
        "label (`rpnt_core.data.splits.calibration_view`, tested). Test: the day's last 20 %, streamed from "
        "bin 0; R² pooled and variance-weighted on the target. Cells: per seed the mean over test days, then "
        "mean ± sd over seeds. Zero-label rows use no labels of the day (0 s).",
        "",
    ]
    for name, what in (
        (
            "transfer-pooldays.json",
            "three seeds, pool sizes 2 and 5 (and 10 on one seed); the README's table",
        ),
        ("transfer.json", "three seeds, the whole pool"),
        ("transfer-rank-seed0.json", "one seed, every recipe tried (the ranking run)"),
        ("transfer-nick.json", "another monkey, task and unit set: Spike pool + Nick 1 → Nick 2, velocity"),
    ):
        if not r.has(name):
            continue
        res = r(name)
        for sc in res["scenarios"]:
            png = name.replace(".json", ".png")
            out += [
                f"### {doc_link(name)}: {what}",
                "",
                f"Scenario `{sc['name']}` (target {sc['target']}): pool {len(sc['pool'])} days → test days "
                f"{', '.join(sc.get('tests', []))}. {T.transfer_budget(res)}",
                "",
                *([f"![{name}](../bench/results/{png})", ""] if (r.folder / png).is_file() else []),
                *T.transfer_table(res, scenario=sc["name"]),
                "",
            ]
        pre = T.transfer_pretraining(res)
        if pre:
            out += [
                "Pretraining runs (best validation loss; masked runs also the mean-rate-only floor):",
                "",
                *pre,
                "",
            ]
    return out


def decoding_compact(r: Results) -> list[str]:
    return T.decoding_table(r("decoding.json"))


def decoding_detail(r: Results) -> list[str]:
    res = r("decoding.json")
    rc = res.get("recipe", {})
    return [
        "Test R² on the last 20 % of each session (streamed causally), every decoder trained on the first "
        f'{100 * res.get("train_fraction", 0.2):g} % of the session (validation 70–80 %). "Pretrained" = '
        "self-supervised on the other real session, synthetic sessions at the same bin width and the "
        "target's own training bins (no labels; a fixed share of the pretraining batches, "
        f"`--target-share {rc.get('target_share', '—')}`), then few-shot finetuned. The synthetic held-out "
        "subject is scored on its longest recorded session (57 s) and on the same subject recorded for "
        f"10 min. Budget: pretraining {rc.get('pre_epochs', '—')} × {rc.get('pre_steps', '—')} steps, "
        f"finetuning ≤ {rc.get('ft_epochs', '—')} × {rc.get('ft_steps', '—')} steps, patience "
        f"{rc.get('patience', '—')}. Mean ± sd over training seeds {res.get('seeds')} (each seed in "
        f"brackets); the data are the same for every seed. Finished {res.get('finished', '—')}.",
        "",
        *T.decoding_table(res, per_seed=True),
        "",
        "Linear probe (causal ridge, 5 lags) of each representation, test R²:",
        "",
        *T.decoding_probes(res),
        "",
        "contdata95's origin is undocumented: keep its numbers out of publications.",
        "",
    ]


def engines_compact(r: Results) -> list[str]:
    res = r("engines.json")
    return [
        T.engines_machine(res),
        "",
        *T.engines_table(res, engines=ENGINES_README_ROWS),
        "",
        *T.engines_bars(res),
    ]


def engines_detail(r: Results) -> list[str]:
    res = r("engines.json")
    return [
        "Per-bin latency of each way to run RPNT online, one thread, streaming real counts one bin at a "
        "time: back to back, and paced (one step every 20 ms as the daemon runs, sleeping in between; "
        "prewarm: the engine's `prewarm()` run shortly before each bin). The floor is the step's bytes "
        "per bin at the machine's measured read rate, or its FLOPs at the measured GEMV/GEMM rate, "
        "whichever is longer. Floors, profiles and per-period sweeps: "
        f"{doc_link('engines.md')}; analysis in [engines.md](engines.md).",
        "",
        T.engines_machine(res),
        "",
        *T.engines_table(res),
        "",
        *T.engines_bars(res),
        "",
    ]


def streaming_compact(r: Results) -> list[str]:
    res = r("streaming.json")
    return [f"ms; {T.load_note(res)}.", "", *T.streaming_table(res), "", *T.checks(res)]


def streaming_detail(r: Results) -> list[str]:
    out = [
        "The recording's counts replayed at real-time pace (re-timed to 20 ms bins) into `rpnt serve` in a "
        "child process, next to the model alone in the same run. End to end = the replay client's send of "
        "the bin-closing packet → its receipt of the prediction (one clock); daemon overhead = per bin, "
        "the daemon's time minus the engine step's.",
        "",
    ]
    for name in sorted(
        (p.name for p in r.folder.glob("streaming*.json")), key=lambda n: (n != "streaming.json", n)
    ):
        if not r.has(name):
            continue
        res = r(name)
        flags = res.get("daemon_flags")
        shown = ", ".join(f"{k} {v}" for k, v in flags.items()) if isinstance(flags, dict) else flags
        extra = f"; daemon flags: {shown}" if flags else ""
        prec = f"; step graph {res['precision']}" if res.get("precision") else ""
        out += [
            f"### {doc_link(name)}",
            "",
            f"ms; {T.load_note(res)}{extra}{prec}.",
            "",
            *T.streaming_table(res),
        ]
        out += ["", *T.checks(res), ""]
    out += [
        "What bounds the daemon's overhead, without sockets (`python bench/bench_hotpath.py`): its whole "
        "per-message work for a bin — parse, checks, binning, bin close, prediction encoding, history.",
        "",
    ]
    for name in sorted(
        (p.name for p in r.folder.glob("hotpath*.json")), key=lambda n: (n != "hotpath.json", n)
    ):
        res = r(name)
        out += [f"{doc_link(name)} ({res.get('channels', '?')} channels, {T.load_note(res)}):", ""]
        out += [*T.hotpath_table(res), ""]
    return out


def service_compact(r: Results) -> list[str]:
    res = r("service.json")
    return [
        f"ms; {T.load_note(res)}; p99 during / at rest: {T.ratios(res, 'p99_ratio_during_vs_rest')}.",
        "",
        *T.phases_table(res, "bins_per_phase"),
        "",
        *T.checks(res),
    ]


def service_detail(r: Results) -> list[str]:
    out = [
        "The recording's counts (20 ms re-timed) replayed at real-time pace into `rpnt serve` (small "
        "preset, random weights) while a monitoring client makes the same two HTTP requests every 0.5 s; "
        "after the rest period `POST /calibrate` (closed loop, the daemon's recent bins, `force=true`) runs "
        "finetuning + export + parity in the calibration process, then swaps at a bin boundary.",
        "",
    ]
    for name in ("service.json", "service-ab-no-idle.json"):
        if r.has(name):
            res = r(name)
            env = f"; settings {', '.join(res['serve_env'])}" if res.get("serve_env") else ""
            out += [
                f"### {doc_link(name)}",
                "",
                f"ms; {T.load_note(res)}{env}; p99 during / at rest: "
                f"{T.ratios(res, 'p99_ratio_during_vs_rest')}; "
                f"swap at bin {res.get('swap_bin')}.",
                "",
                *T.phases_table(res, "bins_per_phase", measures=("daemon", "infer", "end_to_end")),
                "",
                *T.checks(res),
                "",
            ]
    if r.has("live_page.json"):
        res = r("live_page.json")
        out += [
            f"### What an open live page costs: {doc_link('live_page.json')}",
            "",
            f"Windows of {T.fmt(res.get('window_s'), 'g')} s alternating no client and "
            f"{res.get('clients_when_open')} "
            f"`/events` readers; ms; {T.load_note(res)}; p99 open / closed: "
            f"{T.ratios(res, 'p99_ratio_open_vs_closed')}.",
            "",
            *T.phases_table(res, "bins_per_condition"),
            "",
        ]
    return out


def calibration_compact(r: Results) -> list[str]:
    res = r("calibration_speed.json")
    return [
        f"{T.fmt(res.get('seconds'), 'g')} s of labelled {T.fmt(res.get('bin_ms'), 'g')} ms bins per POST, "
        f"decode loop running; {T.load_note(res)}.",
        "",
        *T.calibration_table(res),
        "",
        "Where the time goes (the last arm's per-phase medians, server side):",
        "",
        *T.calibration_phases(res),
    ]


def calibration_detail(r: Results) -> list[str]:
    return [
        "From `POST /calibrate` (an NPZ upload) to the new model live, while the decode loop runs; "
        "`--baseline-ref` runs the same POSTs on an older commit in the same run. Design and settings: "
        "[calibration.md](calibration.md).",
        "",
        *calibration_compact(r),
        "",
    ]


def adapters_compact(r: Results) -> list[str]:
    res = r("adapters.json")
    return [
        f"Bin-closing message sent → prediction received, {res.get('bins_per_path', '—')} bins per path at "
        f"{T.fmt(res.get('bin_ms'), 'g')} ms in one `rpnt serve` run; {T.load_note(res)}.",
        "",
        *T.adapters_table(res),
    ]


def closedloop_compact(r: Results) -> list[str]:
    res, drift = r("closedloop.json"), r("closedloop-drift.json")
    d = drift.get("drift") or {}
    return [
        f"{T.seeds_note(res).capitalize()}; {T.load_note(res)}.",
        "",
        *T.closedloop_table(res),
        "",
        f"Drift (`closedloop-drift.json`, {T.seeds_note(drift)}; "
        f"{T.load_note(drift)}): one {T.fmt(d.get('drift_s'), 'g')} s block, drift from "
        f"{T.fmt(d.get('pre_s'), 'g')} s on; arm recal recalibrates every {T.fmt(d.get('period_s'), 'g')} s from "
        f"the last {T.fmt(d.get('recal_s'), 'g')} s of ReFIT labels.",
        "",
        *T.closedloop_drift(drift),
    ]


def closedloop_detail(r: Results) -> list[str]:
    res = r("closedloop.json")
    others = sorted(p.name for p in r.folder.glob("closedloop-*.json"))
    return [
        "A simulated participant drives a cursor through the real daemon over ZeroMQ in real time "
        "(center-out); every decoder first fitted on the same open-loop observation block, then "
        "recalibrated from its own closed-loop ReFIT labels. Design: [closedloop.md](closedloop.md).",
        "",
        *closedloop_compact(r),
        "",
        "Injected latency:",
        "",
        *T.closedloop_latency(res),
        "",
        "Drift and label experiments: "
        + ", ".join(f"{doc_link(n)} ({doc_link(n.replace('.json', '.md'))})" for n in others)
        + ".",
        "",
    ]


SECTIONS = (
    Section(
        key="steps",
        title="How long each command takes",
        command="python bench/bench_steps.py",
        sources=("steps.json",),
        compact=steps_compact,
        detail=steps_compact,
    ),
    Section(
        key="transfer",
        title="Cross-day transfer",
        command="python bench/bench_transfer.py --scenarios spike --seeds 0,1,2 --pool-sizes 2,5 --jobs 2",
        sources=("transfer-pooldays.json",),
        compact=transfer_compact,
        detail=transfer_detail,
        plot="transfer-pooldays.png",
    ),
    Section(
        key="decoding",
        title="Single-session decoding",
        command="python bench/bench_decoding.py --jobs 2 --seeds 0,1,2",
        sources=("decoding.json",),
        compact=decoding_compact,
        detail=decoding_detail,
    ),
    Section(
        key="engines",
        title="Engine latency",
        command="python bench/bench_engines.py",
        sources=("engines.json",),
        compact=engines_compact,
        detail=engines_detail,
    ),
    Section(
        key="streaming",
        title="Streaming daemon latency",
        command="python bench/bench_streaming.py",
        sources=("streaming.json",),
        compact=streaming_compact,
        detail=streaming_detail,
    ),
    Section(
        key="service",
        title="Control plane during calibration",
        command="python bench/bench_service.py",
        sources=("service.json",),
        compact=service_compact,
        detail=service_detail,
    ),
    Section(
        key="calibration",
        title="Calibration speed",
        command="python bench/bench_calibration.py",
        sources=("calibration_speed.json",),
        compact=calibration_compact,
        detail=calibration_detail,
    ),
    Section(
        key="adapters",
        title="Rig adapters",
        command="python bench/bench_adapters.py",
        sources=("adapters.json",),
        compact=adapters_compact,
        detail=adapters_compact,
    ),
    Section(
        key="closedloop",
        title="Closed loop",
        command="python bench/bench_closedloop.py --workdir DIR",
        sources=("closedloop.json", "closedloop-drift.json"),
        compact=closedloop_compact,
        detail=closedloop_detail,
        plot="closedloop.png",
    ),
)
