"""A bounded schemathesis run against a live node, driven by the node's own ``/openapi.json``
(issue 10, issue 13).

``callfs server`` runs as a subprocess (SQLite, localfs, local locks, erasure coding on) with an API
key. The schema is loaded over HTTP from the node, so serving the document is exercised too. Every
public operation gets ``MAX_EXAMPLES`` generated requests (derandomised: the same requests on every
run; set ``CALLFS_SCHEMATHESIS_EXAMPLES`` and ``CALLFS_SCHEMATHESIS_SEED`` to explore), checked for:

- no 5xx (``not_a_server_error``);
- the status is documented (``status_code_conformance``);
- the Content-Type is documented (``content_type_conformance``);
- documented headers are present and match (``response_headers_conformance``): ``X-Request-ID``
  and the security headers on every answer, ``X-CallFS-*`` where promised;
- the body matches the schema (``response_schema_conformance``);
- JSON bodies are compact, keep non-ASCII unescaped, and end in a newline only where API.md §1
  says so (our own check).

``{path}`` parameters: schemathesis percent-encodes a parameter as one segment (a ``/`` becomes
``%2F``, which CallFS refuses with 400), so a hook sends a generated ``a/b`` as two segments and
mixes in paths that exist (seeded before each operation), so that the handlers, not only path
validation, are exercised.

Generation runs twice: positive (valid requests per the schema) and negative (schemathesis
mutates parameters, headers, bodies and credentials; the answers must still be documented 4xx).
All failures are collected (the first per operation, mode, check and status) and reported
together, each with a curl reproducer. schemathesis skips ``GET /openapi.json`` itself (the
operation that serves the schema); ``test_openapi.py`` covers it. The server's log must hold no
traceback afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from callfs.tests.functional.conftest import ALICE_KEY, BOB_KEY, INTERNAL, KEY0, LINK_SECRET

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.parameters import EncodedPath  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.timeout(240)

MAX_EXAMPLES = int(os.environ.get("CALLFS_SCHEMATHESIS_EXAMPLES", "60"))
#: Unset: derandomised (the same requests every run, for CI). Set: explore with this seed.
SEED = os.environ.get("CALLFS_SCHEMATHESIS_SEED")
#: Pause between requests to the rate-limited operations, so most requests reach the handler.
PAUSE = {"generateLink": 0.011, "downloadLink": 0.1}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
AUTH = {"Authorization": f"Bearer {KEY0}"}
#: Items that exist at the start of every operation's run (owned by ``api-user-0``).
SEEDED_FILES = {"seed.txt": b"hello world\n", "dir/nested/inner.txt": b"inner", "empty.txt": b""}
SEEDED_DIRS = ["dir/", "dir/empty/"]
ERASURE_FILE = "ec.bin"
ERASURE_FILE_UNICODE = "ec-é.bin"  # a manifest naming it must keep the é (API.md §1)
KNOWN_PATHS = [
    "seed.txt",
    "dir",
    "dir/",
    "dir/nested",
    "dir/nested/inner.txt",
    "dir/empty/",
    "empty.txt",
    ERASURE_FILE,
    ERASURE_FILE_UNICODE,
    "missing/nope.txt",
    "",
]
#: Shard requests aim at the erasure-coded file most of the time.
SHARD_PATHS = [ERASURE_FILE, ERASURE_FILE, "seed.txt", "dir"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("schemathesis")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CALLFS_")},
        "CALLFS_SERVER__PROTOCOL": "http",
        "CALLFS_SERVER__LISTEN_ADDR": f"127.0.0.1:{port}",
        "CALLFS_SERVER__EXTERNAL_URL": f"http://127.0.0.1:{port}",
        "CALLFS_METRICS__LISTEN_ADDR": "",
        "CALLFS_METADATA_STORE__TYPE": "sqlite",
        "CALLFS_METADATA_STORE__SQLITE_PATH": str(base / "meta.sqlite3"),
        "CALLFS_BACKEND__LOCALFS_ROOT_PATH": str(base / "files"),
        "CALLFS_DLM__TYPE": "local",
        "CALLFS_AUTH__API_KEYS": KEY0,
        "CALLFS_AUTH__API_KEY_USERS__ALICE": ALICE_KEY,
        "CALLFS_AUTH__API_KEY_USERS__BOB": BOB_KEY,
        "CALLFS_AUTH__INTERNAL_PROXY_SECRET": INTERNAL,
        "CALLFS_AUTH__SINGLE_USE_LINK_SECRET": LINK_SECRET,
        "CALLFS_ERASURE__ENABLED": "true",
        "CALLFS_ERASURE__DATA_SHARDS": "2",
        "CALLFS_ERASURE__PARITY_SHARDS": "1",
        "CALLFS_LOG__LEVEL": "warn",
    }
    log_path = base / "server.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "callfs", "server"],
            cwd=base,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited:\n{log_path.read_text(errors='replace')}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not healthy:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.1)
        yield url
        log = log_path.read_text(errors="replace")
        assert "Traceback" not in log, log[-5000:]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def seed(url: str) -> list[str]:
    """(Re)create the known items; returns fresh link tokens for the download operation."""
    s = requests.Session()
    s.headers.update(AUTH)
    for d in SEEDED_DIRS:
        s.post(f"{url}/v1/files/{d}", timeout=10)
    for name, data in SEEDED_FILES.items():
        s.put(f"{url}/v1/files/{name}", data=data, timeout=10)
    for ec in (ERASURE_FILE, quote(ERASURE_FILE_UNICODE)):
        if s.head(f"{url}/v1/files/{ec}", timeout=10).status_code != 200:
            s.post(f"{url}/v1/files/{ec}?erasure=true", data=b"x" * 5000, timeout=10)
    tokens = []
    for _ in range(3):
        time.sleep(0.02)  # link generation: 100/s, burst 1
        r = s.post(
            f"{url}/v1/links/generate", json={"path": "seed.txt", "expiry_seconds": 60}, timeout=10
        )
        if r.status_code == 201:
            tokens.append(r.json()["token"])
    return tokens


def as_segments(value: str) -> EncodedPath:
    """``a/b`` sent as two segments, each percent-encoded once (``.`` and ``..`` kept literal so
    that the server, not the client, resolves them)."""
    return EncodedPath("/".join(quote(seg, safe="") for seg in value.split("/")))


Findings = dict[tuple[str, str, int], str]


def json_format_problem(operation: str, response: Any) -> str | None:
    """API.md §1: JSON bodies are compact, keep non-ASCII unescaped, and end in a newline only for
    link generation, PATCH success and the erasure manifest."""
    content_type = response.headers.get("content-type", [""])[0]  # lowercase keys, list values
    if not content_type.startswith("application/json"):
        return None
    text = response.content.decode("utf-8")
    if not text:
        return None
    body = text.removesuffix("\n")
    value = json.loads(body)
    newline = (
        (operation.startswith("generateLink") and response.status_code == 201)
        or (operation.startswith("moveFile") and response.status_code == 200)
        or (isinstance(value, dict) and "erasure_profile" in value)
    )
    if text.endswith("\n") != newline:
        return f"trailing newline {'missing' if newline else 'unexpected'}: {text[-80:]!r}"
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if body != expected:
        return f"not compact or non-ASCII escaped: {body[:300]!r}"
    return None


#: Server bugs this run found: name -> the test that reproduces it and fails until it is fixed.
#: The fuzz run tolerates them (``known_bug``), so that it keeps guarding against new ones.
KNOWN_SERVER_BUGS = {
    # API.md §2: "operations that need [a disabled backend] answer 500" (the contract's choice)
    "patch-to-unconfigured-backend": "test_patch_to_unconfigured_backend_is_the_contracts_500",
}


def known_bug(operation: str, case: Any, response: Any) -> str | None:
    """The ``KNOWN_SERVER_BUGS`` entry this answer shows, if any."""
    body = case.body if isinstance(case.body, dict) else {}
    if (
        operation.startswith("moveFile")
        and response.status_code == 500
        and body.get("backend") == "s3"
    ):
        return "patch-to-unconfigured-backend"
    return None


def fuzz_operation(
    url: str, op: Any, mode: Any, examples: int, findings: Findings, statuses: dict[str, Any]
) -> None:
    """``examples`` derandomised requests (a fixed seed: the same ones on every run) to one
    operation; failures go to ``findings`` and the run goes on."""
    name = str(op.definition.raw.get("operationId", op.label))
    session = requests.Session()

    @hypothesis_seed(int(SEED or 0))
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        derandomize=SEED is None,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        time.sleep(PAUSE.get(name, 0))
        response = case.call(base_url=url, session=session, headers=AUTH, timeout=15)
        seen = statuses.setdefault(f"{name} ({mode.value})", {})
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=CHECKS, headers=AUTH)
        except (AssertionError, BaseExceptionGroup) as exc:  # collect, keep fuzzing
            if known_bug(name, case, response) is not None:
                return
            for failure in getattr(exc, "exceptions", None) or [exc]:
                title = getattr(failure, "title", type(failure).__name__)
                key = (f"{name} ({mode.value})", title, response.status_code)
                findings.setdefault(key, str(exc))
        problem = json_format_problem(name, response)
        if problem is not None and known_bug(name, case, response) is None:
            key = (f"{name} ({mode.value})", "JSON format (API.md §1)", response.status_code)
            findings.setdefault(key, f"{problem}\n{case.as_curl_command(headers=AUTH)}")

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE, name  # nothing to negate (no parameters, no body)


#: tus PATCH bodies (``/v1/uploads/{id}``) are raw bytes like ``application/octet-stream``.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")


def load_schema(url: str) -> Any:
    return schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=10)


def test_schemathesis_against_live_node(base_url: str) -> None:
    started = time.monotonic()
    schema = load_schema(base_url)
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) >= 20, [op.label for op in ops]
    findings: Findings = {}
    statuses: dict[str, dict[int, int]] = {}
    tokens: list[str] = []

    def path_params(_ctx: Any, params: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        if not params:
            return st.just(params)
        out = dict(params)
        choices: dict[str, st.SearchStrategy[Any]] = {}
        if "path" in out:
            generated = str(out["path"])
            known = SHARD_PATHS if "index" in out else KNOWN_PATHS
            choices["path"] = st.sampled_from([*known, *[generated] * 4, generated + "/"]).map(
                as_segments
            )
        if "index" in out:
            choices["index"] = st.one_of(st.just(out["index"]), st.integers(0, 3))
        if "token" in out and tokens:
            choices["token"] = st.one_of(st.just(out["token"]), st.sampled_from(tokens))
        if not choices:
            return st.just(out)
        return st.fixed_dictionaries(choices).map(lambda drawn: {**out, **drawn})

    def body(_ctx: Any, value: Any) -> st.SearchStrategy[Any]:
        """Link requests and moves aim at existing items some of the time."""
        if not isinstance(value, dict):
            return st.just(value)
        if "expiry_seconds" in value:
            return st.sampled_from([value, {**value, "path": "seed.txt"}, {**value, "path": "dir"}])
        if "destination" in value:
            moved = {**value, "destination": "moved/" + str(value["destination"])[:50]}
            return st.sampled_from([value, moved, {**moved, "create_parents": True}])
        return st.just(value)

    def query(ctx: Any, value: Any) -> st.SearchStrategy[Any]:
        """File GETs ask for the erasure manifest a third of the time."""
        if ctx.operation.label not in ("GET /v1/files", "GET /v1/files/{path}"):
            return st.just(value)
        return st.sampled_from([value, value, {**(value or {}), "manifest": "true"}])

    schema.hook("flatmap_path_parameters")(path_params)
    schema.hook("flatmap_query")(query)
    schema.hook("flatmap_body")(body)
    runs = ((GenerationMode.POSITIVE, MAX_EXAMPLES), (GenerationMode.NEGATIVE, MAX_EXAMPLES // 2))
    for mode, examples in runs:
        for op in ops:
            tokens[:] = seed(base_url)
            fuzz_operation(base_url, op, mode, examples, findings, statuses)

    elapsed = time.monotonic() - started
    print(
        f"schemathesis: {len(ops)} operations, {MAX_EXAMPLES} positive + {MAX_EXAMPLES // 2} "
        f"negative examples each, in {elapsed:.1f} s"
    )
    for name, seen in statuses.items():
        print(f"  {name}: {dict(sorted(seen.items()))}")
    report = "\n\n".join(
        f"== {op} / {check} / {status}\n{text}"
        for (op, check, status), text in sorted(findings.items())
    )
    assert not findings, f"{len(findings)} finding(s):\n\n{report}"


# ---- what schemathesis found: the contract's 500, and a fixed escaping bug ----


def test_patch_to_unconfigured_backend_is_the_contracts_500(base_url: str) -> None:
    """A move to a backend this node does not have (here S3, no bucket configured) answers 500
    INTERNAL_ERROR: API.md §2 says exactly that ("an empty backend.s3_bucket_name disables that
    backend; operations that need it answer 500"), so the fuzz run allows this one 5xx.

    Reproducer: ``curl -X PUT -H "Authorization: Bearer $KEY" -d x $CALLFS/v1/files/0`` then
    ``curl -X PATCH -H "Authorization: Bearer $KEY" -d '{"destination":"1","backend":"s3"}'
    $CALLFS/v1/files/0``."""
    s = requests.Session()
    s.headers.update(AUTH)
    assert s.put(f"{base_url}/v1/files/bug-backend.txt", data=b"x", timeout=10).status_code in (
        200,
        201,
    )
    r = s.patch(
        f"{base_url}/v1/files/bug-backend.txt",
        json={"destination": "bug-backend-moved.txt", "backend": "s3"},
        timeout=10,
    )
    assert r.status_code == 500, (r.status_code, r.text)
    assert r.json()["code"] == "INTERNAL_ERROR"


def test_manifest_keeps_non_ascii_unescaped(base_url: str) -> None:
    """API.md §1 "non-ASCII left unescaped": the erasure manifest of ``/ec-é.bin`` names it as
    such (it used to come out as ``"/ec-\\u00e9.bin"``).

    Reproducer: ``curl -H "Authorization: Bearer $KEY" --data-binary x
    "$CALLFS/v1/files/ec-%C3%A9.bin?erasure=true"`` then ``curl -H "Authorization: Bearer $KEY"
    "$CALLFS/v1/files/ec-%C3%A9.bin?manifest=true"``."""
    seed(base_url)
    r = requests.get(
        f"{base_url}/v1/files/{quote(ERASURE_FILE_UNICODE)}?manifest=true", headers=AUTH, timeout=10
    )
    assert r.status_code == 200, r.text
    assert json_format_problem("getFile", r_as_schemathesis(r)) is None, r.text


def r_as_schemathesis(r: requests.Response) -> Any:
    """A requests answer in the shape ``json_format_problem`` reads (schemathesis' Response)."""
    return schemathesis.Response.from_any(r)
