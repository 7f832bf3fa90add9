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

if TYPE_CHECKING:
    from callfs.client.aio import AsyncClient, AsyncDownload
    from callfs.client.sync import Client, Download, ResumeStore, UploadResult

#: Loaded when first asked for (PEP 562), so that importing ``callfs.client.errors`` or
#: ``callfs.client.commands`` (``callfs --help``) costs neither urllib3 (~30 ms with ssl and
#: http.client) nor, for the asyncio client, aiohttp (~0.12 s).
_LAZY = {
    "Client": "sync",
    "Download": "sync",
    "ResumeStore": "sync",
    "UploadResult": "sync",
    "AsyncClient": "aio",
    "AsyncDownload": "aio",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name == "sync":  # `callfs.client.sync` without importing it (it used to be eager)
        return importlib.import_module(f"{__name__}.sync")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
