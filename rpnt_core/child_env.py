"""The environment of the package's own child processes (calibration worker, upload parser,
exporter, daemon): the parent's, with this checkout first on ``PYTHONPATH`` so a child imports
the same code as its parent whether or not the package is installed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the folder holding rpnt_core/, exporters/, streaming/, service/


def child_env(base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """``base`` (default: this process's environment) with :data:`ROOT` first on ``PYTHONPATH``,
    then ``overrides`` (e.g. ``OMP_NUM_THREADS="1"``)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(overrides)
    return env
