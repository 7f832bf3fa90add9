"""Integers in parameters are read as v1 read them (Go's ``strconv.Atoi``)."""

from __future__ import annotations

import pytest

from callfs.api.numbers import parse_int


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("-0", 0),
        ("+5", 5),
        ("0" * 30 + "7", 7),
        ("9223372036854775807", 9223372036854775807),
        ("-9223372036854775808", -9223372036854775808),
        ("9223372036854775808", None),  # past 64 bits: Atoi's range error
        ("9" * 5000, None),  # int() raises past 4,300 digits
        (" 1", None),
        ("1 ", None),
        ("\u00b2", None),  # "²".isdigit() is true
        ("\u0665", None),
        ("1_0", None),
        ("", None),
        ("+", None),
        ("-", None),
        ("0x10", None),
    ],
)
def test_parse_int_is_gos_atoi(text: str, value: int | None) -> None:
    assert parse_int(text) == value
