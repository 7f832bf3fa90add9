"""Docker HEALTHCHECK: exit 0 if GET /health answers 200, else 1 (no curl in the slim image).

The URL is $HEALTHCHECK_URL (default http://127.0.0.1:8443/health); with https the node's own
certificate is not verified (it is often self-signed, and this is the node asking itself)."""

import os
import ssl
import sys
import urllib.request

url = os.environ.get("HEALTHCHECK_URL", "http://127.0.0.1:8443/health")
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
if not url.startswith(("http://", "https://")):
    sys.exit(f"HEALTHCHECK_URL must be an http(s) URL, got {url!r}")
try:
    with urllib.request.urlopen(url, timeout=4, context=context) as response:  # noqa: S310
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:
    print(f"health check {url}: {exc}", file=sys.stderr)
    sys.exit(1)
