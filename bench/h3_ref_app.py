"""The application bench_tls.py runs under aioquic's example HTTP/3 server (its
``examples/http3_server.py``, unchanged), the HTTP/3 reference of issue 18: any GET streams the file
``REF_FILE`` in 64 KiB reads, as a static file server would."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

PATH = os.environ.get("REF_FILE", "")
CHUNK = 64 * 1024
Message = MutableMapping[str, Any]


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        return
    size = os.path.getsize(PATH)
    headers = [
        (b"content-length", str(size).encode()),
        (b"content-type", b"application/octet-stream"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    with open(PATH, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            more = len(chunk) == CHUNK
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
            if not more:
                return
