"""``python cluster_tests/crash_points.py server -c CONFIG``: a ``callfs`` process that kills
itself (SIGKILL) at one step of the write path, for ``test_crash_points.py``.

``CRASH_POINT`` names the step; the kill fires at the first pass through it while the file named
by ``CRASH_ARM`` exists (the test creates it just before the request it wants to crash):

- ``staged``: ``stage`` consumed the body (a big body's bytes are under ``.callfs/tmp``, a small
  body's last part still in memory: ``publish`` writes it);
- ``written``: every byte is written under ``.callfs/tmp`` (in ``publish``'s hop), not yet
  renamed (nor fsync'd: blob keys are always new names);
- ``renamed``: the staged file was renamed to its blob key, not yet fsync'd;
- ``published``: the blob is fsync'd under its own key, the metadata not yet committed;
- ``committed``: the metadata commit (a create, update or move) returned, the answer not yet
  sent.

The product has no such hook: this wrapper patches it from outside, in this process only.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callfs.metadata import sqlite as sqlite_store
from callfs.storage import localfs

POINT = os.environ["CRASH_POINT"]
ARM = os.environ["CRASH_ARM"]


def _reached(point: str) -> None:
    if point == POINT and os.path.exists(ARM):
        os.kill(os.getpid(), signal.SIGKILL)


_stage = localfs.LocalFSBackend.stage
_publish = localfs._Staged.publish
_rename = os.rename
_create = sqlite_store.SqliteMetadataStore.create
_update = sqlite_store.SqliteMetadataStore.update
_move = sqlite_store.SqliteMetadataStore.move


async def stage(self: Any, key: str, chunks: Any) -> Any:
    staged = await _stage(self, key, chunks)
    _reached("staged")
    return staged


async def publish(self: Any) -> None:
    await _publish(self)
    _reached("published")


def rename(src: Any, dst: Any, *, src_dir_fd: Any = None, dst_dir_fd: Any = None) -> None:
    publish = src_dir_fd is not None  # the publish rename, out of .callfs/tmp
    if publish:
        _reached("written")
    _rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
    if publish:
        _reached("renamed")


async def create(self: Any, *args: Any, **kwargs: Any) -> Any:
    out = await _create(self, *args, **kwargs)
    _reached("committed")
    return out


async def update(self: Any, *args: Any, **kwargs: Any) -> Any:
    out = await _update(self, *args, **kwargs)
    _reached("committed")
    return out


localfs.LocalFSBackend.stage = stage  # type: ignore[method-assign]


async def move(self: Any, *args: Any, **kwargs: Any) -> Any:
    out = await _move(self, *args, **kwargs)
    _reached("committed")
    return out


localfs._Staged.publish = publish  # type: ignore[method-assign]
os.rename = rename  # type: ignore[assignment]
sqlite_store.SqliteMetadataStore.create = create  # type: ignore[method-assign]
sqlite_store.SqliteMetadataStore.update = update  # type: ignore[method-assign]
sqlite_store.SqliteMetadataStore.move = move  # type: ignore[method-assign]

if __name__ == "__main__":
    from callfs.cli import main

    main(sys.argv[1:])
