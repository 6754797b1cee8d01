"""What the closed loop decodes with: the decoder under test behind the real daemon.

- :class:`ServeBackend`: ``rpnt serve`` (daemon + HTTP control plane) in a child process, serving an
  RPNT export from its own registry; recalibration goes through ``POST /calibrate`` (``source=recent``
  with the KINEMATICS the loop streamed, or an NPZ upload; ``labels=refit`` for intention labels).
- :class:`ThreadBackend`: a :class:`~streaming.daemon.Daemon` in a thread of this process, for a
  decoder that has no export (the classic baselines); recalibration refits the baseline and hot
  swaps it with :meth:`~streaming.daemon.Daemon.swap_decoder` (the path ``/calibrate`` ends in).

Both bind fresh ``ipc://`` endpoints and expose ``ingest`` / ``publish``.  The initial decoders
come from an observation block: :func:`fit_baseline` and :func:`train_rpnt` (few-shot recipe from
scratch, then the exporters' ONNX export with its parity check).
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..serve_process import ServeProcess

BASELINE_NAMES = ("wiener", "kalman", "gru")
#: a baseline's fit: the first part of the data trains, the rest validates
BASELINE_TRAIN_FRACTION = 0.8


def observation_session(counts: np.ndarray, velocity: np.ndarray, *, bin_s: float, name: str = "observation"):
    """A labelled :class:`~rpnt_core.data.Session` (metadata: subject ``closedloop-sim``)."""
    from rpnt_core.data import Session

    return Session(
        counts=np.asarray(counts, dtype=np.int32),
        bin_s=bin_s,
        velocity=np.asarray(velocity, dtype=np.float32),
        subject="closedloop-sim",
        session=name,
        task="center_out",
        source="rpnt closedloop",
    )


def fit_baseline(name: str, counts: np.ndarray, velocity: np.ndarray, *, bin_s: float, seed: int = 0) -> Any:
    """A classic decoder fitted on (counts, velocity): the first ``BASELINE_TRAIN_FRACTION`` trains,
    the rest validates."""
    from rpnt_core.evaluate.baselines import BASELINES

    if name not in BASELINES:
        raise ValueError(f"decoder: expected one of {sorted(BASELINES)} or rpnt, got {name!r}")
    a = int(len(counts) * BASELINE_TRAIN_FRACTION)
    return BASELINES[name].fit(
        train_counts=counts[:a],
        train_velocity=velocity[:a],
        val_counts=counts[a:],
        val_velocity=velocity[a:],
        bin_s=bin_s,
        seed=seed,
    )


def train_rpnt(
    counts: np.ndarray,
    velocity: np.ndarray,
    *,
    bin_s: float,
    workdir: Path,
    preset: str = "small",
    epochs: int = 10,
    steps_per_epoch: int = 20,
    seed: int = 0,
) -> dict:
    """Train an RPNT decoder from scratch on the observation block (the finetuning recipe with
    ``init=None``), export it to ONNX (parity-checked on that block) → ``{"export", "checkpoint",
    "test_r2", "seconds"}``."""
    from exporters.onnx_export import export_checkpoint
    from rpnt_core.data import save_npz
    from rpnt_core.train.finetune import FinetuneOptions, finetune

    workdir.mkdir(parents=True, exist_ok=True)
    sess = observation_session(counts, velocity, bin_s=bin_s)
    data = save_npz(sess, workdir / "observation.npz")
    t0 = time.perf_counter()
    opts = FinetuneOptions(
        preset=preset,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        train_fraction=0.7,
        val_fraction=0.15,
        test_fraction=0.15,
        device="cpu",
        progress=False,
        seed=seed,
    )
    r = finetune(sess, init=None, options=opts, out=workdir / "checkpoint.safetensors")
    export_checkpoint(workdir / "checkpoint.safetensors", workdir / "export", parity_data=data)
    return {
        "export": workdir / "export",
        "checkpoint": workdir / "checkpoint.safetensors",
        "test_r2": float(r["test_r2"]),
        "seconds": round(time.perf_counter() - t0, 1),
    }


class ThreadBackend:
    """The real daemon in a thread of this process (see the module docstring)."""

    def __init__(self, *, decoder: Any, bin_s: float, head_scale: tuple[np.ndarray, np.ndarray]) -> None:
        """``head_scale``: (mean, scale) (D,) of the velocity the first decoder was fitted to — what
        intention labels are put on before a refit (a baseline has no head to carry it)."""
        from streaming.daemon import Daemon
        from streaming.launch import ipc_endpoints

        self.head_scale = head_scale
        ingest, publish, self._dir = ipc_endpoints()
        self.daemon = Daemon(decoder=decoder, bin_s=bin_s, ingest=ingest, publish=publish).start()
        self.ingest, self.publish = self.daemon.endpoints["ingest"], self.daemon.endpoints["publish"]
        self.name = decoder.info.name

    def swap(self, decoder: Any) -> dict:
        """Hot swap (lands at the next bin boundary, warmed on the stream's history)."""
        t = self.daemon.swap_decoder(decoder)
        try:
            return {"swap_bin": t.wait(5.0)}
        except TimeoutError:
            return {"swap_bin": None}

    def close(self) -> None:
        self.daemon.stop()
        self.daemon.join(10.0)


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type (stdlib only)."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for k, v in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    for k, (fname, data) in files.items():
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{fname}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


class ServeBackend:
    """``rpnt serve`` in a child process serving ``export`` (see the module docstring)."""

    def __init__(self, *, export: Path, workdir: Path, env: dict | None = None) -> None:
        import tempfile

        Path(workdir).mkdir(parents=True, exist_ok=True)
        run_dir = Path(
            tempfile.mkdtemp(prefix="rpnt-cl")
        )  # short: unix socket paths are limited to ~107 bytes
        # --replace-active: a registry left by an earlier run in ``workdir`` must not put its last
        # (recalibrated) version live instead of ``export``
        self.proc = ServeProcess(
            model=Path(export),
            registry=Path(workdir) / "registry",
            run_dir=run_dir,
            token=secrets.token_urlsafe(24),
            env=env,
            extra=["--replace-active"],
        )
        self.proc.wait_ready(timeout=300.0)
        self.ingest, self.publish = self.proc.ingest, self.proc.publish
        self.name = "rpnt"

    @property
    def url(self) -> str:
        return self.proc.url

    def request(
        self,
        method: str,
        path: str,
        *,
        fields: dict | None = None,
        files: dict[str, tuple[str, bytes]] | None = None,
    ) -> tuple[int, dict]:
        """(status, JSON) of one HTTP call (POST and DELETE authenticated with the token)."""
        headers, body = {}, None
        if method in ("POST", "DELETE"):
            headers = self.proc.headers()
        if method == "POST":
            body, ctype = _multipart({k: str(v) for k, v in (fields or {}).items()}, files or {})
            headers["Content-Type"] = ctype
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120.0) as r:
                return r.status, json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode() or "{}")

    def calibrate(
        self,
        *,
        seconds: float | None = None,
        upload: dict | None = None,
        labels: str = "recorded",
        force: bool = False,
    ) -> tuple[int, dict]:
        """``POST /calibrate``: ``source=recent`` for the last ``seconds``, or an NPZ ``upload`` (arrays by
        NPZ key); ``labels``: ``refit`` for intention labels (the streamed KINEMATICS, or the upload's
        task streams).  Returns the answer (202 + job, or the 4xx and its detail)."""
        fields: dict = {"force": str(bool(force)).lower()}
        files = None
        if upload is not None:
            import io

            buf = io.BytesIO()
            np.savez(buf, **upload)
            files = {"file": ("calibration.npz", buf.getvalue())}
            fields.update(source="upload", labels=labels)
        else:
            fields.update(source="recent", seconds=f"{float(seconds):g}", labels=labels)
        return self.request("POST", "/calibrate", fields=fields, files=files)

    def wait_job(self, job_id: str, *, timeout: float = 1800.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, st = self.request("GET", f"/calibrate/{job_id}")
            if st.get("state") in ("succeeded", "rejected", "failed"):
                return st
            time.sleep(0.5)
        raise TimeoutError(f"calibration job {job_id} still running after {timeout:g} s")

    def status(self) -> dict:
        return self.request("GET", "/status")[1]

    def close(self) -> int:
        return self.proc.stop()
