"""A real node (SQLite + localfs + local locks) behind aiohttp's test client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from callfs.config import Config, load_config
from callfs.daemon import Node

ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdef000"
KEY0 = "api-key-zero-0123456789abcd"
INTERNAL = "internal-secret-0123456789abcdef"
LINK_SECRET = "link-secret-0123456789abcdef"


def node_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "CALLFS_SERVER__PROTOCOL": "http",
        "CALLFS_SERVER__LISTEN_ADDR": "127.0.0.1:0",
        "CALLFS_SERVER__EXTERNAL_URL": "http://127.0.0.1:8443",
        "CALLFS_METRICS__LISTEN_ADDR": "",
        "CALLFS_METADATA_STORE__TYPE": "sqlite",
        "CALLFS_METADATA_STORE__SQLITE_PATH": str(tmp_path / "meta.sqlite3"),
        "CALLFS_BACKEND__LOCALFS_ROOT_PATH": str(tmp_path / "files"),
        "CALLFS_DLM__TYPE": "local",
        "CALLFS_AUTH__API_KEYS": KEY0,
        "CALLFS_AUTH__API_KEY_USERS__ALICE": ALICE_KEY,
        "CALLFS_AUTH__API_KEY_USERS__BOB": BOB_KEY,
        "CALLFS_AUTH__INTERNAL_PROXY_SECRET": INTERNAL,
        "CALLFS_AUTH__SINGLE_USE_LINK_SECRET": LINK_SECRET,
        "CALLFS_LOG__LEVEL": "warn",
    }
    env.update(extra)
    return env


def make_config(tmp_path: Path, **extra: str) -> Config:
    return load_config(None, env=node_env(tmp_path, **extra), cwd=tmp_path)


@pytest.fixture
def config_env() -> dict[str, str]:
    """Tests override node settings by filling this dict before ``node`` is created."""
    return {}


@pytest.fixture
async def node(tmp_path: Path, config_env: Mapping[str, str]) -> AsyncIterator[Node]:
    n = Node(make_config(tmp_path, **config_env))
    n.build()
    await n.start_components()
    try:
        yield n
    finally:
        await n.stop()


@pytest.fixture
async def client(node: Node, aiohttp_client: Callable[..., Any]) -> TestClient[Any, Any]:
    assert node.app is not None
    return await aiohttp_client(node.app)  # type: ignore[no-any-return]


def raw_url(client: TestClient[Any, Any], raw_path: str) -> URL:
    """A URL sent exactly as written (the client would otherwise resolve ``..`` itself)."""
    return URL(str(client.make_url("/")).rstrip("/") + raw_path, encoded=True)


def auth(key: str = ALICE_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def stored_bytes(node: Node, path: str) -> bytes:
    """The bytes on disk of the blob the entry at ``path`` names (docs/storage-layout.md)."""
    assert node.meta is not None
    entry = await node.meta.get(path)
    assert entry is not None and entry.blob_key is not None
    key = entry.blob_key
    root = Path(node.cfg.backend.localfs_root_path)
    return (root / ".callfs" / "blobs" / key[:2] / key[2:4] / key).read_bytes()


async def unreferenced_files(node: Node) -> list[Path]:
    """Files under the localfs root that no entry names: staged leftovers and orphan blobs."""
    assert node.meta is not None
    root = Path(node.cfg.backend.localfs_root_path)
    found = [p for p in root.rglob("*") if p.is_file()]
    blobs = [p.name for p in found if p.parent.parent.parent.name == "blobs"]
    live = await node.meta.blobs_referenced(blobs)
    return [p for p in found if p.name not in live]
