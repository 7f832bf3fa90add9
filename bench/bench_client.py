"""Issue 16 figures for the client (docs/client.md), in one run against one real ``callfs server``
subprocess (http, SQLite, localfs, local locks), each next to a reference measured in the same run:

1. ``callfs put`` of 256 MiB through tus with the client's default chunk size (64 MiB PATCHes)
   vs a plain PUT of the same file by curl (goal: >= 0.8x), and vs the same command's plain PUT
   (``--no-resumable``: the same start-up, so the ratio is what tus itself costs);
2. ``callfs sync`` of 1,000 x 4 KiB files up (``-j 8``, the default) vs the server's PUT rate at
   the same concurrency, measured with ``curl --parallel --parallel-max 8`` PUTting 1,000 new
   4 KiB files (goal: >= 0.8x); the way down is printed too (vs ``curl --parallel`` GETs);
3. ``callfs get`` of 256 MiB into a file vs ``curl -o`` of the same file (goal: >= 0.9x).

The ``callfs`` figures are the command run as a user runs it (a subprocess: interpreter start and
imports included, ~0.1 s here: "its start" is a ``callfs stat`` of one file, since ``--help`` no
longer imports the transport); the same transfers through the SDK in this process are printed
beside them. Runs alternate (reference, CallFS, reference, ...); the upload order rotates and each
upload starts after os.sync() (the server fsyncs; the disk is the noisiest part of this VM). The
medians are compared, and a load average is printed with each figure (server, client and curl
share the machine's cores).

    python bench/bench_client.py [--runs 3] [--keep]          # about 1-2 minutes

Everything goes under /tmp/bench/client-<time> (deleted unless --keep); traffic stays on
127.0.0.1; every transfer has a time limit. Needs curl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from callfs.client import Client

KEY = "bench-key-0123456789abcdef"
MiB = 1 << 20
BIG = 256 * MiB
SMALL_FILES = 1000
SMALL = 4096
JOBS = 8  # callfs sync's default --jobs
MAX_TIME = 300  # seconds, per transfer
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=MAX_TIME)
    if res.returncode != 0:
        raise SystemExit(f"{cmd[:4]}... exited {res.returncode}: {res.stderr.strip()[-2000:]}")
    return res


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


class Server:
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.work = work
        cfg = work / "config.yaml"
        cfg.write_text(
            f"""server:
  protocol: http
  listen_addr: "127.0.0.1:{self.port}"
  external_url: "{self.base}"
metrics: {{listen_addr: ""}}
log: {{level: warn}}
auth:
  api_keys: ["{KEY}"]
  internal_proxy_secret: bench-internal-secret-0123
  single_use_link_secret: bench-link-secret-0123
