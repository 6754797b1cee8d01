# Over 500 lines: one self-contained benchmark script (machine roofs, graph costs, every engine row and its report).
"""Inference-engine benchmark (issues #3, #18): per-bin latency of every way to run RPNT online,
against the machine's measured floor.

One command, one run:

    python bench/bench_engines.py --out bench/results/engines.json      # --quick: a short version

For the ``paper`` (d_model 512, 4 layers, 16 heads, W = 50) and ``small`` presets, with random
weights (weights do not change the timing) and N = 196 channels, it streams the counts of a real
session (StevensonV2.mat from ../shared/data; Poisson counts when absent) one bin at a time:

- ``torch window``: torch full-window recompute — at every bin the full forward over the last
  W bins, keeping the last output (the naive way; W < receptive field, so it is also inexact);
- ``ort window``: the same with ONNX Runtime and the exported window graph (T = W);
- ``ort step fp32``: the exported step graph (IOBinding, double-buffered state) — the daemon's path;
- ``ort step fp32 (run)``: the same through ``session.run`` (no IOBinding), to show what binding buys;
- ``ort step int8``: the dynamic-int8 step graph;
- ``torch step``: ``RPNT.step`` through the torch engine (development back-end).

Every step row is timed **back to back** (``--bins`` bins after ``--warmup``) and **paced**
(``--paced-bins``, one step every ``--period-ms`` = 20 ms as the daemon runs, the thread sleeping
in between); the daemon's engines also paced with a **keep-warm** (the same thread spins on the
clock until the next bin instead of sleeping: no other core is taken).  Paced rows record this
thread's page faults and context switches per step (``resource.getrusage``).

**Floor.**  The machine's roofs are measured first, one thread: read and copy bandwidth over a
buffer inside the L3 and one far larger (DRAM), a square GEMM and an L2-resident GEMV.  Each step
graph's FLOPs and bytes per bin come from its ONNX shapes (:func:`graph_cost`: weights + state in +
state out); its floor is max(memory, compute) at those roofs (:func:`floor_us`), and every step
row reports its median's ratio to that floor.

Every engine runs single-threaded (ORT: 1 intra-op + 1 inter-op thread, no spinning; torch:
``set_num_threads(1)``), as the daemon does.  Latency is wall time around ``engine.step(counts)``
(validation, Python and ORT included), the garbage collector paused during timed loops; the
thread's CPU time is recorded too (it excludes preemption by other processes on this shared box).
R² loss is ``1 − R²(fp32 torch streaming outputs, engine outputs)`` over the timed bins (pooled,
variance-weighted).  The × column is the median latency of ``torch window`` divided by the
engine's, from the same run.

It also records an ORT profile of the step graphs summed by op type, the node count after ORT's
optimisation and the per-node dispatch cost of this ORT (a chain of tiny Adds).  It prints a
table and writes JSON (``--out``) and Markdown (same path, ``.md``), with the load average before
and after: the box is shared, and p99s move with other tenants' load.
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
        mult = {"K": 1024, "M": 1024**2}.get(txt[-1], 1)
        return int(txt.rstrip("KM")) * mult
    except (OSError, ValueError):
        return 0


def stats_us(ts_ns: np.ndarray) -> dict:
    us = ts_ns / 1e3
    return {
        "median_us": float(np.median(us)),
        "p99_us": float(np.percentile(us, 99)),
        "p999_us": float(np.percentile(us, 99.9)),
        "mean_us": float(us.mean()),
        "min_us": float(us.min()),
        "max_us": float(us.max()),
        "n": int(len(us)),
    }


def time_stream(
    step,
    counts: np.ndarray,
    warmup: int,
    *,
    period_s: float = 0.0,
    keep_warm: bool = False,
    prewarm=None,
    prewarm_lead_s: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Run ``step(t)`` for every bin; returns (outputs (T, D), wall ns, thread-CPU ns, counters),
    the times for bins ≥ warmup.  Wall time is what the daemon sees; thread CPU time excludes the
    time the thread was preempted (this box is shared), i.e. what the engine itself costs.

    ``period_s`` > 0 paces the loop as the daemon runs: each step starts one period after the
    previous one started, the thread sleeping in between (or, with ``keep_warm``, spinning on the
    clock in this same thread, so no other core is taken).  Counters: minor/major page faults and
    voluntary/involuntary context switches of this thread during the timed steps (per step).
    ``prewarm`` (paced only): called ``prewarm_lead_s`` before each step's start, untimed (the
    engine's ``prewarm``: one run that does not advance the stream)."""
    import resource

    outs = []
    n = len(counts) - warmup
    wall = np.empty(n, dtype=np.int64)
    cpu = np.empty(n, dtype=np.int64)
    clock_cpu, clock_wall = time.thread_time_ns, time.perf_counter_ns
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    fields = ("ru_minflt", "ru_majflt", "ru_nvcsw", "ru_nivcsw")
    acc = dict.fromkeys(fields, 0)
    period_ns = int(period_s * 1e9)
    gc.collect()
    gc.disable()
    try:
        nxt = clock_wall()
        for t in range(len(counts)):
            if period_ns:
                nxt += period_ns
                if prewarm is not None:
                    rest = nxt - int(prewarm_lead_s * 1e9) - clock_wall()
                    if rest > 0:
                        time.sleep(rest / 1e9)
                    prewarm()
                if keep_warm:
                    while clock_wall() < nxt:
                        pass
                else:
                    rest = nxt - clock_wall()
                    if rest > 0:
                        time.sleep(rest / 1e9)
            r0 = resource.getrusage(who)
            c0 = clock_cpu()
            t0 = clock_wall()
            y = step(t)
            t1 = clock_wall()
            c1 = clock_cpu()
            r1 = resource.getrusage(who)
            outs.append(y)
            if t >= warmup:
                wall[t - warmup] = t1 - t0
                cpu[t - warmup] = c1 - c0
                for f in fields:
                    acc[f] += getattr(r1, f) - getattr(r0, f)
    finally:
        gc.enable()
    counters = {f[3:] + "_per_step": acc[f] / max(1, n) for f in fields}
    return np.stack(outs).astype(np.float32), wall, cpu, counters


