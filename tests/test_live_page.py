"""The live page and /docs in a real browser: Playwright driving the Debian ``chromium`` (never a
browser Playwright downloads), against ``rpnt serve`` in a child process fed by real-time replays
(streaming.replay over real ZeroMQ).  Every request to a host other than 127.0.0.1 is blocked and
recorded: the page and /docs must not need one.  Skipped where chromium or Playwright is absent.

Correctness only: waits are liveness guards; nothing asserts how fast anything was.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from urllib.parse import urlsplit

import pytest

for _mod in ("fastapi", "uvicorn", "zmq", "onnxruntime", "httpx"):
    pytest.importorskip(_mod)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the [dev] extra)")


def chromium_path() -> str | None:
    """The Debian chromium binary (its /usr/bin wrapper script execs this one)."""
    for p in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if p and os.access(p, os.X_OK):
            return p
    return None


CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package chromium)")

from test_service_http import LIVE, Server  # noqa: E402
from test_streaming_support import tiny_export  # noqa: E402

from streaming.replay import run_replay  # noqa: E402

LIVE_MS = LIVE * 1000
REPLAY_BINS = (
    150  # bins per replayed stream (3 s at 20 ms, real-time pace); replays repeat until the test ends
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, tiny export): ``rpnt serve`` with the tiny model, replays running into it."""
    tiny = tiny_export(tmp_path_factory)
    srv = Server(registry=tmp_path_factory.mktemp("live") / "registry", model=tiny["export"]).wait_ready()
    stop = threading.Event()
    errors: list[BaseException] = []

    def replays() -> None:
        counts, vel = tiny["counts"][:REPLAY_BINS], tiny["velocity"][:REPLAY_BINS]
        while not stop.is_set():
            try:
                run_replay(
                    counts=counts,
                    labels={"velocity": vel},
                    bin_ns=20_000_000,
                    ingest=srv.ingest,
                    publish=srv.publish,
                    realtime=True,
                    handshake_timeout_s=LIVE,
                )
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                if not stop.is_set():
                    errors.append(exc)
                return

    feeder = threading.Thread(target=replays, name="replay-feed", daemon=True)
    feeder.start()

    def stop_feed() -> None:
        stop.set()
        feeder.join(LIVE)

    try:
        yield srv, errors, stop_feed
    finally:
        stop_feed()
        if srv.running():  # the last test stops it itself
            srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


def offline_page(browser, outside: list[str]):
    """A page whose requests to any host but 127.0.0.1 are aborted (and listed in ``outside``)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()

    def route(r):
        host = urlsplit(r.request.url).hostname
        if host == "127.0.0.1":
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return ctx, page, errors


def bins_on_page(page) -> int:
    return int(page.inner_text("#bins").replace(",", ""))


def test_the_live_page_moves_with_the_stream(served, browser, tmp_path):
    srv, feed_errors, _ = served
    outside: list[str] = []
    ctx, page, errors = offline_page(browser, outside)
    try:
        page.goto(srv.url + "/", wait_until="load")
        page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=LIVE_MS)
        page.wait_for_function(
            "/^[0-9,]+$/.test(document.getElementById('bins').textContent)", timeout=LIVE_MS
        )
        first = bins_on_page(page)
        page.wait_for_function(
            f"Number(document.getElementById('bins').textContent.replace(/,/g, '')) > {first}",
            timeout=LIVE_MS,
        )
        second = bins_on_page(page)
        with srv.client() as c:
            st = c.get("/status").json()
        assert first < second <= st["counters"]["bins"]
        # the trajectory: points drawn, and pixels of the path's colour on the canvas
        page.wait_for_function(
            "Number(document.getElementById('traj').dataset.points || 0) >= 2", timeout=LIVE_MS
        )
        painted = page.evaluate("""() => {
            const c = document.getElementById('traj');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && d[i + 2] > d[i] + 60) n++;  // blue-ish
            return n;
        }""")
        assert painted > 50, painted
        assert page.inner_text("#model-version") == st["model"]["model_version"]
        assert page.inner_text("#generation") == str(st["model"]["generation"])
        stages = page.eval_on_selector_all("#latency tr td:first-child", "tds => tds.map(t => t.textContent)")
        assert set(stages) == set(st["latency_ms"]), stages
        assert page.inner_text("#rejects") == str(sum(st["rejected"].values()))
        page.screenshot(path=str(tmp_path / "live.png"))
        if os.environ.get("RPNT_LIVE_SCREENSHOT"):  # for a person to look at
            shutil.copy(tmp_path / "live.png", os.environ["RPNT_LIVE_SCREENSHOT"])
    finally:
        ctx.close()
    assert not errors, errors
    assert not outside, f"the page asked for other hosts: {outside}"
    assert not feed_errors, feed_errors


def test_events_are_json_state_events_without_a_token(served):
    srv, _, _ = served
    import httpx

    with httpx.Client(base_url=srv.url, timeout=LIVE) as c, c.stream("GET", "/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        states = []
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event == "state":
                states.append(json.loads(line[len("data: ") :]))
                if len(states) == 2:
                    break
    s = states[-1]
    assert {"model", "counters", "rejected", "latency_ms", "calibration", "points", "trajectory"} <= set(s)
    assert s["trajectory"] is True and s["n_outputs"] == 2
    assert {"succeeded", "rejected", "failed"} == set(s["calibration"]["totals"]) and "jobs" in states[0][
        "calibration"
    ]
    for p in (p for st in states for p in st["points"]):
        assert len(p) == 3 + 2 and all(isinstance(v, int) for v in p[:3])


def test_docs_render_offline(served, browser):
    srv, _, _ = served
    outside: list[str] = []
    ctx, page, errors = offline_page(browser, outside)
    try:
        page.goto(srv.url + "/docs", wait_until="load")
        page.wait_for_selector(".swagger-ui .opblock", timeout=LIVE_MS)
        ops = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent.trim())")
        title = page.inner_text(".swagger-ui .info .title")
    finally:
        ctx.close()
    assert "rpnt control plane" in title
    for path in ("/status", "/metrics", "/calibrate", "/models/{version}/activate"):
        assert any(path in o for o in ops), (path, ops)
    assert not errors, errors
    assert not outside, f"/docs asked for other hosts: {outside}"


def test_an_open_event_stream_ends_cleanly_when_the_server_stops(served):
    """SIGTERM with a page open: the stream ends with its last chunk (no connection cut mid-stream),
    and ``rpnt serve`` exits 0.  Stops this module's server: keep it the last test that uses it."""
    import httpx

    srv, _, stop_feed = served
    stop_feed()
    got_state = threading.Event()
    outcome: dict = {}

    def read() -> None:
        try:
            with httpx.Client(base_url=srv.url, timeout=LIVE) as c, c.stream("GET", "/events") as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        got_state.set()
            outcome["ended"] = "cleanly"
        except httpx.HTTPError as exc:
            outcome["ended"] = f"with {type(exc).__name__}: {exc}"
        finally:
            got_state.set()

    reader = threading.Thread(target=read, name="events-reader", daemon=True)
    reader.start()
    assert got_state.wait(LIVE) and not outcome, outcome
    stopped = srv.stop()  # asserts exit status 0 and the stopped line
    reader.join(LIVE)
    assert outcome == {"ended": "cleanly"}, outcome
    assert stopped["event"] == "stopped"
