"""Path canonicalisation (API.md §6.1 table and rules)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callfs.errors import BadRequest
from callfs.paths import (
    CanonicalPath,
    after_prefix,
    parse_body_path,
    parse_request_path,
    validate_name,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", "/"),
        ("/", "/"),
        (".", "/"),
        ("./", "/"),
        ("a/..", "/"),
        ("a//b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("a/b/.", "/a/b"),
        ("dir/../x", "/x"),
        ("file%20with%20spaces.txt", "/file with spaces.txt"),
        ("file%2Bplus.txt", "/file+plus.txt"),
        ("a+b", "/a+b"),
        ("file%40at.txt", "/file@at.txt"),
        ("%252e%252e%252f", "/%2e%2e%2f"),
        ("test%EF%BC%8Ffile.txt", "/test／file.txt"),
        (".hidden", "/.hidden"),
        ("a.tar.gz", "/a.tar.gz"),
        ("x...", "/x..."),
        ("tab%09name", "/tab\tname"),
        ("a/.erasure", "/a/.erasure"),
        ("x" * 255, "/" + "x" * 255),
    ],
)
def test_accepted(raw: str, expected: str) -> None:
    assert parse_request_path(raw).path == expected


@pytest.mark.parametrize(
    "raw",
    [
        "..",
        "../x",
        "a/../..",
        "..%2F..%2Fetc%2Fpasswd",
        "test%5Cfile.txt",
        "test%00file.txt",
        "a%2Fb",
        "bad%zz",
        "bad%4",
        "%FF",
        "%C3%28",
        "a%01b",
        "a%E2%80%AEb",
        "a%E2%81%A6b",
        "a\\b",
        ".erasure",
        ".erasure/x",
        "x" * 256,
        "/".join(["abcdefgh"] * 460),
    ],
)
def test_rejected(raw: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request_path(raw)
    assert info.value.message.startswith("invalid path")


def test_directory_form() -> None:
    assert parse_request_path("a/b/") == CanonicalPath("/a/b", True)
    assert parse_request_path("a/b") == CanonicalPath("/a/b", False)
    assert parse_request_path("") == CanonicalPath("/", True)
    p = parse_request_path("a/b/c.txt")
    assert (p.name, p.parent, p.is_root) == ("c.txt", "/a/b", False)
    assert parse_request_path("top").parent == "/"


def test_segments_that_cancel_out_keep_the_form_they_were_written_in() -> None:
    """§6.1: only a trailing ``/`` (or an empty or ``.`` path, step 4) is directory form;
    ``a/..`` is the root in file form, so a POST of a file there is 409, not a mkdir."""
    assert parse_request_path("a/..") == CanonicalPath("/", False)
    assert parse_request_path("a/../") == CanonicalPath("/", True)
    assert parse_request_path("./") == CanonicalPath("/", True)


def test_the_name_limit_applies_to_the_cleaned_path() -> None:
    """§6.1 step 9 comes after the clean (step 8): a long segment that ``..`` removes is fine."""
    assert parse_request_path("x" * 256 + "/../ok") == CanonicalPath("/ok", False)
    with pytest.raises(BadRequest):
        parse_request_path("a/" + "x" * 256)


def test_body_paths_are_not_percent_decoded() -> None:
    assert parse_body_path("/docs/a%20b.txt").path == "/docs/a%20b.txt"
    assert parse_body_path("docs/x/").path == "/docs/x"
    with pytest.raises(BadRequest):
        parse_body_path("../etc")


def test_names() -> None:
    validate_name("ok.txt")
    for bad in ["", "a/b", ".", "..", "a\x00b", "x" * 256, "a\u202eb"]:
        with pytest.raises(BadRequest):
            validate_name(bad)


segment = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\%"), max_size=12
)


@given(st.lists(st.one_of(segment, st.sampled_from([".", "..", ""])), max_size=8))
def test_canonical_output_is_a_fixed_point(parts: list[str]) -> None:
    try:
        first = parse_body_path("/".join(parts))
    except BadRequest:
        return
    again = parse_body_path(first.path)
    assert again.path == first.path
    assert "//" not in first.path and "\\" not in first.path
    assert ".." not in first.path.split("/")
    assert first.path.startswith("/")


def test_the_path_after_a_route_prefix_spelled_with_escapes() -> None:
    """The prefix is cut by segments: ``/v1/%66iles/x`` leaves ``x`` (it left ``es/x``)."""
    assert after_prefix("/v1/files/a%20b/c", "/v1/files") == "a%20b/c"
    assert after_prefix("/v1/%66iles/a%20b/c", "/v1/files") == "a%20b/c"
    assert after_prefix("/v1/%66iles", "/v1/files") == ""
    assert after_prefix("/v1/%66iles/", "/v1/files") == ""
    assert after_prefix("/%76%31/shards/p/0", "/v1/shards/") == "p/0"
    assert after_prefix("/v1/files/%77s/x", "/v1/files/ws") == "x"
    # one "/" belongs to the prefix however it is spelled: "//k/0" leaves "/k/0" both ways
    assert after_prefix("/v1/internal/shards//k/0", "/v1/internal/shards/") == "/k/0"
    assert after_prefix("/v1/internal/shard%73//k/0", "/v1/internal/shards/") == "/k/0"
