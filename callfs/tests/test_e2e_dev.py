"""End to end: ``callfs server --dev`` as a subprocess, then the README walk-through over HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_banner(proc: subprocess.Popen[str], deadline: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    while len(lines) < 3:
        if time.monotonic() > deadline:
            raise AssertionError(f"no dev banner in time; got {lines!r}")
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"server exited early ({proc.poll()}); got {lines!r}")
        lines.append(line.rstrip("\n"))
    return lines


@pytest.mark.slow
async def test_dev_server_readme_walkthrough(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "CALLFS_SERVER__LISTEN_ADDR": f"127.0.0.1:{port}",
        "CALLFS_SERVER__EXTERNAL_URL": base,
    }
    cmd = [sys.executable, "-m", "callfs", "server", "--dev"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        banner = await asyncio.to_thread(read_banner, proc, time.monotonic() + 30)
        assert banner[0] == f"CallFS dev server listening on {base} (data in ./callfs-data)"
        m = re.fullmatch(r"API key: (\S+)", banner[1])
        assert m, banner
        key = m.group(1)
        assert banner[2] == (
            f"Try: curl -H \"Authorization: Bearer {key}\" --data-binary 'hello' "
            f"{base}/v1/files/hello.txt"
        )
        creds = tmp_path / "callfs-data" / "dev-credentials.yaml"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        assert key in creds.read_text()

        h = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession(base) as s:
            async with s.post("/v1/files/docs/hello.txt", data=b"hello", headers=h) as r:
                assert r.status == 201
            async with s.put("/v1/files/docs/readme.md", data=b"# readme\n", headers=h) as r:
                assert r.status == 201
            async with s.get("/v1/files/docs/hello.txt", headers=h) as r:
                assert r.status == 200
                assert await r.read() == b"hello"
            async with s.get("/v1/files/docs/hello.txt", headers={**h, "Range": "bytes=0-1"}) as r:
                assert r.status == 206
                assert await r.read() == b"he"
            async with s.get("/v1/directories/docs", headers=h) as r:
                listing = await r.json()
                assert [i["name"] for i in listing["items"]] == ["hello.txt", "readme.md"]
            async with s.patch(
                "/v1/files/docs/hello.txt", data=b'{"name":"hi.txt"}', headers=h
            ) as r:
                assert r.status == 200
                assert await r.json() == {"path": "/docs/hi.txt"}
            async with s.delete("/v1/files/docs/hi.txt", headers=h) as r:
                assert r.status == 204
            async with s.delete("/v1/files/docs?recursive=true", headers=h) as r:
                assert r.status == 204
            async with s.get("/v1/files/docs", headers=h) as r:
                assert r.status == 404
            async with s.get("/health") as r:
                assert await r.read() == b'{"status":"ok"}'
            # a path under §6.1's 4,096 bytes whose percent-encoded request line passes
            # aiohttp's default 8,190 (it was 400 "malformed request", also for GET and DELETE
            # of an item a PATCH had made)
            deep = "/".join(["é" * 120] * 12)  # 2,891 bytes, 8,700 characters encoded
            url = "/v1/files/" + quote(deep)
            async with s.put(url, data=b"deep", headers=h) as r:
                assert r.status == 201, await r.text()
            async with s.get(url, headers=h) as r:
                assert r.status == 200 and await r.read() == b"deep"
            async with s.delete(url, headers=h) as r:
                assert r.status == 204
        assert (tmp_path / "callfs-data" / "files").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == 0, stderr

    # A second start reuses the saved credentials.
    assert (await dev_banner(tmp_path, env))[1] == f"API key: {key}"


async def dev_banner(cwd: Path, env: dict[str, str]) -> list[str]:
    """Start ``callfs server --dev`` in ``cwd`` with ``env``, return its banner, stop it."""
    cmd = [sys.executable, "-m", "callfs", "server", "--dev"]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        return await asyncio.to_thread(read_banner, proc, time.monotonic() + 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()


@pytest.mark.slow
async def test_dev_banner_shows_a_user_key_when_api_keys_is_emptied(tmp_path: Path) -> None:
    """``CALLFS_AUTH__API_KEYS=`` with a named user's key: the banner shows that key (it was an
    IndexError traceback)."""
    port = free_port()
    bob = "bob-key-0123456789abcdef"
    env = {
        **os.environ,
        "CALLFS_SERVER__LISTEN_ADDR": f"127.0.0.1:{port}",
        "CALLFS_AUTH__API_KEYS": "",
        "CALLFS_AUTH__API_KEY_USERS__BOB": bob,
    }
    assert (await dev_banner(tmp_path, env))[1] == f"API key: {bob}"
