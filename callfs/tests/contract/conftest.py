from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from callfs.locks.base import LockManager
from callfs.storage.base import StorageBackend
from callfs.tests.contract.factories import (
    LOCK_KINDS,
    METADATA_KINDS,
    STORAGE_KINDS,
    StoreHandle,
    make_lock_manager,
    make_metadata_store,
    make_storage,
    selected,
)


@pytest.fixture(params=selected(METADATA_KINDS))
async def store_handle(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreHandle]:
    async with make_metadata_store(request.param, tmp_path) as handle:
        yield handle


@pytest.fixture(params=selected(LOCK_KINDS))
async def lock_manager(request: pytest.FixtureRequest) -> AsyncIterator[LockManager]:
    async with make_lock_manager(request.param) as manager:
        yield manager


@pytest.fixture(params=selected(STORAGE_KINDS))
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StorageBackend]:
    async with make_storage(request.param, tmp_path) as backend:
        yield backend
