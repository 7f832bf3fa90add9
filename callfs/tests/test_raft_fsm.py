"""The Raft state machine and its pysyncobj glue, without a network: apply never raises and is
idempotent by request id, snapshots are checksummed, the port needs the password, and the
library internals the durable log relies on are still there."""

from __future__ import annotations

import asyncio
import os
import pickle
import select
import socket
import sqlite3
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from callfs.cluster import raft as raft_module
from callfs.cluster.fsm import COPY_SUFFIX, StateMachine, publish
from callfs.cluster.raft import NotApplied, RaftNode, RaftSettings, check_internals
from callfs.errors import AlreadyExists, CallFSError, InternalError, Unavailable
from callfs.metadata import raft_commands as C
from callfs.model import BackendType, Entry, EntryType
from callfs.tests.raftnode import one_node_raft_store
from callfs.tests.services import free_port


def entry(path: str) -> Entry:
    return Entry(
        path, EntryType.FILE, 3, "alice", 100, BackendType.LOCALFS, "n1", blob_key="k" * 32
    )


def write_snapshot(rconn: sqlite3.Connection, raft_data: bytes, final: str) -> None:
    """A whole-database snapshot at ``final``, as the snapshot hook writes one."""
    out = final + COPY_SUFFIX
    StateMachine.copy_snapshot(rconn, raft_data, out, 2)
    publish(out, final)


def create(req: str, path: str) -> bytes:
    return C.command(req, 1000.0, "create", [C.entry_out(entry(path)), None])


def test_pysyncobj_internals_the_durable_log_patches_are_present(tmp_path: Path) -> None:
    check_internals()  # raises when the pinned version or a patched attribute changes
    # the journal syncs with fdatasync on the log's own descriptor, found through the library's
    # private attributes: the journal refuses to open if they moved, and its entries reach the
    # file the descriptor names
    from callfs.cluster.raft import _create_journal

    path = tmp_path / "journal"
    journal = _create_journal(str(path))
    fd = journal._fd()
    assert os.path.samefile(f"/proc/self/fd/{fd}", path)
    journal.add(b"x" * 5000, 1, 1)  # grows the 1 KiB file: the library reopens it
    journal.sync()
    assert os.path.samefile(f"/proc/self/fd/{journal._fd()}", path)
    assert b"x" * 5000 in path.read_bytes()
    assert journal.syncs == 1 and not journal.dirty
    journal._destroy()


def test_apply_is_idempotent_by_request_id_and_never_raises(tmp_path: Path) -> None:
    fsm = StateMachine(str(tmp_path / "state.sqlite3"))
    fsm.open_fresh()
    first = fsm.apply(create("req-1", "/a"))
    assert C.result(first)[0] == "/a"
    # the same request again (a retry after "maybe applied"): the same answer, nothing applied
    assert fsm.apply(create("req-1", "/a")) == first
    # a different request for the same path is decided: AlreadyExists, as on a single node
    with pytest.raises(AlreadyExists):
        C.result(fsm.apply(create("req-2", "/a")))
    # garbage, unknown commands and wrong arguments are refused as results, never raised
    for payload in (b"\xff\x00garbage", C.command("r3", 1.0, "no-such", []), C.pack([1])):
        with pytest.raises(InternalError):
            C.result(fsm.apply(payload))
    with pytest.raises(InternalError):
        C.result(fsm.apply(C.command("r4", 1.0, "create", ["not", "an", "entry"])))
    # a batch: whole commands, each decided alone and remembered under its own request id
    b_cmd, a_cmd = create("r5", "/b"), create("r6", "/a")
    one, two = C.result(fsm.apply(C.command("", 1000.0, "batch", [b_cmd, a_cmd])))
    assert C.result(one)[0] == "/b"
    with pytest.raises(AlreadyExists):
        C.result(two)
    # the same batch again (a leader change: "maybe applied"), or one of its commands alone
    # through another batch: nothing applies twice, the first answers come back
    again = C.result(fsm.apply(C.command("", 1001.0, "batch", [create("r7", "/c"), b_cmd])))
    assert C.result(again[0])[0] == "/c"
    assert again[1] == one
    assert fsm.apply(b_cmd) == one
    # a batch inside a batch (a follower's group forwarded into the leader's) works; deeper not
    inner = C.command("", 1.0, "batch", [create("r8", "/d")])
    (nested,) = C.result(fsm.apply(C.command("", 1.0, "batch", [inner])))
    assert C.result(C.result(nested)[0])[0] == "/d"
    deep = C.command("", 1.0, "batch", [C.command("", 1.0, "batch", [inner])])
    with pytest.raises(InternalError):
        C.result(C.result(C.result(fsm.apply(deep))[0])[0])
    assert fsm.broken is None
    fsm.close()


def test_snapshot_round_trip_and_a_damaged_snapshot_is_refused(tmp_path: Path) -> None:
    fsm = StateMachine(str(tmp_path / "state.sqlite3"))
    fsm.open_fresh()
    for i in range(50):
        fsm.apply(create(f"r{i}", f"/f{i}"))
    snap = str(tmp_path / "raft.snapshot")
    write_snapshot(fsm.pin(), b"raft-data", snap)
    other = StateMachine(str(tmp_path / "other.sqlite3"))
    other.open_fresh()
    assert other.restore(snap).raft_data == b"raft-data"
    reader = __import__("sqlite3").connect(other.path)
    assert reader.execute("SELECT count(*) FROM entries").fetchone()[0] == 51  # + the root
    # one chunk missing in the middle (what a cut transfer looks like) -> refused, nothing loaded
    data = Path(snap).read_bytes()
    Path(snap).write_bytes(data[:5000] + data[5000 + 4096 :])
    fresh = StateMachine(str(tmp_path / "fresh.sqlite3"))
    fresh.open_fresh()
    with pytest.raises(ValueError, match="checksum"):
        fresh.restore(snap)
    reader.close()
    for m in (fsm, other, fresh):
        m.close()


