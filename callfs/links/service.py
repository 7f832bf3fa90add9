"""Issue and redeem single-use links. Redemption is one atomic compare-and-set in the metadata
store, so exactly one concurrent redeemer wins, on whichever node it arrives."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable

from callfs.errors import LinkAlreadyUsed, LinkExpired, LinkNotFound
from callfs.metadata.base import MetadataStore
from callfs.metrics import Metrics
from callfs.model import Link, LinkStatus

log = logging.getLogger(__name__)

MIN_EXPIRY = 1
MAX_EXPIRY = 86400
#: Used links are kept this long after use (so a replay says 410, not 404), then swept.
USED_RETENTION = 24 * 3600.0
SWEEP_INTERVAL = 300.0


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def format_expiry(ns: int) -> str:
    """RFC 3339 UTC with up to 9 fractional digits, trailing zeros dropped (§1)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


class LinkService:
    def __init__(
        self,
        meta: MetadataStore,
        secret: str,
        metrics: Metrics | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._meta = meta
        self._key = hashlib.sha256(secret.encode()).digest()
        self._metrics = metrics
        self._clock_ns = clock_ns

    def sign(self, link_id: str, path: str) -> str:
        return _b64(hmac.new(self._key, (link_id + path).encode(), hashlib.sha256).digest())

    async def generate(self, path: str, expiry_seconds: int) -> tuple[Link, str]:
        """Store a new active link to ``path``; returns it and its RFC 3339 expiry."""
        now_ns = self._clock_ns()
        expires_ns = now_ns + expiry_seconds * 1_000_000_000
        link_id = _b64(secrets.token_bytes(16))
        signature = self.sign(link_id, path)
        link = Link(
            token=f"{link_id}.{signature}",
            path=path,
            status=LinkStatus.ACTIVE,
            expires_at=expires_ns / 1e9,
            created_at=now_ns / 1e9,
            signature=signature,
        )
        await self._meta.create_link(link)
        if self._metrics is not None:
            self._metrics.link_generations.inc()
        return link, format_expiry(expires_ns)

    def _count(self, status: str) -> None:
        if self._metrics is not None:
            self._metrics.link_consumptions.labels(status).inc()

    async def redeem(self, token: str, client_ip: str) -> str:
        """Consume the link and return its path. Order (§10): exists -> not expired -> active ->
        signature -> atomic consume."""
        link = await self._meta.get_link(token)
        if link is None:
            self._count("not_found")
            raise LinkNotFound()
        now = self._clock_ns() / 1e9
        if now >= link.expires_at or link.status is LinkStatus.EXPIRED:
            self._count("expired")
            raise LinkExpired()
        if link.status is not LinkStatus.ACTIVE:
            self._count("invalid")
            raise LinkAlreadyUsed()
        link_id, _, given = token.partition(".")
        expected = self.sign(link_id, link.path)
        if not (
            hmac.compare_digest(given.encode(), expected.encode())
            and hmac.compare_digest(link.signature.encode(), expected.encode())
        ):
            self._count("invalid")
            raise LinkExpired()  # the link secret changed since it was issued
        if not await self._meta.consume_link(token, now, client_ip):
            self._count("invalid")
            raise LinkAlreadyUsed()
        self._count("success")
        return link.path

    async def sweep(self) -> int:
        now = self._clock_ns() / 1e9
        removed = await self._meta.sweep_links(now, now - USED_RETENTION)
        if removed:
            log.info("removed %d expired or used links", removed)
        return removed
