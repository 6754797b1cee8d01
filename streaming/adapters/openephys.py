"""Open Ephys GUI, through its ZMQ Interface plugin: spikes in, continuous data as the clock.

``openephys:tcp://HOST:PORT`` subscribes to the plugin's data port (a ZeroMQ PUB).  What the plugin
sends, as documented by Open Ephys (ZMQ Interface page of the GUI docs and the plugin's Python
client): multipart messages ``[envelope, header, data]`` where the header is UTF-8 JSON with
``message_num`` (running number), ``type`` and

- ``"type": "spike"`` — ``header["spike"]``: ``electrode`` (the spike channel's name), ``sample_num``
  (the peak sample), ``stream``, ``source_node``, ``num_channels``, ``num_samples``, ``sorted_id``,
  ``threshold``; data = the waveform;
- ``"type": "data"`` — ``header["content"]``: ``channel_num``, ``sample_num`` (first sample of the
  buffer), ``num_samples``, ``sample_rate``, ``stream``; data = ``num_samples`` float32 values;
- ``"type": "event"`` (TTL) and ``"type": "param"`` — not used by the decoder (counted ``ignored``).

What the bridge makes of them:

- a spike → one event on channel ``N − 1`` of the electrode whose name ends in the number ``N``
  ("Electrode 1" → channel 0; an integer ``electrode`` is taken as the channel itself), at sample
  ``sample_num``; sorted units of one electrode count on its channel (threshold crossings);
- a continuous buffer starting at sample ``s`` → the clock: every spike before ``s`` has been sent
  (the plugin emits a buffer's spikes in the same processing call as the buffer, after or before
  its continuous data), so the held spikes earlier than ``s`` go to the daemon, sorted by time, in
  one SPIKES packet whose clock is ``s``.  A bin therefore closes one GUI buffer after its end;
  a small GUI buffer size keeps that short;
- times go to the daemon as sample indices at the stream's rate (option ``rate``, else the
  ``sample_rate`` of the continuous data; it must be a whole number of Hz) — exact integer
  arithmetic, no float clock mapping (the bin clock is the GUI's sample clock).
- a continuous buffer that starts before the clock already forwarded means acquisition was
  restarted (its sample numbers start again): counted in ``restarts``, and a new stream (RESET)
  begins with it; spikes of the new acquisition that arrive before its first buffer are dropped as
  ``time_order``.

Counted: a ``message_num`` jump → ``lost``; a header that is not JSON (``header_json``), a missing
or malformed field (``fields``), a data frame of the wrong size (``payload_size``), an electrode
without a channel number or beyond the model's channels (``electrode``), a spike earlier than the
clock already forwarded (``time_order``), an unknown type (``msg_type``) are dropped and counted.
The TCP connection is watched with a ZeroMQ socket monitor: a drop is a ``disconnect``, the
reconnection (ZeroMQ retries by itself) a ``reconnect`` and a new stream (RESET: a restarted
acquisition restarts its sample numbers).

Heartbeats (option ``heartbeat``, default 1): every 2 s a JSON ``{"application", "uuid",
"type": "heartbeat"}`` on a REQ socket to PORT + 1, so the GUI lists the decoder as a client; a
request unanswered for 10 s is abandoned and the socket re-made (ZeroMQ's "lazy pirate").
"""

from __future__ import annotations

import json
import re
import time
import uuid
from urllib.parse import urlsplit

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..protocol import DEFAULT_LIMITS, encode_spikes
from .base import AdapterError, Disconnected, IngestAdapter, Unavailable

HEARTBEAT_S = 2.0
HEARTBEAT_GIVE_UP_S = 10.0
_TRAILING_NUMBER = re.compile(r"(\d+)\s*$")


def electrode_channel(electrode) -> int | None:
    """The channel an Open Ephys spike channel counts on: ``"Electrode 7"`` → 6, ``3`` → 3, else None."""
    if isinstance(electrode, bool):
        return None
    if isinstance(electrode, int):
        return electrode
    if isinstance(electrode, str):
        m = _TRAILING_NUMBER.search(electrode)
        return int(m.group(1)) - 1 if m else None
    return None


