"""Inference-engine benchmark (issue #3): per-bin latency of every way to run RPNT online.

One command, one run:

    python bench/bench_engines.py --out bench/results/engines.json

For the ``paper`` (d_model 512, 4 layers, 16 heads, W = 50) and ``small`` presets, with random
weights (weights do not change the timing) and N = 196 channels, it streams the counts of a real
session (StevensonV2.mat from ../shared/data; Poisson counts when absent) one bin at a time and
reports per-bin latency median / p99 / p99.9 in µs over ``--bins`` bins after ``--warmup`` bins:

- ``torch window``: torch full-window recompute — at every bin the full forward over the last
  W bins, keeping the last output (the naive way; W < receptive field, so it is also inexact);
- ``ort window``: the same with ONNX Runtime and the exported window graph (T = W);
- ``ort step fp32``: the exported step graph (IOBinding, double-buffered state) — the daemon's path;
- ``ort step fp32 (run)``: the same through ``session.run`` (no IOBinding), to show what binding buys;
- ``ort step int8``: the dynamic-int8 step graph;
- ``torch step``: ``RPNT.step`` through the torch engine (development back-end).

Every engine runs single-threaded (ORT: 1 intra-op + 1 inter-op thread, no spinning; torch:
``set_num_threads(1)``), as the daemon does, so the binner and the HTTP server keep the other core.
Latency is wall time around ``engine.step(counts)`` (validation, Python and ORT included), with
the garbage collector paused during timed loops; the thread's CPU time for the same calls is
recorded too (it excludes preemption by other processes on this shared 2-core box).  R² loss is ``1 − R²(fp32 torch streaming
outputs, engine outputs)`` over the timed bins (pooled, variance-weighted).  The ratio column is
the median latency of ``torch window`` divided by the engine's, from the same run.

To explain what limits each step graph it also records: an ORT profile of the step graphs summed
by op type; the node count after ORT's optimisation; the per-node dispatch cost of this ORT on
this machine (a chain of tiny Adds); the weight bytes each step must stream; and the sustained
memory read bandwidth (numpy, one thread).  It prints a table and writes JSON (``--out``) and
Markdown (same path, ``.md``).  The machine's load average is recorded: the box is shared, and
p99/p99.9 move with other tenants' load.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "stevenson2011_m1_centerout" / "StevensonV2.mat"
BARS_P99_US = {"paper": 1000.0, "small": 250.0}
R2_BAR = 0.005


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def l3_bytes() -> int:
    try:
        txt = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        mult = {"K": 1024, "M": 1024 ** 2}.get(txt[-1], 1)
        return int(txt.rstrip("KM")) * mult
    except (OSError, ValueError):
        return 0


def stats_us(ts_ns: np.ndarray) -> dict:
    us = ts_ns / 1e3
    return {"median_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)),
            "p999_us": float(np.percentile(us, 99.9)), "mean_us": float(us.mean()), "min_us": float(us.min()),
            "max_us": float(us.max()), "n": int(len(us))}


def time_stream(step, counts: np.ndarray, warmup: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``step(t)`` for every bin; returns (outputs (T, D), wall ns, thread-CPU ns), the times
    for bins ≥ warmup.  Wall time is what the daemon sees; thread CPU time excludes the time the
    thread was preempted (this box is shared), i.e. what the engine itself costs."""
    outs = []
    n = len(counts) - warmup
    wall = np.empty(n, dtype=np.int64)
    cpu = np.empty(n, dtype=np.int64)
    clock_cpu, clock_wall = time.thread_time_ns, time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for t in range(len(counts)):
            c0 = clock_cpu()
            t0 = clock_wall()
            y = step(t)
            t1 = clock_wall()
            c1 = clock_cpu()
            outs.append(y)
            if t >= warmup:
                wall[t - warmup] = t1 - t0
                cpu[t - warmup] = c1 - c0
    finally:
        gc.enable()
    return np.stack(outs).astype(np.float32), wall, cpu


