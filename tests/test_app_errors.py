"""The control plane's last-resort error answer: a 500 names the error's type, never its text
(which can hold server paths); the text goes to the log."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402


class _BrokenControl:
    settings = Settings()
    calibration = SimpleNamespace(busy=lambda: None)

    def status(self) -> dict:
        raise OSError(
            28, "No space left on device: '/var/lib/rpnt/registry/staging/upload-4242-x/upload.bin'"
        )


def test_an_unexpected_error_is_a_500_without_the_servers_paths(caplog):
    client = TestClient(create_app(_BrokenControl(), token="t"), raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="rpnt.http"):
        r = client.get("/status")
    assert r.status_code == 500
    detail = r.json()["detail"]
    assert detail == "internal error (OSError); the server log has the details"
    assert "/var/lib" not in r.text and "staging" not in r.text
    assert any(
        "/var/lib/rpnt" in (rec.exc_text or "") or "/var/lib/rpnt" in str(rec.exc_info)
        for rec in caplog.records
    )
