#!/usr/bin/env bash
# Issue 2 benchmark: one CallFS node next to nginx (static GET + WebDAV PUT) and `rclone serve webdav`,
# all measured in the same run on this machine with the shared harness, plus the machine's rate of
# fsync'd 4 KiB file creates and CallFS's peak RSS while 2 GiB goes up and comes back down.
# Prints a side-by-side table and the issue's goals as ratios (bench/compare.py).
#
#   bash bench/bench_http.sh                       # full run, DURATION=5s BIG_RUNS=5 (about 6-8 minutes)
#   DURATION=2s BIG_RUNS=1 PEERS= bash bench/bench_http.sh     # quick CallFS-only smoke run
#   LOOP=uvloop bash bench/bench_http.sh           # start CallFS with CALLFS_LOOP=uvloop
#
# Environment (defaults in brackets):
#   CALLFS_SHARED_BENCH  the reference harness [<repo>/../shared/bench]
#   OUT        results directory [/tmp/bench/callfs-<unix time>]; DATA  fixtures [/tmp/bench/data]
#   DURATION [5s]  BIG_RUNS [5]  CONNS ["16 64"]   passed to the harness (run_http.sh)
#   PEERS      ["nginx rclone-webdav"]; empty = CallFS only
#   PORT       CallFS port [18443];  PYTHON  interpreter that has callfs installed [python3]
#   LOOP       asyncio | uvloop [asyncio]; uvloop exports CALLFS_LOOP=uvloop to the server and reports
#              whether the server process really loaded uvloop
#   FSYNC_FILES  files per fsync'd-create batch [1000] (3 batches before CallFS, 3 after the peers)
#   KEEP_DATA  1 = keep CallFS's stored files and database under $OUT [0]
#   WORKERS    CallFS's server.workers [1]; with more, RSS figures are the sum over the processes
# Needs: bash $CALLFS_SHARED_BENCH/setup.sh once (wrk, nginx, rclone, curl). Fixtures are made with
# $CALLFS_SHARED_BENCH/mkdata.sh when missing. Everything written goes under $OUT and $DATA (/tmp);
# all traffic goes to 127.0.0.1; every load run and transfer is bounded in time.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${CALLFS_SHARED_BENCH:-$REPO/../shared/bench}
export OUT=${OUT:-/tmp/bench/callfs-$(date +%s)}
export DATA=${DATA:-/tmp/bench/data}
export DURATION=${DURATION:-5s} BIG_RUNS=${BIG_RUNS:-5} CONNS=${CONNS:-16 64}
PEERS=${PEERS-nginx rclone-webdav}
PORT=${PORT:-18443}
PY=${PYTHON:-python3}
LOOP=${LOOP:-asyncio}
FSYNC_FILES=${FSYNC_FILES:-1000}
KEEP_DATA=${KEEP_DATA:-0}
WORKERS=${WORKERS:-1}
KEY=bench-key-0123456789abcdef
BASE=http://127.0.0.1:$PORT
BIG_MAXTIME=300   # seconds, per 2 GiB transfer

die() { echo "bench_http: $*" >&2; exit 2; }
[ -f "$SHARED/run_http.sh" ] || die "no harness at $SHARED (set CALLFS_SHARED_BENCH)"
for tool in wrk curl cmp; do command -v "$tool" >/dev/null || die "$tool missing: bash $SHARED/setup.sh"; done
case $LOOP in asyncio|uvloop) ;; *) die "LOOP must be asyncio or uvloop";; esac
[ -s "$DATA/f256m.bin" ] || bash "$SHARED/mkdata.sh" "$DATA" >/dev/null || die "cannot make fixtures"
curl -s -o /dev/null --max-time 1 "$BASE/" && die "port $PORT is already in use"
mkdir -p "$OUT"
echo "results: $OUT"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "callfs commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "python: $($PY -c 'import sys; print(sys.version.split()[0])')"
  echo "nginx: $(nginx -v 2>&1 | sed 's/.*: //')"
  echo "rclone: $(rclone version 2>/dev/null | head -1)"
  echo "wrk: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
  echo "cpus: $(nproc); DURATION=$DURATION BIG_RUNS=$BIG_RUNS CONNS=$CONNS LOOP=$LOOP"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