async def test_the_raft_port_refuses_unauthenticated_pickles(tmp_path: Path) -> None:
    port = free_port()
    store = one_node_raft_store(tmp_path / "raft", port)
    await store.start()
    try:
        marker = tmp_path / "pwned"

        class Evil:
            def __reduce__(self) -> tuple[object, tuple[str]]:
                return (os.system, (f"touch {marker}",))

        frame = zlib.compress(pickle.dumps(Evil()))
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(struct.pack("i", len(frame)) + frame)
            time.sleep(0.5)
        assert not marker.exists()
    finally:
        await store.close()


def members_at(fsm: StateMachine, level: int) -> None:
    for i in range(2):
        C.result(fsm.apply(C.command(f"m{i}", 1.0, "member_put", [f"n{i}", f"h:{i}", "http://h"])))
        C.result(fsm.apply(C.command(f"l{i}", 1.0, "member_level", [f"n{i}", level])))


def state_of(fsm: StateMachine) -> list[object]:
    conn = sqlite3.connect(fsm.path)
    try:
        return [
            conn.execute("SELECT * FROM entries ORDER BY path").fetchall(),
            conn.execute("SELECT id, result FROM raft_requests ORDER BY id").fetchall(),
            conn.execute("SELECT * FROM raft_members ORDER BY node_id").fetchall(),
        ]
    finally:
        conn.close()


def snapshot(snaps: object, final: Path, raft_data: object) -> None:
    """One snapshot through the serializer hooks, as pysyncobj takes it; waits for it."""
    from callfs.cluster.raft import _Snapshots

    assert isinstance(snaps, _Snapshots)
    snaps.serialize(str(final) + ".tmp", raft_data)
    deadline = time.monotonic() + 30
    while (state := snaps.check()) == 1:  # SERIALIZER_STATE.SERIALIZING
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert state == 2, state  # SUCCESS


def test_incremental_snapshots_append_commands_and_replay_them_exactly(tmp_path: Path) -> None:
    """Once every member reads them, a snapshot appends the commands applied since the last one
    (the database is copied again only when replaying would cost more than a copy): restored
    elsewhere, the records replay to the same state and the last record's Raft data; a record
    torn by a crash counts as never taken, and the next one is written over it."""
    from callfs.cluster.raft import _Snapshots

    fsm = StateMachine(str(tmp_path / "state.sqlite3"))
    fsm.open_fresh()
    members_at(fsm, 2)
    final = tmp_path / "raft.snapshot"
    snaps = _Snapshots(fsm, 2)
    for i in range(30):
        fsm.apply(create(f"a{i}", f"/a{i}"))
    snapshot(snaps, final, ("raft", 1))
    assert (snaps.taken, snaps.copies) == (1, 1) and fsm.since == []
    base = final.stat().st_size
    assert final.read_bytes()[:8] == b"CFSRAFT2"

    snaps._copy = 3600.0  # a copy this slow: appending is always cheaper
    for i in range(10):
        fsm.apply(create(f"b{i}", f"/b{i}"))
    C.result(fsm.apply(C.command("d1", 1001.0, "delete", ["/a3", None])))
    snapshot(snaps, final, ("raft", 2))
    first_end = final.stat().st_size
    after_first = state_of(fsm)
    for i in range(5):
        fsm.apply(create(f"c{i}", f"/c{i}"))
    fsm.apply(create("b0", "/b0"))  # a retry: answered from memory, replayed alike
    snapshot(snaps, final, ("raft", 3))
    assert (snaps.taken, snaps.copies) == (3, 1)
    assert base < first_end < final.stat().st_size < base + 64 * 1024  # records, not copies
    # the base copy is untouched by appends: the retained older copy is still the first one
    assert not (tmp_path / "raft.snapshot.1").exists()

    other = StateMachine(str(tmp_path / "other.sqlite3"))
    other.open_fresh()
    restored = other.restore(str(final))
    assert pickle.loads(restored.raft_data) == ("raft", 3)
    assert (restored.version, restored.records, restored.end) == (2, 2, final.stat().st_size)
    assert state_of(other) == state_of(fsm)

    # a crash while the last record was written: the snapshot before it is what restores
    data = final.read_bytes()
    final.write_bytes(data[:-7])
    torn = StateMachine(str(tmp_path / "torn.sqlite3"))
    torn.open_fresh()
    restored = torn.restore(str(final))
    assert pickle.loads(restored.raft_data) == ("raft", 2)
    assert (restored.records, restored.end) == (1, first_end)
    assert state_of(torn) == after_first
    # the node goes on from there: its next record replaces the torn one
    resumed = _Snapshots(torn, 2)
    assert pickle.loads(pickle.dumps(resumed.deserialize(str(final)))) == ("raft", 2)
    for i in range(5):
        torn.apply(create(f"c{i}", f"/c{i}"))
    torn.apply(create("b0", "/b0"))
    resumed._copy = 3600.0
    snapshot(resumed, final, ("raft", 3))
    assert resumed.copies == 0 and final.stat().st_size == len(data)
    again = StateMachine(str(tmp_path / "again.sqlite3"))
    again.open_fresh()
    assert pickle.loads(again.restore(str(final)).raft_data) == ("raft", 3)
    assert state_of(again) == state_of(fsm)
    for m in (fsm, other, torn, again):
        m.close()


