"""Bearer tokens to identities (API.md §4). Every comparison is constant-time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

from callfs.errors import AuthenticationFailed
from callfs.model import INTERNAL_PROXY_USER, Identity

_BEARER = "Bearer "
#: The candidate of a token whose digest names no key: a compare that cannot match (an empty
#: token never gets here).
_NO_KEY = (b"", "")


def extract_token(header: str | None) -> str:
    """Strip one leading ``Bearer `` (case-sensitive, one space) if present, then trim."""
    if header is None:
        return ""
    if header.startswith(_BEARER):
        header = header[len(_BEARER) :]
    return header.strip()


def _token_bytes(header: str | None) -> bytes:
    """The token as the bytes the client sent. aiohttp decodes header bytes that are not UTF-8
    (a raw 0xE9) to lone surrogates; ``surrogateescape`` turns them back instead of raising, so
    such a token simply matches no key."""
    return extract_token(header).encode("utf-8", "surrogateescape")


class Authenticator:
    """Maps a bearer token to the user it belongs to.

    ``api_keys[i]`` is user ``api-user-<i>``; ``api_key_users`` maps user -> key; the internal proxy
    secret is the admin identity ``internal-proxy``. No key maps to ``root``.
    """

    def __init__(
        self,
        api_keys: Sequence[str],
        api_key_users: Mapping[str, str],
        internal_proxy_secret: str,
    ) -> None:
        table: list[tuple[bytes, str]] = [
            (key.encode(), f"api-user-{i}") for i, key in enumerate(api_keys)
        ]
        table += [(key.encode(), user) for user, key in sorted(api_key_users.items())]
        if internal_proxy_secret:
            table.append((internal_proxy_secret.encode(), INTERNAL_PROXY_USER))
        self._table = tuple(table)
        #: SHA-256 of a key -> (key, user), first entry wins as in the table: one dict lookup on a
        #: digest (which reveals nothing about the key) and one constant-time compare per request.
        self._by_digest: dict[bytes, tuple[bytes, str]] = {}
        for key, user in self._table:
            self._by_digest.setdefault(hashlib.sha256(key).digest(), (key, user))
        self._internal = internal_proxy_secret.encode()

    def identify(self, authorization: str | None) -> Identity:
        """The identity of an ``Authorization`` header value; ``AuthenticationFailed`` otherwise.

        The token's SHA-256 picks the one candidate key, which is then compared in constant time:
        the work does not depend on which key (or how much of one) matched, nor on the number of
        keys."""
        token = _token_bytes(authorization)
        found: str | None = None
        if token:
            key, user = self._by_digest.get(hashlib.sha256(token).digest(), _NO_KEY)
            if hmac.compare_digest(token, key):
                found = user
        if found is None:
            raise AuthenticationFailed()
        return Identity(found)

    def is_internal(self, authorization: str | None) -> bool:
        """True iff the header carries the internal proxy secret (internal endpoints, §12.6).

        An empty configured secret rejects everything."""
        token = _token_bytes(authorization)
        if not self._internal or not token:
            return False
        return hmac.compare_digest(token, self._internal)
