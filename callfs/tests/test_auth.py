"""API keys (§4) and the owner model (§5)."""

from __future__ import annotations

import pytest

from callfs.auth.keys import Authenticator, extract_token
from callfs.auth.policy import check_delete, check_read, check_write
from callfs.errors import AuthenticationFailed, NotFound, PermissionDenied
from callfs.model import BackendType, Entry, EntryType, Identity


def test_extract_token() -> None:
    assert extract_token("Bearer abc") == "abc"
    assert extract_token("Bearer   abc  ") == "abc"
    assert extract_token("abc") == "abc"
    assert extract_token("bearer abc") == "bearer abc"
    assert extract_token(None) == ""


def test_identities() -> None:
    auth = Authenticator(["k" * 16, "j" * 16], {"alice": "a" * 16}, "s" * 20)
    assert auth.identify("Bearer " + "k" * 16).user_id == "api-user-0"
    assert auth.identify("j" * 16).user_id == "api-user-1"
    assert auth.identify("Bearer " + "a" * 16).user_id == "alice"
    admin = auth.identify("Bearer " + "s" * 20)
    assert admin.user_id == "internal-proxy" and admin.is_admin
    for bad in [None, "", "Bearer ", "k" * 15, "root"]:
        with pytest.raises(AuthenticationFailed):
            auth.identify(bad)
    assert auth.is_internal("Bearer " + "s" * 20)
    assert not auth.is_internal("Bearer " + "k" * 16)
    assert not Authenticator([], {}, "").is_internal("Bearer ")


def test_a_key_listed_twice_is_its_first_user() -> None:
    """The digest table keeps the table's order: the first entry of a repeated key wins."""
    auth = Authenticator(["k" * 16, "k" * 16], {"alice": "k" * 16}, "k" * 16)
    assert auth.identify("Bearer " + "k" * 16).user_id == "api-user-0"
    auth = Authenticator([], {"bob": "b" * 16, "alice": "b" * 16}, "")
    assert auth.identify("Bearer " + "b" * 16).user_id == "alice"  # sorted by user
    with pytest.raises(AuthenticationFailed):
        Authenticator([""], {}, "").identify("Bearer x")


def item(kind: str, owner: str) -> Entry:
    return Entry(
        path="/x",
        type=EntryType.DIRECTORY if kind == "d" else EntryType.FILE,
        size=0,
        owner=owner,
        mtime=0,
        backend_type=BackendType.LOCALFS,
        instance_id=None,
    )


ALICE, BOB, ROOT = Identity("alice"), Identity("bob"), Identity("root")


def test_read() -> None:
    assert check_read(BOB, item("f", "alice")).owner == "alice"
    with pytest.raises(NotFound):
        check_read(ALICE, None)


@pytest.mark.parametrize(
    ("who", "target", "parent", "allowed"),
    [
        (ALICE, item("f", "alice"), None, True),
        (BOB, item("f", "alice"), None, False),
        (BOB, item("d", "alice"), None, True),
        (ROOT, item("f", "alice"), None, True),
        (Identity("internal-proxy"), item("f", "alice"), None, True),
        (BOB, None, None, True),
        (BOB, None, item("d", "alice"), True),
        (BOB, None, item("f", "alice"), False),
        (ALICE, None, item("f", "alice"), True),
    ],
)
def test_write(who: Identity, target: Entry | None, parent: Entry | None, allowed: bool) -> None:
    if allowed:
        check_write(who, target, parent)
    else:
        with pytest.raises(PermissionDenied):
            check_write(who, target, parent)


def test_delete() -> None:
    check_delete(ALICE, item("f", "alice"))
    check_delete(ROOT, item("d", "alice"))
    with pytest.raises(PermissionDenied):
        check_delete(BOB, item("d", "alice"))
    with pytest.raises(PermissionDenied):
        check_delete(ALICE, item("d", "root"))
    with pytest.raises(NotFound):
        check_delete(ALICE, None)