def test_a_snapshot_copies_the_database_when_an_append_would_not_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is copied again (a new file: what a transfer reads stays whole) when the
    records would take longer to replay than a copy, while a snapshot is being sent to a node,
    and in a group where a member does not read version 2 yet (then as version 1)."""
    from callfs.cluster.raft import _Snapshots

    fsm = StateMachine(str(tmp_path / "state.sqlite3"))
    fsm.open_fresh()
    members_at(fsm, 2)
    final = tmp_path / "raft.snapshot"
    snaps = _Snapshots(fsm, 2)
    snapshot(snaps, final, ("raft", 1))
    assert snaps.copies == 1
    # replaying would cost more than the copy took (and more than the floor)
    monkeypatch.setattr("callfs.cluster.raft._REPLAY_FLOOR", 0.0)
    snaps._copy = 0.0
    fsm.apply(create("x1", "/x1"))
    snapshot(snaps, final, ("raft", 2))
    assert snaps.copies == 2
    # cheap to replay, but a transfer is reading the file
    snaps._copy = 3600.0
    snaps.transmitting = lambda: True
    inode = final.stat().st_ino
    fsm.apply(create("x2", "/x2"))
    snapshot(snaps, final, ("raft", 3))
    assert snaps.copies == 3 and final.stat().st_ino != inode
    assert (tmp_path / "raft.snapshot.1").stat().st_ino == inode  # the retained older copy
    snaps.transmitting = lambda: False
    # a member of an earlier build joins the table: version 1, whole copies only
    C.result(fsm.apply(C.command("l1", 2.0, "member_level", ["n1", 1])))
    snapshot(snaps, final, ("raft", 4))
    fsm.apply(create("x3", "/x3"))
    snapshot(snaps, final, ("raft", 5))
    assert snaps.copies == 5 and final.read_bytes()[:8] == b"CFSRAFT1"
    other = StateMachine(str(tmp_path / "other.sqlite3"))
    other.open_fresh()
    assert pickle.loads(other.restore(str(final)).raft_data) == ("raft", 5)
    assert state_of(other) == state_of(fsm)
    for m in (fsm, other):
        m.close()


def test_snapshot_files_survive_leftovers_installs_and_damage(tmp_path: Path) -> None:
    """A leftover ``raft.snapshot.tmp`` (pysyncobj renames that name over the snapshot) never
    becomes the snapshot; a copy that finishes after a snapshot from the leader was installed
    is dropped, and the next record goes to the installed file; a damaged record that is not the
    last, or a record found where it was not written, fails the restore instead of replaying
    less."""
    from pysyncobj.serializer import Serializer

    from callfs.cluster.raft import _Snapshots

    fsm = StateMachine(str(tmp_path / "state.sqlite3"))
    fsm.open_fresh()
    members_at(fsm, 2)
    final = tmp_path / "raft.snapshot"
    snaps = _Snapshots(fsm, 2)
    # through pysyncobj's own Serializer, which renames <final>.tmp after each serialize
    serializer = Serializer(
        str(final), 1 << 20, False, snaps.serialize, snaps.deserialize, snaps.check
    )
    Path(str(final) + ".tmp").write_bytes(b"junk left by a crash")
    serializer.serialize((None, ("raft", 1)), 1)
    deadline = time.monotonic() + 30
    while serializer.checkSerializing()[0] == 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    snaps._copy = 3600.0
    fsm.apply(create("y1", "/y1"))
    Path(str(final) + ".tmp").write_bytes(b"junk again")
    serializer.serialize((None, ("raft", 2)), 2)
    while serializer.checkSerializing()[0] == 1:
        time.sleep(0.01)
    assert (snaps.taken, snaps.copies) == (2, 1)
    check = StateMachine(str(tmp_path / "check.sqlite3"))
    check.open_fresh()
    assert pickle.loads(check.restore(str(final)).raft_data) == (("raft", 2),)  # data[1:]
    assert state_of(check) == state_of(fsm)

    # the leader's snapshot arrives (renamed into place by pysyncobj, then installed) while
    # this node's own copy is under way: the copy is dropped, the leader's file stays
    leader = StateMachine(str(tmp_path / "leader.sqlite3"))
    leader.open_fresh()
    members_at(leader, 2)
    for i in range(20):
        leader.apply(create(f"L{i}", f"/L{i}"))
    sent = tmp_path / "from-leader"
    write_snapshot(leader.pin(), pickle.dumps(("leader", 99)), str(sent))
    snaps._copy = 0.0
    fsm.apply(create("y2", "/y2"))
    snaps.serialize(str(final) + ".tmp", ("raft", 3))
    deadline = time.monotonic() + 30
    while snaps._state == 1:  # the copy runs; check() not called yet
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.replace(sent, final)
    assert snaps.deserialize(str(final)) == ("leader", 99)
    assert snaps.check() == 3  # FAILED: pysyncobj keeps its log and tries again later
    assert not Path(str(final) + ".copy.tmp").exists()
    assert state_of(fsm) == state_of(leader)
    snaps._copy = 3600.0
    fsm.apply(create("y3", "/y3"))
    snapshot(snaps, final, ("raft", 100))
    after = StateMachine(str(tmp_path / "after.sqlite3"))
    after.open_fresh()
    restored = after.restore(str(final))
    assert pickle.loads(restored.raft_data) == ("raft", 100) and restored.records == 1
    assert state_of(after) == state_of(fsm)

    # damage in a record that is not the last; a record moved (bytes lost in a transfer)
    fsm.apply(create("y4", "/y4"))
    snapshot(snaps, final, ("raft", 101))
    good = final.read_bytes()
    first = 8 + 8 + 32 + int.from_bytes(good[8:16], "big")  # where the records start
    second = restored.end  # the record of ("raft", 101), the last
    bad = bytearray(good)
    bad[first + 60] ^= 0xFF
    for name, data in (("flip", bytes(bad)), ("gap", good[:first] + good[second:])):
        final.write_bytes(data)
        m = StateMachine(str(tmp_path / f"{name}.sqlite3"))
        m.open_fresh()
        with pytest.raises(ValueError, match="delta record at"):
            m.restore(str(final))
        m.close()
    # the same damage in the last record is a torn tail: the record before it restores
    bad = bytearray(good)
    bad[second + 60] ^= 0xFF
    final.write_bytes(bytes(bad))
    m = StateMachine(str(tmp_path / "tail.sqlite3"))
    m.open_fresh()
    assert pickle.loads(m.restore(str(final)).raft_data) == ("raft", 100)
    m.close()
    for m in (fsm, check, leader, after):
        m.close()


def test_a_voter_without_a_member_row_holds_snapshots_at_version_1(tmp_path: Path) -> None:
    """A node that just joined has no member row yet (and may run an earlier build): it counts
    as level 1, so snapshots stay version 1 until it announces its level."""
    from callfs.cluster.raft import _Snapshots

    fsm = StateMachine(str(tmp_path / "state.sqlite3"))
    fsm.open_fresh()
    members_at(fsm, 2)  # rows for h:0 and h:1
    final = tmp_path / "raft.snapshot"
    snaps = _Snapshots(fsm, 1)
    snaps.voters = lambda: ["h:0", "h:1", "h:9"]
    snapshot(snaps, final, ("raft", 1))
    assert final.read_bytes()[:8] == b"CFSRAFT1"
    snaps.voters = lambda: ["h:0", "h:1"]
    snapshot(snaps, final, ("raft", 2))
    assert final.read_bytes()[:8] == b"CFSRAFT2"
    fsm.close()


def test_a_command_of_a_newer_level_stops_the_node_instead_of_drifting(
    tmp_path: Path,
) -> None:
    """A replica that meets a command above its build's level which the group accepted (every
    member announced it) cannot apply it as the others do: the node stops (here: recorded) and
    nothing of the entry is applied, also inside a batch; a broken replica takes no snapshot."""
    from callfs.cluster.raft import _Snapshots

    stops: list[str] = []
    fsm = StateMachine(str(tmp_path / "state.sqlite3"))
    fsm.open_fresh()
    fsm.on_newer_command = stops.append
    for i, level in enumerate((C.LEVEL + 1, C.LEVEL + 1)):
        C.result(fsm.apply(C.command(f"m{i}", 1.0, "member_put", [f"n{i}", f"h:{i}", "http://h"])))
        C.result(fsm.apply(C.command(f"l{i}", 1.0, "member_level", [f"n{i}", level])))
    future = C.pack([C.LEVEL + 1, "r1", 1.0, "create", [C.entry_out(entry("/x")), None]])
    with pytest.raises(InternalError):
        C.result(fsm.apply(future))
    assert len(stops) == 1 and "upgrade" in stops[0]
    assert fsm.broken is not None
    batch = C.command("", 1.0, "batch", [create("r2", "/y"), future])
    with pytest.raises(InternalError):
        C.result(fsm.apply(batch))
    reader = sqlite3.connect(fsm.path)
    found = reader.execute("SELECT count(*) FROM entries WHERE path IN ('/x', '/y')").fetchone()
    assert found == (0,)
    snaps = _Snapshots(fsm, 1)
    snaps.serialize(str(tmp_path / "raft.snapshot.tmp"), b"raft-data")
    assert snaps.check() == 3 and snaps.failed == 1  # SERIALIZER_STATE.FAILED
    assert not (tmp_path / "raft.snapshot").exists()
    reader.close()
    fsm.close()


def test_the_member_table_holds_back_commands_above_its_lowest_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``apply`` refuses a command above the lowest level the member table records, the same
    on every replica (a result, not a stop), and applies it once every member announced it."""
    from callfs.errors import Unavailable

    monkeypatch.setattr(C, "LEVEL", C.LEVEL + 1)
    monkeypatch.setitem(C.SINCE, "noop", C.LEVEL)
    stops: list[str] = []
    fsm = StateMachine(str(tmp_path / "state.sqlite3"))
    fsm.open_fresh()
    fsm.on_newer_command = stops.append
    for i in range(2):
        C.result(fsm.apply(C.command(f"m{i}", 1.0, "member_put", [f"n{i}", f"h:{i}", "http://h"])))
    C.result(fsm.apply(C.command("l0", 1.0, "member_level", ["n0", C.LEVEL])))
    with pytest.raises(Unavailable, match="waits for every raft node"):
        C.result(fsm.apply(C.command("x1", 1.0, "noop", [])))
    C.result(fsm.apply(C.command("l1", 1.0, "member_level", ["n1", C.LEVEL])))
    assert C.result(fsm.apply(C.command("x2", 1.0, "noop", []))) is None
    # a re-registration (member_put) counts the node as level 1 again until it announces
    C.result(fsm.apply(C.command("m9", 1.0, "member_put", ["n1", "h:1", "http://h"])))
    with pytest.raises(Unavailable):
        C.result(fsm.apply(C.command("x3", 1.0, "noop", [])))
    for bad in (["n1", 0], ["n1", True], ["n1", "2"], ["nobody", 2]):
        with pytest.raises(CallFSError):
            C.result(fsm.apply(C.command(f"b{bad}", 1.0, "member_level", bad)))
    assert stops == [] and fsm.broken is None
    fsm.close()


