"""service.live's PredictionFeed on a real ZeroMQ PUB socket: what it keeps and pages out, that it
subscribes only while read, and the endpoint it connects to; the page's files ship as package
data.  (The page itself, in a browser: tests/test_live_page.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")
pytest.importorskip("starlette")

from test_streaming_support import short_ipc_dir  # noqa: E402

from service.live import PredictionFeed, connect_endpoint  # noqa: E402
from streaming.protocol import encode_prediction  # noqa: E402

LIVE = 60.0  # liveness guard for waits; never a timing assertion


def prediction(k: int, y: tuple[float, float], *, epoch: int = 1) -> list[bytes]:
    return encode_prediction(
        bin=k,
        bin_ns=20_000_000,
        velocity_bytes=np.asarray(y, np.float32).tobytes(),
        n_outputs=2,
        model_version=b"v1",
        flags=0,
        epoch=epoch,
        generation=1,
        t_recv_ns=0,
        t_close_ns=0,
        t_infer_ns=0,
        t_publish_ns=0,
        n_spikes=0,
    )


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + LIVE
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_connect_endpoint():
    assert connect_endpoint("tcp://0.0.0.0:5556") == "tcp://127.0.0.1:5556"
    assert connect_endpoint("tcp://*:5556") == "tcp://127.0.0.1:5556"
    assert connect_endpoint("tcp://[::]:5556") == "tcp://[::1]:5556"
    assert connect_endpoint("tcp://127.0.0.1:5556") == "tcp://127.0.0.1:5556"
    assert connect_endpoint("ipc:///run/rpnt/out") == "ipc:///run/rpnt/out"
    assert connect_endpoint("inproc://pub") is None
    assert PredictionFeed(endpoint=lambda: "inproc://pub").available is False


def test_the_feed_pages_predictions_keeps_the_last_ones_and_subscribes_only_while_read():
    d = short_ipc_dir()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"ipc://{d}/out")
    feed = PredictionFeed(endpoint=lambda: f"ipc://{d}/out", capacity=50)
    try:
        assert feed.since(0) == ([], 0)
        feed.open()

        def joined() -> (
            bool
        ):  # a SUB gets only what is published after it joined: markers (epoch 0) until one arrives
            pub.send_multipart(prediction(0, (0.0, 0.0), epoch=0))
            time.sleep(0.02)
            return bool(feed.since(0)[0])

        def real(points: list) -> list:
            return [p for p in points if p[0] == 1]

        wait_until(joined, "the feed never received a prediction")
        for k in range(30):
            pub.send_multipart(prediction(k, (k, np.nan if k == 3 else -k)))
        wait_until(lambda: len(real(feed.since(0)[0])) == 30, "30 predictions did not arrive")
        points, nxt = feed.since(0)
        points = real(points)
        assert [p[:3] for p in points] == [[1, k, 0] for k in range(30)]
        assert points[3][3:] == [3.0, None] and points[4][3:] == [4.0, -4.0]
        assert feed.since(nxt) == ([], nxt)
        for k in range(30, 130):  # more than capacity: the oldest go
            pub.send_multipart(prediction(k, (k, k)))
        wait_until(lambda: feed.since(nxt)[1] == nxt + 100, "100 more predictions did not arrive")
        points, nxt = feed.since(0)
        assert len(points) == 50 and [p[1] for p in points] == list(range(80, 130))
        feed.close()
        wait_until(lambda: feed._thread is None, "the feed's thread did not end after its last reader left")
        for _ in range(5):  # nobody reads: nothing is subscribed, nothing is kept
            pub.send_multipart(prediction(999, (0.0, 0.0)))
        assert feed.since(nxt) == ([], nxt)
    finally:
        feed.close()
        pub.close(0)
        ctx.term()


def test_static_assets_ship_as_package_data():
    import tomllib

    from conftest import REPO

    pkg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "service"
    ]
    static = REPO / "service" / "static"
    shipped = {p.name for p in static.iterdir() if p.is_file()}
    assert {"index.html", "live.js", "live.css", "favicon.svg"} <= shipped
    covered = {p.name for pattern in pkg for p in (REPO / "service").glob(pattern)}
    assert shipped <= covered, shipped - covered
    for name in ("index.html", "live.js", "live.css"):  # nothing loaded from elsewhere
        text = (static / name).read_text()
        assert "http://" not in text.replace("http://127.0.0.1", "") and "https://" not in text, name
    assert Path(static / "index.html").read_text().count("/static/live.js") == 1
