"""Issue 5 figures: 256 MiB PUT and GET through CallFS with the S3 backend vs boto3 directly
against the same moto server, in one run (goal: >= 0.8x of direct boto3), and CallFS's peak RSS
while a 2 GiB file moves from S3 to localfs and back (goal: < 200 MiB).

    python bench/bench_s3.py
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import requests

KEY = "bench-key-0123456789abcdef"
H = {"Authorization": f"Bearer {KEY}"}
BIG = 256 * 1024 * 1024
RUNS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
    return -1


def main() -> None:
    moto_port, port = free_port(), free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{moto_port}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds)
    for _ in range(100):
        try:
            s3.create_bucket(Bucket="bench")
            break
        except Exception:
            time.sleep(0.1)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        blob = tmp / "big.bin"
        blob.write_bytes(os.urandom(BIG))
        cfg = tmp / "c.yaml"
        cfg.write_text(
            f"""server: {{protocol: http, cert_file: "", key_file: "",
  listen_addr: "127.0.0.1:{port}"}}
metrics: {{listen_addr: ""}}
log: {{level: warn, format: console}}
auth: {{api_keys: ["{KEY}"], internal_proxy_secret: bench-internal-0123456789,
  single_use_link_secret: bench-link-0123456789}}
metadata_store: {{type: sqlite, sqlite_path: "{tmp}/m.sqlite3"}}
dlm: {{type: local}}
backend: {{default_backend: s3, localfs_root_path: "{tmp}/files", s3_bucket_name: bench,
  s3_endpoint: "{endpoint}", s3_access_key: testing, s3_secret_key: testing}}
"""
        )
        node = subprocess.Popen([sys.executable, "-m", "callfs", "server", "-c", str(cfg)], cwd=tmp)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    requests.get(base + "/health", timeout=1)
                    break
                except requests.RequestException:
                    time.sleep(0.1)
            rows = {"direct PUT": [], "direct GET": [], "callfs PUT": [], "callfs GET": []}
            for i in range(RUNS):
                t = time.perf_counter()
                s3.upload_file(str(blob), "bench", f"direct/{i}.bin")
                rows["direct PUT"].append(BIG / (time.perf_counter() - t) / 1e6)
                t = time.perf_counter()
                body = s3.get_object(Bucket="bench", Key=f"direct/{i}.bin")["Body"]
                while body.read(1 << 20):
                    pass
                rows["direct GET"].append(BIG / (time.perf_counter() - t) / 1e6)
                t = time.perf_counter()
                with blob.open("rb") as f:
                    r = requests.put(f"{base}/v1/files/cf/{i}.bin", data=f, headers=H, timeout=300)
                    assert r.status_code == 201, r.text
                rows["callfs PUT"].append(BIG / (time.perf_counter() - t) / 1e6)
                t = time.perf_counter()
                with requests.get(
                    f"{base}/v1/files/cf/{i}.bin", headers=H, stream=True, timeout=300
                ) as r:
                    for _ in r.iter_content(1 << 20):
                        pass
                rows["callfs GET"].append(BIG / (time.perf_counter() - t) / 1e6)
            med = {k: statistics.median(v) for k, v in rows.items()}
            print(
                "| 256 MiB, median of 3 | boto3 direct MB/s | CallFS (s3) MB/s | ratio (goal 0.8) |"
            )
            print("|---|---:|---:|---:|")
            for op in ("PUT", "GET"):
                d, c = med[f"direct {op}"], med[f"callfs {op}"]
                print(f"| {op} | {d:.0f} | {c:.0f} | {c / d:.2f} |")
            # 2 GiB: upload to localfs, move to S3 and back, watching the server's peak RSS
            two = tmp / "two.bin"
            with two.open("wb") as out:
                for _ in range(8):
                    out.write(blob.read_bytes())
            blob.unlink()
            with two.open("rb") as f:
                r = requests.put(f"{base}/v1/files/local/two.bin", data=f, headers=H, timeout=600)
            move = {"destination": "/local/two.bin", "backend": "localfs"}
            # it went to s3 (the default backend): move it to localfs and back to s3
            r = requests.patch(f"{base}/v1/files/local/two.bin", json=move, headers=H, timeout=600)
            assert r.status_code == 200, r.text
            move["backend"] = "s3"
            r = requests.patch(f"{base}/v1/files/local/two.bin", json=move, headers=H, timeout=600)
            assert r.status_code == 200, r.text
            print(
                f"\nCallFS peak RSS over the whole run (2 GiB moved s3 -> localfs -> s3): "
                f"{peak_rss_mib(node.pid)} MiB (goal < 200 MiB)"
            )
        finally:
            node.terminate()
            node.wait(30)
            moto.terminate()
            moto.wait(30)


if __name__ == "__main__":
    main()
