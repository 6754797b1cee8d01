"""``rpnt closedloop``: a simulated participant drives a cursor through the live daemon.

1. The participant (an encoding model fitted on a real center-out recording, or a documented
   synthetic one) watches an open-loop observation block (the cursor moves by its intention);
   the decoder is fitted on it: the classic baselines directly, RPNT trained from scratch and
   exported to ONNX.
2. The decoder is served by the real daemon — ``rpnt serve`` for RPNT, the daemon in a thread for
   baselines (they have no export) — and the participant runs the task in real time, 20 ms bins,
   over ZeroMQ, streaming ReFIT intention labels back as KINEMATICS.
3. ``--recalibrate`` (default ``refit``): the decoder is recalibrated from those labels
   (``POST /calibrate source=recent labels=refit`` for RPNT, a refit + hot swap for baselines;
   both put the labels on the first decoder's speed scale, :func:`~.refit.on_head_scale`) and a second
   block runs on the new decoder.
4. Metrics per block (success rate, time to target, dial-in, path efficiency, Fitts bitrate,
   bins lost); ``--out``: per-trial JSON, summary JSON and a PNG.  ``--json``: the last line is
   one JSON object (decoder, success_rate, median_time_to_target_s, bitrate_bps, bins_lost, …,
   of the last block).

Seeded: the same ``--seed`` gives the same participant, targets and noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

DECODERS = ("rpnt", "wiener", "kalman", "gru")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rpnt closedloop",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--decoder", choices=DECODERS, default="rpnt", help="the decoder under test (default rpnt)"
    )
    p.add_argument(
        "--seconds", type=float, default=60.0, help="seconds of each closed-loop block (real time)"
    )
    p.add_argument("--observe-s", type=float, default=180.0, help="seconds of the observation block")
    p.add_argument(
        "--recalibrate",
        choices=("refit", "intended", "decoded", "none"),
        default="refit",
        help="labels the decoder is recalibrated from after the first block (none: one block)",
    )
    p.add_argument(
        "--extra-latency-ms", type=float, default=0.0, help="added delay before a prediction moves the cursor"
    )
    p.add_argument("--task", choices=("center_out", "random"), default="center_out")
    p.add_argument("--radius", type=float, default=1.5, help="target radius (velocity units · s)")
    p.add_argument("--distance", type=float, default=8.0, help="target distance from the centre")
    p.add_argument("--hold-s", type=float, default=0.3)
    p.add_argument("--timeout-s", type=float, default=6.0)
    p.add_argument("--feedback-delay-ms", type=float, default=100.0, help="the participant's visual delay")
    p.add_argument(
        "--recording",
        type=Path,
        default=None,
        help="recording to fit the encoding on (default: the shared Nick center-out session, if present)",
    )
    p.add_argument("--synthetic", action="store_true", help="use the documented synthetic tuning instead")
    p.add_argument("--preset", default="small", help="RPNT preset trained from scratch (small | paper)")
    p.add_argument("--rpnt-epochs", type=int, default=10)
    p.add_argument("--rpnt-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=None, help="directory for trials.json, summary.json, closedloop.png"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    return p


def check_args(a: argparse.Namespace) -> str | None:
    """Why the parsed arguments cannot run (the message after ``error:``), or None."""
    for name in ("seconds", "observe_s", "radius", "distance", "timeout_s"):
        if not getattr(a, name) > 0:
            return f"--{name.replace('_', '-')} must be > 0"
    if a.extra_latency_ms < 0 or a.hold_s < 0 or a.feedback_delay_ms < 0:
        return "--extra-latency-ms, --hold-s and --feedback-delay-ms must be ≥ 0"
    return None


def spec_of(a: argparse.Namespace):
    """The :class:`~streaming.closedloop.session.ClosedLoopSpec` the arguments describe."""
    from .session import ClosedLoopSpec

    return ClosedLoopSpec(
        decoder=a.decoder,
        seconds=a.seconds,
        observe_s=a.observe_s,
        recalibrate=None if a.recalibrate == "none" else a.recalibrate,
        extra_latency_s=a.extra_latency_ms / 1e3,
        task_kind=a.task,
        radius=a.radius,
        distance=a.distance,
        hold_s=a.hold_s,
        timeout_s=a.timeout_s,
        feedback_delay_s=a.feedback_delay_ms / 1e3,
        recording=a.recording,
        synthetic=a.synthetic,
        preset=a.preset,
        rpnt_epochs=a.rpnt_epochs,
        rpnt_steps=a.rpnt_steps,
        seed=a.seed,
    )


HEADLINE_KEYS = (
    "success_rate",
    "median_time_to_target_s",
    "median_dial_in_s",
    "median_path_efficiency",
    "bitrate_bps",
    "bins_lost",
    "n_trials",
    "swaps",
)


def headline(a: argparse.Namespace, result: dict, workdir: Path) -> dict:
    """The ``--json`` object: the last block's metrics and what ran."""
    last = result["blocks"][-1]
    return {
        "decoder": a.decoder,
        **{k: last[k] for k in HEADLINE_KEYS},
        "block": last["name"],
        "extra_latency_ms": a.extra_latency_ms,
        "seed": a.seed,
        "encoding": result["encoding"]["source"],
        "out": str(workdir),
    }


def block_line(b: dict) -> str:
    """One human line of a block's metrics."""
    return (
        f"[closedloop] {b['name']}: success {b['success_rate']:.1%} of {b['n_trials']} trials, median time to "
        f"target {_f(b['median_time_to_target_s'])} s, dial-in {_f(b['median_dial_in_s'])} s, path efficiency "
        f"{_f(b['median_path_efficiency'])}, bitrate {_f(b['bitrate_bps'])} bits/s, bins lost {b['bins_lost']}"
    )


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    problem = check_args(a)
    if problem is not None:
        print(f"rpnt closedloop: error: {problem}", file=sys.stderr)
        return 2
    from .session import run_closedloop

    stream = sys.stderr if a.json else sys.stdout

    def log(*x) -> None:
        print(*x, file=stream, flush=True)

    try:
        workdir = Path(tempfile.mkdtemp(prefix="rpnt-closedloop-")) if a.out is None else a.out
        result = run_closedloop(spec_of(a), workdir=workdir, log=log)
    except FileNotFoundError as exc:
        print(f"rpnt closedloop: error: {exc}", file=sys.stderr)
        return 2
    for b in result["blocks"]:
        log(block_line(b))
    if a.json:
        print(json.dumps(headline(a, result, workdir)))
    return 0


def _f(x) -> str:
    return "–" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
