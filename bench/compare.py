"""Side-by-side table of a bench_http.sh run, with the issue's goals as ratios.

python bench/compare.py /tmp/bench/callfs-<time>
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    rows = list(csv.DictReader((out / "results.tsv").open(), delimiter="\t"))
    cell: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows:
        cell[(r["name"], r["workload"], r["conns"])] = r

    def num(name: str, wl: str, conns: str, col: str) -> float | None:
        r = cell.get((name, wl, conns))
        try:
            return float(r[col]) if r else None
        except ValueError:
            return None

    fsync_rate = float((out / "fsync.txt").read_text().strip())
    peak = (out / "peak_rss_mib.txt").read_text().strip()
    names = ["callfs", "nginx", "rclone-webdav"]
    print("| workload | conns | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for wl, col, unit in [
        ("get4k", "req_s", "req/s"),
        ("put4k", "req_s", "req/s"),
        ("get1m", "MB_s", "MB/s"),
        ("get256m", "MB_s", "MB/s"),
        ("put256m", "MB_s", "MB/s"),
    ]:
        for conns in ("16", "64") if wl in ("get4k", "put4k", "get1m") else ("1",):
            vals = []
            for n in names:
                v = num(n, wl, conns, col)
                extra = ""
                r = cell.get((n, wl, conns))
                if r and r["p50_ms"] not in ("-", ""):
                    extra = f" (p50 {r['p50_ms']} / p99 {r['p99_ms']} ms)"
                vals.append("-" if v is None else f"{v:,.0f} {unit}{extra}")
            print(f"| {wl} | {conns} | " + " | ".join(vals) + " |")
    print(f"\nmachine: {fsync_rate:,.0f} fsync'd 4 KiB creates/s; CallFS peak RSS {peak} MiB")

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "n/a"

    goals = [
        (
            "256 MiB GET vs nginx",
            num("callfs", "get256m", "1", "MB_s"),
            num("nginx", "get256m", "1", "MB_s"),
            ">= 0.9x",
        ),
        (
            "256 MiB PUT (fsync'd) vs nginx WebDAV",
            num("callfs", "put256m", "1", "MB_s"),
            num("nginx", "put256m", "1", "MB_s"),
            ">= 1.0x",
        ),
    ]
    for c in ("16", "64"):
        goals.append(
            (
                f"4 KiB GET vs rclone, c{c}",
                num("callfs", "get4k", c, "req_s"),
                num("rclone-webdav", "get4k", c, "req_s"),
                ">= 1.5x",
            )
        )
        goals.append(
            (
                f"4 KiB PUT vs fsync'd creates, c{c}",
                num("callfs", "put4k", c, "req_s"),
                fsync_rate,
                ">= 0.8x",
            )
        )
    print("\n| goal | measured | target |")
    print("|---|---:|---:|")
    for label, ours, ref, target in goals:
        print(f"| {label} | {ratio(ours, ref)} | {target} |")
    print(f"| peak RSS, 2 GiB up+down | {peak} MiB | < 150 MiB |")


if __name__ == "__main__":
    main()
