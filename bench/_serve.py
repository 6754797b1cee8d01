"""``rpnt serve`` as the HTTP benchmarks (bench_service, bench_live_page, bench_calibration) run it:
one child process with ``--gc-freeze`` on a fresh registry, the replay that feeds it in a thread,
and the random-weight model they serve."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rpnt_core.child_env import child_env

if TYPE_CHECKING:
    from service.demo import ServeProcess

REPO = Path(__file__).resolve().parents[1]


def random_export(n_channels: int, bin_s: float, out: Path) -> Path:
    """A random-weight ``small`` RPNT (seed 0, 2 outputs) saved under ``out`` and exported as a
    step graph; returns the export directory."""
    import torch

    from exporters.onnx_export import export_step_graph
    from rpnt_core import RPNT, RPNTConfig, save_checkpoint

    torch.manual_seed(0)
    model = RPNT(RPNTConfig.preset("small", n_channels=n_channels, n_outputs=2, bin_s=bin_s)).eval()
    (out / "export").mkdir(parents=True, exist_ok=True)
    ckpt = out / "live.safetensors"
    save_checkpoint(model, ckpt, meta={"kind": "scratch", "data_fingerprint": "bench-random"})
    export_step_graph(model, out / "export" / "rpnt_step.onnx", checkpoint=str(ckpt.resolve()))
    return out / "export"


class Served:
    """``with Served(...) as serve:`` — ``rpnt serve --gc-freeze`` seeded with ``export`` on a fresh
    registry under ``run_dir``, ready (its ready line logged) inside the block, stopped on leaving
    it; :attr:`exit_code` is the serve process's exit status afterwards.

    Args:
        export: the export directory the registry is seeded with.
        run_dir: holds the registry, the ipc:// endpoints and ``serve.log``.
        log: one line per event (the ready line).
        env: extra environment for the serve process (settings such as ``RPNT_CALIBRATION__NICE``).
        extra: extra ``rpnt serve`` flags.
        code: run another checkout of this repository (its root: first on ``PYTHONPATH`` and the
            working directory) instead of this one.
        ready_timeout: seconds to wait for the ready line.
    """

    def __init__(
        self,
        *,
        export: Path,
        run_dir: Path,
        log: Callable[[str], None],
        env: dict[str, str] | None = None,
        extra: Sequence[str] = (),
        code: Path | None = None,
        ready_timeout: float = 120.0,
    ) -> None:
        self.export, self.run_dir, self.log = export, run_dir, log
        self.env, self.extra, self.code, self.ready_timeout = (
            dict(env or {}),
            list(extra),
            code,
            ready_timeout,
        )
        self.exit_code: int | None = None
        self._proc: ServeProcess | None = None

    def __enter__(self) -> ServeProcess:
        from service.demo import ServeProcess

        root = self.code or REPO
        # only PYTHONPATH from child_env: ServeProcess adds the rest of this environment itself
        path = child_env()["PYTHONPATH"] if self.code is None else str(self.code)
        self._proc = ServeProcess(
            model=self.export,
            registry=self.run_dir / "registry",
            run_dir=self.run_dir,
            token=secrets.token_urlsafe(16),
            extra=["--gc-freeze", *self.extra],
            env={"PYTHONPATH": path, **self.env},
            cwd=root,  # ``python -m`` puts the working directory first on sys.path
        )
        try:
            ready = self._proc.wait_ready(timeout=self.ready_timeout)
        except BaseException:
            self.exit_code = self._proc.stop()
            raise
        self.log(f"rpnt serve up ({ready['decoder']}, {ready['n_channels']} channels) from {root}")
        return self._proc

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self.exit_code = self._proc.stop()


class ReplayThread(threading.Thread):
    """:func:`streaming.replay.run_replay` with ``kwargs`` in a thread of its own; after
    :meth:`join`, :meth:`result` is its result, or raises what it raised."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(name="bench-replay")
        self._kwargs = kwargs
        self._result: object = None
        self._error: BaseException | None = None

    def run(self) -> None:
        from streaming.replay import run_replay

        try:
            self._result = run_replay(**self._kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self._error = exc

    def result(self):  # noqa: ANN201 - streaming.replay's result type
        if self._error is not None:
            raise RuntimeError(f"replay failed: {self._error}") from self._error
        return self._result
