"""Credentials in URLs: the gate refuses a key exactly when the access log redacts its value
(``gate.url_credential`` decides for both), percent-encoded keys included (issue 28)."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from weightsync.api import create_app
from weightsync.api.gate import redact_url_credentials, url_credential
from weightsync.api.server import RedactCredentials
from weightsync.config import Settings

TOKEN = "s3cret-unit-token"
ENCODED_KEYS = ["token", "Token", "%74oken", "%74%6F%6B%65%6E", "%54OKEN", "access_token",
                "access%5Ftoken", "%61ccess_token"]


@pytest.mark.parametrize("key", ENCODED_KEYS)
def test_the_gate_refuses_and_the_log_redacts_the_same_keys(key):
    http = TestClient(create_app(Settings(token=TOKEN)))
    for url in (f"/status?{key}={TOKEN}", f"/status?a=1&{key}={TOKEN}&b=2",
                f"/status?a=b;{key}={TOKEN}"):
        r = http.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
        if ";" not in url:  # the gate splits on & only (as parse_qsl); the log on ; too
            assert (r.status_code, r.json()["code"]) == (422, "credentials_in_url"), url
        assert url_credential(key)
        line = redact_url_credentials(url)
        assert TOKEN not in line and f"{key}=[redacted]" in line, line


def test_the_uvicorn_access_log_record_is_redacted():
    fmt = '%s - "%s %s HTTP/%s" %d'
    args = ("127.0.0.1:5000", "GET", f"/status?%74oken={TOKEN}&x=1", "1.1", 422)
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, fmt, args, None)
    assert RedactCredentials().filter(record)
    text = record.getMessage()
    assert TOKEN not in text
    assert "/status?%74oken=[redacted]&x=1" in text
    record = logging.LogRecord("x", logging.INFO, __file__, 1, f"GET /?TOKEN={TOKEN} 422", None,
                               None)
    RedactCredentials().filter(record)
    assert TOKEN not in record.getMessage()


@pytest.mark.parametrize("text, expected", [
    ("/a=b?token=x", "/a=b?token=[redacted]"),  # a path holding '=' is no key
    ("/x?tok%65n=abc#frag&y=2", "/x?tok%65n=[redacted]&y=2"),  # the value runs to a separator
    ("/x?q=a?token=x", "/x?q=a?token=x"),  # inside q's value: not a key for the gate either
    ("/x?notatoken=1&tokens=2", "/x?notatoken=1&tokens=2"),
    ("/x?%2574oken=1", "/x?%2574oken=1"),  # decoded once, as the gate does: "%74oken"
    ("no query here", "no query here"),
])
def test_redaction_edges(text, expected):
    assert redact_url_credentials(text) == expected
