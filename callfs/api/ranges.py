"""Single byte ranges (API.md §9.3)."""

from __future__ import annotations

import re

from callfs.errors import RangeNotSatisfiable

#: ASCII digits only: ``\d`` and ``int()`` also take Arabic-Indic, fullwidth and other digits,
#: which no HTTP client means; such a header is malformed, so the whole file is sent (200).
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


def parse_range(header: str | None, size: int, if_range: str | None) -> tuple[int, int] | None:
    """``(first, last)`` inclusive for a satisfiable single range; None means "send it all (200)".

    Multiple ranges, a malformed header, or any ``If-Range`` get the full 200. A first byte at or
    past the end (so any range of an empty file) raises ``RangeNotSatisfiable``."""
    if header is None or if_range is not None:
        return None
    m = _RANGE.fullmatch(header.strip(" \t"))
    if m is None:
        return None
    first_s, last_s = m.groups()
    if not first_s and not last_s:
        return None
    if not first_s:  # suffix: the last n bytes
        n = int(last_s)
        if size == 0:
            raise RangeNotSatisfiable(size)
        if n == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - n), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None
    if first >= size:
        raise RangeNotSatisfiable(size)
    return first, min(last, size - 1)
