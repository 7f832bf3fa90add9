"""A bounded raw-HTTP fuzzer against a real listening server (issue 10).

``callfs server`` runs as a subprocess; requests go over raw sockets so the bytes reach the server
exactly as generated (no client library normalises paths, headers or methods). Hypothesis draws
request paths (percent-encodings, control characters, unicode, ``..``, very long segments),
methods, header names and values, and bodies for ``/v1/files``, ``/v1/directories``,
``/v1/links`` and ``/download/``.

It asserts: no 5xx at all (a single node has no peer to miss, so not even 502/503/507), no
``Traceback`` in the server's log, ``/health`` answers afterwards, and nothing outside the data
root (in the root's parent directory, or the server's working directory) was created or changed.

Examples are derandomised (the same 200 every run, so CI is reproducible); set
``CALLFS_FUZZ_SEED`` (and ``CALLFS_FUZZ_EXAMPLES``) to explore other inputs locally.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from callfs.tests.functional.conftest import ALICE_KEY, BOB_KEY, INTERNAL, KEY0, LINK_SECRET

MAX_EXAMPLES = int(os.environ.get("CALLFS_FUZZ_EXAMPLES", "200"))
IO_TIMEOUT = 10.0
T = TypeVar("T")
WAIT_FOR_ANSWER = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_snapshot(top: Path, skip: Path | None = None) -> dict[str, tuple[str, int, int]]:
    """Every entry below ``top`` (except the ``skip`` subtree): kind/content hash, mode, mtime."""
    snap: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        if skip is not None and here == skip:
            dirnames[:] = []
            continue
        for name in [*dirnames, *filenames]:
            p = here / name
            if skip is not None and p == skip:
                snap[str(p.relative_to(top))] = ("data root", 0, 0)
                continue
            st_ = p.lstat()
            if p.is_symlink():
                kind = "link:" + os.readlink(p)
            elif p.is_dir():
                kind = "dir"
            else:
                kind = "file:" + hashlib.sha256(p.read_bytes()).hexdigest()
            snap[str(p.relative_to(top))] = (kind, st_.st_mode, st_.st_mtime_ns)
    return snap


@dataclass
class LiveServer:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    sandbox: Path
    root: Path
    cwd: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def send_raw(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection and read until the server closes it (every request
    says ``Connection: close``). A server still waiting for body bytes it was promised gets an
    end of stream after ``WAIT_FOR_ANSWER`` seconds (a half-close: aiohttp then gives up on the
    request without answering, which is fine)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_FOR_ANSWER) as sock:
        with contextlib.suppress(OSError):  # the server may answer 400 and close before reading
            sock.sendall(request)
        chunks: list[bytes] = []
        half_closed = False
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                if half_closed or chunks:
                    raise AssertionError(
                        f"no complete answer to {request[:300]!r}: {b''.join(chunks)[:300]!r}"
                    ) from None
                half_closed = True
                sock.settimeout(IO_TIMEOUT)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                continue
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int | None:
    """The final status of a response (interim ``1xx`` answers, e.g. to ``Expect``, skipped)."""
    while response.startswith(b"HTTP/"):  # aiohttp answers a request without a version as 0.9
        status = int(response.split(b" ", 2)[1])
        if status >= 200:
            return status
        _, sep, response = response.partition(b"\r\n\r\n")
        if not sep:
            return status
    return None


def get_health(port: int) -> int | None:
    return status_of(
        send_raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    base = tmp_path_factory.mktemp("fuzz")
    sandbox = base / "sandbox"  # the data root's parent: nothing here may change
    root = sandbox / "files"
    (sandbox / "neighbour").mkdir(parents=True)
    (sandbox / "neighbour" / "secret.txt").write_bytes(b"not served")
    (sandbox / "files-other").mkdir()
    cwd = base / "cwd"
    cwd.mkdir()
    (base / "meta").mkdir()
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CALLFS_")},
        "CALLFS_SERVER__PROTOCOL": "http",
        "CALLFS_SERVER__LISTEN_ADDR": f"127.0.0.1:{port}",
        "CALLFS_SERVER__EXTERNAL_URL": f"http://127.0.0.1:{port}",
        "CALLFS_METRICS__LISTEN_ADDR": "",
        "CALLFS_METADATA_STORE__TYPE": "sqlite",
        "CALLFS_METADATA_STORE__SQLITE_PATH": str(base / "meta" / "meta.sqlite3"),
        "CALLFS_BACKEND__LOCALFS_ROOT_PATH": str(root),
        "CALLFS_DLM__TYPE": "local",
        "CALLFS_AUTH__API_KEYS": KEY0,
        "CALLFS_AUTH__API_KEY_USERS__ALICE": ALICE_KEY,
        "CALLFS_AUTH__API_KEY_USERS__BOB": BOB_KEY,
        "CALLFS_AUTH__INTERNAL_PROXY_SECRET": INTERNAL,
        "CALLFS_AUTH__SINGLE_USE_LINK_SECRET": LINK_SECRET,
        "CALLFS_LOG__LEVEL": "warn",
    }
    log_path = base / "server.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "callfs", "server"],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(port, proc, log_path, sandbox, root, cwd)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited ({proc.returncode}):\n{server.log()}")
            try:
                if get_health(port) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not healthy in time:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- strategies -----------------------------------------------------------------------------
PREFIXES = [
    "/v1/files/",
    "/v1/files",
    "/v1/files/ws/",
    "/v1/directories/",
    "/v1/directories",
    "/v1/links/generate",
    "/download/",
    "/v1/links/",
]
NASTY_SEGMENTS = [
    "..",
    ".",
    "",
    "...",
    "%2e%2e",
    "%2E%2E%2F",
    "..%2F..%2Fetc%2Fpasswd",
    "%2F",
    "%00",
    "%5C",
    "%0a",
    "%0d%0a",
    "%7f",
    "%e2%80%ae",
    "%ff",
    "%c0%af",
    "%",
    "%2",
    "%zz",
    "%252e%252e%252f",
    ".callfs",
    ".callfs-tmp",
    ".erasure",
    "%2Eerasure",
    "tmp",
    "blobs",
    "ws",
    "a" * 255,
    "a" * 256,
    "é" * 128,
    "x" * 5000,
    "con",
    "nul",
    "~",
    "*",
    "?",
    "#",
    ";",
    "+",
    "@",
    "%20",
    "\\",
    "$(id)",
]


def mostly(common: st.SearchStrategy[T], rare: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``rare`` one draw in five: well-formed requests must reach the handlers, not only the
    HTTP parser (which answers 400 to most malformed bytes)."""
    mixed = st.integers(0, 9).flatmap(lambda i: rare if i in (3, 7) else common)
    mixed.common = common  # type: ignore[attr-defined]  # what well-formed requests draw from
    return mixed


