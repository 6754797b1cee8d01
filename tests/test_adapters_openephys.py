"""The Open Ephys bridge against a real ZeroMQ publisher that speaks the ZMQ Interface plugin's
documented wire format (``[envelope, JSON header, data]``; spikes, continuous buffers, TTL events;
heartbeats on the data port + 1) and a live daemon: a replay decodes bit for bit like the native
replay, the heartbeat reaches the "GUI", a dropped connection is a counted disconnect and its
return a counted reconnect with a fresh stream, and malformed messages are dropped and counted
by reason.  The Open Ephys GUI itself does not run here (docs/adapters.md says what that leaves
untested).  Correctness only: timeouts guard liveness, nothing asserts timing."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import zmq
from adapter_support import (
    N_CH,
    adapter_stats,
    bridges,
    native_predictions,
    poisson_counts,
    velocities,
    wait_connected,
)
from test_streaming_support import BIN_NS, LIVE_TIMEOUT, FIRDecoder, collect, live_daemon, offline, wait_until

from streaming.adapters.openephys import electrode_channel
from streaming.replay import events_from_counts

RATE = 30_000
PER_BIN = RATE * BIN_NS // 1_000_000_000  # 600 samples per 20 ms bin


def _free_port_pair() -> int:
    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port


class FakeGui:
    """The ZMQ Interface's two sockets: PUB on ``port`` (data) and REP on ``port + 1`` (heartbeats)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.num = 0
        self.heartbeats: list[dict] = []
        self.pub = self.rep = None

    def open(self) -> FakeGui:
        ctx = zmq.Context.instance()
        self.pub, self.rep = ctx.socket(zmq.PUB), ctx.socket(zmq.REP)
        for s in (self.pub, self.rep):
            s.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 1_000_000)
        for s, port in ((self.pub, self.port), (self.rep, self.port + 1)):
            assert wait_until(lambda s=s, port=port: self._bind(s, port), timeout=LIVE_TIMEOUT), (
                f"port {port} stays busy"
            )
        return self

    @staticmethod
    def _bind(s, port: int) -> bool:
        try:
            s.bind(f"tcp://127.0.0.1:{port}")
            return True
        except zmq.ZMQError:
            return False

    def close(self) -> None:
        for s in (self.pub, self.rep):
            s.close(0)

    def answer_heartbeats(self) -> None:
        while self.rep.poll(0):
            self.heartbeats.append(json.loads(self.rep.recv()))
            self.rep.send(b"heartbeat received")

    def send(self, kind: str, header: dict, data: bytes = b"", *, skip: int = 0) -> None:
        self.num += 1 + skip
        self.pub.send_multipart(
            [kind.encode(), json.dumps({"message_num": self.num, "type": kind, **header}).encode(), data]
        )

    def spike(self, electrode, sample: int) -> None:
        self.send(
            "spike",
            {
                "spike": {
                    "stream": "example_data",
                    "source_node": 105,
                    "electrode": electrode,
                    "sample_num": sample,
                    "num_channels": 1,
                    "num_samples": 40,
                    "sorted_id": 0,
                    "threshold": [-50.0],
                }
            },
            np.zeros(40, np.float32).tobytes(),
        )

    def data(self, start: int, n: int = PER_BIN) -> None:
        self.send(
            "data",
            {
                "content": {
                    "stream": "example_data",
                    "channel_num": 0,
                    "num_samples": n,
                    "sample_num": start,
                    "sample_rate": float(RATE),
                },
                "data_size": 4 * n,
            },
            np.zeros(n, np.float32).tobytes(),
        )

    def ttl(self) -> None:
        self.send(
            "event",
            {"content": {"type": 3, "sample_num": 0, "event_id": 1, "event_channel": 1}, "data_size": 0},
        )

    def replay(self, counts: np.ndarray, *, seed: int = 0, bad=None) -> None:
        """Per bin: the continuous buffer starting at the bin (the clock), then its spikes in GUI order
        (electrodes interleaved, not sorted by time); a last buffer closes the last bin."""
        chans, times = events_from_counts(counts, BIN_NS)
        rng = np.random.default_rng(seed)
        for k in range(counts.shape[0]):
            self.data(k * PER_BIN)
            if bad is not None and k == counts.shape[0] // 2:
                bad(self)
            for i in rng.permutation(chans[k].shape[0]):
                self.spike(f"Electrode {int(chans[k][i]) + 1}", int(times[k][i]) * RATE // 1_000_000_000)
            self.answer_heartbeats()
        self.data(counts.shape[0] * PER_BIN)

    def handshake(self, d, key: str) -> None:
        """TTL events (ignored by the decoder) until the bridge sees one: its subscription is live."""
        seen = d.snapshot()["adapters"][key]["ignored"]

        def live() -> bool:
            self.ttl()
            self.answer_heartbeats()
            return d.snapshot()["adapters"][key]["ignored"] > seen

        assert wait_until(live, timeout=LIVE_TIMEOUT, interval=0.05)


@pytest.fixture
def gui():
    g = FakeGui(_free_port_pair()).open()
    try:
        yield g
    finally:
        g.close()


def test_replay_through_the_zmq_interface_format_equals_the_native_replay_bit_for_bit(gui):
    counts = poisson_counts(100, seed=1)
    spec = f"openephys:tcp://127.0.0.1:{gui.port}?free_run=1"
    key = f"ingest {spec}"
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        native = native_predictions(rig, sub, counts)
        with bridges(d, ingest=[spec]):
            wait_connected(d, key)
            gui.handshake(d, key)
            gui.replay(counts)
            got = collect(sub, counts.shape[0])
            st = adapter_stats(d, key)
    np.testing.assert_array_equal(velocities(got), velocities(native))
    np.testing.assert_array_equal([p.n_spikes for p in got], counts.sum(1))
    assert [p.bin for p in got] == list(range(counts.shape[0])) and got[0].flags == 8
    assert st["rejected"] == {} and st["lost"] == 0 and st["disconnects"] == 0
    assert (
        gui.heartbeats
        and gui.heartbeats[0]["type"] == "heartbeat"
        and gui.heartbeats[0]["application"] == "rpnt"
    )


def test_dropped_connection_is_a_disconnect_and_its_return_a_reconnect_with_a_fresh_stream(gui):
    c1, c2 = poisson_counts(30, seed=2), poisson_counts(40, seed=3)
    spec = f"openephys:tcp://127.0.0.1:{gui.port}?free_run=1&heartbeat=0"
    key = f"ingest {spec}"
    with live_daemon(FIRDecoder()) as (d, rig, sub), bridges(d, ingest=[spec]):
        wait_connected(d, key)
        gui.handshake(d, key)
        gui.replay(c1)
        first = collect(sub, c1.shape[0])
        gui.close()  # the GUI goes away ...
        assert wait_until(lambda: adapter_stats(d, key)["disconnects"] == 1)
        gui.open()  # ... and comes back: acquisition restarts at sample 0
        assert wait_until(lambda: adapter_stats(d, key)["reconnects"] == 1)
        gui.handshake(d, key)
        gui.replay(c2, seed=1)
        second = collect(sub, c2.shape[0])
        st = adapter_stats(d, key)
    np.testing.assert_array_equal(velocities(first), offline(FIRDecoder(), c1))
    np.testing.assert_array_equal(velocities(second), offline(FIRDecoder(), c2))
    assert second[0].epoch == first[0].epoch + 1 and second[0].flags & 8
    assert st["disconnects"] == 1 and st["reconnects"] == 1 and st["connected"]


def test_acquisition_restarted_in_the_gui_starts_a_fresh_stream_without_a_reconnect(gui):
    c1, c2 = poisson_counts(30, seed=5), poisson_counts(30, seed=6)
    spec = f"openephys:tcp://127.0.0.1:{gui.port}?free_run=1&heartbeat=0"
    key = f"ingest {spec}"
    with live_daemon(FIRDecoder()) as (d, rig, sub), bridges(d, ingest=[spec]):
        wait_connected(d, key)
        gui.handshake(d, key)
        gui.replay(c1)
        first = collect(sub, c1.shape[0])
        gui.replay(c2, seed=2)  # stop / start in the GUI: sample numbers begin at 0 again
        second = collect(sub, c2.shape[0])
        st = adapter_stats(d, key)
    np.testing.assert_array_equal(velocities(first), offline(FIRDecoder(), c1))
    np.testing.assert_array_equal(velocities(second), offline(FIRDecoder(), c2))
    assert second[0].epoch == first[0].epoch + 1 and second[0].flags & 8
    assert st["restarts"] == 1 and st["disconnects"] == 0 and st["rejected"] == {}


def test_malformed_messages_are_counted_by_reason_and_the_stream_goes_on(gui):
    counts = poisson_counts(40, seed=4)
    spec = f"openephys:tcp://127.0.0.1:{gui.port}?free_run=1&heartbeat=0"
    key = f"ingest {spec}"

    def bad(g: FakeGui) -> None:
        g.pub.send_multipart([b"spike", b"{not json"])
        g.pub.send_multipart([b"spike"])
        g.send("video", {})
        g.send("spike", {"spike": {"electrode": "Electrode 2"}})  # no sample_num
        g.spike("Stereotrode", 20 * PER_BIN + 5)  # no channel number
        g.spike(f"Electrode {N_CH + 1}", 20 * PER_BIN + 5)  # beyond the model's channels
        g.spike("Electrode 1", 3)  # long before the clock already forwarded
        g.send(
            "data",
            {"content": {"sample_num": 20 * PER_BIN, "num_samples": 600, "sample_rate": 3e4}},
            b"\0" * 8,
        )
        g.ttl()
        g.num += 2  # two messages the bridge never sees

    with live_daemon(FIRDecoder()) as (d, rig, sub):
        native = native_predictions(rig, sub, counts)
        with bridges(d, ingest=[spec]):
            wait_connected(d, key)
            gui.handshake(d, key)
            gui.replay(counts, bad=bad)
            got = collect(sub, counts.shape[0])
            st = adapter_stats(d, key)
    np.testing.assert_array_equal(velocities(got), velocities(native))
    assert st["rejected"] == {
        "header_json": 1,
        "frames": 1,
        "msg_type": 1,
        "fields": 1,
        "electrode": 2,
        "time_order": 1,
        "payload_size": 1,
    }
    assert st["lost"] == 2


def test_electrode_names_map_to_channels():
    assert electrode_channel("Electrode 1") == 0 and electrode_channel("Tetrode 12") == 11
    assert (
        electrode_channel(5) == 5
        and electrode_channel("Stereotrode") is None
        and electrode_channel(True) is None
    )