def test_members_tables_from_before_levels_gain_the_column(tmp_path: Path) -> None:
    fsm = StateMachine(str(tmp_path / "state.sqlite3"))
    fsm.open_fresh()
    conn = sqlite3.connect(fsm.path)
    conn.executescript(
        "DROP TABLE raft_members; CREATE TABLE raft_members (node_id TEXT PRIMARY KEY,"
        " raft_addr TEXT NOT NULL, api_endpoint TEXT NOT NULL);"
        " INSERT INTO raft_members VALUES ('n1', 'h:1', 'http://h:2');"
    )
    conn.close()
    snap = str(tmp_path / "raft.snapshot")
    write_snapshot(fsm.pin(), b"raft-data", snap)
    other = StateMachine(str(tmp_path / "other.sqlite3"))
    other.open_fresh()
    other.restore(snap)
    got = sqlite3.connect(other.path).execute("SELECT node_id, level FROM raft_members")
    assert got.fetchall() == [("n1", 1)]
    for m in (fsm, other):
        m.close()


async def test_a_command_waits_until_every_member_applies_its_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proposer refuses a command some member could not apply (503, nothing in the log);
    once every member has announced the level, it goes through."""
    from callfs.errors import Unavailable

    store = one_node_raft_store(tmp_path / "raft", free_port())
    await store.start()
    try:
        service = store.service
        await service.register()
        assert service.cluster_level() == C.LEVEL
        assert service.status()["nodes"]["node-1"]["level"] == C.LEVEL
        monkeypatch.setitem(C.SINCE, "noop", C.LEVEL + 1)
        assert not service.supports("noop")
        applied = service.node.fsm.applied
        with pytest.raises(Unavailable, match="upgrade"):
            await service.execute("noop", [])
        assert service.node.fsm.applied == applied
        # this node is upgraded (it applies the new level) and announces it
        monkeypatch.setattr(C, "LEVEL", C.LEVEL + 1)
        await service.register()
        assert service.cluster_level() == C.LEVEL
        assert service.supports("noop")
        assert await service.execute("noop", []) is None
        assert service.node.fsm.broken is None
    finally:
        await store.close()


async def test_a_crash_after_a_snapshot_before_the_log_is_compacted_loses_no_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot is on disk, the node dies before pysyncobj compacts its log: at restart the
    log's first entries are not the snapshot's, and pysyncobj would clear the log, dropping the
    acknowledged entries after the snapshot. The node trims the log to the snapshot instead and
    replays what follows."""
    from callfs.cluster.raft import _Snapshots

    data = tmp_path / "raft"
    slow = {"snapshot_threshold": 1 << 20, "snapshot_interval": 3600.0}
    real_check = _Snapshots.check

    def unheard(self: _Snapshots) -> int:  # the snapshot takes effect; pysyncobj never hears
        state = real_check(self)
        return 1 if state == 2 else state  # SUCCESS -> SERIALIZING

    monkeypatch.setattr(_Snapshots, "check", unheard)  # before pysyncobj binds it
    port = free_port()  # the group's one member, by its address: the same after the restart
    store = one_node_raft_store(data, port, **slow)
    await store.start()
    try:
        for i in range(20):
            await store.create(entry(f"/a{i}"))
        node = store.service.node
        node.force_snapshot()
        deadline = time.monotonic() + 30
        while node.status()["snapshots_taken"] < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        for i in range(10):
            await store.create(entry(f"/b{i}"))  # acknowledged: in the fsync'd log only
        assert node.status()["log_len"] > 30  # not compacted
    finally:
        await store.close()
    monkeypatch.setattr(_Snapshots, "check", real_check)
    store = one_node_raft_store(data, port, **slow)
    await store.start()
    try:
        for path in ("/a0", "/a19", "/b0", "/b9"):
            assert await store.get(path) is not None, path
    finally:
        await store.close()


