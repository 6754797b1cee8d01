"""One closed bin → ``decoder.step`` → a prediction on the PUB socket, and the swaps that land on it.

:class:`BinPublisher` is mixed into :class:`~streaming.daemon.Daemon`: the binner calls
:meth:`~BinPublisher._on_bin` in the loop thread for every bin it closes, in order.  A decoder
that raises yields a NaN prediction flagged ERROR (counted, rate-limited log) and the stream goes
on; a full PUB queue drops the prediction (counted), never blocks.  Queued swaps
(:mod:`streaming.swap`) are applied first, so the new decoder decodes this bin.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from rpnt_core.decoder import Decoder

from .binner import Binner
from .history import HistoryRing
from .latency import StageHistograms
from .logsink import LogSink
from .options import DaemonOptions
from .protocol import PredFlag, encode_prediction
from .swap import SwapTicket, apply_at_boundary, plan_boundary

_now = time.monotonic_ns
# plain ints on the hot path (IntEnum / IntFlag operations run Python code)
_FIRST, _ERROR, _SWAPPED = int(PredFlag.FIRST), int(PredFlag.ERROR), int(PredFlag.SWAPPED)
_NOBLOCK, _SNDMORE_NOBLOCK = zmq.NOBLOCK, zmq.SNDMORE | zmq.NOBLOCK


class BinPublisher:
    """Decode and publish each closed bin (see the module docstring); the attributes annotated on the
    class are the daemon state it reads and writes."""

    options: DaemonOptions
    bin_ns: int
    n_outputs: int
    _decoder: Decoder
    _generation: int
    _version_bytes: bytes
    _nan_bytes: bytes
    _binner: Binner
    _history: HistoryRing
    _recorder: Any
    _stages: StageHistograms
    _log: LogSink
    _pub: zmq.Socket | None
    _c: dict[str, int]
    _t_recv: int
    _last_bin: int | None
    _swap_q: collections.deque[SwapTicket]
    _swaps: collections.deque[dict]
    _use_decoder: Callable[[Decoder], None]

    def _on_bin(self, k: int, counts: np.ndarray, n_spikes: int, flags: int) -> None:
        """Called by the binner for every closed bin, in order (counts (N,) int64, valid during the call)."""
        t_close = _now()
        if self._swap_q:
            flags = self._apply_swaps(k, flags)
        dec = self._decoder
        epoch = self._binner.epoch
        try:
            if flags & _FIRST:
                dec.reset()
            vb = np.asarray(dec.step(counts), dtype=np.float32).tobytes()  # (D,) float32
            d = len(vb) // 4
        except Exception as exc:  # noqa: BLE001 - a failing engine must not stop the stream
            flags |= _ERROR
            vb, d = self._nan_bytes, self.n_outputs
            self._c["decode_errors"] += 1
            self._log.limited("decode_error", logging.ERROR, f"decoder.step failed on bin {k}: {exc!r}")
        t_infer = _now()
        self._c["bins"] += 1  # counted before the send: whoever sees bin k's prediction sees it counted
        self._last_bin = k
        frames = encode_prediction(
            bin=k,
            bin_ns=self.bin_ns,
            velocity_bytes=vb,
            n_outputs=d,
            model_version=self._version_bytes,
            flags=flags,
            epoch=epoch,
            generation=self._generation,
            t_recv_ns=self._t_recv,
            t_close_ns=t_close,
            t_infer_ns=t_infer,
            t_publish_ns=_now(),
            n_spikes=n_spikes,
        )
        self._publish(k, frames)
        t_pub = _now()
        t_recv = self._t_recv
        h = self._stages.h
        h["parse"].record(t_close - t_recv)
        h["infer"].record(t_infer - t_close)
        h["publish"].record(t_pub - t_infer)
        h["daemon"].record(t_pub - t_recv)
        self._history.append(epoch, k, counts)
        if self._recorder is not None:
            stamps = (t_recv, t_close, t_infer, t_pub)
            self._recorder.append(
                epoch=epoch,
                k=k,
                counts=counts,
                output=vb,
                flags=flags,
                n_spikes=n_spikes,
                generation=self._generation,
                stamps=stamps,
            )

    def _publish(self, k: int, frames: list) -> None:
        """Bin ``k``'s prediction frames on PUB, never blocking (a full queue drops it, counted)."""
        try:
            send = self._pub.send  # three frames; plain send() skips send_multipart's per-frame checks
            send(frames[0], _SNDMORE_NOBLOCK)
            send(frames[1], _SNDMORE_NOBLOCK)
            send(frames[2], _NOBLOCK)
        except zmq.Again:
            self._c["publish_dropped"] += 1
        except zmq.ZMQError as exc:
            self._c["publish_errors"] += 1
            self._log.limited("publish_error", logging.ERROR, f"publish failed on bin {k}: {exc!r}")

    def _apply_swaps(self, k: int, flags: int) -> int:
        """Every queued swap, at bin ``k`` (:mod:`streaming.swap`); returns ``flags`` with SWAPPED."""
        epoch = self._binner.epoch
        while self._swap_q:
            t = self._swap_q.popleft()
            plan = plan_boundary(
                k=k,
                epoch=epoch,
                first_bin=bool(flags & _FIRST),
                ticket=t,
                max_catchup=self.options.swap_catchup_bins,
            )
            mode = apply_at_boundary(plan, t, epoch=epoch, history=self._history)
            self._use_decoder(t.decoder)
            self._c["swaps"] += 1
            version = self._version_bytes.decode()
            if self._recorder is not None:
                self._recorder.add_version(self._generation, version)
            rec = {
                "bin": k,
                "epoch": epoch,
                "generation": self._generation,
                "model_version": version,
                "mode": mode,
                "time": time.time(),
            }
            self._swaps.append(rec)
            self._log.log(logging.INFO, f"decoder swapped at bin {k}: {rec}")
            t.resolve(bin=k, epoch=epoch, generation=self._generation, mode=mode)
            flags |= _SWAPPED
        return flags
