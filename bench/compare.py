"""Side-by-side table of one bench_http.sh run, with the issue's goals as ratios.

    python3 bench/compare.py /tmp/bench/callfs-<time>

Reads results.tsv (rows from the shared run_http.sh), fsync.txt (creates/s per batch),
peak_rss_bench_mib.txt ("<name> <MiB>" per server), peak_rss_2g_mib.txt, 2g.txt, callfs_loop.txt.
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

PEERS = ["nginx", "rclone-webdav"]
NAMES = ["callfs", *PEERS]
WORKLOADS = [
    ("get4k", "GET 4 KiB", "req_s", "req/s", ("16", "64")),
    ("put4k", "PUT 4 KiB", "req_s", "req/s", ("16", "64")),
    ("get1m", "GET 1 MiB", "MB_s", "MB/s", ("16", "64")),
    ("get256m", "GET 256 MiB, 1 stream, median", "MB_s", "MB/s", ("1",)),
    ("put256m", "PUT 256 MiB, 1 stream, median", "MB_s", "MB/s", ("1",)),
]


def read_text(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def to_float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def ratio(ours: float | None, ref: float | None) -> float | None:
    return ours / ref if ours is not None and ref else None


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def main() -> None:
    out = Path(sys.argv[1])
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    with (out / "results.tsv").open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            cells[(row["name"], row["workload"], row["conns"])] = row

    def value(name: str, wl: str, conns: str, col: str) -> float | None:
        row = cells.get((name, wl, conns))
        return to_float(row[col]) if row else None

    def cell(name: str, wl: str, conns: str, col: str, unit: str) -> str:
        row = cells.get((name, wl, conns))
        v = value(name, wl, conns, col)
        if row is None or v is None:
            return "-"
        text = f"{v:,.0f} {unit}"
        if row["p50_ms"] not in ("-", ""):
            text += f" (p50 {float(row['p50_ms']):.2f} / p99 {float(row['p99_ms']):.2f} ms)"
        if row["errors"] not in ("0", "-", ""):
            text += f" **{row['errors']} errors**"
        return text

    names = [n for n in NAMES if any(k[0] == n for k in cells)]
    peers = [n for n in PEERS if n in names]
    print(f"env: {read_text(out / 'env.txt').replace(chr(10), '; ')}")
    print(f"CallFS event loop: {read_text(out / 'callfs_loop.txt', 'unknown')}\n")
    head = " | ".join(names) + "".join(f" | callfs / {p}" for p in peers)
    print(f"| workload | conns | {head} |")
    print("|---|---:|" + "---:|" * (len(names) + len(peers)))
    for wl, label, col, unit, conns_list in WORKLOADS:
        for conns in conns_list:
            vals = [cell(n, wl, conns, col, unit) for n in names]
            ours = value("callfs", wl, conns, col)
            vals += [fmt_ratio(ratio(ours, value(p, wl, conns, col))) for p in peers]
            print(f"| {label} | {conns} | " + " | ".join(vals) + " |")

    rss: dict[str, str] = {}
    for line in read_text(out / "peak_rss_bench_mib.txt").splitlines():
        name, _, mib = line.partition(" ")
        rss[name] = mib
    print(
        "| peak RSS over these workloads (MiB) | | "
        + " | ".join(rss.get(n, "-") for n in names)
        + " |" * (len(peers) + 1)
    )

    batches = [float(x) for x in read_text(out / "fsync.txt").split()]
    fsync_rate = statistics.median(batches) if batches else None
    peak_2g = (
        to_float(read_text(out / "peak_rss_2g_mib.txt"))
        if (out / "peak_rss_2g_mib.txt").exists()
        else None
    )
    if fsync_rate is not None:
        print(
            f"\nmachine: fsync'd 4 KiB creates/s, median {fsync_rate:,.0f} "
            f"(batches: {', '.join(f'{b:,.0f}' for b in batches)})"
        )
    durable = [float(x) for x in read_text(out / "fsync-dir.txt").split()]
    if durable:
        put4k, median = value("callfs", "put4k", "16", "req_s"), statistics.median(durable)
        vs = f"; CallFS PUT 4 KiB c16 {put4k / median:.2f}x of it" if put4k else ""
        print(
            "machine: the same with the directory fsync'd too (a durable new name; information, "
            f"not the goal's reference), median {median:,.0f} "
            f"(batches: {', '.join(f'{b:,.0f}' for b in durable)}){vs}"
        )
    print("2 GiB up and down: " + read_text(out / "2g.txt", "not measured").replace("\n", "; "))

    goals: list[tuple[str, float | None, str, float]] = [
        (
            "GET 256 MiB vs nginx",
            ratio(value("callfs", "get256m", "1", "MB_s"), value("nginx", "get256m", "1", "MB_s")),
            ">= 0.9x",
            0.9,
        ),
        (
            "PUT 256 MiB (CallFS fsyncs) vs nginx WebDAV PUT",
            ratio(value("callfs", "put256m", "1", "MB_s"), value("nginx", "put256m", "1", "MB_s")),
            ">= 1.0x",
            1.0,
        ),
    ]
    for c in ("16", "64"):
        goals.append(
            (
                f"GET 1 MiB vs nginx, c{c}",
                ratio(value("callfs", "get1m", c, "MB_s"), value("nginx", "get1m", c, "MB_s")),
                ">= 0.6x",
                0.6,
            )
        )
    for c in ("16", "64"):
        goals.append(
            (
                f"GET 4 KiB (auth + metadata) vs rclone, c{c}",
                ratio(
                    value("callfs", "get4k", c, "req_s"),
                    value("rclone-webdav", "get4k", c, "req_s"),
                ),
                ">= 1.5x",
                1.5,
            )
        )
    for c in ("16", "64"):
        goals.append(
            (
                f"PUT 4 KiB durable vs fsync'd 4 KiB creates, c{c}",
                ratio(value("callfs", "put4k", c, "req_s"), fsync_rate),
                ">= 0.8x",
                0.8,
            )
        )
    print("\n| goal | measured | target | met |")
    print("|---|---:|---:|---|")
    for label, measured, target, bound in goals:
        met = "n/a" if measured is None else ("yes" if measured >= bound else "**no**")
        print(f"| {label} | {fmt_ratio(measured)} | {target} | {met} |")
    met_rss = "n/a" if peak_2g is None else ("yes" if peak_2g < 150 else "**no**")
    shown = "n/a" if peak_2g is None else f"{peak_2g:.0f} MiB"
    print(f"| CallFS peak RSS, 2 GiB up + down | {shown} | < 150 MiB | {met_rss} |")


if __name__ == "__main__":
    main()