def test_a_wake_during_the_drain_does_not_switch_later_wakes_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tick thread's wake-up pipe: a wake that lands while the tick thread drains the pipe
    must not leave the "already woken" flag up over an empty pipe, which silenced every later
    wake (each new log entry then waited for the next tick: ~5 ms per commit under load)."""

    class Poller:
        def subscribe(self, fd: int, callback: object, events: int) -> None:
            self.fd = fd

    class Sync:
        _poller = Poller()

    node = RaftNode(
        RaftSettings(
            node_id="n", bind_addr="127.0.0.1:1", peers=(), data_dir=str(tmp_path), password="x"
        )
    )
    node._subscribe_wake(Sync())
    r = node._wake_r
    assert r is not None
    try:
        node._wake()
        real_read = os.read
        calls = []

        def read_racing_a_wake(fd: int, n: int) -> bytes:
            if not calls:
                node._wake()  # another thread proposes a command while the pipe is drained
            calls.append(fd)
            return real_read(fd, n)

        monkeypatch.setattr(raft_module.os, "read", read_racing_a_wake)
        node._drain(r, 0)
        monkeypatch.setattr(raft_module.os, "read", real_read)
        assert not select.select([r], [], [], 0)[0]  # drained
        node._wake()  # the next proposal, after the tick that followed the drain
        assert select.select([r], [], [], 0)[0], "a wake after the drain left the pipe empty"
    finally:
        for fd in (node._wake_r, node._wake_w):
            if fd is not None:
                os.close(fd)


def _three_nodes(tmp_path: Path, election: float) -> list[RaftNode]:
    """Three Raft nodes in this process (not started), election timeouts from ``election`` to
    twice that."""
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    return [
        RaftNode(
            RaftSettings(
                node_id=f"n{i}",
                bind_addr=addrs[i],
                peers=tuple(a for a in addrs if a != addrs[i]),
                data_dir=str(tmp_path / f"n{i}"),
                password="x",
                election_min=election,
                election_max=2 * election,
                leader_fallback=2 * election,
            )
        )
        for i in range(3)
    ]


async def _ready_leader(nodes: list[RaftNode], within: float = 15.0) -> RaftNode:
    deadline = time.monotonic() + within
    while not any(n.is_leader() and n.leader_ready() for n in nodes):
        assert time.monotonic() < deadline, "no leader"
        await asyncio.sleep(0.05)
    return next(n for n in nodes if n.is_leader() and n.leader_ready())


async def test_pipelined_appends_never_make_a_follower_truncate_what_it_acknowledged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three nodes in this process, many commands in flight on the leader: acknowledgements
    overtaken by later sends must not move the leader's next index back (pysyncobj then resends
    entries and the follower truncates what it had acknowledged, logging CRITICAL)."""
    import logging
    import uuid

    from callfs.cluster.raft import _DurableTransport

    # long election timeouts: a leader change under this load would fail the writers, not the check
    nodes = _three_nodes(tmp_path, election=2.0)
    caplog.set_level(logging.WARNING)
    resent: list[int] = []
    for node in nodes:
        node.start()
    try:
        deadline = time.monotonic() + 15
        leader = await _ready_leader(nodes)
        transport = leader.sync._SyncObj__transport
        assert isinstance(transport, _DurableTransport)
        send = transport.send
        highest: dict[object, int] = {}

        def counting_send(node: object, message: object) -> object:
            entries = message.get("entries") if isinstance(message, dict) else None
            if entries:
                if entries[0][1] <= highest.get(node, 0):
                    resent.append(entries[0][1])
                highest[node] = max(highest.get(node, 0), entries[-1][1])
            return send(node, message)

        transport.send = counting_send

        async def writer() -> None:
            for _ in range(200):
                payload = C.command(uuid.uuid4().hex, time.time(), "noop", [])
                await leader.propose(payload, 10.0)

        await asyncio.gather(*(writer() for _ in range(16)))
        target = leader.commit_index
        while any(n.last_applied < target for n in nodes):
            assert time.monotonic() < deadline + 30, "followers did not catch up"
            await asyncio.sleep(0.05)
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop)
    truncations = [r for r in caplog.records if "truncating" in r.getMessage()]
    assert not truncations, truncations[0].getMessage()
    # Not vacuous: acknowledgements were overtaken by later sends (entries were in flight).
    assert transport.index_restores > 0
    assert not resent, f"{len(resent)} entries sent again to a follower that had them"


