"""Integers in query parameters and headers, read as CallFS v1 read them (Go's
``strconv.Atoi``), so that clients of v1 see the same values accepted and refused."""

from __future__ import annotations

_INT64 = 1 << 63


def parse_int(text: str) -> int | None:
    """``text`` as Go's ``strconv.Atoi`` reads it: an optional sign and ASCII digits, nothing
    else (no spaces, no ``_``, no other scripts' digits), within 64 bits; None otherwise. (Python's
    ``int()`` takes more, and a number of over 4,300 digits makes it raise.)"""
    negative = text.startswith("-")
    digits = text[1:] if negative or text.startswith("+") else text
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    if len(digits.lstrip("0")) > 19:
        return None
    value = -int(digits) if negative else int(digits)
    return value if -_INT64 <= value < _INT64 else None
