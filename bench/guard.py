"""Issue 18's regression guard: every transfer workload next to its reference, in one run, one line
per goal with the measured ratio, the target and whether it is met. Minutes, not a test.

    python bench/guard.py [--out DIR]

It runs, one after the other (the machine is shared: nothing else should run meanwhile):
- ``bench_http.sh`` (one node vs nginx and ``rclone serve webdav``, the machine's fsync'd-create
  rate, 2 GiB up and down) with ``DURATION=3s BIG_RUNS=3 CONNS=16 FSYNC_FILES=300`` unless set
  in the environment; its goal table comes from ``compare.py``;
- ``bench_links_ws.py`` (WebSocket download vs HTTP GET, 64 MiB);
- ``bench_s3.py`` (CallFS on S3 vs boto3 direct on the same moto server, 256 MiB);
- ``bench_tls.py`` (HTTPS and HTTP/3 vs plain HTTP, 256 MiB).
Each script's full output is kept under ``--out``; ``bench_tls.py`` also runs nginx over TLS and
aioquic's example HTTP/3 server as the references of those two goals.
``WORKERS=2`` (passed on to ``bench_http.sh``) serves CallFS from two processes
(``server.workers``, docs/workers.md).
Needs ``bash ../shared/bench/setup.sh`` once (wrk, nginx, rclone).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
Row = tuple[str, str, str, str]  # goal, measured, target, met


def run(name: str, cmd: list[str], out: Path, env: dict[str, str]) -> str:
    started = time.monotonic()
    print(f"running {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    text = done.stdout + done.stderr
    (out / f"{name}.txt").write_text(text)
    print(f"  {name}: exit {done.returncode}, {time.monotonic() - started:.0f} s", file=sys.stderr)
    return text


def met(ratio: float, bound: float) -> str:
    return "yes" if ratio >= bound else "**no**"


def http_rows(text: str, conns: list[str]) -> list[Row]:
    rows: list[Row] = []
    table = text.partition("| goal | measured | target | met |")[2]
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0].startswith("---"):
            continue
        at = re.search(r", c(\d+)$", cells[0])
        if at and at.group(1) not in conns:
            continue  # a connection count this run did not load
        rows.append((cells[0], cells[1], cells[2], cells[3]))
    return rows or [("bench_http.sh", "no goal table (see its output)", "", "n/a")]


def ws_rows(text: str) -> list[Row]:
    m = re.search(r"\| download[^|]* \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", text)
    if not m:
        return [("WebSocket download vs HTTP GET", "not measured (see ws.txt)", ">= 0.7x", "n/a")]
    ratio = float(m.group(3))
    what = f"{ratio:.2f}x ({m.group(2)} vs {m.group(1)} MB/s)"
    return [("WebSocket download vs HTTP GET, 64 MiB", what, ">= 0.7x", met(ratio, 0.7))]


def s3_rows(text: str) -> list[Row]:
    rows: list[Row] = []
    for op in ("PUT", "GET"):
        m = re.search(rf"\| {op} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", text)
        if not m:
            rows.append((f"S3 {op} vs boto3", "not measured (see s3.txt)", ">= 0.8x", "n/a"))
            continue
        ratio = float(m.group(3))
        what = f"{ratio:.2f}x ({m.group(2)} vs {m.group(1)} MB/s)"
        rows.append((f"S3 {op} 256 MiB vs boto3 direct", what, ">= 0.8x", met(ratio, 0.8)))
    rss = re.search(r"peak RSS over the whole run[^:]*: (\d+) MiB", text)
    if rss:
        mib = int(rss.group(1))
        ok = "yes" if mib < 200 else "**no**"
        rows.append(("CallFS peak RSS, 2 GiB via S3", f"{mib} MiB", "< 200 MiB", ok))
    return rows


def tls_rows(text: str) -> list[Row]:
    rows: list[Row] = []
    m = re.search(r"\| GET 256 MiB \| ([\d,]+) MB/s \| ([\d,]+) MB/s \| ([\d,]+) MB/s \|", text)
    if m:
        plain, tls, h3 = (float(g.replace(",", "")) for g in m.groups())
        rows += [
            ("HTTPS GET 256 MiB vs plain HTTP (same client)", f"{tls / plain:.2f}x", "(info)", "-"),
            ("HTTP/3 GET 256 MiB", f"{h3:,.0f} MB/s", "(info)", "-"),
        ]
    for goal, bound in (
        ("HTTPS GET 256 MiB (curl) vs nginx over TLS", 0.9),
        ("HTTP/3 GET 256 MiB vs aioquic's example server", 0.8),
    ):
        ref = re.search(re.escape(goal) + r" \| .*? \| .*? \| ([\d.]+)x \|", text)
        if ref:
            ratio = float(ref.group(1))
            rows.append((goal, f"{ratio:.2f}x", f">= {bound}x", met(ratio, bound)))
        else:
            rows.append((goal, "not measured (see tls.txt)", f">= {bound}x", "n/a"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=f"/tmp/bench/guard-{int(time.time())}")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for key, value in {
        "DURATION": "3s",
        "BIG_RUNS": "3",
        "CONNS": "16",
        "FSYNC_FILES": "300",
        "PYTHON": sys.executable,
    }.items():
        env.setdefault(key, value)
    env.setdefault("OUT", str(out / "http"))
    py = sys.executable
    rows: list[Row] = []
    http = run("http", ["bash", str(HERE / "bench_http.sh")], out, env)
    rows += http_rows(http, env["CONNS"].split())
    rows += ws_rows(run("ws", [py, str(HERE / "bench_links_ws.py"), "--links", "200"], out, env))
    rows += s3_rows(run("s3", [py, str(HERE / "bench_s3.py")], out, env))
    rows += tls_rows(run("tls", [py, str(HERE / "bench_tls.py")], out, env))
    print(f"regression guard, {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f}")
    print("| goal | measured | target | met |")
    print("|---|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"(every script's output: {out})")


if __name__ == "__main__":
    main()
