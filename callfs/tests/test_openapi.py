"""The OpenAPI document (``callfs/api/openapi.json``, served at ``GET /openapi.json``): valid
OpenAPI 3.1, listing exactly the public routes the application registers, consistent with the
error table, shipped in the package, and served without authentication (API.md §22, issue 13).
Conformance of the server's answers to it is checked by ``functional/test_schemathesis.py``."""

from __future__ import annotations

import configparser
import json
import re
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from callfs.api import errors as api_errors
from callfs.api.middleware import SECURITY_HEADERS
from callfs.daemon import Node
from callfs.tests.functional.conftest import make_config

REPO = Path(__file__).resolve().parents[2]
HTTP_METHODS = {"get", "head", "post", "put", "delete", "patch", "options", "trace"}


def document() -> dict[str, Any]:
    text = resources.files("callfs.api").joinpath("openapi.json").read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    ]


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def route_key(path: str) -> str:
    """``/v1/files/{tail}`` (aiohttp) and ``/v1/files/{path}`` (OpenAPI) -> ``/v1/files/{*}``; a
    route's variable part, one segment or many, is compared by its literal prefix."""
    head, brace, _ = path.partition("{")
    return head + "{*}" if brace else path


def test_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # openapi-spec-validator: raises on any violation


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    # erasure on: /v1/shards/... is registered only then
    n = Node(make_config(tmp_path, CALLFS_ERASURE__ENABLED="true"))
    n.build()
    await n.start_components()
    try:
        yield n
    finally:
        await n.stop()


async def test_document_lists_exactly_the_registered_public_routes(node: Node) -> None:
    assert node.app is not None
    registered = set()
    for route in node.app.router.routes():
        resource = route.resource
        assert resource is not None
        if resource.canonical.startswith(("/v1/internal/", "/ui")):  # /ui/: the web page, not API
            continue
        registered.add((route_key(resource.canonical), route.method.lower()))
    documented = {(route_key(path), method) for path, method, _ in operations(document())}
    assert documented - registered == set(), "documented but not served"
    assert registered - documented == set(), "served but not documented in openapi.json"
    assert not any(p.startswith("/v1/internal/") for p in document()["paths"])


async def test_served_without_auth_with_security_headers(
    node: Node, aiohttp_client: Callable[..., Any]
) -> None:
    assert node.app is not None
    client = await aiohttp_client(node.app)
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    for name, value in SECURITY_HEADERS.items():
        assert resp.headers[name] == value
    assert re.fullmatch(r"[0-9a-f]{16}", resp.headers["X-Request-ID"])
    body = await resp.read()
    assert b"\n" not in body  # compact, like every other JSON answer
    assert json.loads(body) == document()
    # HEAD is served only on /v1/files/{path} (API.md §3)
    head = await client.head("/openapi.json")
    assert head.status == 405


def test_error_codes_match_the_error_table() -> None:
    doc = document()
    enum = set(doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"])
    table = {code for _, code in api_errors._TABLE.values()}
    pipeline_codes = {"NOT_FOUND", "METHOD_NOT_ALLOWED", "INTERNAL_ERROR"}
    assert enum == table | pipeline_codes
    # every status of the table is documented on some operation, with its code
    documented: dict[str, set[str]] = {}
    for _, _, op in operations(doc):
        for status, response in op["responses"].items():
            schema = resolve(doc, response).get("content", {}).get("application/json", {})
            text = json.dumps(schema.get("schema", {}))
            documented.setdefault(status, set()).update(re.findall(r'"([A-Z_]{5,})"', text))
    for status, code in api_errors._TABLE.values():
        assert code in documented.get(str(status), set()), (status, code)


def test_every_operation_documents_auth_and_common_headers() -> None:
    doc = document()
    for path, method, op in operations(doc):
        public = op.get("security", doc["security"]) == []
        assert public == (path in {"/health", "/download/{token}", "/openapi.json"}), path
        if not public:
            assert "401" in op["responses"], (method, path)
        for status, response in op["responses"].items():
            headers = resolve(doc, response).get("headers", {})
            for name in ("X-Request-ID", *SECURITY_HEADERS):
                assert name in headers, (method, path, status, name)
        for param in op.get("parameters", []):
            if param["in"] == "path":
                assert param["required"] is True
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }


def test_shipped_as_package_data() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    entries = [e.strip() for e in cfg["options.package_data"]["callfs"].split(",")]
    assert "api/openapi.json" in entries


def test_user_guide_names_every_route() -> None:
    guide = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    for path, method, _ in operations(document()):
        shown = route_key(path).replace("{*}", "")
        assert shown in guide, (method, path)
        assert method.upper() in guide
