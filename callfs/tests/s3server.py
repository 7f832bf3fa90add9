"""moto's S3 server over HTTP on 127.0.0.1 for the tests (never an in-memory mock): one server per
test session, a fresh bucket per backend."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

from callfs.storage.s3 import S3Backend

_server: ThreadedMotoServer | None = None
_endpoint = ""
CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def endpoint() -> str:
    """Start moto once (thread in this process, real HTTP on a free loopback port)."""
    global _server, _endpoint
    if _server is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        _server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        _server.start()
        _endpoint = f"http://127.0.0.1:{port}"
    return _endpoint


def client() -> Any:
    return boto3.client("s3", endpoint_url=endpoint(), region_name="us-east-1", **CREDS)


def make_bucket() -> str:
    name = f"callfs-test-{uuid.uuid4().hex[:12]}"
    client().create_bucket(Bucket=name)
    return name


@asynccontextmanager
async def s3_backend(**kwargs: Any) -> AsyncIterator[S3Backend]:
    backend = S3Backend(
        bucket=make_bucket(),
        endpoint=endpoint(),
        access_key="testing",
        secret_key="testing",
        **kwargs,
    )
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()