metadata_store: {{type: sqlite, sqlite_path: "{work}/meta.sqlite3"}}
dlm: {{type: local}}
backend: {{localfs_root_path: "{work}/files"}}
"""
        )
        self.log = (work / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "callfs", "server", "-c", str(cfg)],
            cwd=work,
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {(work / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not answer /health in 30 s")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def curl(*args: str) -> list[str]:
    return [
        "curl",
        "-sS",
        "--fail",
        "--max-time",
        str(MAX_TIME),
        "-H",
        f"Authorization: Bearer {KEY}",
        *args,
    ]


def curl_parallel(cfg_lines: list[str], cfg_path: Path) -> list[str]:
    cfg_path.write_text("\n".join(cfg_lines) + "\n")
    return curl("--parallel", "--parallel-max", str(JOBS), "-K", str(cfg_path))


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per figure [3]")
    ap.add_argument("--keep", action="store_true", help="keep /tmp/bench/client-<time>")
    args = ap.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is required (apt-get install curl)")
    out = Path(f"/tmp/bench/client-{int(time.time())}")
    work = out / "node"
    work.mkdir(parents=True)
    print(f"results: {out}")
    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    curl_version = run(["curl", "--version"]).stdout.split()[1]
    print(
        f"date {time.strftime('%F %T')}, commit {commit or '?'}, {os.cpu_count()} cpus, "
        f"python {sys.version.split()[0]}, curl {curl_version}"
    )
    env = {
        **os.environ,
        "CALLFS_API_KEY": KEY,
        "XDG_STATE_HOME": str(out / "state"),
        "XDG_CONFIG_HOME": str(out / "config"),
    }
    env.pop("CALLFS_PROFILE", None)
    big = out / "big.bin"
    with big.open("wb") as f:
        for _ in range(BIG // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    small_dir = out / "small"
    small_dir.mkdir()
    for i in range(SMALL_FILES):
        (small_dir / f"d{i % 10}").mkdir(exist_ok=True)
        (small_dir / f"d{i % 10}" / f"f{i:04d}.bin").write_bytes(os.urandom(SMALL))
    small_files = sorted(small_dir.rglob("*.bin"))

    srv = Server(work)
    env["CALLFS_URL"] = srv.base
    callfs = [sys.executable, "-m", "callfs"]
    results: dict[str, list[float]] = {}

    def measure(name: str, fn: Callable[[], T]) -> T:
        seconds, value = timed(fn)
        results.setdefault(name, []).append(seconds)
        return value

    def last(name: str) -> float:
        return results[name][-1]

    def med(name: str) -> float:
        return statistics.median(results[name])

    def cli(*argv: str) -> Callable[[], subprocess.CompletedProcess[str]]:
        return lambda: run([*callfs, *argv], env)

    def rel(p: Path) -> str:
        return p.relative_to(small_dir).as_posix()

    try:
        sdk = Client(srv.base, KEY, max_connections=JOBS)
        # warm-up: the page cache holds the file; the server has run one PUT and one GET
        warm = f"{srv.base}/v1/files/warm.bin"
        run(curl("-o", "/dev/null", "-H", "Expect:", "-T", str(big), warm))
        run(curl("-o", "/dev/null", warm))

        # ---- 1. upload 256 MiB: curl PUT vs callfs put (tus) -------------------------------
        print(f"== upload 256 MiB (load {load()})")
        for r in range(args.runs):
            dst = f"{srv.base}/v1/files/up/curl-{r}.bin"
            uploads: list[tuple[str, Callable[[], object]]] = [
                (
                    "put_curl",
                    partial(run, curl("-o", "/dev/null", "-H", "Expect:", "-T", str(big), dst)),
                ),
                ("put_cli", cli("put", str(big), f"/up/cli-{r}.bin", "--json")),
                (
                    "put_cli_plain",
                    cli("put", "--no-resumable", str(big), f"/up/cli-plain-{r}.bin", "--json"),
                ),
                ("put_sdk_tus", partial(sdk.upload_file, big, f"/up/sdk-{r}.bin")),
                ("put_sdk_plain", partial(sdk.upload, f"/up/plain-{r}.bin", big, resumable=False)),
            ]
            # each upload starts with no dirty pages left by the one before (the server fsyncs),
            # and the order rotates so that none is always first or last
            turn = r % len(uploads)
            for name, fn in uploads[turn:] + uploads[:turn]:
                os.sync()
                value = measure(name, fn)
                if name == "put_cli":
                    doc = json.loads(value.stdout)  # type: ignore[attr-defined]
                    assert doc["resumable"] and doc["size"] == BIG, doc
                elif name == "put_sdk_tus":
                    assert value.resumable  # type: ignore[attr-defined]
            print(
                f"  run {r + 1}: curl PUT {last('put_curl'):.2f} s, callfs put (tus) "
                f"{last('put_cli'):.2f} s, callfs put --no-resumable "
                f"{last('put_cli_plain'):.2f} s, SDK tus {last('put_sdk_tus'):.2f} s, "
                f"SDK plain PUT {last('put_sdk_plain'):.2f} s (load {load()})"
            )
        load_put = load()

        # ---- 2. 1,000 x 4 KiB: curl --parallel PUT vs callfs sync up; and down ---------------
        print(f"== 1,000 x 4 KiB at concurrency {JOBS} (load {load()})")
        for r in range(args.runs):
            lines = [
                f'upload-file = "{p}"\nurl = "{srv.base}/v1/files/pc-{r}/{rel(p)}"\n'
                'output = "/dev/null"'
                for p in small_files
            ]
            put_cfg = curl_parallel(lines, out / f"put-{r}.curlrc")
            os.sync()
            measure("small_put_curl", partial(run, put_cfg))
            up = cli("sync", str(small_dir), f"callfs:/sync-{r}", "--json")
            os.sync()
            doc = json.loads(measure("sync_up", up).stdout)
            assert doc["transferred"] == SMALL_FILES and not doc["failed"], doc
            lines = [
                f'url = "{srv.base}/v1/files/pc-{r}/{rel(p)}"\n'
                f'output = "{out}/curl-down-{r}/{rel(p)}"\ncreate-dirs'
                for p in small_files
            ]
            get_cfg = curl_parallel(lines, out / f"get-{r}.curlrc")
            measure("small_get_curl", partial(run, get_cfg))
            down = cli("sync", f"callfs:/sync-{r}", str(out / f"sync-down-{r}"), "--json")
            doc = json.loads(measure("sync_down", down).stdout)
            assert doc["transferred"] == SMALL_FILES and not doc["failed"], doc
            print(
                f"  run {r + 1}: curl PUT {SMALL_FILES / last('small_put_curl'):.0f}/s, "
                f"callfs sync up {SMALL_FILES / last('sync_up'):.0f}/s, "
                f"curl GET {SMALL_FILES / last('small_get_curl'):.0f}/s, "
                f"callfs sync down {SMALL_FILES / last('sync_down'):.0f}/s (load {load()})"
            )
            shutil.rmtree(out / f"curl-down-{r}")
            shutil.rmtree(out / f"sync-down-{r}")
        load_sync = load()

        # ---- 3. download 256 MiB: curl -o vs callfs get -------------------------------------
        print(f"== download 256 MiB into a file (load {load()})")
        dl = out / "dl.bin"
        src_url = f"{srv.base}/v1/files/up/cli-0.bin"
        downloads: list[tuple[str, Callable[[], object]]] = [
            ("get_curl", partial(run, curl("-o", str(dl), src_url))),
            ("get_cli", cli("get", "/up/cli-0.bin", str(dl), "--json")),
            ("get_sdk", partial(sdk.download, "/up/cli-0.bin", dl)),
        ]
        for r in range(args.runs):
            for name, fn in downloads[r % 3 :] + downloads[: r % 3]:
                os.sync()
                measure(name, fn)
                assert dl.stat().st_size == BIG
                dl.unlink()
            print(
                f"  run {r + 1}: curl {last('get_curl'):.2f} s, callfs get "
                f"{last('get_cli'):.2f} s, SDK download {last('get_sdk'):.2f} s (load {load()})"
            )
        load_get = load()
        # one byte-for-byte check of what the commands moved
        run([*callfs, "get", "/up/cli-0.bin", str(dl)], env)
        same = subprocess.run(["cmp", "-s", str(dl), str(big)], check=False).returncode == 0
        dl.unlink()
        for _ in range(3):  # start, imports (urllib3 included) and one HEAD: a command's floor
            measure("cli_start", cli("stat", "/up/cli-0.bin"))
        cli_start = med("cli_start")
        sdk.close()
    finally:
        srv.stop()

    def mbs(name: str) -> float:
        return BIG / MiB / med(name)

    def rate(name: str) -> float:
        return SMALL_FILES / med(name)

    print()
    print(
        f"Medians of {args.runs} runs; `callfs` = the command as a subprocess "
        f"(its start, with one HEAD: {cli_start:.2f} s); "
        f"byte-exact 256 MiB get: {'yes' if same else 'NO'}"
    )
    print()
    print("| workload | reference | callfs command | SDK in-process | command / ref | SDK / ref |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| upload 256 MiB, MiB/s | curl PUT {mbs('put_curl'):.0f} | put (tus, 64 MiB PATCHes) "
        f"{mbs('put_cli'):.0f} | tus {mbs('put_sdk_tus'):.0f} / plain PUT "
        f"{mbs('put_sdk_plain'):.0f} | "
        f"{ratio(mbs('put_cli'), mbs('put_curl'))} | {ratio(mbs('put_sdk_tus'), mbs('put_curl'))} |"
    )
    print(
        f"| 1,000 x 4 KiB up, files/s, c{JOBS} | curl -Z PUT {rate('small_put_curl'):.0f} | "
        f"sync {rate('sync_up'):.0f} | | {ratio(rate('sync_up'), rate('small_put_curl'))} | |"
    )
    print(
        f"| 1,000 x 4 KiB down, files/s, c{JOBS} | curl -Z GET {rate('small_get_curl'):.0f} | "
        f"sync {rate('sync_down'):.0f} | | {ratio(rate('sync_down'), rate('small_get_curl'))} | |"
    )
    print(
        f"| download 256 MiB, MiB/s | curl -o {mbs('get_curl'):.0f} | get {mbs('get_cli'):.0f} | "
        f"{mbs('get_sdk'):.0f} | {ratio(mbs('get_cli'), mbs('get_curl'))} | "
        f"{ratio(mbs('get_sdk'), mbs('get_curl'))} |"
    )
    print()
    goals = [
        (
            "tus upload 256 MiB, SDK (default chunk) vs curl PUT",
            "put_sdk_tus",
            "put_curl",
            0.8,
            load_put,
        ),
        (
            "tus upload 256 MiB, `callfs put` command vs curl PUT",
            "put_cli",
            "put_curl",
            0.8,
            load_put,
        ),
        (
            "tus upload 256 MiB, `callfs put` vs `callfs put --no-resumable` (same start-up)",
            "put_cli",
            "put_cli_plain",
            0.8,
            load_put,
        ),
        (
            f"`callfs sync` up 1,000 x 4 KiB vs server PUT rate at c{JOBS}",
            "sync_up",
            "small_put_curl",
            0.8,
            load_sync,
        ),
        ("`callfs get` 256 MiB command vs curl", "get_cli", "get_curl", 0.9, load_get),
        ("256 MiB download, SDK vs curl", "get_sdk", "get_curl", 0.9, load_get),
    ]
    print("| goal | measured | target | met | load 1/5/15 min after |")
    print("|---|---:|---:|---|---|")
    for name, ours, ref, target, ld in goals:
        value = med(ref) / med(ours)
        met = "yes" if value >= target else "no"
        print(f"| {name} | {value:.2f}x | >= {target}x | {met} | {ld} |")
    if not args.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
