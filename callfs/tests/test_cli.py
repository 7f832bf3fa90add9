"""The ``callfs`` command line (API.md §20) through click's runner and a real join endpoint."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import click
import pytest
from aiohttp import web
from click.testing import CliRunner

from callfs.cli import cli, main, mask_dsn

GOOD = {
    "CALLFS_AUTH__API_KEYS": "k" * 16,
    "CALLFS_AUTH__INTERNAL_PROXY_SECRET": "s" * 20,
    "CALLFS_AUTH__SINGLE_USE_LINK_SECRET": "l" * 20,
}


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in its own empty working directory, so no stray config file is picked up.

    (``CliRunner.isolated_filesystem`` did this before click 8.5 deprecated it.)
    """
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def run(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, args, env={**GOOD, **(env or {})})


def test_config_validate_success() -> None:
    result = run(["config", "validate"], {"CALLFS_BACKEND__S3_BUCKET_NAME": "bkt"})
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "Validating configuration...",
        "Configuration is valid",
        "Instance ID: callfs-instance-1",
        "Listen Address: :8443",
        "Metadata Store DSN: postgres:/***require",
        "Redis Address: localhost:6379",
        "Local FS Root: /var/lib/callfs",
        "S3 Bucket: bkt",
        "S3 Region: us-east-1",
    ]


def test_config_validate_failure() -> None:
    result = run(["config", "validate"], {"CALLFS_SERVER__LISTEN_ADDR": ""})
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "Validating configuration...",
        "Configuration validation failed: config validation failed: server.listen_addr is required",
    ]