segment = mostly(
    st.one_of(
        st.sampled_from([s for s in NASTY_SEGMENTS if s.isascii() and s.isprintable()]),
        st.text(min_size=1, max_size=12).map(lambda s: quote(s, safe="")),  # encoded unicode
        st.binary(min_size=1, max_size=6).map(lambda b: "".join(f"%{c:02x}" for c in b)),
        st.text(alphabet="abc.", min_size=1, max_size=4),
    ),
    st.one_of(  # raw bytes in the request target: unicode, controls, very long
        st.sampled_from(NASTY_SEGMENTS),
        st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/?# "), max_size=8),
    ),
)
query = st.one_of(
    st.just(""),
    st.sampled_from(
        [
            "?recursive=true",
            "?recursive=true&max_depth=-5",
            "?max_depth=99999999999999999999",
            "?mode=upload",
            "?mode=%00",
            "?manifest=true",
            "?overwrite=true",
            "?erasure=true",
            "?a=%ff",
            "?" + "q" * 9000,
        ]
    ),
    st.text(max_size=20).map(lambda s: "?" + quote(s, safe="=&")),
)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
method = mostly(
    st.sampled_from(METHODS),
    st.one_of(
        st.sampled_from(["OPTIONS", "TRACE", "PROPFIND", "get", "G\x00T", "CONNECT", "PRI"]),
        st.sampled_from(["", "M" * 300]),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-_!", min_size=1, max_size=10),
    ),
)
AUTHS = [
    f"Bearer {BOB_KEY}",
    ALICE_KEY,
    f"Bearer {INTERNAL}",
    "Bearer ",
    "Bearer x",
    f"bearer {ALICE_KEY}",
    f"Bearer {ALICE_KEY}\x00",
    "Basic YWxpY2U6eA==",
]
auth_header = mostly(st.just(f"Bearer {ALICE_KEY}"), st.one_of(st.none(), st.sampled_from(AUTHS)))
header_name = mostly(
    st.sampled_from(
        [
            "Range",
            "If-Range",
            "Content-Type",
            "Transfer-Encoding",
            "Content-Length",
            "X-CallFS-Erasure",
            "Origin",
            "Upgrade",
            "Connection",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
            "X-Forwarded-For",
            "X-Request-ID",
            "Expect",
            "Host",
            "Authorization",
            "Cookie",
            "Accept-Encoding",
        ]
    ),
    st.one_of(
        st.text(alphabet="abcXYZ-_.!#$%&'*+^`|~0123456789", min_size=1, max_size=20),
        st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=20),
    ),
)
header_value = mostly(
    st.one_of(
        st.sampled_from(
            [
                "bytes=0-0",
                "bytes=-1",
                "bytes=5-1",
                "bytes=99999999999999999999-",
                "bytes=0-1,2-3",
                "chunked",
                "gzip, chunked",
                "-1",
                "99999999999999999999",
                "true",
                "websocket",
                "Upgrade",
                "13",
                "dGhlIHNhbXBsZSBub25jZQ==",
                "100-continue",
                "http://evil.example",
                "a" * 9000,
            ]
        ),
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    ),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=40),
)
json_text = st.one_of(st.text(max_size=30), st.sampled_from(NASTY_SEGMENTS), st.integers())
json_body = st.fixed_dictionaries(
    {},
    optional={
        "path": json_text,
        "destination": json_text,
        "name": json_text,
        "expiry_seconds": st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=5)),
        "overwrite": st.one_of(st.booleans(), st.text(max_size=5)),
        "create_parents": st.one_of(st.booleans(), st.integers()),
        "backend": st.sampled_from(["localfs", "s3", "erasure", "", "x"]),
        "instance": st.text(max_size=10),
    },
).map(lambda d: json.dumps(d).encode())
raw_body = st.one_of(
    st.just(b""),
    st.binary(max_size=512),
    st.sampled_from([b"{", b"[]", b"null", b'{"path": "\\ud800"}', b"\xff\xfe", b"0\r\n\r\n"]),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Seven requests in ten are well-formed HTTP with fuzzed paths, queries, bodies and header
    values (they reach CallFS's handlers); the rest also break the HTTP syntax somewhere."""
    if draw(st.integers(0, 9)) < 7:
        return draw(_request(well_formed=True))
    return draw(_request(well_formed=False))


def _pick(well_formed: bool, strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    common = getattr(strategy, "common", None)
    return common if well_formed and common is not None else strategy


@st.composite
def _request(draw: st.DrawFn, well_formed: bool) -> bytes:
    segment_ = _pick(well_formed, segment)
    method_ = _pick(well_formed, method)
    header_name_ = _pick(well_formed, header_name)
    header_value_ = _pick(well_formed, header_value)
    prefix = draw(st.sampled_from(PREFIXES))
    segments = draw(st.lists(segment_, max_size=6))
    path = prefix + "/".join(segments) + draw(st.sampled_from(["", "/", "//"]))
    if prefix == "/download/" and draw(st.booleans()):
        path = prefix + draw(st.sampled_from(["", "x", "a" * 300, "0" * 32 + ".", ".%00"]))
    target = path + draw(query)
    verb = draw(method_)
    headers = [("Host", "127.0.0.1")]
    auth = draw(auth_header)
    if auth is not None:
        headers.append(("Authorization", auth))
    headers += draw(st.lists(st.tuples(header_name_, header_value_), max_size=3))
    wants_json = verb == "PATCH" or prefix.startswith("/v1/links")
    payload = draw(mostly(json_body, raw_body) if wants_json else mostly(raw_body, json_body))
    framing = draw(
        st.sampled_from(["length", "length", "chunked"] + ([] if well_formed else ["none"]))
    )
    if framing == "length":
        headers.append(("Content-Length", str(len(payload))))
        wire_body = payload
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        wire_body = f"{len(payload):x}\r\n".encode() + payload + b"\r\n" if payload else b""
        wire_body += b"0\r\n\r\n"
    else:
        wire_body = b""
    headers.append(("Connection", "close"))
    version = "HTTP/1.1" if well_formed else draw(st.sampled_from(["HTTP/1.0", "HTTP/9.9", ""]))
    line = f"{verb} {target} {version}".rstrip(" ")
    head = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    # The target is sent as UTF-8 (raw unicode paths); header bytes above 0x7f too.
    return head.encode("utf-8", "surrogatepass") + wire_body


# Requests aiohttp's HTTP parser refuses, always sent: each is answered 400 in the JSON envelope
# (callfs/api/protocol_errors.py) and logged as one warning line on ``aiohttp.server`` without a
# traceback (callfs/log.py), so no unauthenticated client can fill the log with tracebacks.
PARSER_REFUSALS: list[bytes] = [
    # InvalidURLError: a raw non-ASCII byte in the request target
    b"GET /v1/files/\xc3\xa9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    # BadHttpMessage: a header name that is not a token
    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\nConnection: close\r\n\r\n",
    # BadStatusLine: an unknown HTTP version
    b"GET /health HTTP/9.9\r\nHost: x\r\nConnection: close\r\n\r\n",
    # BadHttpMessage: a header line over 8190 bytes
    b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\nConnection: close\r\n\r\n",
]


def _fuzz_settings() -> settings:
    return settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize="CALLFS_FUZZ_SEED" not in os.environ,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        print_blob=True,
    )


def check_one(live: LiveServer, request: bytes) -> None:
    response = send_raw(live.port, request)
    status = status_of(response)
    assert status is None or status < 500, (
        f"{status} for {request[:400]!r}:\n{response[:600]!r}\n"
        f"--- server log ---\n{live.log()[-3000:]}"
    )


def traceback_kinds(log: str) -> dict[str, tuple[int, str]]:
    """The log lines holding a traceback, by logger and exception type: (count, one example)."""
    kinds: dict[str, tuple[int, str]] = {}
    for line in log.splitlines():
        if "Traceback" not in line:
            continue
        try:
            record = json.loads(line)
            text = str(record.get("error", "")) or line
            logger = str(record.get("logger", "?"))
        except ValueError:
            text, logger = line, "?"
        last = [x for x in text.splitlines() if x and not x.startswith(" ")][-1:]
        kind = f"{logger}: {last[0].split(':', 1)[0] if last else '?'}"
        n, example = kinds.get(kind, (0, text[-600:]))
        kinds[kind] = (n + 1, example)
    return kinds


def test_fuzz_raw_http(live: LiveServer) -> None:
    outside_before = tree_snapshot(live.sandbox, skip=live.root)
    cwd_before = tree_snapshot(live.cwd)
    # Some state for the fuzzer to trip over: files, a directory, a link.
    setup = [
        f"POST /v1/files/a/b.txt HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n"
        "Content-Length: 5\r\nConnection: close\r\n\r\nhello",
        f"POST /v1/files/.callfs/tmp/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n",
        f"PUT /v1/files/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {BOB_KEY}\r\n"
        "Content-Length: 3\r\nConnection: close\r\n\r\nbob",
    ]
    for raw in setup:
        assert status_of(send_raw(live.port, raw.encode())) in (200, 201)

    for request in PARSER_REFUSALS:
        check_one(live, request)

    test = given(requests())(lambda request: check_one(live, request))
    seed_env = os.environ.get("CALLFS_FUZZ_SEED")
    if seed_env is not None:
        test = hypothesis_seed(int(seed_env))(test)
    _fuzz_settings()(test)()

    assert get_health(live.port) == 200
    assert live.proc.poll() is None, "the server exited"
    assert tree_snapshot(live.sandbox, skip=live.root) == outside_before
    assert tree_snapshot(live.cwd) == cwd_before
    assert (live.sandbox / "neighbour" / "secret.txt").read_bytes() == b"not served"
    kinds = traceback_kinds(live.log())
    assert kinds == {}, "tracebacks in the server log:\n" + "\n".join(
        f"{n} x {kind}: {example}" for kind, (n, example) in sorted(kinds.items())
    )
