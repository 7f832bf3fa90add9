#!/usr/bin/env bash
# Issue 2 benchmark: CallFS next to nginx (static GET + WebDAV PUT) and `rclone serve webdav`, in one
# run on this machine, with the shared harness (../shared/bench). Prints a side-by-side table.
#
#   bash bench/bench_http.sh            # full run (about 8-10 minutes)
#   DURATION=3s BIG_RUNS=3 bash bench/bench_http.sh
#
# Needs: bash ../shared/bench/setup.sh (wrk, nginx, rclone, curl) and ../shared/bench/mkdata.sh.
# Everything it writes goes under $OUT (default /tmp/bench/callfs-<time>); traffic stays on 127.0.0.1.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED_BENCH:-$REPO/../shared/bench}
export OUT=${OUT:-/tmp/bench/callfs-$(date +%s)}
export DURATION=${DURATION:-5s} BIG_RUNS=${BIG_RUNS:-5} CONNS=${CONNS:-16 64}
DATA=${DATA:-/tmp/bench/data}
PORT=${PORT:-18443}
KEY=bench-key-0123456789abcdef
PY=${PYTHON:-python3}
mkdir -p "$OUT"
[ -f "$DATA/f256m.bin" ] || { echo "no fixtures in $DATA: run $SHARED/mkdata.sh" >&2; exit 2; }

echo "== machine: fsync'd 4 KiB file creates"
$PY - "$OUT/fsync" > "$OUT/fsync.txt" <<'PY'
import os, sys, time
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
buf = os.urandom(4096); n = 2000
t = time.perf_counter()
for i in range(n):
    fd = os.open(os.path.join(d, f"{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, buf); os.fsync(fd); os.close(fd)
print(f"{n / (time.perf_counter() - t):.0f}")
PY
echo "fsync'd 4 KiB creates/s: $(cat "$OUT/fsync.txt")"

echo "== CallFS"
WORK="$OUT/callfs"; mkdir -p "$WORK"
cat > "$WORK/config.yaml" <<YAML
server: {protocol: http, cert_file: "", key_file: "", listen_addr: "127.0.0.1:$PORT",
         external_url: "http://127.0.0.1:$PORT"}
metrics: {listen_addr: ""}
log: {level: warn, format: console}
auth: {api_keys: ["$KEY"], internal_proxy_secret: bench-internal-secret-0123,
       single_use_link_secret: bench-link-secret-0123}
metadata_store: {type: sqlite, sqlite_path: "$WORK/meta.sqlite3"}
dlm: {type: local}
backend: {localfs_root_path: "$WORK/files"}
YAML
(cd "$WORK" && exec $PY -m callfs server -c "$WORK/config.yaml" > "$WORK/server.log" 2>&1) &
CALLFS_PID=$!
trap 'kill $CALLFS_PID 2>/dev/null' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/health" && break; sleep 0.1; done
# the process serving is the python child of the subshell
SRV_PID=$(pgrep -f "callfs server -c $WORK/config.yaml" | head -1)
NAME=callfs BASE=http://127.0.0.1:$PORT AUTH="Bearer $KEY" SEED=1 GET_PREFIX=/v1/files/bench/fx/ \
  PUT_PREFIX=/v1/files/bench/put/ bash "$SHARED/run_http.sh"

echo "== CallFS peak RSS while 2 GiB goes up and comes back down"
BIG="$OUT/f2g.bin"
[ -f "$BIG" ] || for _ in 1 2 3 4 5 6 7 8; do cat "$DATA/f256m.bin"; done > "$BIG"
RSS_BEFORE=$(awk '/VmRSS/ {print $2}' /proc/$SRV_PID/status)
curl -s -o /dev/null -H 'Expect:' -H "Authorization: Bearer $KEY" -T "$BIG" \
  "http://127.0.0.1:$PORT/v1/files/bench/big2g.bin" -w 'PUT 2 GiB: %{http_code} %{time_total}s\n'
curl -s -o /dev/null -H "Authorization: Bearer $KEY" \
  "http://127.0.0.1:$PORT/v1/files/bench/big2g.bin" -w 'GET 2 GiB: %{http_code} %{time_total}s\n'
PEAK=$(awk '/VmHWM/ {print $2}' /proc/$SRV_PID/status)
echo "CallFS RSS before: $((RSS_BEFORE / 1024)) MiB; peak over the whole run: $((PEAK / 1024)) MiB"
echo "$((PEAK / 1024))" > "$OUT/peak_rss_mib.txt"
rm -f "$BIG"
kill $CALLFS_PID 2>/dev/null; wait $CALLFS_PID 2>/dev/null; trap - EXIT

for peer in nginx rclone-webdav; do
  echo "== $peer"
  pid=$(bash "$SHARED/servers/start.sh" "$peer") || { echo "cannot start $peer" >&2; continue; }
  case $peer in
    nginx) BASE=http://127.0.0.1:8081 MK=0 ;;
    rclone-webdav) BASE=http://127.0.0.1:8082 MK=1 ;;
  esac
  NAME=$peer BASE=$BASE GET_PREFIX=/fixtures/ PUT_PREFIX=/up/ MKCOL=$MK SERVER_PIDS=$pid \
    bash "$SHARED/run_http.sh"
  bash "$SHARED/servers/stop.sh" "$peer" --wipe
done

echo
$PY "$REPO/bench/compare.py" "$OUT"