def heartbeat_endpoint(endpoint: str) -> str:
    """The plugin's listening socket: the data port + 1 on the same host."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.port is None:
        raise AdapterError(f"openephys:{endpoint}: expected tcp://HOST:PORT (the ZMQ Interface's data port)")
    host = parts.hostname if ":" not in (parts.hostname or "") else f"[{parts.hostname}]"
    return f"tcp://{host}:{parts.port + 1}"


class OpenEphysIngest(IngestAdapter):
    """``openephys:tcp://HOST:PORT`` (options ``rate``: spike sample rate in Hz; ``heartbeat``: 0/1)."""

    kind = "openephys"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.endpoint = self.spec.target
        self._hb_endpoint = heartbeat_endpoint(self.endpoint)
        rate = self.spec.option("rate", 0.0, float)
        self.rate = self._whole_rate(rate) if rate else None
        self.heartbeat = self.spec.option("heartbeat", True, bool)
        self._uuid = str(uuid.uuid4())
        self._sub: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None
        self._req: zmq.Socket | None = None
        self._req_sent_at: float | None = None
        self._next_hb = 0.0
        self._reset_stream_state()
        self.stats.extra.update(ignored=0, restarts=0)

    def _whole_rate(self, rate: float) -> int:
        if not (rate > 0 and float(rate).is_integer()):
            raise AdapterError(f"{self.spec.text}: rate must be a whole number of Hz, got {rate:g}")
        return int(rate)

    def _reset_stream_state(self) -> None:
        self._held_ch: list[int] = []
        self._held_s: list[int] = []
        self._tick = -1  # the last clock forwarded (samples)
        self._msg_num: int | None = None
        self._ticked = False  # a continuous buffer has been seen (the clock comes from them)

    # ------------------------------------------------------------------ sockets
    def _open_local(self) -> None:
        super()._open_local()
        ctx = zmq.Context.instance()
        self._sub = ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._mon = self._sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._sub.connect(self.endpoint)

    def _close_local(self) -> None:
        for s in (self._req, self._mon, self._sub):
            if s is not None:
                s.close(0)
        super()._close_local()

    def _connect(self) -> None:
        """Wait (up to 0.5 s per call) for the monitor to report the TCP connection."""
        if self._mon.poll(500):
            ev = recv_monitor_message(self._mon)
            if ev["event"] == zmq.EVENT_CONNECTED:
                self._reset_stream_state()
                return
        raise Unavailable(f"no Open Ephys ZMQ Interface at {self.endpoint} (yet)")

    def _idle(self) -> None:
        self._drain(lambda frames: None)  # nothing is published without a connection; keep the socket empty

    # ------------------------------------------------------------------ the loop
    def _poll(self, timeout_s: float) -> None:
        self._heartbeat()
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        if self._req is not None and self._req_sent_at is not None:
            poller.register(self._req, zmq.POLLIN)
        ready = dict(poller.poll(int(timeout_s * 1000)))
        if self._req in ready:
            self._req.recv()
            self._req_sent_at = None
        if self._sub in ready:
            self._drain(self._handle)
            if not self._ticked and self._held_s:
                self._flush(None)  # no continuous data (yet): the spikes of this batch, sorted
        if self._mon in ready:
            ev = recv_monitor_message(self._mon)
            if ev["event"] == zmq.EVENT_DISCONNECTED:
                raise Disconnected(f"Open Ephys at {self.endpoint} closed the connection")

    def _drain(self, handle, budget: int = 4096) -> None:
        for _ in range(budget):
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)

    def _heartbeat(self) -> None:
        if not self.heartbeat:
            return
        now = time.monotonic()
        if self._req_sent_at is not None and now - self._req_sent_at > HEARTBEAT_GIVE_UP_S:
            self._req.close(0)
            self._req, self._req_sent_at = None, None
        if now < self._next_hb or self._req_sent_at is not None:
            return
        if self._req is None:
            self._req = zmq.Context.instance().socket(zmq.REQ)
            self._req.setsockopt(zmq.LINGER, 0)
            self._req.connect(self._hb_endpoint)
        msg = {"application": "rpnt", "uuid": self._uuid, "type": "heartbeat"}
        self._req.send(json.dumps(msg).encode(), zmq.NOBLOCK)
        self._req_sent_at, self._next_hb = now, now + HEARTBEAT_S

    # ------------------------------------------------------------------ messages
    def _handle(self, frames: list[bytes]) -> None:
        self.stats.received += 1
        if len(frames) < 2:
            self.stats.reject("frames", detail=f"{len(frames)} frame(s); expected envelope, header[, data]")
            return
        try:
            header = json.loads(frames[1].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            self.stats.reject("header_json", detail="frame 1 is not UTF-8 JSON")
            return
        if not isinstance(header, dict):
            self.stats.reject("header_json", detail="the header is not a JSON object")
            return
        num = header.get("message_num")
        if isinstance(num, int) and not isinstance(num, bool):
            if self._msg_num is not None and num > self._msg_num + 1:
                self.stats.lost += num - self._msg_num - 1
            self._msg_num = num
        kind = header.get("type")
        if kind == "spike":
            self._on_spike(header.get("spike"))
        elif kind == "data":
            self._on_data(header.get("content"), frames)
        elif kind in ("event", "param"):
            self.stats.extra["ignored"] += 1
        else:
            self.stats.reject("msg_type", detail="header type is not spike, data, event or param")

    @staticmethod
    def _sample(d: dict, name: str) -> int | None:
        v = d.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (1 << 62) else None

    def _on_spike(self, spike) -> None:
        if not isinstance(spike, dict) or self._sample(spike, "sample_num") is None:
            self.stats.reject("fields", detail="spike without a sample_num")
            return
        ch = electrode_channel(spike.get("electrode"))
        if ch is None or not 0 <= ch < self.n_channels:
            self.stats.reject(
                "electrode", detail=f"electrode without a channel number in [1, {self.n_channels}]"
            )
            return
        s = spike["sample_num"]
        if s < self._tick:
            self.stats.reject("time_order", detail="spike earlier than the clock already forwarded")
            return
        self._held_ch.append(ch)
        self._held_s.append(s)
        if len(self._held_s) >= DEFAULT_LIMITS.max_events:
            self._flush(None)

    def _on_data(self, content, frames: list[bytes]) -> None:
        if not isinstance(content, dict):
            self.stats.reject("fields", detail="data without content")
            return
        start, n = self._sample(content, "sample_num"), self._sample(content, "num_samples")
        rate = content.get("sample_rate")
        if start is None or n is None or not isinstance(rate, (int, float)) or isinstance(rate, bool):
            self.stats.reject("fields", detail="data content needs sample_num, num_samples and sample_rate")
            return
        if len(frames) < 3 or len(frames[2]) != 4 * n:
            self.stats.reject("payload_size", detail=f"data frame is not {n} float32 samples")
            return
        if self.rate is None:
            try:
                self.rate = self._whole_rate(float(rate))
            except AdapterError as exc:
                self.stats.reject("sample_rate", detail=str(exc))
                return
        self._ticked = True
        if start < self._tick:  # sample numbers went back: acquisition restarted, a new stream
            self.stats.extra["restarts"] += 1
            self._held_ch, self._held_s, self._tick = [], [], -1
            self._reset_due = True
        if start > self._tick:
            self._flush(start)

    def _flush(self, clock: int | None) -> None:
        """Send the held spikes before ``clock`` (all of them when None), sorted, with that clock."""
        if self.rate is None:
            self.stats.reject(
                "sample_rate", len(self._held_s), "spikes before any sample rate is known (set rate=)"
            )
            self._held_ch, self._held_s = [], []
            return
        ch = np.asarray(self._held_ch, dtype=np.int64)
        s = np.asarray(self._held_s, dtype=np.int64)
        now = np.ones(s.shape, bool) if clock is None else s < clock
        order = np.lexsort((ch[now], s[now]))
        out_ch, out_s = ch[now][order], s[now][order]
        self._held_ch, self._held_s = ch[~now].tolist(), s[~now].tolist()
        if clock is not None:
            self._tick = clock
        elif out_s.size:
            self._tick = int(out_s[-1])
        if out_s.size or clock is not None:
            self.send(
                encode_spikes(
                    source=self.source_id,
                    seq=self.next_seq(),
                    channels=out_ch,
                    times=out_s,
                    clock=clock,
                    rate_hz=self.rate,
                )
            )
