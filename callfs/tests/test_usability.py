"""Issue 13, usability: link file names, derived link URLs, listener logs, CLI guidance."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from callfs import cli as cli_module
from callfs import daemon
from callfs.api.links import content_disposition
from callfs.cli import cli, main, valid_cert_host
from callfs.config import load_config
from callfs.daemon import Node, derived_external_url, resolve_external_url, serve
from callfs.tests.functional.conftest import ALICE_KEY, auth, node_env
from callfs.tls import generate_self_signed

GOOD = {
    "CALLFS_AUTH__API_KEYS": "k" * 16,
    "CALLFS_AUTH__INTERNAL_PROXY_SECRET": "s" * 20,
    "CALLFS_AUTH__SINGLE_USE_LINK_SECRET": "l" * 20,
}


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def invoke(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, args, env=env)


# -- 1. link downloads: a plain filename= fallback next to filename* (API.md §22) ----------------


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("report.pdf", "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"),
        (
            "ré sumé(1).txt",
            'attachment; filename="re sume(1).txt"; '
            "filename*=UTF-8''r%C3%A9%20sum%C3%A9%281%29.txt",
        ),
        (
            "日本.txt",
            "attachment; filename=\"__.txt\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.txt",
        ),
        (
            'a"b\\c%d\x01e\x7f.txt',
            "attachment; filename=\"a_b_c_d_e_.txt\"; filename*=UTF-8''a%22b%5Cc%25d%01e%7F.txt",
        ),
    ],
)
def test_content_disposition_has_an_ascii_fallback(name: str, header: str) -> None:
    assert content_disposition(name) == header


async def test_link_download_sends_both_file_names(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    node = Node(load_config(None, env=node_env(tmp_path), cwd=tmp_path))
    node.build()
    await node.start_components()
    try:
        client = await aiohttp_client(node.app)
        resp = await client.post("/v1/files/ré sumé.txt", data=b"cv", headers=auth())
        assert resp.status == 201
        resp = await client.post(
            "/v1/links/generate",
            json={"path": "/ré sumé.txt", "expiry_seconds": 60},
            headers=auth(),
        )
        token = (await resp.json())["token"]
        resp = await client.get(f"/download/{token}")
        assert resp.status == 200
        assert await resp.read() == b"cv"
        assert resp.headers["Content-Disposition"] == (
            "attachment; filename=\"re sume.txt\"; filename*=UTF-8''r%C3%A9%20sum%C3%A9.txt"
        )
    finally:
        await node.stop()


# -- 2. link URLs without server.external_url: derived from the listener, with a warning ---------


def cfg_with(tmp_path: Path, **env: str) -> Any:
    base = node_env(tmp_path)
    del base["CALLFS_SERVER__EXTERNAL_URL"]
    base.update(env)
    return load_config(None, env=base, cwd=tmp_path)


def test_derived_external_url(tmp_path: Path) -> None:
    def host() -> str:
        return "node-a"

    cases = [
        ({"CALLFS_SERVER__LISTEN_ADDR": "127.0.0.1:8080"}, "http://127.0.0.1:8080"),
        ({"CALLFS_SERVER__LISTEN_ADDR": ":9000"}, "http://node-a:9000"),
        ({"CALLFS_SERVER__LISTEN_ADDR": "0.0.0.0:9000"}, "http://node-a:9000"),
        ({"CALLFS_SERVER__LISTEN_ADDR": "[::]:9000"}, "http://node-a:9000"),
        ({"CALLFS_SERVER__LISTEN_ADDR": "[::1]:9000"}, "http://[::1]:9000"),
        (
            {"CALLFS_SERVER__PROTOCOL": "https", "CALLFS_SERVER__LISTEN_ADDR": "10.0.0.5:8443"},
            "https://10.0.0.5:8443",
        ),
        (
            {"CALLFS_SERVER__PROTOCOL": "auto", "CALLFS_SERVER__LISTEN_ADDR": "10.0.0.5:80"},
            "https://10.0.0.5:80",  # auto with the default cert and key files is TLS (§2)
        ),
    ]
    for env, expected in cases:
        assert derived_external_url(cfg_with(tmp_path, **env), hostname=host) == expected, env
    no_name = cfg_with(tmp_path, CALLFS_SERVER__LISTEN_ADDR=":81")
    assert derived_external_url(no_name, hostname=lambda: "") == "http://127.0.0.1:81"


def test_resolve_external_url_only_when_not_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="callfs.daemon")
    given = cfg_with(tmp_path, CALLFS_SERVER__EXTERNAL_URL="https://files.example.com")
    assert resolve_external_url(given) is given
    assert not caplog.records
    for unset in ("localhost:8443", ""):  # the schema default counts as "not set"
        cfg = cfg_with(
            tmp_path,
            CALLFS_SERVER__EXTERNAL_URL=unset,
            CALLFS_SERVER__LISTEN_ADDR="127.0.0.1:8080",
        )
        assert resolve_external_url(cfg).server.external_url == "http://127.0.0.1:8080"
    assert len(caplog.records) == 2
    assert "server.external_url is not set; using http://127.0.0.1:8080" in caplog.text
    caplog.clear()
    resolve_external_url(cfg, warn=False)
    assert not caplog.records


# -- 2 + 6. a served node: derived link URLs; every listener logs protocol and address -----------


async def test_serve_logs_every_listener_and_links_use_the_real_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callfs.daemon")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    generate_self_signed(["127.0.0.1"], cert, key)
    port, mport, qport = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    cfg = cfg_with(
        tmp_path,
        CALLFS_SERVER__PROTOCOL="https",
        CALLFS_SERVER__CERT_FILE=str(cert),
        CALLFS_SERVER__KEY_FILE=str(key),
        CALLFS_SERVER__LISTEN_ADDR=f"127.0.0.1:{port}",
        CALLFS_SERVER__ENABLE_QUIC="true",
        CALLFS_SERVER__QUIC_LISTEN_ADDR=f"127.0.0.1:{qport}",
        CALLFS_METRICS__LISTEN_ADDR=f"127.0.0.1:{mport}",
    )
    ready = asyncio.Event()
    task = asyncio.create_task(serve(cfg, ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        messages = [r.getMessage() for r in caplog.records]
        assert f"listening on https://127.0.0.1:{port}" in messages
        metrics_line = f"listening on http://127.0.0.1:{mport} (metrics"
        assert any(m.startswith(metrics_line) for m in messages)
        assert f"listening on https://127.0.0.1:{qport} (HTTP/3 over QUIC, UDP)" in messages
        assert any("server.external_url is not set" in m for m in messages)
        connector = aiohttp.TCPConnector(ssl=False)
        async with aiohttp.ClientSession(f"https://127.0.0.1:{port}", connector=connector) as s:
            h = {"Authorization": f"Bearer {ALICE_KEY}"}
            async with s.post("/v1/files/a.txt", data=b"a", headers=h) as r:
                assert r.status == 201
            body = {"path": "/a.txt", "expiry_seconds": 60}
            async with s.post("/v1/links/generate", json=body, headers=h) as r:
                url = (await r.json())["url"]
        assert url.startswith(f"https://127.0.0.1:{port}/download/")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# -- 3. callfs server --dev --listen HOST:PORT, and a banner with the address really served ------


def fake_run(seen: dict[str, Any]) -> Callable[..., int]:
    def run(cfg: Any, on_ready: Callable[[], None] | None = None) -> int:
        seen["cfg"] = cfg
        assert on_ready is not None
        on_ready()
        return 0

    return run


def test_dev_listen_sets_listener_and_banner(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(daemon, "run", fake_run(seen))
    result = invoke(["server", "--dev", "--listen", "127.0.0.1:9123"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].server.listen_addr == "127.0.0.1:9123"
    assert seen["cfg"].server.external_url == "http://127.0.0.1:9123"
    lines = result.output.splitlines()
    assert lines[0] == (
        "CallFS dev server listening on http://127.0.0.1:9123 (data in ./callfs-data)"
    )
    assert lines[2].endswith(" http://127.0.0.1:9123/v1/files/hello.txt")


def test_dev_default_banner_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(daemon, "run", fake_run(seen))
    result = invoke(["server", "--dev"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        "CallFS dev server listening on http://127.0.0.1:8443 (data in ./callfs-data)"
    )
    # An explicit external_url (a proxy in front) is kept.
    result = invoke(
        ["server", "--dev", "--listen", "127.0.0.1:9124"],
        {"CALLFS_SERVER__EXTERNAL_URL": "https://dev.example.com"},
    )
    assert "listening on https://dev.example.com (data" in result.output.splitlines()[0]


def test_listen_rejects_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("8080", "host:", "host:http", "host:70000"):
        with pytest.raises(SystemExit) as info:
            main(["server", "--dev", "--listen", bad])
        assert info.value.code == 1
        err = capsys.readouterr().err
        assert "HOST:PORT" in err and repr(bad) in err, err


# -- 4. cert generate: no silent overwrite, no silent mkdir, valid hosts -------------------------


def test_cert_generate_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    args = ["cert", "generate", "--host", "localhost", "--cert-file", str(cert)]
    args += ["--key-file", str(key)]
    assert invoke(args).exit_code == 0
    first = cert.read_bytes()
    result = invoke(args)
    assert result.exit_code == 1
    assert f"--cert-file: '{cert}' already exists; pass --force to overwrite it" in result.output
    assert cert.read_bytes() == first
    cert.unlink()  # the key alone is protected too
    result = invoke(args)
    assert result.exit_code == 1 and "--key-file" in result.output
    assert not cert.exists()
    assert invoke([*args, "--force"]).exit_code == 0
    assert cert.read_bytes() != first


def test_cert_generate_does_not_create_directories(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    result = invoke(
        [
            "cert",
            "generate",
            "--host",
            "localhost",
            "--cert-file",
            str(missing / "c.pem"),
            "--key-file",
            str(tmp_path / "k.pem"),
        ]
    )
    assert result.exit_code == 1
    assert f"directory '{missing}' does not exist" in result.output
    assert not missing.exists() and not (tmp_path / "no").exists()
    assert not (tmp_path / "k.pem").exists()


def test_cert_generate_validates_hosts(tmp_path: Path) -> None:
    for good in ("localhost", "node-1.example.com", "*.example.com", "10.0.0.1", "::1"):
        assert valid_cert_host(good), good
    for bad in ("bad_host", "-x.com", "a..b", "10.0.0.999", "a b", "x" * 64, "*"):
        assert not valid_cert_host(bad), bad
    cert = tmp_path / "c.pem"
    hosts = "ok.example.com,bad_host"
    result = invoke(
        ["cert", "generate", "--host", hosts, "--cert-file", str(cert), "--key-file", str(cert)]
    )
    assert result.exit_code == 1
    assert "--host 'bad_host' is neither an IP address nor a valid host name" in result.output
    assert not cert.exists()


# -- 5. --version, bare callfs, and a helpful "no keys" error ------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--version"])  # returns (exit status 0), like --help
    assert capsys.readouterr().out == f"callfs {cli_module.package_version()}\n"
    assert cli_module.package_version() not in ("", "unknown")


def test_bare_callfs_runs_the_server_and_guides_a_newcomer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # API.md §20: no arguments runs `callfs server`; with nothing configured, it says what to do
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert '"callfs server --dev"' in err and '"callfs server -c FILE"' in err


def test_server_without_keys_suggests_dev_or_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["server"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "auth.api_keys or auth.api_key_users must contain at least one key" in err
    assert '"callfs server --dev"' in err and '"callfs server -c FILE"' in err


# -- 7. the systemd unit: the binary the README installs, a config the service user can read -----

REPO = Path(__file__).resolve().parents[2]


def test_systemd_unit_agrees_with_the_install_steps(tmp_path: Path) -> None:
    unit = (REPO / "deploy" / "callfs.service").read_text()
    steps = (REPO / "deploy" / "README.md").read_text()
    readme = (REPO / "README.md").read_text()
    execs = [line.split("=", 1)[1].split()[0] for line in unit.splitlines() if "ExecStart" in line]
    assert execs and len(set(execs)) == 1
    binary = execs[0]
    assert binary in readme and binary in steps  # the README installs what the unit runs
    assert "User=callfs" in unit and "Group=callfs" in unit
    # root-owned, group callfs, 0640: readable by the service user, not writable
    assert "install -o root -g callfs -m 0640 config.yaml /etc/callfs/config.yaml" in steps
    assert "install -d -o root   -g callfs -m 0750 /etc/callfs" in steps
    assert "install -d -o callfs -g callfs -m 0750 /var/lib/callfs" in steps
    analyze = shutil.which("systemd-analyze")
    installed = Path(sys.executable).parent / "callfs"
    if analyze is None or not installed.exists():
        pytest.skip("systemd-analyze or the installed callfs script is not available")
    copy = tmp_path / "callfs.service"
    copy.write_text(unit.replace(binary, str(installed)))
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