async def test_a_snapshot_transfer_no_leader_will_finish_is_dropped(tmp_path: Path) -> None:
    """pysyncobj ends a snapshot transfer only from the leader's send loop: one under way when
    the leader stepped down (or to a node since removed) would stay open for good, holding its
    file and making every later snapshot a full database copy. Each node drops those at its next
    tick, and only those: a leader's transfer to a member goes on."""
    from pysyncobj.node import TCPNode

    nodes = _three_nodes(tmp_path, election=1.0)
    for node in nodes:
        node.start()
    try:
        leader = await _ready_leader(nodes)
        follower = next(n for n in nodes if n is not leader)
        snapshot = tmp_path / "old-snapshot"
        snapshot.write_bytes(b"x" * 1000)

        def transfer() -> dict[str, object]:
            return {"transmitted": 100, "file": open(snapshot, "rb")}

        def transfers(node: RaftNode) -> dict[object, dict[str, object]]:
            serializer = getattr(node.sync, raft_module._SERIALIZER_ATTR)
            found = getattr(serializer, raft_module._TRANSMISSIONS_ATTR)
            assert isinstance(found, dict)
            return found

        member = next(iter(leader.sync.otherNodes))
        gone = TCPNode("127.0.0.1:1")
        stuck, kept, removed = transfer(), transfer(), transfer()
        transfers(follower)[member] = stuck  # what a deposed leader is left with
        transfers(leader)[member] = kept
        transfers(leader)[gone] = removed
        assert follower._snapshots.transmitting() and leader._snapshots.transmitting()
        deadline = time.monotonic() + 5
        while transfers(follower) or gone in transfers(leader):
            assert time.monotonic() < deadline, "a stale transfer was never dropped"
            await asyncio.sleep(0.02)
        assert stuck["file"].closed and removed["file"].closed  # type: ignore[union-attr]
        assert not follower._snapshots.transmitting()
        assert transfers(leader).get(member) is kept and not kept["file"].closed  # type: ignore[union-attr]
        assert follower.transmissions_dropped == 1 and leader.transmissions_dropped == 1
        transfers(leader).pop(member)["file"].close()  # type: ignore[union-attr]
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop)


async def test_reads_waiting_for_the_local_apply_are_released_or_told_why(
    tmp_path: Path,
) -> None:
    """``RaftService._until_applied`` on a real one-node group: a read waiting for an index is
    released soon after it is applied, one waiting past its deadline gets ``Unavailable``, and
    one still waiting when the node stops learns that at once (not at its deadline)."""
    store = one_node_raft_store(tmp_path / "raft", free_port())
    await store.start()
    service = store.service
    try:
        await store.create(entry("/a"))
        applied = service.node.last_applied
        loop = asyncio.get_running_loop()
        far = time.monotonic() + 30

        waiting = asyncio.ensure_future(service._until_applied(applied + 1, far))
        started = loop.time()
        await store.create(entry("/b"))  # applies (at least) the next index
        await asyncio.wait_for(waiting, 5)
        assert loop.time() - started < 1

        with pytest.raises(Unavailable):
            await service._until_applied(applied + 1000, time.monotonic() + 0.2)

        stuck = asyncio.ensure_future(service._until_applied(applied + 1000, far))
        await asyncio.sleep(0.05)
        started = loop.time()
        await asyncio.to_thread(service.node.stop)
        with pytest.raises(NotApplied):
            await asyncio.wait_for(stuck, 5)
        assert loop.time() - started < 5
        assert service._apply_live == 0
    finally:
        await store.close()