def memory_bandwidth_gbs() -> float:
    """Sustained single-thread read+write bandwidth (np.copyto of 256 MiB), GB/s of traffic."""
    a = np.ones(64 * 1024 * 1024, np.float32)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        dt = time.perf_counter() - t0
        best = max(best, 2 * a.nbytes / dt / 1e9)
    return best


def node_dispatch_us() -> float:
    """ORT per-node cost on this machine: a chain of 200 Adds on a (1, 128) tensor."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from exporters.runtime import session_options

    n, shape = 200, [1, 128]
    nodes, prev = [], "x"
    for i in range(n):
        nodes.append(helper.make_node("Add", [prev, "c"], [f"y{i}"]))
        prev = f"y{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, shape)],
                          [onnx.numpy_helper.from_array(np.ones(shape, np.float32), "c")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    s = ort.InferenceSession(m.SerializeToString(), session_options(optimization="basic"),
                             providers=["CPUExecutionProvider"])
    x = np.ones(shape, np.float32)
    for _ in range(100):
        s.run(None, {"x": x})
    ts = []
    for _ in range(1000):
        t0 = time.perf_counter()
        s.run(None, {"x": x})
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e6 / n)


def optimized_node_count(path: Path) -> tuple[int, dict]:
    import onnx
    import onnxruntime as ort

    from exporters.graph_checks import op_types
    from exporters.runtime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = op_types(onnx.load(so.optimized_model_filepath))
    return sum(ops.values()), ops


def weight_bytes(path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return int(sum(numpy_helper.to_array(i).nbytes for i in m.graph.initializer))


def profile_by_op(path: Path, counts: np.ndarray, n: int = 300) -> dict:
    """ORT profiling of the step engine over ``n`` bins, summed by op type (µs per step).

    The profiler adds overhead to every node, so absolute numbers are inflated; shares show
    where the time goes."""
    from exporters.runtime import OnnxStepEngine

    with tempfile.TemporaryDirectory() as tmp:
        eng = OnnxStepEngine(path, warmup_bins=20, profile_prefix=str(Path(tmp) / "prof"))
        for t in range(n):
            eng.step(counts[t % len(counts)])
        events = json.loads(Path(eng.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    runs = [e["dur"] for e in events if e.get("name") == "model_run"]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] += e["dur"]
            nodes[op] += 1
    nr = max(1, len(runs))
    total = sum(by_op.values()) / nr
    table = sorted(((op, d / nr, nodes[op] // nr) for op, d in by_op.items()), key=lambda x: -x[1])
    return {"runs": nr, "model_run_median_us_profiled": float(np.median(runs[20:])) if len(runs) > 20 else None,
            "kernel_us_per_step": total,
            "by_op": [{"op": op, "us_per_step": round(us, 1), "share": round(us / total, 3), "nodes": k}
                      for op, us, k in table]}


def run_preset(preset: str, counts: np.ndarray, args, root: Path) -> dict:
    import torch

    from exporters.onnx_export import export_model
    from exporters.quantize import quantize_int8
    from exporters.runtime import OnnxStepEngine, OnnxWindowEngine
    from exporters.torch_engine import TorchEngine
    from rpnt_core import RPNT, RPNTConfig
    from rpnt_core.evaluate.metrics import r2_score

    torch.manual_seed(args.seed)
    n_ch = counts.shape[1]
    model = RPNT(RPNTConfig.preset(preset, n_channels=n_ch)).eval()
    c = model.config
    w = c.window
    out = root / preset
    print(f"\n[{preset}] exporting (d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} heads, W {w}, "
          f"N {n_ch}, receptive field {model.receptive_field}) ...", flush=True)
    t0 = time.perf_counter()
    # parity on real counts without a target: the int8 gate is then R² vs the fp32 outputs
    res = export_model(model, out, int8=True, window_bins=w, parity_counts=counts, parity_bins=args.parity_bins,
                       seed=args.seed)
    export_s = time.perf_counter() - t0
    step32 = res.files["step"]
    step8 = res.files.get("step.int8")
    gate8 = res.reports["step.int8"]["gate"]
    if step8 is None:  # rejected by the gate: time it anyway, flagged
        step8 = quantize_int8(step32, out / "rejected.int8.onnx")

    stream = counts[: args.warmup + args.bins]
    with torch.no_grad():
        ref = model.predict_stream(torch.from_numpy(stream)[None])["velocity"][0].numpy()

    torch.set_num_threads(1)
    results: dict[str, dict] = {}

    def record(name: str, fn, n_bins: int | None = None, warmup: int | None = None) -> None:
        # every row times the same bins: stream[args.warmup : args.warmup + n]; a row may start
        # its (untimed) warm-up later than bin 0 when it needs fewer warm-up bins
        n = args.bins if n_bins is None else n_bins
        start = args.warmup - (args.warmup if warmup is None else min(warmup, args.warmup))
        y, ts, cpu = time_stream(lambda t: fn(t + start), stream[start: args.warmup + n], args.warmup - start)
        st = stats_us(ts)
        st["cpu"] = stats_us(cpu)
        full = ref[start: args.warmup + n]
        sl = slice(args.warmup - start, None)
        st["r2_loss_vs_fp32_torch"] = float(1.0 - r2_score(full[sl], y[sl]))
        results[name] = st
        print(f"  {name:<22} median {st['median_us']:9.1f} µs  p99 {st['p99_us']:9.1f}  p99.9 {st['p999_us']:9.1f}"
              f"  (CPU time p99 {st['cpu']['p99_us']:9.1f})  R² loss {st['r2_loss_vs_fp32_torch']:.2e}", flush=True)

    # --- full-window recompute (naive): last W bins, keep the last output
    pad = np.concatenate([np.zeros((w - 1, n_ch), np.float32), stream])  # zero history before bin 0

    @torch.no_grad()
    def torch_window(t: int) -> np.ndarray:
        x = torch.from_numpy(pad[t: t + w])[None]
        return model(x)["velocity"][0, -1].numpy()

    weng = OnnxWindowEngine(res.files["window"])

    def ort_window(t: int) -> np.ndarray:
        return weng.run(pad[t: t + w])["velocity"][-1]

    record("torch window", torch_window, args.window_bins, warmup=20)  # the window itself holds the history
    record("ort window", ort_window, args.window_bins, warmup=20)

    e32 = OnnxStepEngine(step32, warmup_bins=args.warmup)
    record("ort step fp32", lambda t: e32.step(stream[t]))
    e32r = OnnxStepEngine(step32, warmup_bins=args.warmup, io_binding=False)
    record("ort step fp32 (run)", lambda t: e32r.step(stream[t]))
    e8 = OnnxStepEngine(step8, warmup_bins=args.warmup)
    record("ort step int8", lambda t: e8.step(stream[t]))
    te = TorchEngine(model, warmup_bins=args.warmup)
    record("torch step", lambda t: te.step(stream[t]), args.extra_bins)

    base = results["torch window"]["median_us"]
    base99 = results["torch window"]["p99_us"]
    for st in results.values():
        st["speedup_vs_torch_window"] = base / st["median_us"]
        st["p99_speedup_vs_torch_window"] = base99 / st["p99_us"]

    analysis = {}
    if not args.no_profile:
        for name, path in (("ort step fp32", step32), ("ort step int8", step8)):
            nodes, ops = optimized_node_count(path)
            analysis[name] = {"onnx_nodes_after_ort_optimisation": nodes, "ops_after_optimisation": ops,
                              "weight_bytes": weight_bytes(path), "profile": profile_by_op(path, stream, n=200)}
    return {"config": {"d_model": c.d_model, "n_layers": c.n_layers, "n_heads": c.n_heads, "window": w,
                       "n_channels": n_ch, "receptive_field": model.receptive_field,
                       "params": int(sum(p.numel() for p in model.parameters()))},
            "export_seconds": export_s, "int8_gate": gate8, "int8_written": "step.int8" in res.files,
            "engines": results, "analysis": analysis, "bar_p99_us": BARS_P99_US.get(preset)}


def markdown(report: dict) -> str:
    lines = [f"# Engine latency ({report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"onnxruntime {report['versions']['onnxruntime']}, torch {report['versions']['torch']})", "",
             f"Per-bin latency over {report['settings']['bins']} bins after {report['settings']['warmup']} warm-up "
             f"(window rows: {report['settings']['window_bins']} bins; torch step: {report['settings']['extra_bins']}), "
             f"single thread, counts from "
             f"{report['settings']['counts']}. Load average before/after: {report['machine']['load_before']} / "
             f"{report['machine']['load_after']}. Latency columns are wall time around `step` (what the "
             "daemon sees; on this shared box p99/p99.9 include preemption by other tenants' processes); "
             "CPU-time columns are the calling thread's CPU time for the same calls (the engine's own cost).", ""]
    for preset, r in report["presets"].items():
        c = r["config"]
        lines += [f"## {preset} (d_model {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads, W {c['window']}, "
                  f"N {c['n_channels']}, {c['params'] / 1e6:.1f} M params) — bar p99 ≤ {r['bar_p99_us']:g} µs", "",
                  "| engine | median µs | p99 µs | p99.9 µs | CPU-time median / p99 / p99.9 µs "
                  "| × vs torch window (median) | R² loss vs fp32 torch |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, st in r["engines"].items():
            cp = st["cpu"]
            lines.append(f"| {name} | {st['median_us']:.1f} | {st['p99_us']:.1f} | {st['p999_us']:.1f} | "
                         f"{cp['median_us']:.1f} / {cp['p99_us']:.1f} / {cp['p999_us']:.1f} | "
                         f"{st['speedup_vs_torch_window']:.1f} | {st['r2_loss_vs_fp32_torch']:.2e} |")
        lines.append("")
        for name, a in r.get("analysis", {}).items():
            top = ", ".join(f"{o['op']} {o['share'] * 100:.0f}%" for o in a["profile"]["by_op"][:5])
            lines.append(f"- {name}: {a['onnx_nodes_after_ort_optimisation']} nodes after ORT optimisation, "
                         f"{a['weight_bytes'] / 1e6:.1f} MB weights; profile (by op, share of kernel time): {top}")
        lines.append("")
    lim = report.get("limits", {})
    if lim:
        lines += ["## What limits latency", ""] + [f"- {k}: {v}" for k, v in lim.items()] + [""]
    return "\n".join(lines)


def limits(report: dict) -> dict:
    """One line per step engine: which floor dominates, from node count × dispatch cost, weight
    bytes ÷ DRAM bandwidth, and the ORT profile by op type."""
    out = {}
    bw = report["machine"]["memory_bandwidth_gbs"] / 2  # read-only traffic: half the copy rate
    disp = report["machine"]["ort_node_dispatch_us"]
    l3 = report["machine"]["l3_bytes"]
    for preset, r in report["presets"].items():
        for name, a in r.get("analysis", {}).items():
            st = r["engines"][name]
            med, wb = st["median_us"], a["weight_bytes"]
            nodes = a["onnx_nodes_after_ort_optimisation"]
            mem_floor = wb / (bw * 1e9) * 1e6
            dispatch_floor = nodes * disp
            top = a["profile"]["by_op"][0]
            gemm_share = sum(o["share"] for o in a["profile"]["by_op"]
                             if o["op"] in ("Gemm", "MatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                                            "MatMulInteger", "FusedMatMul"))
            if wb > l3 / 2 and mem_floor > 0.6 * med:
                verdict = "memory bandwidth (weights streamed from DRAM every bin)"
            elif dispatch_floor > 0.5 * med:
                verdict = "per-op overhead (many small kernels)"
            elif gemm_share > 0.5:
                verdict = "matrix-vector kernels (compute / cache bandwidth)"
            else:
                verdict = "mixed: matrix-vector kernels + per-op overhead"
            out[f"{preset} / {name}"] = (
                f"{verdict}. median {med:.0f} µs, p99 {st['p99_us']:.0f} µs (bar {r['bar_p99_us']:g}); "
                f"weights {wb / 1e6:.1f} MB (L3 {l3 / 2**20:.0f} MiB) → DRAM floor {mem_floor:.0f} µs at "
                f"{bw:.1f} GB/s, implied {wb / med / 1e3:.1f} GB/s; {nodes} nodes × {disp:.2f} µs dispatch = "
                f"{dispatch_floor:.0f} µs; matmul share of kernel time {gemm_share * 100:.0f}%, top op "
                f"{top['op']} ({top['share'] * 100:.0f}%)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "engines.json"),
                   help="JSON report (a Markdown table is written beside it, .md)")
    p.add_argument("--presets", default="paper,small", help="comma-separated presets (default paper,small)")
    p.add_argument("--bins", type=int, default=2000, help="timed bins per engine (default 2000)")
    p.add_argument("--warmup", type=int, default=200, help="untimed bins before (default 200)")
    p.add_argument("--window-bins", type=int, default=None,
                   help="timed bins for the full-window rows (torch window, ort window); default --bins")
    p.add_argument("--extra-bins", type=int, default=500,
                   help="timed bins for the extra 'torch step' row (default 500)")
    p.add_argument("--parity-bins", type=int, default=100, help="bins per parity stream in the export")
    p.add_argument("--data", default=str(DATA), help="session file for counts (Poisson counts if absent)")
    p.add_argument("--channels", type=int, default=196, help="channels when --data is absent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pin", type=int, default=None, help="pin the process to this CPU (default: no pinning)")
    p.add_argument("--no-profile", action="store_true", help="skip the ORT profiles / limit analysis")
    args = p.parse_args(argv)
    args.window_bins = args.window_bins or args.bins
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})

    import onnxruntime as ort
    import torch

    need = args.warmup + max(args.bins, args.window_bins, args.extra_bins)
    data = Path(args.data)
    if data.is_file():
        from rpnt_core.data import load_session

        sess = load_session(data)
        counts = np.asarray(sess.counts, dtype=np.float32)
        source = f"{data.name} ({counts.shape[1]} channels)"
        if len(counts) < need:
            counts = np.concatenate([counts] * (need // len(counts) + 1))
        counts = counts[:need]
    else:
        from exporters.parity import random_counts

        counts = random_counts(need, args.channels, seed=args.seed)
        source = f"Poisson counts ({args.channels} channels; {data} not found)"
    print(f"counts: {source}", flush=True)

    t_start = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    report: dict = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": load_before,
                    "platform": platform.platform()},
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "settings": {"bins": args.bins, "warmup": args.warmup, "window_bins": args.window_bins,
                     "extra_bins": args.extra_bins, "counts": source,
                     "threads": "1 (ORT intra/inter-op 1, no spinning; torch.set_num_threads(1))",
                     "gc": "paused during timed loops", "pinned_cpu": args.pin},
        "presets": {},
    }
    report["machine"]["memory_bandwidth_gbs"] = memory_bandwidth_gbs()
    report["machine"]["ort_node_dispatch_us"] = node_dispatch_us()
    report["machine"]["l3_bytes"] = l3_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        for preset in [x.strip() for x in args.presets.split(",") if x.strip()]:
            report["presets"][preset] = run_preset(preset, counts, args, Path(tmp))
    report["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["limits"] = limits(report)
    report["seconds"] = round(time.perf_counter() - t_start, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md)
    print(f"wrote {out} and {out.with_suffix('.md')} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
