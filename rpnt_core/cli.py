"""The one ``rpnt`` command.  Subcommands live in their own modules and are imported only when
invoked, so ``rpnt evaluate`` never loads uvicorn and ``rpnt serve`` need not import torch.

The table maps a subcommand to ``"module:function"``; the function takes ``argv`` (the
arguments after the subcommand) and returns an exit code.  Packages further up the dependency
chain (exporters, streaming, service) register here by name only — rpnt_core imports none of them.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("rpnt_core.commands:simulate_main", "write synthetic sessions with ground truth (NPZ)"),
    "inspect": (
        "rpnt_core.commands:inspect_main",
        "quality control: per-session facts and flags (unfit to train on)",
    ),
    "pretrain": ("rpnt_core.commands:pretrain_main", "self-supervised pretraining on unlabelled recordings"),
    "finetune": (
        "rpnt_core.commands:finetune_main",
        "supervised (few-shot) finetuning of a behaviour decoder",
    ),
    "evaluate": (
        "rpnt_core.commands:evaluate_main",
        "stream a session causally and print R² (and baselines)",
    ),
    "demo": (
        "service.demo:main",
        "simulate → pretrain → finetune → export → serve → real-time replay + calibration",
    ),
    "export": ("exporters.cli:main", "checkpoint → ONNX step and window graphs, with a parity check"),
    "serve": (
        "service.cli:serve_main",
        "run the decoder daemon (ZeroMQ in, predictions out) + its HTTP control plane",
    ),
    "replay": (
        "streaming.cli:replay_main",
        "replay a recorded session through the daemon and report R² + latency",
    ),
    "closedloop": (
        "streaming.closedloop.cli:main",
        "a simulated participant drives a cursor through the live "
        "daemon: success rate, time to target, bitrate",
    ),
}

OPTIONAL = {"exporters": "export", "streaming": "serve", "service": "serve"}


def _usage() -> str:
    lines = ["usage: rpnt <command> [options]   (rpnt <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand.

    Args:
        argv: the arguments after ``rpnt`` (``None``: ``sys.argv[1:]``).
    Returns:
        The subcommand's exit code; 2 for an unknown command or one whose package is not installed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in ("-V", "--version"):
        from .checkpoint import package_version

        print(package_version())
        return 0
    if name not in COMMANDS:
        print(f"rpnt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    module, func = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = OPTIONAL.get(top)
        hint = f" (install the extra: pip install 'rpnt[{extra}]')" if extra else ""
        print(f"rpnt {name}: cannot import {module}: {exc}{hint}", file=sys.stderr)
        return 2
    return int(getattr(mod, func)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
