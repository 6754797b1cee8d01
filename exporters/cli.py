"""``rpnt export``: checkpoint → ONNX step + window graphs, with parity checks.

Wired into the ``rpnt`` command as a sub-command; callable directly as ``main(argv)``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from .contract import DEFAULT_PARITY_BINS, DEFAULT_R2_GATE, DEFAULT_TOLERANCE

EXIT_OK = 0
EXIT_FAILED = 1  # parity or graph check failed: nothing written
EXIT_USAGE = 2  # bad arguments or inputs (argparse also uses 2)
EXIT_REJECTED = 3  # fp32 written, but a requested --int8/--fp16 variant failed its R² gate

DESCRIPTION = """\
Export a trained RPNT checkpoint (.safetensors) to ONNX for the real-time daemon.

Writes into DIR:
  rpnt_step.onnx          the step graph: one bin of counts + the model state in,
                          velocity + log-rates + the next state out (static shapes, opset 18,
                          ops TensorRT parses). This is what the daemon runs every bin.
  rpnt_window.onnx        the window graph: a fixed T-bin window in, outputs for every bin
                          (offline / batch decoding).
  rpnt_step.int8.onnx     with --int8: dynamic int8 for CPUs (ONNX Runtime CPU only).
  rpnt_step.fp16.onnx     with --fp16: half precision for GPUs.
  *.parity.json / .txt    the parity report of each graph.
  export.json             manifest (files, sha256, gate outcomes).

The model's contract (channel count, bin width, window, state layout, input/output names and
units, weights hash, data fingerprint, version) is stored inside each .onnx file; the daemon
reads it from there.

Before anything is written, ONNX Runtime runs the step graph bin by bin over a random stream
(and over --parity-data, if given) and compares it with the torch model: if the max abs error
of velocity or log-rates exceeds --tolerance, the export fails and writes nothing but the
reports (in DIR/export-failed/). A reduced-precision model is written only if its R² is within
--r2-gate of fp32 on the held-out stream (vs the real velocity when --parity-data has it,
else vs the fp32 outputs).
"""

EPILOG = """\
examples:
  rpnt export runs/m1/best.safetensors --out exports/m1
  rpnt export best.safetensors --out exports/m1 --int8 --parity-data data/session.npz
  rpnt export best.safetensors --out exports/m1 --fp16 --window-bins 512

exit status: 0 exported; 1 parity/graph check failed (nothing written);
             2 bad arguments or inputs; 3 fp32 exported but a requested --int8/--fp16
             variant failed its R² gate (not written).
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``rpnt export`` argument parser."""
    p = argparse.ArgumentParser(
        prog="rpnt export",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint", metavar="CKPT", help="checkpoint file (.safetensors) written by rpnt training"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        required=True,
        help="output directory (created if missing; a previous export in it is replaced)",
    )
    p.add_argument("--int8", action="store_true", help="also write a dynamic-int8 step graph for CPU serving")
    p.add_argument("--fp16", action="store_true", help="also write a float16 step graph for GPU serving")
    p.add_argument(
        "--window-bins",
        metavar="T",
        type=int,
        default=None,
        help="bins in the window graph (default: the model's receptive field + 127)",
    )
    p.add_argument(
        "--parity-data",
        metavar="FILE",
        default=None,
        help="a session (.npz/.mat/.nwb) whose counts (its last --parity-bins bins) are also "
        "used for the parity check; its channel count and bin width must match the model",
    )
    p.add_argument(
        "--parity-bins",
        metavar="N",
        type=int,
        default=DEFAULT_PARITY_BINS,
        help="bins per parity stream (default %(default)s)",
    )
    p.add_argument(
        "--tolerance",
        metavar="X",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="max abs error allowed for the float32 graphs (default %(default)g)",
    )
    p.add_argument(
        "--r2-gate",
        metavar="X",
        type=float,
        default=DEFAULT_R2_GATE,
        help="max R² drop vs fp32 for --int8/--fp16 models to be written (default %(default)g)",
    )
    meta = p.add_argument_group(
        "metadata (baked into the export as the metadata bias; default: the metadata of the session the "
        "checkpoint was finetuned on, so the served model conditions exactly as `rpnt evaluate` scored it)"
    )
    meta.add_argument("--subject", default=None, help="subject name from the model's vocabulary")
    meta.add_argument("--session", default=None, help="session name from the model's vocabulary")
    meta.add_argument("--task", default=None, help="task name from the model's vocabulary")
    meta.add_argument("--date-days", type=float, default=None, help="recording date in days")
    meta.add_argument(
        "--force",
        action="store_true",
        help="allow changing some of the checkpoint's finetuning metadata but not all of it",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random parity stream")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final summary")
    return p


def _usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments before anything is loaded, or None."""
    if not Path(args.checkpoint).is_file():
        return f"checkpoint not found: {args.checkpoint}"
    if args.parity_data is not None and not Path(args.parity_data).is_file():
        return f"parity data not found: {args.parity_data}"
    if args.window_bins is not None and args.window_bins < 1:
        return "--window-bins must be ≥ 1"
    return None


def main(argv: list[str] | None = None) -> int:
    """``rpnt export``; returns the exit status (``EXIT_*``)."""
    args = build_parser().parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    problem = _usage_error(args)
    if problem:
        print(f"rpnt export: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    log("loading torch and the exporter ...")
    try:
        from rpnt_core.checkpoint import CheckpointError, read_header

        from .graph_checks import GraphCheckError
        from .onnx_export import ExportError, export_checkpoint, resolve_metadata
        from .parity import ParityError
    except ImportError as exc:
        print(f"rpnt export: error: {exc} (install the extra: pip install 'rpnt[export]')", file=sys.stderr)
        return EXIT_USAGE

    ckpt = Path(args.checkpoint)
    given = {"subject": args.subject, "session": args.session, "task": args.task, "date_days": args.date_days}
    try:
        metadata = resolve_metadata(read_header(ckpt)[1].get("metadata"), given, force=args.force)
        result = export_checkpoint(
            ckpt,
            args.out,
            parity_data=args.parity_data,
            int8=args.int8,
            fp16=args.fp16,
            window_bins=args.window_bins,
            parity_bins=args.parity_bins,
            tolerance=args.tolerance,
            r2_gate_limit=args.r2_gate,
            metadata=metadata,
            seed=args.seed,
            log=log,
        )
    except (ParityError, GraphCheckError) as exc:
        print(f"rpnt export: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ExportError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"rpnt export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(result.summary())
    if not result.rejected:
        return EXIT_OK
    rejected = "; ".join(f"{k} ({v})" for k, v in result.rejected.items())
    print(
        textwrap.fill(f"note: requested reduced-precision model(s) not written: {rejected}"), file=sys.stderr
    )
    return EXIT_REJECTED


if __name__ == "__main__":  # python -m exporters.cli
    raise SystemExit(main(sys.argv[1:]))
