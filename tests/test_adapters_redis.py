"""Redis-stream adapters (BRAND-style) against a real ``redis-server`` (the Debian package, started
here on a free loopback port; the tests skip without it) and a live daemon: spike and count
entries decode bit for bit like the native replay, the prediction stream carries exactly the
native predictions, a server that goes away and comes back is a counted disconnect and reconnect
with the stream going on, a ``seq`` jump is counted lost, and malformed entries are dropped and
counted by reason.  Correctness only: timeouts guard liveness, nothing asserts timing."""

from __future__ import annotations

import shutil
import socket
import subprocess

import numpy as np
import pytest

redis = pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed (Debian package redis-server)", allow_module_level=True)

from adapter_support import (
    adapter_stats,
    bridges,
    native_predictions,
    poisson_counts,
    velocities,
    wait_connected,
)
from test_streaming_support import (
    BIN_NS,
    LIVE_TIMEOUT,
    FIRDecoder,
    collect,
    live_daemon,
    offline,
    send_stream,
    wait_until,
)

from streaming.replay import events_from_counts


class RedisServer:
    """A throw-away redis-server on 127.0.0.1:``port`` (no persistence) that can be stopped and restarted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        assert wait_until(lambda: self._pings(client), timeout=LIVE_TIMEOUT), "redis-server did not start"
        client.close()
        return self

    @staticmethod
    def _pings(client) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(LIVE_TIMEOUT)
            self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    srv = RedisServer(_free_port()).start()
    try:
        yield srv
    finally:
        srv.stop()


def spike_entries(counts: np.ndarray, *, first_bin: int = 0, seq0: int = 0) -> list[dict]:
    """The native replay's packets as stream entries: per bin its events and the bin's end as clock."""
    chans, times = events_from_counts(counts, BIN_NS, first_bin=first_bin)
    return [
        {
            "seq": seq0 + k,
            "channels": chans[k].astype("<u2").tobytes(),
            "times_ns": times[k].astype("<i8").tobytes(),
            "clock_ns": (first_bin + k + 1) * BIN_NS,
        }
        for k in range(counts.shape[0])
    ]


def xadd_all(client, key: str, entries: list[dict]) -> None:
    pipe = client.pipeline(transaction=False)
    for e in entries:
        pipe.xadd(key, e)
    pipe.execute()


def test_spike_entries_and_the_prediction_stream_equal_the_native_replay_bit_for_bit(server):
    counts = poisson_counts(120, seed=1)
    client = redis.Redis(port=server.port)
    spec_in = f"redis:rig:spikes?port={server.port}&free_run=1"
    spec_out = f"redis:rpnt:predictions?port={server.port}"
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        native = native_predictions(rig, sub, counts)
        with bridges(d, ingest=[spec_in], publish=[spec_out]):
            wait_connected(d, f"ingest {spec_in}", f"publish {spec_out}")
            xadd_all(client, "rig:spikes", spike_entries(counts))
            got = collect(sub, counts.shape[0])
            assert wait_until(lambda: client.xlen("rpnt:predictions") >= counts.shape[0])
            st_in, st_out = adapter_stats(d, f"ingest {spec_in}"), adapter_stats(d, f"publish {spec_out}")
    vel = velocities(native)
    np.testing.assert_array_equal(velocities(got), vel)
    np.testing.assert_array_equal([p.n_spikes for p in got], counts.sum(1))
    assert [p.bin for p in got] == list(range(counts.shape[0])) and got[0].flags == 8
    out = client.xrange("rpnt:predictions")[-counts.shape[0] :]
    np.testing.assert_array_equal(np.stack([np.frombuffer(f[b"y"], "<f4") for _, f in out]), vel)
    assert [int(f[b"bin"]) for _, f in out] == [p.bin for p in got]
    assert all(int(f[b"latency_ns"]) >= 0 and f[b"model_version"] == b"fir-a" for _, f in out)
    assert st_in["received"] == counts.shape[0] and st_in["rejected"] == {} and st_in["lost"] == 0
    assert st_out["forwarded"] >= counts.shape[0] and st_out["lost"] == 0


def test_count_entries_equal_the_native_replay_bit_for_bit(server):
    counts = poisson_counts(60, seed=2)
    client = redis.Redis(port=server.port)
    spec = f"redis:rig:counts?port={server.port}&free_run=1"
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        native = native_predictions(rig, sub, counts)
        with bridges(d, ingest=[spec]):
            wait_connected(d, f"ingest {spec}")
            xadd_all(
                client,
                "rig:counts",
                [
                    {"first_bin": 0, "counts": counts[:25].astype("<u2").tobytes()},
                    {"first_bin": 25, "counts": counts[25:].astype("<u2").tobytes()},
                ],
            )
            got = collect(sub, counts.shape[0])
    np.testing.assert_array_equal(velocities(got), velocities(native))


def test_server_restart_is_a_disconnect_and_reconnect_and_a_seq_jump_is_lost(server):
    c = poisson_counts(70, seed=3)
    spec = f"redis:rig:spikes?port={server.port}&free_run=1"
    entries = spike_entries(c)
    key = f"ingest {spec}"
    with live_daemon(FIRDecoder()) as (d, rig, sub), bridges(d, ingest=[spec]):
        wait_connected(d, key)
        xadd_all(redis.Redis(port=server.port), "rig:spikes", entries[:30])
        first = collect(sub, 30)
        server.stop()
        assert wait_until(lambda: adapter_stats(d, key)["disconnects"] == 1)
        assert not adapter_stats(d, key)["connected"]
        server.start()
        assert wait_until(lambda: adapter_stats(d, key)["reconnects"] == 1)
        # the writer goes on where it was (same stream, no RESET); one entry never made it
        del entries[45]
        xadd_all(redis.Redis(port=server.port), "rig:spikes", entries[30:])
        second = collect(sub, 40)
        st = adapter_stats(d, key)
    got = first + second
    assert [p.bin for p in got] == list(range(70))  # bin 45 closed empty by bin 46's events, not lost
    ref = c.copy()
    ref[45] = 0
    np.testing.assert_array_equal(velocities(got), offline(FIRDecoder(), ref))
    assert {p.epoch for p in got} == {first[0].epoch}  # one stream across the outage
    assert st["disconnects"] == 1 and st["reconnects"] == 1 and st["lost"] == 1 and st["connected"]


def test_malformed_entries_are_counted_by_reason_and_the_stream_goes_on(server):
    counts = poisson_counts(40, seed=4)
    client = redis.Redis(port=server.port)
    spec = f"redis:rig:spikes?port={server.port}&free_run=1"
    entries = spike_entries(counts)
    bad = [
        {"channels": b"\x01\x00"},  # times missing
        {"channels": b"\x01\x00\x02", "times_ns": b"\x00" * 8},  # odd byte count
        {"clock_ns": "soon"},  # not a number
        {"clock_ns": str(1 << 70)},  # beyond 64 bits
        {"counts": b"\x01\x00" * 3, "first_bin": 5},  # not a whole number of 8-channel bins
        {"hello": "world"},
    ]  # nothing the adapter knows
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        native = native_predictions(rig, sub, counts)
        with bridges(d, ingest=[spec]):
            wait_connected(d, f"ingest {spec}")
            xadd_all(client, "rig:spikes", entries[:20] + bad + entries[20:])
            got = collect(sub, counts.shape[0])
            st = adapter_stats(d, f"ingest {spec}")
    np.testing.assert_array_equal(velocities(got), velocities(native))
    assert st["rejected"] == {"fields": 2, "payload_size": 2, "number": 2}
    assert st["received"] == counts.shape[0] + len(bad) and "'" not in st["last_error"]


def test_an_adapter_connecting_does_not_cut_the_stream_another_source_is_sending(server):
    c = poisson_counts(60, seed=6)
    spec = f"redis:rig:spikes?port={server.port}&free_run=1"
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        send_stream(rig, c[:30])
        first = collect(sub, 30)
        with bridges(d, ingest=[spec]):
            wait_connected(d, f"ingest {spec}")
            send_stream(rig, c[30:], first_bin=30, reset=False)
            second = collect(sub, 30)
            st = adapter_stats(d, f"ingest {spec}")
    got = first + second
    assert [p.bin for p in got] == list(range(60)) and {p.epoch for p in got} == {first[0].epoch}
    np.testing.assert_array_equal(velocities(got), offline(FIRDecoder(), c))
    assert st["forwarded"] == 0  # its RESET waits for its first data
