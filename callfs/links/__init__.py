"""Single-use, HMAC-signed, expiring download links (API.md §10)."""
