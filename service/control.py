"""The control plane's state and actions, independent of HTTP (``service.app`` maps routes onto it).

:class:`ControlPlane` holds the running :class:`~streaming.daemon.Daemon`, the
:class:`~service.registry.ModelRegistry` and the :class:`~service.calibration.CalibrationManager`.
Everything it does to the decoder goes through the daemon's own control methods (``snapshot``,
``status``, ``swap_decoder``, ``recent_training_data``): it never touches the loop's state.

Model activation (:meth:`ControlPlane.activate`, used by rollback and by calibration): load the
version's export with the configured engine (ONNX Runtime warms up on load), check its channel
count and bin width against the stream, ``swap_decoder`` (warmed on the stream's recent history so
its first output equals what it would have said had it run all along), and record it in the
registry.  The swap itself lands at the next bin boundary — no bin missed or decoded twice; with
no stream running it lands on the next stream's first bin (``pending`` in the answer).  If loading
or checking fails, the live decoder and the registry are untouched.

Calibration (:meth:`ControlPlane.calibrate`): the request's data is staged, checked against the live
model and handed to the calibration worker by :mod:`service.intake`, which raises typed errors
for the HTTP layer to map onto status codes.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from .calibration import CalibrationManager
from .intake import CalibrationRequest, submit_calibration
from .metrics import BUCKETS_MS, MetricsInput, exposition, new_registry
from .registry import ModelRegistry
from .settings import Settings

log = logging.getLogger("rpnt.service")


class ActivationError(RuntimeError):
    """A version that cannot go live (it does not load, or does not fit the stream)."""


def load_version_engine(registry: ModelRegistry, version: str, settings: Settings) -> Any:
    """The decoder engine of a registry version, as ``settings.model`` says (backend, precision)."""
    from streaming.launch import load_decoder

    m = settings.model
    if m.backend == "torch":
        ckpt = registry.checkpoint(version)
        if ckpt is None:
            raise ActivationError(f"version {version} has no checkpoint for the torch backend")
        return load_decoder(ckpt, backend="torch")
    return load_decoder(
        registry.export_dir(version),
        backend=m.backend,
        precision=m.precision,
        intra_op_threads=m.intra_op_threads,
    )


class ControlPlane:
    """See the module docstring.  ``daemon`` must already be constructed (it may not be started yet)."""

    def __init__(
        self, *, daemon: Any, registry: ModelRegistry, settings: Settings, live_version: str
    ) -> None:
        self.daemon = daemon
        self.registry = registry
        self.settings = settings
        self._live_version = live_version
        self._activate_lock = threading.Lock()
        self.calibration = CalibrationManager(
            registry=registry, settings=settings.calibration, activate=self.activate
        )
        self.started = time.time()
        self._contracts: dict = {}
        self.metrics_registry = new_registry(self.metrics_input)  # this plane's own, never the global one
        self.closing = threading.Event()  # set when the HTTP server stops: long-lived streams end

    # ------------------------------------------------------------------ reading
    @property
    def live_version(self) -> str:
        return self._live_version

    def ready(self) -> tuple[bool, str]:
        """(ready, why): ready once the decode loop runs and the engine has warmed up."""
        d = self.daemon
        if not d.running:
            return False, "the decode loop is not running"
        warm = d.startup.get("warmup", {})
        if not warm:
            return False, "the engine has not warmed up yet"
        return True, f"model version {self._live_version} loaded and warmed up ({warm.get('detail')})"

    def status(self) -> dict:
        """What ``GET /status`` answers: the live model, the stream's shape, uptime, counters, latency,
        adapters, calibration, swaps and start-up record (daemon snapshots only)."""
        st = self.daemon.status()
        snap = self.daemon.snapshot()
        return {
            "model": {
                "registry_version": self._live_version,
                "model_version": st["model_version"],
                "fingerprint": st["fingerprint"],
                "decoder": st["decoder"],
                "generation": st["generation"],
                "backend": self.settings.model.backend,
                "precision": self.settings.model.precision,
                # an activation lands at the next bin the loop closes; until then the old decoder decodes
                "swap_pending": st["pending_swaps"] > 0,
                "target": self.live_target(),
            },
            "n_channels": st["n_channels"],
            "n_outputs": st["n_outputs"],
            "bin_s": st["bin_s"],
            "uptime_s": st["uptime_s"],
            "started_at": st["started_at"],
            "running": st["running"],
            "endpoints": {"ingest": st["ingest"], "publish": st["publish"]},
            "counters": snap["counters"],
            "rejected": snap["rejected"],
            "sequence": snap["sequence"],
            "stream": snap["stream"],
            "latency_ms": snap["latency_ms"],
            "adapters": snap["adapters"],
            "calibration": {
                "running": self.calibration.busy(),
                "totals": dict(self.calibration.totals),
                "worker": self.calibration.worker_status(),
            },
            "swaps": st["swaps"],
            "startup": st["startup"],
        }

    def metrics_input(self) -> MetricsInput:
        """What one ``/metrics`` scrape reads (see :mod:`service.metrics`)."""
        return MetricsInput(
            snapshot=self.daemon.snapshot(buckets_ms=BUCKETS_MS),
            status=self.daemon.status(),
            calibration_totals=dict(self.calibration.totals),
            calibration_running=self.calibration.busy() is not None,
            registry_version=self._live_version,
        )

    def metrics_exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) of ``/metrics``: Prometheus text, or OpenMetrics if ``accept`` asks."""
        return exposition(self.metrics_registry, accept)

    # ------------------------------------------------------------------ acting
    def activate(self, version: str, reason: str, *, wait_s: float = 2.0) -> dict:
        """Swap registry ``version`` in (see the module docstring).  Raises ``RegistryError`` for an
        unknown version and :class:`ActivationError` when it cannot go live."""
        version = str(version)
        with self._activate_lock:
            self.registry.meta(version)  # RegistryError if unknown
            t0 = time.perf_counter()
            try:
                engine = load_version_engine(self.registry, version, self.settings)
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime's load errors (InvalidProtobuf, Fail, ...)
                # derive from Exception only; any failure to load means "cannot go live" (409), not a 500
                raise ActivationError(f"version {version} does not load: {exc}") from exc
            load_s = time.perf_counter() - t0
            try:
                ticket = self.daemon.swap_decoder(engine)
            except ValueError as exc:
                raise ActivationError(f"version {version} does not fit the stream: {exc}") from exc
            self.registry.activate(version, reason=reason)
            previous, self._live_version = self._live_version, version
        try:
            swap_bin: int | None = ticket.wait(wait_s)
        except TimeoutError:
            swap_bin = None  # no bin closed yet: it lands on the next one
        except RuntimeError as exc:  # the daemon stopped before the swap took effect
            raise ActivationError(str(exc)) from exc
        out = {
            "version": version,
            "previous": previous,
            "reason": reason,
            "load_s": round(load_s, 3),
            "swap_bin": swap_bin,
            "pending": swap_bin is None,
            "mode": ticket.mode or None,
            "model_version": engine.info.version,
        }
        log.info("model version %s activated (%s): %s", version, reason, out)
        return out

    def calibrate(self, request: CalibrationRequest) -> dict:
        """Stage ``request``'s calibration data and start a job on it (:mod:`service.intake`); the
        202 body.  Raises :class:`~service.intake.UploadTooLarge`,
        :class:`~service.uploads.CalibrationInputError`, :class:`~service.calibration.CalibrationBusy`
        or :class:`~service.intake.CalibrationRefused`; the live model is untouched by any of them."""
        return submit_calibration(self, request)

    def recent_calibration_data(self, seconds: float) -> tuple[Any, Any]:
        """(counts, kinematics) of the last ``seconds`` of decoded bins the rig sent kinematics for."""
        return self.daemon.recent_training_data(seconds)

    def export_dir(self) -> Path:
        """The live version's export directory."""
        return self.registry.export_dir(self._live_version)

    def live_contract(self):
        """The live export's contract (metadata, target, …), read once per version."""
        v = self._live_version
        if v not in self._contracts:
            from exporters.runtime import read_contract

            self._contracts[v] = read_contract(self.export_dir() / "rpnt_step.onnx")
        return self._contracts[v]

    def live_metadata(self) -> dict:
        """The metadata (subject, session, task, date_days) the live export was made for."""
        return dict(self.live_contract().metadata)

    def live_target(self) -> str:
        """The behaviour series the live model decodes (``velocity``, ``position``, …)."""
        return self.live_contract().target