async def test_a_join_of_a_voter_already_at_that_address_changes_nothing(tmp_path: Path) -> None:
    """API.md §12.6: "Already a voter with the same address: success, no change". It rewrote
    the member's API endpoint and reset its command level to 1 (holding back the group)."""
    port = free_port()
    store = one_node_raft_store(tmp_path / "raft", port)
    await store.start()
    try:
        service = store.service
        await service.register()
        before = service.status()["nodes"]
        assert before["node-1"]["level"] == C.LEVEL
        applied = service.node.fsm.applied
        await service.join("node-1", f"127.0.0.1:{port}", "http://127.0.0.1:9")
        assert service.status()["nodes"] == before
        assert service.node.fsm.applied == applied  # nothing went through the log
        assert service.cluster_level() == C.LEVEL
    finally:
        await store.close()


def test_a_crash_during_log_compaction_loses_no_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a Raft review, which demonstrated it: pysyncobj compacts the log in place (clear,
    then add each kept entry again from the start), so a kill -9 midway left only the entries
    written again (39 of 101 in its run). The compaction now writes a new file and renames it."""
    import pysyncobj.journal as pjournal

    from callfs.cluster.raft import _create_journal

    path = tmp_path / "journal"
    journal = _create_journal(str(path))
    for i in range(1, 301):
        journal.add(b"cmd%d" % i, i, 1)
    journal.sync()
    real_add = pjournal.FileJournal.add
    added = [0]

    def dying_add(self: Any, *entry: Any) -> None:
        added[0] += 1
        if added[0] == 40:
            raise SystemExit("kill -9")  # the process dies mid-compaction
        real_add(self, *entry)

    monkeypatch.setattr(pjournal.FileJournal, "add", dying_add)
    with pytest.raises(SystemExit):
        journal.deleteEntriesTo(199)
    monkeypatch.setattr(pjournal.FileJournal, "add", real_add)
    after_crash = pjournal.FileJournal(str(path))  # what a restart reads
    assert [e[1] for e in after_crash] == list(range(1, 301))  # untouched: nothing lost
    after_crash._destroy()

    journal.deleteEntriesTo(199)  # now a compaction that completes
    assert [e[1] for e in journal] == list(range(200, 301))
    journal.add(b"cmd301", 301, 1)  # the log goes on in the new file
    journal.sync()
    journal._destroy()
    reopened = _create_journal(str(path))
    assert [e[1] for e in reopened] == list(range(200, 302))
    assert reopened[-1][0] == b"cmd301"
    assert not os.path.exists(str(path) + ".compact")
    reopened._destroy()


def test_a_reopened_log_is_synced_and_a_failed_sync_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the same review: entries a kill -9 left in the page cache were taken as on disk
    at restart (the first acknowledgement went out unsynced), and a failed fdatasync cleared
    the flag, so the next acknowledgement went out unsynced too."""
    path = tmp_path / "journal"
    journal = raft_module._create_journal(str(path))
    journal.add(b"a", 1, 1)  # written, never synced: the process dies here
    journal._destroy()
    synced: list[int] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(raft_module.os, "fdatasync", fdatasync)
    reopened = raft_module._create_journal(str(path))
    assert synced  # at open, before anything is acknowledged
    assert not reopened.dirty

    def failing(fd: int) -> None:
        raise OSError(5, "EIO")

    reopened.add(b"b", 2, 1)
    monkeypatch.setattr(raft_module.os, "fdatasync", failing)
    with pytest.raises(OSError):
        reopened.sync()
    assert reopened.dirty  # the next send or commit syncs again
    monkeypatch.setattr(raft_module.os, "fdatasync", real_fdatasync)
    reopened.sync()
    assert not reopened.dirty
    reopened._destroy()


def test_a_damaged_snapshot_from_the_leader_never_replaces_our_own(tmp_path: Path) -> None:
    """From the Raft review, which demonstrated a node that could never apply again: pysyncobj
    renames a received snapshot over the node's own before reading it; a damaged one was then
    refused and deleted, and after a restart the log started at a snapshot that was gone. The
    received file is checked before it is put in place."""
    fsm = StateMachine(str(tmp_path / "state.sqlite3"))
    fsm.open_fresh()
    for i in range(20):
        fsm.apply(create(f"r{i}", f"/f{i}"))
    own = str(tmp_path / "raft.snapshot")
    write_snapshot(fsm.pin(), b"ours", own)
    mine = Path(own).read_bytes()
    incoming = own + raft_module.INCOMING_SUFFIX
    write_snapshot(fsm.pin(), b"theirs", incoming)
    sent = Path(incoming).read_bytes()
    Path(incoming).write_bytes(sent[:5000] + sent[5000 + 4096 :])  # a cut transfer
    with pytest.raises(ValueError, match="checksum"):
        raft_module._durable_replace(incoming, own)
    assert Path(own).read_bytes() == mine  # ours stays, the damaged one is gone
    assert not os.path.exists(incoming)
    Path(incoming).write_bytes(sent)  # the leader sends it again, whole
    raft_module._durable_replace(incoming, own)
    assert Path(own).read_bytes() == sent
    fsm.close()


def test_a_crash_leftover_of_the_snapshot_rotation_does_not_stop_snapshots(
    tmp_path: Path,
) -> None:
    """From the Raft review: a kill -9 between the link and the rename of a retained snapshot
    left ``<snapshot>.1.retain.tmp``; every later rotation failed on it (FileExistsError), so
    no snapshot ever completed again and the log never compacted."""
    fsm = StateMachine(str(tmp_path / "state.sqlite3"))
    fsm.open_fresh()
    snapshots = raft_module._Snapshots(fsm, 3)
    final = str(tmp_path / "raft.snapshot")
    Path(final).write_bytes(b"current")
    Path(final + ".1").write_bytes(b"older")
    Path(final + ".1.retain.tmp").write_bytes(b"left by a crash")
    snapshots._rotate(final)
    assert Path(final + ".1").read_bytes() == b"current"
    assert Path(final + ".2").read_bytes() == b"older"
    assert not os.path.exists(final + ".1.retain.tmp")
    fsm.close()


