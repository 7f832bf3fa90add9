"""A small asyncio client for the CallFS HTTP API: streams uploads and downloads from/to disk.

BASE=http://127.0.0.1:8443
python examples/clients/callfs_client.py --base $BASE --key KEY put ./big.iso /isos/big.iso
python examples/clients/callfs_client.py --base $BASE --key KEY get /isos/big.iso ./copy.iso
python examples/clients/callfs_client.py --base $BASE --key KEY ls /isos
python examples/clients/callfs_client.py --base $BASE --key KEY link /isos/big.iso --expiry 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

CHUNK = 1 << 20


def files_url(base: str, path: str) -> str:
    quoted = "/".join(urllib.parse.quote(p, safe="") for p in path.strip("/").split("/"))
    return f"{base.rstrip('/')}/v1/files/{quoted}"


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:8443")
    ap.add_argument("--key", required=True)
    sub = ap.add_subparsers(dest="cmd", required=True)
    put = sub.add_parser("put")
    put.add_argument("local", type=Path)
    put.add_argument("remote")
    get = sub.add_parser("get")
    get.add_argument("remote")
    get.add_argument("local", type=Path)
    ls = sub.add_parser("ls")
    ls.add_argument("remote", nargs="?", default="/")
    ls.add_argument("--recursive", action="store_true")
    link = sub.add_parser("link")
    link.add_argument("remote")
    link.add_argument("--expiry", type=int, default=3600)
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.key}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        if args.cmd == "put":
            data = file_chunks(args.local)
            async with s.put(files_url(args.base, args.remote), data=data) as r:
                print(r.status, await r.text())
                return 0 if r.status in (200, 201) else 1
        if args.cmd == "get":
            async with s.get(files_url(args.base, args.remote)) as r:
                if r.status != 200:
                    print(r.status, await r.text(), file=sys.stderr)
                    return 1
                with args.local.open("wb") as out:
                    async for chunk in r.content.iter_chunked(CHUNK):
                        await asyncio.to_thread(out.write, chunk)
                return 0
        if args.cmd == "ls":
            url = f"{args.base.rstrip('/')}/v1/directories/{args.remote.strip('/')}"
            params = {"recursive": "true"} if args.recursive else {}
            async with s.get(url, params=params) as r:
                if r.status != 200:
                    print(r.status, await r.text(), file=sys.stderr)
                    return 1
                body = await r.json()
                for item in body.get("items", []):
                    print(f"{item['type'][0]} {item['size']:>12} {item['mtime']} {item['path']}")
                return 0 if r.status == 200 else 1
        body = {"path": args.remote, "expiry_seconds": args.expiry}
        async with s.post(f"{args.base.rstrip('/')}/v1/links/generate", json=body) as r:
            print(json.dumps(await r.json(), indent=2))
            return 0 if r.status == 201 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