def _best_rate(fn, nbytes: float, repeats: int) -> float:
    """Best-of-``repeats`` rate of ``fn()`` in GB/s for ``nbytes`` of traffic (best = what the
    machine can do when nothing else is using it)."""
    best = 0.0
    fn()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def bandwidth(nbytes: int, repeats: int) -> dict:
    """Single-thread read (``np.sum``) and copy (``np.copyto``, read + write traffic) rates over
    a float32 buffer of ``nbytes``, GB/s."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    return {
        "bytes": int(a.nbytes),
        "read_gbs": _best_rate(lambda: a.sum(), a.nbytes, repeats),
        "copy_gbs": _best_rate(lambda: np.copyto(b, a), 2 * a.nbytes, repeats),
    }


def matmul_throughput() -> dict:
    """Single-thread float32 GFLOP/s: a square GEMM (the compute roof) and a batch-1 GEMV whose
    512 KiB of weights sit in L2 (a step's matmuls are GEMVs; this is their rate without the
    memory roof)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512), dtype=np.float32)
    b = rng.standard_normal((512, 512), dtype=np.float32)
    gemm = _best_rate(lambda: a @ b, 2 * 512**3, 10)  # "GB/s" of flops → GFLOP/s
    w = rng.standard_normal((512, 256), dtype=np.float32)
    x = rng.standard_normal((1, 512), dtype=np.float32)

    def gemv() -> None:
        for _ in range(100):
            x @ w

    return {"gemm_gflops": gemm, "gemv_gflops_l2": _best_rate(gemv, 100 * 2 * 512 * 256, 10)}