def test_a_leader_cut_off_from_its_followers_stops_reading_before_another_is_elected(
    tmp_path: Path,
) -> None:
    """From the Raft review, which measured it: a leader whose Raft traffic is cut off but whose
    connections stay open kept answering reads (pysyncobj's quorum test) for 0.4-0.5 s after
    another node was elected and could take writes. Its read lease must end before any other
    node can lead."""
    nodes = _three_nodes(tmp_path, 0.4)  # the default election_min
    for node in nodes:
        node.start()
    try:
        deadline = time.monotonic() + 20
        leader = None
        while leader is None:
            assert time.monotonic() < deadline, "no leader"
            ready = [n for n in nodes if n.is_leader() and n.leader_ready() and n.lease_holds()]
            leader = ready[0] if len(ready) == 1 else None
            time.sleep(0.01)
        others = [n for n in nodes if n is not leader]
        transport = leader.sync._SyncObj__transport  # type: ignore[attr-defined]
        transport.send = lambda node, message: False  # its Raft traffic is cut, both ways
        transport._onMessageReceivedCallback = lambda node, message: None
        last_lease = None
        first_other = None
        deadline = time.monotonic() + 20
        while first_other is None:
            now = time.monotonic()
            assert now < deadline, "no new leader"
            if leader.lease_holds():
                last_lease = now
            if any(n.is_leader() for n in others):
                first_other = now
            time.sleep(0.001)
        assert last_lease is not None  # it held the lease for a moment after the cut
        assert last_lease < first_other, first_other - last_lease
        for _ in range(100):  # and never again while cut off
            assert not leader.lease_holds()
            time.sleep(0.005)
    finally:
        for node in nodes:
            node.stop()


def test_a_compaction_that_fails_after_its_rename_stops_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a review of the atomic compaction: once the new journal is renamed in place, a
    failure (the directory fsync, reopening the file) left the journal writing to the replaced
    file, so entries acknowledged afterwards were missing from the journal a restart reads. The
    node now stops at once; a restart reads the compacted journal."""
    path = tmp_path / "journal"
    journal = raft_module._create_journal(str(path))
    for i in range(1, 11):
        journal.add(b"c%d" % i, i, 1)
    journal.sync()

    class Stopped(Exception):
        """What stop_node raises here instead of ending the process."""

    def stop(message: str) -> None:
        raise Stopped(message)

    def failing_fsync_dir(where: str) -> None:
        raise OSError(5, "EIO")

    monkeypatch.setattr(raft_module, "stop_node", stop)
    monkeypatch.setattr(raft_module, "fsync_dir", failing_fsync_dir)
    with pytest.raises(Stopped, match="after its rename"):
        journal.deleteEntriesTo(5)
    monkeypatch.undo()
    journal._destroy()  # what the process exit does
    reopened = raft_module._create_journal(str(path))
    assert [e[1] for e in reopened] == list(range(6, 11))
    reopened._destroy()


async def test_a_broken_replica_hands_over_leadership_and_never_leads_again(
    tmp_path: Path,
) -> None:
    """A leader whose state machine broke (its database failed) answered every write with that
    failure while the other replicas applied fine, until someone restarted it. It now steps
    down, another node leads and takes writes, and the broken one never campaigns again (a
    leadership transfer to it is refused too), while it still keeps the log. The command that
    broke it was applied by the group: its proposer learns "outcome unknown" (and asks the new
    leader), never the broken replica's answer."""
    import uuid

    from callfs.cluster.raft import OutcomeUnknown

    nodes = _three_nodes(tmp_path, election=0.4)
    for node in nodes:
        node.start()
    try:
        broken = await _ready_leader(nodes)
        states: list[int] = []
        broken.on_state_changed = lambda _old, new: states.append(new)
        fatal = C.command(uuid.uuid4().hex, time.time(), "noop", [])
        apply = broken.fsm.apply

        def breaking(payload: bytes) -> bytes:
            out = apply(payload)
            if payload == fatal:  # as if its database failed applying this one
                broken.fsm.broken = "a command could not be applied: disk I/O error (test)"
                return C.failed(InternalError("metadata replica failed"))
            return out

        broken.fsm.apply = breaking  # type: ignore[method-assign]
        with pytest.raises(OutcomeUnknown):
            await broken.propose(fatal, 10.0)
        started = time.monotonic()
        others = [n for n in nodes if n is not broken]
        leader = await _ready_leader(others, within=10.0)
        handover = time.monotonic() - started
        assert not broken.is_leader()
        payload = C.command(uuid.uuid4().hex, time.time(), "noop", [])
        assert C.result(await leader.propose(payload, 10.0)) is None
        # the new leader hands leadership straight back to it if it can: refused
        sent: list[int] = []
        while 0 not in sent:  # FAIL_REASON.SUCCESS: asked (denied while it lags an entry)
            assert len(sent) < 100, sent
            leader.sync.transferLeadership(broken.settings.bind_addr, lambda _r, e: sent.append(e))
            await asyncio.sleep(0.05)
        await asyncio.sleep(3.0)  # several election timeouts
        assert states == [0], states  # it stepped down and never campaigned
        assert not broken.is_leader()
        assert broken.commit_index >= leader.commit_index - 1  # it still follows the log
        assert handover < 5.0, handover
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop)
