"""The CallFS client: a blocking ``Client``, an asyncio ``AsyncClient``, one ``ClientError``.

```python
from callfs.client import Client

with Client("http://127.0.0.1:8443", "KEY") as c:
    c.upload("/docs/report.pdf", "report.pdf")     # tus (resumable) for big files, else PUT
    for entry in c.list("/docs"):                  # paged listing
        print(entry.path, entry.size)
    with c.open("/docs/report.pdf", 0, 1024) as f: # a byte range, streamed
        head = f.read()
```

See docs/client.md. ``callfs.client.commands`` holds the ``callfs put/get/...`` commands and
``callfs.client.fsspec_fs`` the fsspec filesystem (``callfs://``); neither is imported here.
"""

from typing import TYPE_CHECKING, Any

from callfs.client.errors import ClientError, TransportError
from callfs.client.model import Entry, Link
from callfs.client.sync import Client, Download, ResumeStore, UploadResult

if TYPE_CHECKING:
    from callfs.client.aio import AsyncClient, AsyncDownload


def __getattr__(name: str) -> Any:
    # The asyncio client pulls in aiohttp (~0.12 s): only when asked for, so the blocking
    # `callfs put/get/...` commands start faster.
    if name in ("AsyncClient", "AsyncDownload"):
        from callfs.client import aio

        return getattr(aio, name)
    raise AttributeError(name)


__all__ = [
    "AsyncClient",
    "AsyncDownload",
    "Client",
    "ClientError",
    "Download",
    "Entry",
    "Link",
    "ResumeStore",
    "TransportError",
    "UploadResult",
]