fsync_batches() { # label [dir]: 3 batches of FSYNC_FILES fsync'd 4 KiB creates on the filesystem of
  # $OUT (the goal's reference); with "dir", each create also fsyncs its directory, as a durable
  # new name needs (without a journal, ext4 does not sync the entry with the file): printed only.
  # The files stay until the end of the run: on this machine's journal-less ext4, creates right
  # after a big delete cost ~10x the CPU for a minute (bench/README.md, "recently deleted").
  local file="$OUT/fsync.txt"
  [ "${2:-}" = dir ] && file="$OUT/fsync-dir.txt"
  $PY - "$OUT/fsync-$1-${2:-file}" "$FSYNC_FILES" "${2:-file}" >> "$file" <<'PY'
import os, sys, time
d, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
buf = os.urandom(4096)
for b in range(3):
    sub = os.path.join(d, str(b)); os.makedirs(sub)
    dirfd = os.open(sub, os.O_RDONLY)
    t = time.perf_counter()
    for i in range(n):
        fd = os.open(os.path.join(sub, f"{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, buf); os.fsync(fd); os.close(fd)
        if mode == "dir":
            os.fsync(dirfd)
    print(f"{n / (time.perf_counter() - t):.0f}")
    os.close(dirfd)
PY
}

echo "== machine: fsync'd 4 KiB file creates (3 x $FSYNC_FILES)"
fsync_batches before
fsync_batches before dir
echo "creates/s: $(paste -sd' ' "$OUT/fsync.txt"); with the directory fsync'd: $(paste -sd' ' "$OUT/fsync-dir.txt")"

# --- CallFS ---------------------------------------------------------------------------------------
WORK="$OUT/callfs"
mkdir -p "$WORK"
cat > "$WORK/config.yaml" <<YAML
server:
  protocol: http
  listen_addr: "127.0.0.1:$PORT"
  external_url: "http://127.0.0.1:$PORT"
  workers: $WORKERS
metrics:
  listen_addr: ""
log:
  level: warn
auth:
  api_keys: ["$KEY"]
  internal_proxy_secret: bench-internal-secret-0123
  single_use_link_secret: bench-link-secret-0123
metadata_store:
  type: sqlite
  sqlite_path: "$WORK/meta.sqlite3"
dlm:
  type: local
backend:
  localfs_root_path: "$WORK/files"
YAML

SRV_PID=""
start_callfs() { # label
  if [ "$LOOP" = uvloop ]; then export CALLFS_LOOP=uvloop; else unset CALLFS_LOOP; fi
  (cd "$WORK" && exec $PY -m callfs server -c "$WORK/config.yaml") >> "$WORK/server-$1.log" 2>&1 &
  SRV_PID=$!
  local i
  for i in $(seq 200); do   # up to 20 s
    curl -s -o /dev/null --max-time 1 "$BASE/health" && break
    kill -0 "$SRV_PID" 2>/dev/null || { cat "$WORK/server-$1.log" >&2; die "CallFS did not start"; }
    sleep 0.1
  done
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$BASE/health")" = 200 ] \
    || { cat "$WORK/server-$1.log" >&2; die "CallFS /health is not 200 after 20 s"; }
  if grep -q uvloop "/proc/$SRV_PID/maps" 2>/dev/null; then echo uvloop; else echo asyncio; fi \
    > "$OUT/callfs_loop.txt"
}
stop_callfs() {
  [ -n "$SRV_PID" ] || return 0
  kill -TERM "$SRV_PID" 2>/dev/null
  local i
  for i in $(seq 100); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$SRV_PID" 2>/dev/null && kill -KILL "$SRV_PID"
  wait "$SRV_PID" 2>/dev/null
  SRV_PID=""
}
kib() { # a /proc status field in KiB, summed over the server and its worker processes
  local p t=0 v
  for p in "$SRV_PID" $(pgrep -P "$SRV_PID" 2>/dev/null); do
    v=$(awk -v k="$1" '$1 == k":" {print $2}' "/proc/$p/status" 2>/dev/null) && t=$(( t + ${v:-0} ))
  done
  echo "$t"
}
PEER_UP=""
cleanup() {
  stop_callfs
  [ -n "$PEER_UP" ] && bash "$SHARED/servers/stop.sh" "$PEER_UP" --wipe
  rm -f "$OUT/f2g.bin"
  rm -rf "$OUT"/fsync-*-file "$OUT"/fsync-*-dir
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== CallFS (loop: $LOOP, server.workers: $WORKERS)"
start_callfs bench
echo "CallFS event loop in the server process: $(cat "$OUT/callfs_loop.txt")"
[ "$LOOP" = uvloop ] && [ "$(cat "$OUT/callfs_loop.txt")" != uvloop ] \
  && echo "warning: LOOP=uvloop asked for, but the server ignored CALLFS_LOOP and runs asyncio" >&2
NAME=callfs BASE=$BASE AUTH="Bearer $KEY" SEED=1 GET_PREFIX=/v1/files/bench/fx/ \
  PUT_PREFIX=/v1/files/bench/put/ SERVER_PIDS=$SRV_PID bash "$SHARED/run_http.sh"
echo "callfs $(( $(kib VmHWM) / 1024 ))" >> "$OUT/peak_rss_bench_mib.txt"
echo "CallFS peak RSS over the workloads: $(( $(kib VmHWM) / 1024 )) MiB"
stop_callfs

echo "== CallFS peak RSS while 2 GiB goes up and comes back down (fresh process)"
BIG="$OUT/f2g.bin"
for _ in 1 2 3 4 5 6 7 8; do cat "$DATA/f256m.bin"; done > "$BIG"
start_callfs rss2g
RSS_START=$(kib VmRSS)
( peak=0; while kill -0 "$SRV_PID" 2>/dev/null; do
    r=$(kib VmRSS) || break
    [ -n "$r" ] && [ "$r" -gt "$peak" ] && { peak=$r; echo "$peak" > "$OUT/rss_poll_kib.txt"; }
    sleep 0.05
  done ) &
POLL_PID=$!
curl -s -o /dev/null --max-time $BIG_MAXTIME -H 'Expect:' -H "Authorization: Bearer $KEY" -T "$BIG" \
  -w 'PUT 2 GiB: HTTP %{http_code}, %{time_total} s\n' "$BASE/v1/files/bench/big2g.bin" | tee "$OUT/2g.txt"
curl -s --max-time $BIG_MAXTIME -H "Authorization: Bearer $KEY" "$BASE/v1/files/bench/big2g.bin" \
  -w '%{stderr}%{http_code} %{time_total} %{size_download}\n' 2> "$OUT/2g_get.txt" | cmp -s - "$BIG"
CMP_RC=${PIPESTATUS[1]}
SAME=$([ "$CMP_RC" = 0 ] && echo identical || echo DIFFERENT)
read -r code secs size < "$OUT/2g_get.txt"
echo "GET 2 GiB: HTTP $code, $secs s, $size bytes, content $SAME to what was sent" | tee -a "$OUT/2g.txt"
HWM=$(kib VmHWM)
kill "$POLL_PID" 2>/dev/null; wait "$POLL_PID" 2>/dev/null
POLLED=$(cat "$OUT/rss_poll_kib.txt" 2>/dev/null || echo 0)
echo "$(( HWM / 1024 ))" > "$OUT/peak_rss_2g_mib.txt"
echo "CallFS RSS at start $(( RSS_START / 1024 )) MiB; peak (VmHWM) $(( HWM / 1024 )) MiB;" \
  "highest polled VmRSS $(( POLLED / 1024 )) MiB" | tee -a "$OUT/2g.txt"
curl -s -o /dev/null --max-time 30 -X DELETE -H "Authorization: Bearer $KEY" "$BASE/v1/files/bench/big2g.bin"
rm -f "$BIG"
stop_callfs

# --- peers ----------------------------------------------------------------------------------------
peer_rss_mib() { # sum of VmHWM over a peer's process tree (nginx: master + workers), MiB
  local p t=0 h
  for p in $1 $(pgrep -P "$1"); do
    h=$(awk '$1 == "VmHWM:" {print $2}' "/proc/$p/status" 2>/dev/null); t=$(( t + ${h:-0} ))
  done
  echo $(( t / 1024 ))
}
for peer in $PEERS; do
  echo "== $peer"
  case $peer in
    nginx) PBASE=http://127.0.0.1:8081 MK=0 ;;
    rclone-webdav) PBASE=http://127.0.0.1:8082 MK=1 ;;
    *) echo "unknown peer $peer (nginx, rclone-webdav)" >&2; continue ;;
  esac
  pid=$(bash "$SHARED/servers/start.sh" "$peer") || { echo "cannot start $peer" >&2; continue; }
  PEER_UP=$peer
  NAME=$peer BASE=$PBASE GET_PREFIX=/fixtures/ PUT_PREFIX=/up/ MKCOL=$MK SERVER_PIDS=$pid \
    bash "$SHARED/run_http.sh"
  echo "$peer $(peer_rss_mib "$pid")" >> "$OUT/peak_rss_bench_mib.txt"
  bash "$SHARED/servers/stop.sh" "$peer" --wipe
  PEER_UP=""
done

echo "== machine: fsync'd 4 KiB file creates again (3 x $FSYNC_FILES)"
fsync_batches after
fsync_batches after dir
echo "creates/s (all batches): $(paste -sd' ' "$OUT/fsync.txt")"

[ "$KEEP_DATA" = 1 ] || rm -rf "$WORK/files" "$WORK"/meta.sqlite3*
echo
$PY "$REPO/bench/compare.py" "$OUT" | tee "$OUT/summary.md"
echo
echo "rerun: $(printf 'DURATION=%s BIG_RUNS=%s LOOP=%s bash bench/bench_http.sh' "$DURATION" "$BIG_RUNS" "$LOOP")"
