"""Helpers shared by the streaming tests (no tests here): a numpy decoder, a live daemon on
loopback, stream/collect helpers, and one tiny ONNX export per test session.

The numpy :class:`FIRDecoder` implements the decoder contract with a finite receptive field, so
the daemon tests run in milliseconds; tests that claim to test the ONNX path export a real model
(:func:`tiny_export`) and load it with ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from rpnt_core.decoder import DecoderInfo
from streaming.client import PredictionSubscriber, RigClient, wait_for_daemon
from streaming.daemon import Daemon
from streaming.options import DaemonOptions
from streaming.protocol import Prediction
from streaming.replay import events_from_counts

BIN_NS = 20_000_000
LIVE_TIMEOUT = 60.0  # liveness only: generous, never a timing assertion


class FIRDecoder:
    """velocity_t = Σ_{i<R} W_i · counts_{t−i} + b: causal, stateful, receptive field R."""

    def __init__(
        self,
        n_channels: int = 8,
        n_outputs: int = 2,
        *,
        taps: int = 3,
        seed: int = 0,
        version: str = "fir-a",
        bin_s: float = 0.02,
        fail_on: set[int] | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.W = rng.standard_normal((taps, n_outputs, n_channels)).astype(np.float32)  # (R, D, N)
        self.b = rng.standard_normal(n_outputs).astype(np.float32)
        self.fail_on = fail_on or set()
        self._info = DecoderInfo(
            n_channels=n_channels,
            n_outputs=n_outputs,
            bin_s=bin_s,
            name="fir",
            version=version,
            fingerprint=f"fp-{version}",
            extra={"receptive_field": taps},
        )
        self.reset()

    @property
    def info(self) -> DecoderInfo:
        return self._info

    def reset(self) -> None:
        self.hist = np.zeros((self.W.shape[0], self.W.shape[2]), dtype=np.float32)  # (R, N), row 0 = newest
        self.t = 0

    def step(self, counts: np.ndarray) -> np.ndarray:
        self.t += 1
        if self.t in self.fail_on:
            raise RuntimeError(f"boom at step {self.t}")
        self.hist[1:] = self.hist[:-1]
        self.hist[0] = counts
        return (np.einsum("rdn,rn->d", self.W, self.hist) + self.b).astype(np.float32)


def offline(decoder, counts: np.ndarray) -> np.ndarray:
    """Reference: reset + step per bin (the contract's decode_stream)."""
    from rpnt_core.decoder import decode_stream

    return decode_stream(decoder, counts)


def short_ipc_dir() -> str:
    return tempfile.mkdtemp(prefix="rpnt-t")  # short: unix socket paths are limited to ~107 bytes


@contextlib.contextmanager
def live_daemon(decoder, *, bin_s: float = 0.02, transport: str = "ipc", source_id: int = 1, **options):
    """A started daemon (loop in a thread), a connected rig client and a live subscriber."""
    tmp = short_ipc_dir()
    if transport == "ipc":
        ingest, publish = f"ipc://{tmp}/in", f"ipc://{tmp}/out"
    else:
        ingest = publish = "tcp://127.0.0.1:*"  # the OS picks free loopback ports
    d = Daemon(decoder=decoder, bin_s=bin_s, ingest=ingest, publish=publish, options=DaemonOptions(**options))
    d.start()
    rig = RigClient(endpoint=d.endpoints["ingest"], source_id=source_id)
    sub = PredictionSubscriber(endpoint=d.endpoints["publish"])
    try:
        wait_for_daemon(rig, sub, timeout=LIVE_TIMEOUT)
        yield d, rig, sub
    finally:
        rig.close()
        sub.close()
        d.stop()
        assert d.join(LIVE_TIMEOUT), "daemon thread did not exit"
        shutil.rmtree(tmp, ignore_errors=True)


def send_stream(
    rig: RigClient,
    counts: np.ndarray,
    *,
    bin_ns: int = BIN_NS,
    first_bin: int = 0,
    reset: bool = True,
    free_run: bool = True,
    kinematics: np.ndarray | None = None,
) -> None:
    """RESET at bin ``first_bin`` then one SPIKES packet per bin (events + clock at the bin's end)."""
    if reset:
        rig.send_reset(start=first_bin * bin_ns, free_run=free_run)
    chans, times = events_from_counts(counts, bin_ns, first_bin=first_bin)
    for i in range(counts.shape[0]):
        rig.send_spikes(chans[i], times[i], clock=(first_bin + i + 1) * bin_ns)
        if kinematics is not None:
            rig.send_kinematics(first_bin + i, kinematics[i])


def collect(
    sub: PredictionSubscriber, n: int, *, timeout: float = LIVE_TIMEOUT, where=lambda p: True
) -> list[Prediction]:
    """The next ``n`` predictions satisfying ``where`` (PONGs skipped), or fewer on timeout."""
    out: list[Prediction] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        m = sub.recv(0.2)
        if isinstance(m, Prediction) and where(m):
            out.append(m)
    return out


def barrier(rig: RigClient, sub: PredictionSubscriber, *, timeout: float = LIVE_TIMEOUT) -> list[Prediction]:
    """PING and wait for the PONG: everything this rig sent before has been handled.  Returns the
    predictions that arrived meanwhile."""
    token = int(time.monotonic_ns() & 0x7FFFFFFFFFFF)
    rig.ping(token)
    return until_pong(sub, token, timeout=timeout)


def until_pong(sub: PredictionSubscriber, token: int, *, timeout: float = LIVE_TIMEOUT) -> list[Prediction]:
    """The predictions that arrive before the PONG answering ``token`` (raises TimeoutError without one)."""
    from streaming.protocol import Pong

    got: list[Prediction] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = sub.recv(0.2)
        if isinstance(m, Prediction):
            got.append(m)
        elif isinstance(m, Pong) and m.token == token:
            return got
    raise TimeoutError("no PONG")


def wait_until(cond, *, timeout: float = LIVE_TIMEOUT, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


# ---------------------------------------------------------------------------- one ONNX export per session
_EXPORTS: dict[str, dict] = {}


def _tiny_export_impl(root: Path) -> dict:
    import torch

    from exporters.onnx_export import export_step_graph
    from rpnt_core import RPNT, RPNTConfig, load_checkpoint, save_checkpoint
    from rpnt_core.data import Session, save_npz

    torch.manual_seed(0)
    cfg = RPNTConfig(
        n_channels=8,
        d_model=16,
        n_layers=1,
        n_heads=2,
        window=8,
        kernel_q=2,
        kernel_hidden=8,
        dropout=0.0,
        bin_s=0.02,
    )
    model = RPNT(cfg).eval()
    for blk in model.blocks:  # context kernels start near zero ('add' mode): make them matter
        if hasattr(blk.attn, "kernel_mlp"):
            torch.nn.init.normal_(blk.attn.kernel_mlp[-1].weight, std=0.3)
            torch.nn.init.normal_(blk.attn.kernel_mlp[-1].bias, std=0.3)
    ckpt = root / "tiny.safetensors"
    meta = save_checkpoint(model, ckpt, meta={"kind": "scratch", "data_fingerprint": "fp-stream-tiny"})
    rng = np.random.default_rng(5)
    T = 400
    counts = rng.poisson(rng.uniform(0.2, 3.0, size=8), size=(T, 8)).astype(np.int64)
    t = np.arange(T) * 0.02
    velocity = np.stack([np.sin(2 * np.pi * 0.5 * t), np.cos(2 * np.pi * 0.3 * t)], 1).astype(np.float32)
    npz = save_npz(Session(counts=counts, bin_s=0.02, velocity=velocity), root / "session.npz")
    out = root / "export"
    out.mkdir()
    # the step graph only (what the daemon runs): the exporters' own tests cover the window graph and
    # parity reports, and ours compare the daemon's output with the torch model anyway
    export_step_graph(load_checkpoint(ckpt), out / "rpnt_step.onnx", checkpoint=str(ckpt.resolve()))
    return {
        "root": root,
        "ckpt": ckpt,
        "meta": meta,
        "export": out,
        "npz": Path(npz),
        "counts": counts,
        "velocity": velocity,
        "config": cfg,
    }


def seeded_registry(tiny: dict, root: Path):
    """A model registry at ``root`` whose one version is ``tiny_export``'s export and checkpoint;
    returns (registry, version)."""
    from service.registry import CHECKPOINT, ModelRegistry

    reg = ModelRegistry(root=root)
    staged = reg.new_staging("base")
    shutil.copytree(tiny["export"], staged / "export")
    shutil.copy(tiny["ckpt"], staged / CHECKPOINT)
    return reg, reg.add(staged, meta={"source": "test"})


def tiny_export(tmp_path_factory) -> dict:
    """A tiny random-weight RPNT: checkpoint, ONNX export (via the exporters package) and a
    labelled synthetic session — made once per test session and shared between modules."""
    base = str(tmp_path_factory.getbasetemp())
    if base not in _EXPORTS:
        _EXPORTS[base] = _tiny_export_impl(tmp_path_factory.mktemp("stream-tiny"))
    return _EXPORTS[base]