def test_config_flag_on_group_and_command(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("instance_discovery: {instance_id: from-file}\n")
    for args in (
        ["config", "-c", str(cfg), "validate"],
        ["config", "validate", "--config", str(cfg)],
    ):
        result = run(args)
        assert "Instance ID: from-file" in result.output, result.output


def test_mask() -> None:
    assert mask_dsn("") == ""
    assert mask_dsn("short") == "***"
    assert mask_dsn("postgres://u:p@host/db?x=1") == "postgres:/***/db?x=1"


def test_errors_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["nope"], ["server", "--bogus"], ["cluster", "join"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 1
        assert capsys.readouterr().err.startswith("Error: ")
    with pytest.raises(SystemExit):
        main(["cluster", "join"])
    assert 'required flag(s) "leader" not set' in capsys.readouterr().err


def test_help_and_completion() -> None:
    assert "server" in run(["--help"]).output
    assert "validate" in run(["help", "config"]).output
    assert "--dev" in run(["server", "-h"]).output
    assert "_CALLFS_COMPLETE" in run(["completion", "bash"]).output


def test_join_missing_values_and_unreachable_leader() -> None:
    result = run(
        ["cluster", "join", "--leader", "http://127.0.0.1:9"], {"CALLFS_AUTH__API_KEYS": ""}
    )
    assert result.exit_code == 1
    assert "node id (use --node-id or set raft.node_id in config) is required" in result.output
    result = run(
        [
            "cluster",
            "join",
            "--leader",
            "http://127.0.0.1:9",
            "--node-id",
            "n2",
            "--raft-addr",
            "127.0.0.1:7001",
            "--api-endpoint",
            "http://x",
            "--internal-secret",
            "s",
        ]
    )
    assert result.exit_code == 1
    assert "failed to contact leader:" in result.output


#: ``cluster join`` flags but the leader and the node ID.
JOIN_FLAGS = [
    "--raft-addr",
    "127.0.0.1:7002",
    "--api-endpoint",
    "http://n2:8443",
    "--internal-secret",
    "sec",
]


#: A whole ``cluster join`` but for ``--leader``.
JOIN = ["cluster", "join", "--node-id", "n2", *JOIN_FLAGS]


async def test_join_against_a_leader(aiohttp_server: Any) -> None:
    seen: list[Any] = []

    async def join(request: web.Request) -> web.Response:
        seen.append((request.headers["Authorization"], await request.json()))
        if seen[-1][1]["node_id"] == "bad":
            return web.json_response({"status": "error", "error": "not leader"}, status=502)
        return web.Response(text='{"status":"joined","leader_id":"n1"}\n')

    app = web.Application()
    app.router.add_post("/v1/internal/raft/join", join)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}/"
    args = ["cluster", "join", "--leader", base, *JOIN_FLAGS]
    ok = await asyncio.to_thread(run, [*args, "--node-id", "n2"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip() == "Join successful: node=n2 leader=n1 status=joined"
    assert seen[0] == (
        "Bearer sec",
        {"node_id": "n2", "raft_addr": "127.0.0.1:7002", "api_endpoint": "http://n2:8443"},
    )
    bad = await asyncio.to_thread(run, [*args, "--node-id", "bad"])
    assert bad.exit_code == 1
    assert "join failed: not leader" in bad.output


async def test_join_advertises_the_endpoint_the_node_uses(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """From a config audit: with ``server.external_url`` unset the node serves and names itself
    by its listener (``http://127.0.0.1:9555``), but ``cluster join`` sent the bare default
    ``localhost:8443`` as the new member's API endpoint."""
    seen: list[Any] = []

    async def join(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.Response(text='{"status":"joined","leader_id":"n1"}\n')

    app = web.Application()
    app.router.add_post("/v1/internal/raft/join", join)
    server = await aiohttp_server(app)
    cfg = tmp_path / "n2.yaml"
    cfg.write_text(
        'server: {listen_addr: "127.0.0.1:9555", protocol: http}\n'
        "metadata_store: {type: raft}\n"
        f'raft: {{node_id: n2, bind_addr: "127.0.0.1:7002", data_dir: "{tmp_path}/raft",'
        ' peers: {n1: "127.0.0.1:7001"}}\n'
        'auth: {internal_proxy_secret: "sec-0123456789abcdef0123456789abcdef",'
        ' single_use_link_secret: "link-0123456789abcdef0123456789abcdef",'
        ' api_keys: ["k-0123456789abcdef"]}\n'
        f'backend: {{localfs_root_path: "{tmp_path}/data"}}\n'
    )
    leader = f"http://127.0.0.1:{server.port}"
    ok = await asyncio.to_thread(run, ["cluster", "join", "--leader", leader, "-c", str(cfg)])
    assert ok.exit_code == 0, ok.output
    assert seen == [
        {"node_id": "n2", "raft_addr": "127.0.0.1:7002", "api_endpoint": "http://127.0.0.1:9555"}
    ]


@asynccontextmanager
async def _raw_leader(answer: bytes, drip: float = 0.0) -> AsyncIterator[str]:
    """A 'leader' that reads the request, then sends ``answer`` (a byte every ``drip`` s)."""
    handlers: list[asyncio.Task[Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            with contextlib.suppress(ConnectionError):  # the CLI may leave first
                await reader.readuntil(b"\r\n\r\n")
                step = 1 if drip else len(answer)
                for i in range(0, len(answer), step):
                    writer.write(answer[i : i + step])
                    await writer.drain()
                    await asyncio.sleep(drip)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@pytest.mark.parametrize(
    ("leader", "answer"),
    [
        ("notaurl", None),
        ("http://[::1", None),
        ("stub", b"SSH-2.0-OpenSSH_9.2\r\n"),
        ("stub", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"),
        ("stub", b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\n{"),
    ],
)
async def test_join_network_failures_are_one_error_line(leader: str, answer: bytes | None) -> None:
    """API.md §20.4: ``failed to contact leader: <detail>``, exit 1, never a traceback."""
    async with AsyncExitStack() as stack:
        if answer is not None:
            leader = await stack.enter_async_context(_raw_leader(answer))
        result = await asyncio.to_thread(run, [*JOIN, "--leader", leader])
    assert result.exit_code == 1
    assert result.output.startswith("Error: failed to contact leader: "), result.output
    assert "Traceback" not in result.output


async def test_join_gives_up_after_its_timeout_even_when_the_leader_drips(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The contract's timeout bounds the whole request: a leader that answers one byte a
    second never resets it (urllib's own timeout is per socket operation)."""
    monkeypatch.setattr("callfs.cli.JOIN_TIMEOUT", 1.0)
    answer = (
        b'HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{"status":"joined","leader_id":"n1"}    '
    )
    async with _raw_leader(answer, drip=0.2) as leader:
        started = asyncio.get_running_loop().time()
        result = await asyncio.to_thread(run, [*JOIN, "--leader", leader])
        took = asyncio.get_running_loop().time() - started
    assert result.exit_code == 1
    assert result.output.strip() == "Error: failed to contact leader: timed out"
    assert took < 3.0, took


def test_cert_generate(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    result = run(
        [
            "cert",
            "generate",
            "--host",
            "localhost,127.0.0.1",
            "--cert-file",
            str(cert),
            "--key-file",
            str(key),
        ]
    )
    assert result.exit_code == 0, result.output
    assert cert.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert oct(key.stat().st_mode & 0o777) == "0o600"


BROKEN_CONFIG = {"CALLFS_AUTH__API_KEYS": ""}  # fails validation, so no defaults are taken from it


def test_cluster_status_and_remove_missing_values() -> None:
    for args in (["cluster", "status"], ["cluster", "remove", "n2"]):
        result = run(args, BROKEN_CONFIG)
        assert result.exit_code == 1
        assert "node url (use --url or set server.external_url in config) is required" in (
            result.output
        )
        result = run([*args, "--url", "http://127.0.0.1:9"], BROKEN_CONFIG)
        assert result.exit_code == 1
        assert (
            "internal secret (use --internal-secret or set auth.internal_proxy_secret in config)"
            " is required"
        ) in result.output
    blank = run(["cluster", "remove", "  ", "--url", "http://x", "--internal-secret", "s"])
    assert blank.exit_code == 1
    assert "node id is required" in blank.output


def test_cluster_remove_needs_a_node(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["cluster", "remove"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "NODE" in err
    with pytest.raises(SystemExit) as info:
        main(["cluster", "status", "--bogus"])
    assert info.value.code == 1


def test_cluster_status_and_remove_take_url_and_secret_from_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server: {external_url: 'http://127.0.0.1:9'}\n")
    for args in (
        ["cluster", "-c", str(cfg), "status"],
        ["cluster", "remove", "n2", "-c", str(cfg)],
    ):
        result = run(args)
        assert result.exit_code == 1
        assert "failed to contact node:" in result.output, result.output


def test_cluster_help_lists_the_new_commands() -> None:
    assert {"join", "status", "remove"} <= set(run(["help", "cluster"]).output.split())
    assert "--json" in run(["cluster", "status", "-h"]).output


def test_undecodable_answers_name_the_status_and_body() -> None:
    from callfs.cli import _decode

    with pytest.raises(click.ClickException) as info:
        _decode("join", 404, b"<html><h1>404 Not Found</h1></html>" + b"x" * 300)
    message = info.value.format_message()
    assert message.startswith("failed to decode join response: HTTP 404, body '<html><h1>404")
    assert "x" * 165 in message and "x" * 166 not in message  # the first 200 bytes only
    with pytest.raises(click.ClickException, match="HTTP 200, body '\\[1\\]'"):
        _decode("status", 200, b"[1]")
    assert _decode("remove", 200, b'{"status":"removed"}\n') == {"status": "removed"}


def test_fsck_repair_with_a_short_grace_warns() -> None:
    """``--repair --grace 0`` removed the bytes of moves about to commit, in an audit that ran
    it beside a drain: it is for a cluster where nothing writes, and says so."""
    args = ["fsck", "--url", "http://127.0.0.1:9", "--internal-secret", "s", "--repair"]
    warned = run([*args, "--grace", "0"])
    assert "warning: --repair with a grace under 600 s can remove" in warned.output
    assert warned.exit_code == 1  # nothing listens there
    assert "warning" not in run([*args, "--grace", "600"]).output
    assert "warning" not in run(args).output
