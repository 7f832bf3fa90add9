#!/usr/bin/env bash
# The README's requests (under /demo) against a running node: 201 put, 200 replace, ...
# Usage: KEY=<api key> BASE=http://127.0.0.1:8443 bash examples/clients/walkthrough.sh
set -euo pipefail
: "${KEY:?set KEY to an API key}"
BASE=${BASE:-http://127.0.0.1:8443}
H="Authorization: Bearer $KEY"
echo "upload";   curl -fsS -H "$H" --data-binary 'hello' "$BASE/v1/files/demo/hello.txt" -o /dev/null -w '%{http_code}\n'
echo "put";      curl -fsS -H "$H" -T /etc/hostname "$BASE/v1/files/demo/host.txt" -o /dev/null -w '%{http_code}\n'
echo "replace";  curl -fsS -H "$H" -T /etc/hostname "$BASE/v1/files/demo/host.txt" -o /dev/null -w '%{http_code}\n'
echo "download"; curl -fsS -H "$H" "$BASE/v1/files/demo/hello.txt"; echo
echo "range";    curl -fsS -H "$H" -H 'Range: bytes=1-3' "$BASE/v1/files/demo/hello.txt"; echo
echo "list";     curl -fsS -H "$H" "$BASE/v1/directories/demo?recursive=true"; echo
echo "link";     curl -fsS -H "$H" -d '{"path":"/demo/hello.txt","expiry_seconds":300}' "$BASE/v1/links/generate"
echo "rename";   curl -fsS -H "$H" -X PATCH -d '{"name":"hi.txt"}' "$BASE/v1/files/demo/hello.txt"
echo "delete";   curl -fsS -H "$H" -X DELETE "$BASE/v1/files/demo?recursive=true" -o /dev/null -w '%{http_code}\n'