def machine_roofs(quick: bool) -> dict:
    """Measured roofs of this machine: L3-resident and DRAM bandwidth, matmul throughput."""
    l3 = l3_bytes() or 32 * 2**20
    small = bandwidth(min(8 * 2**20, l3 // 4), 20 if quick else 50)  # > L2, well inside L3
    large = bandwidth((128 if quick else 256) * 2**20, 3 if quick else 5)  # ≫ L3: DRAM
    return {"l3_bytes": l3, "l3_bandwidth": small, "dram_bandwidth": large, **matmul_throughput()}


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
    g = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, shape)],
        [onnx.numpy_helper.from_array(np.ones(shape, np.float32), "c")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    s = ort.InferenceSession(
        m.SerializeToString(), session_options(optimization="basic"), providers=["CPUExecutionProvider"]
    )
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


_MATMULS = (
    "MatMul",
    "Gemm",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "FusedMatMul",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QLinearMatMul",
)


def graph_cost(path: Path) -> dict:
    """FLOPs and bytes one step of an ONNX graph needs, from its shapes.

    FLOPs: 2·M·K·N per MatMul/Gemm (K from the weight or the second input), one per output
    element for every other node.  Bytes: weights (initializers) read once, the state read and
    the next state written (graph inputs/outputs other than counts and the heads' outputs)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=False)
    g = m.graph
    shapes: dict[str, list[int]] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
    for i in g.initializer:
        shapes[i.name] = list(i.dims)
    matmul = other = 0
    for n in g.node:
        out = shapes.get(n.output[0]) if n.output else None
        if out is None:
            continue
        size = int(np.prod(out)) if out else 1
        if n.op_type in _MATMULS and len(n.input) > 1:
            a = shapes.get(n.input[0])
            k = a[-1] if a else 1
            if n.op_type == "Gemm" and any(at.name == "transA" and at.i for at in n.attribute) and a:
                k = a[-2]
            matmul += 2 * size * k
        else:
            other += size
    weights = int(sum(numpy_helper.to_array(i).nbytes for i in g.initializer))

    def nbytes(vi) -> int:
        t = vi.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        return int(np.prod(dims)) * 4 if dims else 4

    state_in = sum(nbytes(i) for i in g.input if i.name.startswith("state."))
    state_out = sum(nbytes(o) for o in g.output if o.name.startswith("next_state."))
    return {
        "matmul_flops": int(matmul),
        "other_flops": int(other),
        "flops": int(matmul + other),
        "weight_bytes": weights,
        "state_bytes_in": int(state_in),
        "state_bytes_out": int(state_out),
        "bytes": int(weights + state_in + state_out),
        "onnx_nodes": len(g.node),
    }


def floor_us(cost: dict, roofs: dict) -> dict:
    """The step's floor on this machine: max(compute, memory), each at its measured roof.

    Memory: weights + state at the L3 read rate when they fit in the L3, else at the DRAM read
    rate (an optimistic floor on a shared machine: other tenants use the L3 too).  Compute: the
    matmul FLOPs at the L2-resident GEMV rate (batch 1: a step's matmuls are GEMVs) plus the
    other FLOPs at the GEMM rate (elementwise work vectorises at least as well)."""
    fits = cost["bytes"] <= roofs["l3_bytes"]
    bw = roofs["l3_bandwidth" if fits else "dram_bandwidth"]["read_gbs"]
    mem = cost["bytes"] / (bw * 1e9) * 1e6
    comp = (
        cost["matmul_flops"] / (roofs["gemv_gflops_l2"] * 1e9)
        + cost["other_flops"] / (roofs["gemm_gflops"] * 1e9)
    ) * 1e6
    return {
        "floor_us": max(mem, comp),
        "memory_us": mem,
        "compute_us": comp,
        "bound": "memory" if mem >= comp else "compute",
        "level": "L3" if fits else "DRAM",
        "read_gbs": bw,
    }


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
    return {
        "runs": nr,
        "model_run_median_us_profiled": float(np.median(runs[20:])) if len(runs) > 20 else None,
        "kernel_us_per_step": total,
        "by_op": [
            {"op": op, "us_per_step": round(us, 1), "share": round(us / total, 3), "nodes": k}
            for op, us, k in table
        ],
    }


_BASELINE_EXPORT = """
import sys, torch
from rpnt_core import RPNT, RPNTConfig
from exporters.onnx_export import export_step_graph
from exporters.quantize import quantize_int8
preset, n_ch, weights, out, out8 = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
model = RPNT(RPNTConfig.preset(preset, n_channels=n_ch)).eval()
model.load_state_dict(torch.load(weights, weights_only=True))
export_step_graph(model, out)
quantize_int8(out, out8)
"""


def baseline_step_graphs(ref: str, model, preset: str, out: Path) -> dict[str, Path]:
    """The fp32 and int8 step graphs of ``model``'s weights as the code at git ``ref`` exports
    them (``git archive`` of rpnt_core/ and exporters/ into ``out``, exported in a child process),
    so that a graph change is timed against its predecessor in the same run."""
    import subprocess

    import torch

    from rpnt_core.child_env import child_env

    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "rpnt_core", "exporters"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    weights = out / "weights.pt"
    torch.save(model.state_dict(), weights)
    files = {"fp32": out / "step.onnx", "int8": out / "step.int8.onnx"}
    env = child_env(PYTHONPATH=str(src))  # the archived code, not this checkout
    subprocess.run(
        [
            sys.executable,
            "-c",
            _BASELINE_EXPORT,
            preset,
            str(model.config.n_input_channels),
            str(weights),
            str(files["fp32"]),
            str(files["int8"]),
        ],
        check=True,
        env=env,
        cwd=str(src),
        capture_output=True,
    )
    return files


def _add_speedups(results: dict[str, dict]) -> None:
    """Each row's median and p99 speedup over the torch full-window recompute, in place."""
    base, base99 = results["torch window"]["median_us"], results["torch window"]["p99_us"]
    for st in results.values():
        st["speedup_vs_torch_window"] = base / st["median_us"]
        st["p99_speedup_vs_torch_window"] = base99 / st["p99_us"]


def _graph_analysis(graphs: dict[str, Path], stream: np.ndarray) -> dict[str, dict]:
    """Per step graph: ONNX nodes and ops after ORT's optimisation, weight bytes, kernel-time profile."""
    analysis = {}
    for key, path in graphs.items():
        nodes, ops = optimized_node_count(path)
        analysis[f"ort step {key}"] = {
            "onnx_nodes_after_ort_optimisation": nodes,
            "ops_after_optimisation": ops,
            "weight_bytes": weight_bytes(path),
            "profile": profile_by_op(path, stream, n=200),
        }
    return analysis


def run_preset(preset: str, counts: np.ndarray, args, root: Path, roofs: dict) -> dict:
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
    print(
        f"\n[{preset}] exporting (d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} heads, W {w}, "
        f"N {n_ch}, receptive field {model.receptive_field}) ...",
        flush=True,
    )
    t0 = time.perf_counter()
    # parity on real counts without a target: the int8 gate is then R² vs the fp32 outputs
    res = export_model(
        model,
        out,
        int8=True,
        window_bins=w,
        parity_counts=counts,
        parity_bins=args.parity_bins,
        seed=args.seed,
    )
    export_s = time.perf_counter() - t0
    step32 = res.files["step"]
    step8 = res.files.get("step.int8")
    gate8 = res.reports["step.int8"]["gate"]
    if step8 is None:  # rejected by the gate: time it anyway, flagged
        step8 = quantize_int8(step32, out / "rejected.int8.onnx")

    stream = counts[: args.warmup + max(args.bins, args.paced_bins + args.paced_warmup)]
    with torch.no_grad():
        ref = model.predict_stream(torch.from_numpy(stream)[None])["velocity"][0].numpy()

    from exporters.quantize import calibration_feeds, quantize_int8_static

    step8s = quantize_int8_static(
        step32, out / "step.int8-static.onnx", calibration_feeds(step32, counts[-args.calibration_bins :])
    )
    graphs = {"fp32": step32, "int8": step8, "int8 static": step8s}
    if args.baseline_ref:
        print(f"  exporting the {args.baseline_ref} step graphs of the same weights ...", flush=True)
        base = baseline_step_graphs(args.baseline_ref, model, preset, out / "baseline")
        graphs.update({f"{k} @{args.baseline_ref}": v for k, v in base.items()})

    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    costs = {k: graph_cost(v) for k, v in graphs.items()}
    floors = {k: floor_us(v, roofs) for k, v in costs.items()}

    def timed(fn, n: int, warmup: int, start: int, **pace) -> dict:  # noqa: ANN003
        y, ts, cpu, counters = time_stream(
            lambda t: fn(t + start), stream[start : start + warmup + n], warmup, **pace
        )
        st = stats_us(ts)
        st["cpu"] = stats_us(cpu)
        st["counters"] = counters
        full = ref[start : start + warmup + n]
        st["r2_loss_vs_fp32_torch"] = float(1.0 - r2_score(full[warmup:], y[warmup:]))
        return st

    def record(
        name: str,
        fn,
        n_bins: int | None = None,
        warmup: int | None = None,
        *,
        floor: str | None = None,
        paced: bool = False,
        keep_warm: bool = False,
        reset=None,
        prewarm=None,
    ) -> None:
        # back to back: every row times the same bins, stream[args.warmup : args.warmup + n]; a row
        # may start its (untimed) warm-up later than bin 0 when it needs fewer warm-up bins
        n = args.bins if n_bins is None else n_bins
        wu = args.warmup if warmup is None else min(warmup, args.warmup)
        st = timed(fn, n, wu, args.warmup - wu)
        line = (
            f"  {name:<24} b2b median {st['median_us']:9.1f} µs p99 {st['p99_us']:9.1f}"
            f" (CPU p99 {st['cpu']['p99_us']:8.1f})"
        )
        if floor is not None:
            st["floor_us"] = floors[floor]["floor_us"]
            st["floor_key"] = floor
            st["ratio_to_floor"] = st["median_us"] / st["floor_us"]
            line += f" ×floor {st['ratio_to_floor']:5.1f}"
        modes = (
            ([("paced", False, args.period_ms)] if paced else [])
            + ([("paced_prewarm", False, args.period_ms)] if prewarm is not None else [])
            + ([("paced_keep_warm", True, args.period_ms)] if keep_warm else [])
            + ([(f"paced_{ms:g}ms", False, ms) for ms in args.period_sweep] if keep_warm else [])
        )
        for key, spin, ms in modes:
            if reset is not None:
                reset()
            pw = prewarm if key == "paced_prewarm" else None
            ps = timed(
                fn,
                args.paced_bins,
                args.paced_warmup,
                0,
                period_s=ms / 1e3,
                keep_warm=spin,
                prewarm=pw,
                prewarm_lead_s=args.prewarm_lead_ms / 1e3,
            )
            if floor is not None:
                ps["ratio_to_floor"] = ps["median_us"] / st["floor_us"]
            st[key] = ps
            line += f" | {key} {ps['median_us']:.0f}/{ps['p99_us']:.0f}"
        line += f"  R² loss {st['r2_loss_vs_fp32_torch']:.2e}"
        results[name] = st
        print(line, flush=True)

    # --- full-window recompute (naive): last W bins, keep the last output
    pad = np.concatenate([np.zeros((w - 1, n_ch), np.float32), stream])  # zero history before bin 0

    @torch.no_grad()
    def torch_window(t: int) -> np.ndarray:
        x = torch.from_numpy(pad[t : t + w])[None]
        return model(x)["velocity"][0, -1].numpy()

    weng = OnnxWindowEngine(res.files["window"])

    def ort_window(t: int) -> np.ndarray:
        return weng.run(pad[t : t + w])["velocity"][-1]

    record("torch window", torch_window, args.window_bins, warmup=20)  # the window itself holds the history
    record("ort window", ort_window, args.window_bins, warmup=20)

    def step_row(name: str, eng, floor: str, **kw) -> None:
        eng.reset()
        if kw.get("keep_warm"):
            kw["prewarm"] = eng.prewarm
        record(name, lambda t: eng.step(stream[t]), floor=floor, paced=True, reset=eng.reset, **kw)

    step_row("ort step fp32", OnnxStepEngine(step32, warmup_bins=args.warmup), "fp32", keep_warm=True)
    step_row("ort step fp32 (run)", OnnxStepEngine(step32, warmup_bins=args.warmup, io_binding=False), "fp32")
    step_row("ort step int8", OnnxStepEngine(step8, warmup_bins=args.warmup), "int8", keep_warm=True)
    step_row("ort step int8 static", OnnxStepEngine(step8s, warmup_bins=args.warmup), "int8 static")
    from exporters.openvino_engine import OpenVinoStepEngine, openvino_available

    if openvino_available():
        step_row("openvino step fp32→bf16", OpenVinoStepEngine(step32, warmup_bins=args.warmup), "fp32")
        step_row("openvino step int8", OpenVinoStepEngine(step8, warmup_bins=args.warmup), "int8")
    for key in [k for k in graphs if "@" in k]:
        step_row(f"ort step {key}", OnnxStepEngine(graphs[key], warmup_bins=args.warmup), key)
    te = TorchEngine(model, warmup_bins=args.warmup)
    te.reset()
    record(
        "torch step", lambda t: te.step(stream[t]), args.extra_bins, floor="fp32", paced=True, reset=te.reset
    )

    _add_speedups(results)
    analysis = {} if args.no_profile else _graph_analysis(graphs, stream)
    return {
        "config": {
            "d_model": c.d_model,
            "n_layers": c.n_layers,
            "n_heads": c.n_heads,
            "window": w,
            "n_channels": n_ch,
            "receptive_field": model.receptive_field,
            "params": int(sum(p.numel() for p in model.parameters())),
        },
        "export_seconds": export_s,
        "int8_gate": gate8,
        "int8_written": "step.int8" in res.files,
        "cost": costs,
        "floor": floors,
        "engines": results,
        "analysis": analysis,
        "bar_p99_us": BARS_P99_US.get(preset),
    }


def _paced(st: dict, key: str) -> str:
    ps = st.get(key)
    return f"{ps['median_us']:.1f} / {ps['p99_us']:.1f}" if ps else "—"


def markdown(report: dict) -> str:
    m, st_ = report["machine"], report["settings"]
    roofs = m["roofs"]
    lines = [
        f"# Engine latency ({m['cpu']}, {m['cores']} cores, "
        f"onnxruntime {report['versions']['onnxruntime']}, torch {report['versions']['torch']})",
        "",
        f"Measured **under load** (shared machine): load average before/after {m['load_before']} / "
        f"{m['load_after']}.  Back to back: {st_['bins']} bins after {st_['warmup']} warm-up (window rows: "
        f"{st_['window_bins']} bins; torch step: {st_['extra_bins']}).  Paced: {st_['paced_bins']} bins after "
        f"{st_['paced_warmup']}, one step every {st_['period_ms']:g} ms as the daemon runs, the thread "
        f"sleeping in between (prewarm: the engine's `prewarm()` run {st_['prewarm_lead_ms']:g} ms before each "
        "bin; keep-warm: spinning in the same thread instead of sleeping).  Single thread, counts from "
        f"{st_['counts']}.  Latency is wall time around `step` (what the daemon sees; p99 includes "
        "preemption by other tenants); CPU time is the calling thread's.",
        "",
        "Machine roofs (one thread, best of repeats): "
        f"L3-resident read {roofs['l3_bandwidth']['read_gbs']:.1f} GB/s "
        f"({roofs['l3_bandwidth']['bytes'] / 2**20:.0f} MiB buffer; copy {roofs['l3_bandwidth']['copy_gbs']:.1f}), "
        f"DRAM read {roofs['dram_bandwidth']['read_gbs']:.1f} GB/s "
        f"({roofs['dram_bandwidth']['bytes'] / 2**20:.0f} MiB; copy {roofs['dram_bandwidth']['copy_gbs']:.1f}), "
        f"L3 {roofs['l3_bytes'] / 2**20:.0f} MiB, GEMM {roofs['gemm_gflops']:.0f} GFLOP/s, "
        f"L2-resident GEMV {roofs['gemv_gflops_l2']:.1f} GFLOP/s; ORT per-node dispatch "
        f"{m['ort_node_dispatch_us']:.2f} µs.",
        "",
    ]
    for preset, r in report["presets"].items():
        c = r["config"]
        lines += [
            f"## {preset} (d_model {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads, W {c['window']}, "
            f"N {c['n_channels']}, {c['params'] / 1e6:.1f} M params) — bar p99 ≤ {r['bar_p99_us']:g} µs paced",
            "",
        ]
        for prec, cost in r["cost"].items():
            f = r["floor"][prec]
            lines.append(
                f"- floor, step {prec}: {cost['flops'] / 1e6:.1f} MFLOP ({cost['matmul_flops'] / 1e6:.1f} in "
                f"matmuls), {cost['bytes'] / 1e6:.2f} MB per bin (weights {cost['weight_bytes'] / 1e6:.2f}, "
                f"state in/out {cost['state_bytes_in'] / 1e6:.2f}/{cost['state_bytes_out'] / 1e6:.2f}); "
                f"{cost['onnx_nodes']} ONNX nodes → memory {f['memory_us']:.0f} µs ({f['level']} at "
                f"{f['read_gbs']:.1f} GB/s), compute {f['compute_us']:.0f} µs → **floor {f['floor_us']:.0f} µs** "
                f"({f['bound']}-bound)"
            )
        lines += [
            "",
            "| engine | b2b median / p99 µs | paced median / p99 µs | paced + prewarm median / p99 µs | paced keep-warm (spin) median / p99 µs "
            "| CPU-time b2b median / p99 µs | × floor (b2b / paced median) | × vs torch window | R² loss vs fp32 torch |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, st in r["engines"].items():
            cp = st["cpu"]
            ratio = "—"
            if "ratio_to_floor" in st:
                ratio = f"{st['ratio_to_floor']:.1f}" + (
                    f" / {st['paced']['ratio_to_floor']:.1f}" if "paced" in st else ""
                )
            lines.append(
                f"| {name} | {st['median_us']:.1f} / {st['p99_us']:.1f} | {_paced(st, 'paced')} | "
                f"{_paced(st, 'paced_prewarm')} | "
                f"{_paced(st, 'paced_keep_warm')} | {cp['median_us']:.1f} / {cp['p99_us']:.1f} | {ratio} | "
                f"{st['speedup_vs_torch_window']:.1f} | {st['r2_loss_vs_fp32_torch']:.2e} |"
            )
        lines.append("")
        for name, st in r["engines"].items():
            sweep = sorted((float(k[6:-2]), st[k]) for k in st if k.startswith("paced_") and k.endswith("ms"))
            if sweep:
                per = ", ".join(
                    f"{ms:g} ms {x['median_us']:.0f} / {x['p99_us']:.0f}"
                    for ms, x in sweep + [(report["settings"]["period_ms"], st["paced"])]
                )
                lines.append(
                    f"- {name}, paced median / p99 µs by period (sleeping between steps): {per}; "
                    f"back to back {st['median_us']:.0f} / {st['p99_us']:.0f}"
                )
            for key in [k for k in st if k.startswith("paced")]:
                if key in st:
                    k = st[key]["counters"]
                    lines.append(
                        f"- {name}, {key}: per step {k['minflt_per_step']:.2f} minor faults, "
                        f"{k['nvcsw_per_step']:.2f} voluntary / {k['nivcsw_per_step']:.2f} involuntary "
                        f"context switches; CPU time median {st[key]['cpu']['median_us']:.1f} µs "
                        f"(b2b {st['cpu']['median_us']:.1f})"
                    )
        for name, a in r.get("analysis", {}).items():
            top = ", ".join(f"{o['op']} {o['share'] * 100:.0f}%" for o in a["profile"]["by_op"][:5])
            lines.append(
                f"- {name}: {a['onnx_nodes_after_ort_optimisation']} nodes after ORT optimisation, "
                f"{a['weight_bytes'] / 1e6:.1f} MB weights; profile (by op, share of kernel time): {top}"
            )
        lines.append("")
    lim = report.get("limits", {})
    if lim:
        lines += ["## What limits latency", ""] + [f"- {k}: {v}" for k, v in lim.items()] + [""]
    return "\n".join(lines)


def limits(report: dict) -> dict:
    """One line per step engine: its floor, the gap to it, the per-node dispatch share and the
    ORT profile's matmul share."""
    out = {}
    disp = report["machine"]["ort_node_dispatch_us"]
    for preset, r in report["presets"].items():
        for name, a in r.get("analysis", {}).items():
            st = r["engines"][name]
            prec = name.removeprefix("ort step ")
            f, cost = r["floor"][prec], r["cost"][prec]
            med = st["median_us"]
            nodes = a["onnx_nodes_after_ort_optimisation"]
            dispatch = nodes * disp
            gemm_share = sum(o["share"] for o in a["profile"]["by_op"] if o["op"] in _MATMULS)
            paced = st.get("paced", {})
            out[f"{preset} / {name}"] = (
                f"b2b median {med:.0f} µs = {med / f['floor_us']:.1f}× the {f['floor_us']:.0f} µs floor "
                f"({f['bound']}-bound: {cost['bytes'] / 1e6:.1f} MB from {f['level']}); paced median "
                f"{paced.get('median_us', float('nan')):.0f} / p99 {paced.get('p99_us', float('nan')):.0f} µs "
                f"(bar {r['bar_p99_us']:g}); {nodes} nodes × {disp:.2f} µs dispatch = {dispatch:.0f} µs; matmul "
                f"share of kernel time {gemm_share * 100:.0f}%"
            )
    return out


def rescore(report: dict) -> dict:
    """Recompute the floors, ratios and limit lines of a report from its own measurements (its
    costs and roofs), e.g. after a change to :func:`floor_us`; nothing is re-timed."""
    roofs = report["machine"]["roofs"]
    for r in report["presets"].values():
        r["floor"] = {k: floor_us(c, roofs) for k, c in r["cost"].items()}
        for st in r["engines"].values():
            if "floor_us" not in st:
                continue
            key = st.get("floor_key")
            if key is None:
                continue
            st["floor_us"] = r["floor"][key]["floor_us"]
            st["ratio_to_floor"] = st["median_us"] / st["floor_us"]
            for mode, ps in st.items():
                if mode.startswith("paced") and isinstance(ps, dict):
                    ps["ratio_to_floor"] = ps["median_us"] / st["floor_us"]
    report["limits"] = limits(report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out",
        default=str(REPO / "bench" / "results" / "engines.json"),
        help="JSON report (a Markdown table is written beside it, .md)",
    )
    p.add_argument("--presets", default="paper,small", help="comma-separated presets (default paper,small)")
    p.add_argument("--bins", type=int, default=2000, help="timed bins per engine (default 2000)")
    p.add_argument("--warmup", type=int, default=200, help="untimed bins before (default 200)")
    p.add_argument(
        "--window-bins",
        type=int,
        default=None,
        help="timed bins for the full-window rows (torch window, ort window); default --bins",
    )
    p.add_argument(
        "--extra-bins", type=int, default=500, help="timed bins for the extra 'torch step' row (default 500)"
    )
    p.add_argument("--parity-bins", type=int, default=100, help="bins per parity stream in the export")
    p.add_argument("--data", default=str(DATA), help="session file for counts (Poisson counts if absent)")
    p.add_argument("--channels", type=int, default=196, help="channels when --data is absent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pin", type=int, default=None, help="pin the process to this CPU (default: no pinning)")
    p.add_argument("--no-profile", action="store_true", help="skip the ORT profiles / limit analysis")
    p.add_argument("--paced-bins", type=int, default=500, help="timed bins per paced row (default 500)")
    p.add_argument("--paced-warmup", type=int, default=20, help="untimed paced bins before (default 20)")
    p.add_argument("--period-ms", type=float, default=20.0, help="pacing period, ms (default 20: one bin)")
    p.add_argument(
        "--calibration-bins",
        type=int,
        default=300,
        help="bins (from the end of the counts, not the timed ones) calibrating the static int8 graph",
    )
    p.add_argument(
        "--baseline-ref",
        default=None,
        metavar="REF",
        help="also time the step graphs the code at git REF exports for the same weights",
    )
    p.add_argument(
        "--period-sweep",
        default="0.5,2,5",
        help="extra pacing periods, ms, for the engines with a keep-warm row: does latency grow with "
        "the idle gap? (default 0.5,2,5)",
    )
    p.add_argument(
        "--prewarm-lead-ms",
        type=float,
        default=2.0,
        help="paced prewarm rows: run the engine's prewarm() this long before each bin (default 2)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="short run: 300 b2b bins after 50, 20 window bins, 100 torch-step bins, 150 paced bins",
    )
    p.add_argument(
        "--rescore",
        metavar="JSON",
        default=None,
        help="no run: recompute floors/ratios of an existing report (written back with its .md)",
    )
    args = p.parse_args(argv)
    if args.rescore:
        path = Path(args.rescore)
        report = rescore(json.loads(path.read_text()))
        path.write_text(json.dumps(report, indent=2) + "\n")
        path.with_suffix(".md").write_text(markdown(report) + "\n")
        print(f"rescored {path}")
        return 0
    if args.quick:
        args.bins, args.warmup, args.extra_bins, args.paced_bins = 300, 50, 100, 150
        args.window_bins = args.window_bins or 20
    args.window_bins = args.window_bins or args.bins
    args.period_sweep = [float(x) for x in args.period_sweep.split(",") if x.strip()]
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})

    import onnxruntime as ort
    import torch

    need = args.warmup + max(
        args.bins, args.window_bins, args.extra_bins, args.paced_bins + args.paced_warmup
    )
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
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "load_before": load_before,
            "platform": platform.platform(),
        },
        "versions": {
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "bins": args.bins,
            "warmup": args.warmup,
            "window_bins": args.window_bins,
            "extra_bins": args.extra_bins,
            "counts": source,
            "threads": "1 (ORT intra/inter-op 1, no spinning; torch.set_num_threads(1))",
            "gc": "paused during timed loops",
            "pinned_cpu": args.pin,
            "quick": args.quick,
            "baseline_ref": args.baseline_ref,
            "prewarm_lead_ms": args.prewarm_lead_ms,
            "paced_bins": args.paced_bins,
            "paced_warmup": args.paced_warmup,
            "period_ms": args.period_ms,
        },
        "note": "measured under load on a shared machine (see machine.load_before/after)",
        "presets": {},
    }
    print("measuring the machine's roofs ...", flush=True)
    report["machine"]["roofs"] = roofs = machine_roofs(args.quick)
    report["machine"]["ort_node_dispatch_us"] = node_dispatch_us()
    print(json.dumps(roofs), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in [x.strip() for x in args.presets.split(",") if x.strip()]:
            report["presets"][preset] = run_preset(preset, counts, args, Path(tmp), roofs)
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
