"""How long each step of the user's path takes on this machine: the figures next to the README's commands.

    python bench/bench_steps.py              # the Spike days from ../shared/data (≈ 30–60 min on 2 cores)
    python bench/bench_steps.py --only demo  # one step

Every step is the ``rpnt`` command a user types, run as a child process with its defaults, timed by
wall clock and by CPU time (user + system seconds of the command and its children), one run each
(a step's time is its own, not a distribution).  On a busy machine the wall clock says how busy it
was; the CPU time does not: on 2 idle cores a step takes between CPU/2 and CPU seconds of wall
clock (all its threads busy, or one), which is what the README quotes:

- ``inspect``: quality control of the 20 Spike days;
- ``pretrain``: the default pretraining on every clean Spike day (cursor position; supervised, as
  ``rpnt pretrain`` chooses on labelled days), the issue's ≤ 30 min budget — one torch thread, so
  its CPU time is its wall clock on an idle core (two threads on two idle cores take less);
- ``finetune``: the newest day calibrated from its first 60 s of labels (``--label-seconds 60``;
  timing only: that day is also in the pool, so its R² says nothing about transfer);
- ``evaluate``, ``export``: the finetuned checkpoint scored and exported to ONNX (with parity);
- ``demo``: ``rpnt demo`` as the README runs it.

The machine's load average is recorded before and after each step.  JSON to ``--out`` (default bench/results/steps.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPIKE = REPO.parent / "shared" / "data" / "limblab_spike_wf_2012"
STEPS = ("inspect", "pretrain", "finetune", "evaluate", "export", "demo")


def commands(work: Path) -> dict[str, list[str]]:
    days = sorted(SPIKE.glob("*.mat"))
    newest = str(days[-1])
    pre, ft = str(work / "pre.safetensors"), str(work / "ft.safetensors")
    return {
        "inspect": ["inspect", str(SPIKE)],
        "pretrain": [
            "pretrain",
            "--data",
            str(SPIKE),
            "--target",
            "position",
            "--out",
            pre,
            "--quiet",
            "--threads",
            "1",
        ],
        "finetune": [
            "finetune",
            "--init",
            pre,
            "--data",
            newest,
            "--target",
            "position",
            "--label-seconds",
            "60",
            "--out",
            ft,
            "--quiet",
            "--threads",
            "1",
        ],
        "evaluate": ["evaluate", "--ckpt", ft, "--data", newest, "--json"],
        "export": ["export", ft, "--out", str(work / "export"), "--parity-data", newest],
        "demo": ["demo", "--workdir", str(work / "demo"), "--quiet"],
    }


def run_step(name: str, argv: list[str]) -> dict:
    load_before = os.getloadavg()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rpnt_core.cli", *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru2.ru_utime - ru.ru_utime) + (ru2.ru_stime - ru.ru_stime)
    row = {
        "step": name,
        "command": "rpnt " + " ".join(Path(x).name if "/" in x else x for x in argv),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "exit": proc.returncode,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    if proc.returncode != 0:
        row["stderr_tail"] = proc.stderr[-2000:]
    print(
        f"{name:<9} {seconds:8.1f} s wall  {cpu:8.1f} s CPU  exit {proc.returncode}  load {load_before[0]:.1f} → "
        f"{row['load_after'][0]:.1f}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only", default=",".join(STEPS), help=f"comma list of steps (default: all of {', '.join(STEPS)})"
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "steps.json"))
    p.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    if not any(SPIKE.glob("*.mat")):
        print(f"bench_steps: no Spike days under {SPIKE.name}/ (shared data absent)", file=sys.stderr)
        return 2
    work = Path(a.workdir or tempfile.mkdtemp(prefix="rpnt-steps-"))
    work.mkdir(parents=True, exist_ok=True)
    cmds = commands(work)
    wanted = [s for s in STEPS if s in a.only.split(",")]
    out_path = Path(a.out)
    old = json.loads(out_path.read_text()).get("steps", []) if out_path.exists() else []
    rows = {r["step"]: r for r in old}
    for name in wanted:
        rows[name] = run_step(name, cmds[name]) | {"measured": time.strftime("%Y-%m-%d %H:%M")}
        result = {
            "benchmark": "steps",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": "wall-clock and CPU seconds (user + system, the command and its children) of each "
            "command with its defaults; load average before/after",
            "steps": [rows[s] for s in STEPS if s in rows],
        }
        out_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(rows[s]["exit"] == 0 for s in wanted) else 1


if __name__ == "__main__":
    raise SystemExit(main())
