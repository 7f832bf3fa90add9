"""Logging (API.md §17): JSON/console lines, the access log, and redaction of secrets and tokens."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from callfs.api.ratelimit import RateLimiter
from callfs.api.state import STATE
from callfs.daemon import Node, log_secrets
from callfs.log import (
    ConsoleFormatter,
    JsonFormatter,
    RedactionFilter,
    configure_logging,
    set_log_mode,
    shown_path,
    shown_size,
    shown_user,
)
from callfs.tests.functional.conftest import (
    ALICE_KEY,
    BOB_KEY,
    INTERNAL,
    KEY0,
    LINK_SECRET,
    auth,
    make_config,
)

#: What the node's config holds; the filter is built from the daemon's own list, not from this.
SECRETS = [ALICE_KEY, BOB_KEY, KEY0, INTERNAL, LINK_SECRET]


@pytest.fixture
def captured(node: Node) -> Iterator[io.StringIO]:
    """Log through the redaction ``run`` installs: ``log_secrets`` of the node's config."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactionFilter(log_secrets(node.cfg)))
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_no_secret_or_token_in_any_log_line(
    client: TestClient[Any, Any], node: Node, captured: io.StringIO
) -> None:
    assert node.app is not None
    node.app[STATE].download_limiter = RateLimiter(1e6, 1000)
    await client.post("/v1/files/f.txt", data=b"secret body bytes", headers=auth())
    resp = await client.post(
        "/v1/links/generate", json={"path": "/f.txt", "expiry_seconds": 60}, headers=auth()
    )
    token = (await resp.json())["token"]
    assert (await client.get(f"/download/{token}")).status == 200
    assert (await client.get(f"/download/{token}")).status == 410
    await client.get("/v1/files/f.txt", headers={"Authorization": "Bearer " + ALICE_KEY[:-1]})
    # code that logs a secret or a token by mistake is still redacted
    logging.getLogger("callfs.test").warning(
        "oops %s %s %s %s %s",
        ALICE_KEY,
        BOB_KEY,
        KEY0,
        token,
        f"download/{token}",
        extra={"path": INTERNAL},
    )
    try:
        raise ValueError(f"failure mentioning {LINK_SECRET}")
    except ValueError:
        logging.getLogger("callfs.test").exception("with a traceback")
    text = captured.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    access = [line for line in lines if line["msg"] == "HTTP request"]
    assert len(access) >= 5
    first = access[0]
    assert {
        "method",
        "path",
        "status",
        "duration",
        "user_agent",
        "remote_addr",
        "request_id",
    } <= set(first)
    assert first["path"] == "/v1/files/*"
    for secret in [*SECRETS, token, token.split(".")[1], b"secret body bytes".decode()]:
        assert secret not in text
    assert token[:8] in text  # cut to the first 8 characters, still traceable
    assert "[REDACTED]" in text


def test_log_secrets_cover_every_configured_secret(tmp_path: Path) -> None:
    extra = {
        "CALLFS_BACKEND__S3_SECRET_KEY": "s3-secret-key-0123456789",
        # botocore's debug lines quote the access key id (found by audit)
        "CALLFS_BACKEND__S3_ACCESS_KEY": "S3ACCESS-AKIA0123456789",
        "CALLFS_METADATA_STORE__REDIS_PASSWORD": "meta-redis-password-0123",
        "CALLFS_DLM__REDIS_PASSWORD": "dlm-redis-password-0123",
    }
    secrets = log_secrets(make_config(tmp_path, **extra))
    for secret in [*SECRETS, *extra.values()]:
        assert secret in secrets
    redaction = RedactionFilter(secrets)
    for secret in [*SECRETS, *extra.values()]:
        assert redaction.redact(f"value {secret} here") == "value [REDACTED] here"


def test_formats_and_levels(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        _formats_and_levels(capsys)
    finally:
        # as found: a root logger left at ERROR with no handler would silence every later
        # test's warnings (and make "nothing was logged" assertions pass without looking)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _formats_and_levels(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", "console", secrets=["top-secret-value-123"])
    logging.getLogger("callfs.x").info("hello top-secret-value-123", extra={"status": 200})
    err = capsys.readouterr().err
    assert "hello [REDACTED]" in err and "status=200" in err
    configure_logging("nonsense", "json")
    assert logging.getLogger().level == logging.INFO
    logging.getLogger("callfs.x").debug("hidden")
    logging.getLogger("callfs.x").info("shown")
    out = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [o["msg"] for o in out] == ["shown"]
    configure_logging("warn", "json")
    assert logging.getLogger().level == logging.WARNING
    assert isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
    configure_logging("error", "text")
    assert isinstance(logging.getLogger().handlers[0].formatter, ConsoleFormatter)
    configure_logging("ERROR", "json")  # the four names in any case (test_config_errors)
    assert logging.getLogger().level == logging.ERROR


@pytest.fixture
def log_mode(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str | None], None]]:
    """Set ``CALLFS_LOG_MODE`` as ``configure_logging`` reads it; the default mode after."""

    def use(mode: str | None) -> None:
        if mode is None:
            monkeypatch.delenv("CALLFS_LOG_MODE", raising=False)
        else:
            monkeypatch.setenv("CALLFS_LOG_MODE", mode)
        set_log_mode(os.environ.get("CALLFS_LOG_MODE"))

    yield use
    set_log_mode(None)


def test_log_modes_show_paths_users_and_sizes_as_the_contract_says(
    log_mode: Callable[[str | None], None],
) -> None:
    """§17's table: production (the default, and any unknown mode), development, debug."""
    path, user = "/reports/2026/quarterly-summary.pdf", "alice-in-accounting"
    for mode in (None, "production", "Debug", "verbose"):
        log_mode(mode)
        assert shown_path(path) == "hash:" + hashlib.sha256(path.encode()).digest()[:8].hex()
        assert shown_user(user) == "user_hash:" + hashlib.sha256(user.encode()).digest()[:6].hex()
        assert (shown_size(11), shown_size(1535), shown_size(1536)) == ("0 KiB", "1 KiB", "2 KiB")
    log_mode("development")
    assert shown_path(path) == "/reports/2...ary.pdf"
    assert shown_path("/short/name.txt") == "/short/name.txt"
    assert (shown_user(user), shown_user("bob")) == ("alic****", "bob")
    assert shown_size(1535) == "1535 bytes"
    log_mode("debug")
    assert (shown_path(path), shown_user(user), shown_size(11)) == (path, user, "11 bytes")


async def test_operation_logs_hash_paths_and_round_sizes_by_default(
    client: TestClient[Any, Any],
    captured: io.StringIO,
    log_mode: Callable[[str | None], None],
) -> None:
    """A tus upload logs its size: to the KiB in production (the default), exact in debug."""
    log_mode(None)
    meta = "path " + base64.b64encode(b"/tus/a.bin").decode()
    headers = {**auth(), "Tus-Resumable": "1.0.0", "Upload-Metadata": meta}
    resp = await client.post("/v1/uploads", headers={**headers, "Upload-Length": "3000"})
    assert resp.status == 201, await resp.text()
    log_mode("debug")
    resp = await client.post("/v1/uploads", headers={**headers, "Upload-Length": "3001"})
    assert resp.status == 201
    messages = [json.loads(line)["msg"] for line in captured.getvalue().splitlines()]
    assert "upload created (3 KiB)" in messages
    assert "upload created (3001 bytes)" in messages
    assert not any("3000" in m for m in messages)
