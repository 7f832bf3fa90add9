"""The node's Raft replica: the only module that imports pysyncobj (pinned to 0.3.17).

``RaftNode`` runs pysyncobj's tick thread over a ``StateMachine`` (``cluster/fsm.py``) and turns a
replicated call into an asyncio future. What pysyncobj does not do, done here:

- **Durability** (LIBRARIES.md §1.13): pysyncobj writes its log into an mmap it never msyncs and its
  term/vote without fsync. We replace its journal with one that msyncs on demand, and its transport
  with one that flushes the journal before ANY outgoing message. A follower then acknowledges only
  entries on its disk, and a leader's entry is acknowledged by a follower only after the leader's
  own flush: "acknowledged => fsync'd on a majority", with one flush per batch, not per entry.
  Term/vote and snapshot renames are fsync'd (file and directory). A one-node group sends nothing,
  so the journal is also flushed on every tick before callbacks can run... see ``_tick``.
- **Snapshots** are SQLite copies taken off the tick thread (a 1 M-entry copy takes over a second
  and would stop heartbeats), checksummed, and verified before a follower installs one.
- **Security**: the Raft port unpickles what arrives; it never runs without a password.

These are library internals: ``check_internals`` fails loudly at start when they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pysyncobj
import pysyncobj.journal as pjournal
import pysyncobj.serializer as pserializer
import pysyncobj.syncobj as psyncobj
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.transport import TCPTransport

from callfs.cluster.fsm import (
    COPY_SUFFIX,
    SNAPSHOT2_LEVEL,
    StateMachine,
    fsync_dir,
    publish,
    read_snapshot_base,
    stop_node,
)
from callfs.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)

PINNED_VERSION = "0.3.17"
#: The index of the no-op a new leader appends (private; see ``RaftNode.leader_ready``).
_NOOP_ATTR = "_SyncObj__noopIDx"
#: When the leader next sends append_entries, and its last log index (private; ``_tick``).
_NEXT_SEND = "_SyncObj__newAppendEntriesTime"
_LAST_INDEX = "_SyncObj__getCurrentLogIndex"
#: The leader's next log index to send to each follower (private; ``_DurableTransport``).
_NEXT_INDEX = "_SyncObj__raftNextIndex"
_TRANSPORT_ATTR = "_SyncObj__transport"
#: What a replica whose state machine broke uses to stand aside (``RaftNode._stand_aside``).
_ELECTION_DEADLINE = "_SyncObj__raftElectionDeadline"
_SET_STATE = "_SyncObj__setState"
_LEADER_ATTR = "_SyncObj__raftLeader"
#: How far a broken replica pushes its election deadline at every tick (seconds).
_NO_ELECTION = 3600.0
#: The part of ``raftMinTimeout`` a read lease lasts from the send of the appends a majority
#: answered (the rest: the followers' clocks may run a little faster than the leader's).
LEASE_FRACTION = 0.8

#: pysyncobj fail reasons that mean "this command was not applied": retry it anywhere.
NOT_APPLIED = frozenset(
    {
        FAIL_REASON.QUEUE_FULL,
        FAIL_REASON.MISSING_LEADER,
        FAIL_REASON.NOT_LEADER,
        FAIL_REASON.REQUEST_DENIED,
        FAIL_REASON.DISCARDED,
    }
)


class NotApplied(Exception):
    """The command was definitely not applied (no leader, not leader, discarded)."""


class OutcomeUnknown(Exception):
    """The command may or may not have been applied (timeout, leader change): retry it with the
    same request id."""


def check_internals() -> None:
    """The durability hooks patch pysyncobj internals; refuse to run on a version they were not
    verified against (tests call this too)."""
    version = getattr(pysyncobj, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("pysyncobj")
    if version != PINNED_VERSION:
        raise RuntimeError(
            f"pysyncobj {version} is installed; CallFS's durable Raft log is verified against "
            f"{PINNED_VERSION} only (pip install pysyncobj=={PINNED_VERSION})"
        )
    missing = [
        name
        for owner, name in (
            (psyncobj, "createJournal"),
            (pjournal, "FileJournal"),
            (pjournal, "MetaStorer"),
            (pserializer, "atomicReplace"),
        )
        if not hasattr(owner, name)
    ]
    for owner, name in (
        (pjournal.FileJournal, "flush"),
        (pjournal.FileJournal, "deleteEntriesTo"),
        (pjournal.FileJournal, "_FileJournal__getDefaultHeader"),
        (pjournal, "ResizableFile"),
        (pjournal.MetaStorer, "storeMeta"),
        (pjournal.MetaStorer, "getMeta"),
        (pjournal.MetaStorer, "getPath"),
        (TCPTransport, "_onMessageReceived"),
    ):
        if not hasattr(owner, name):
            missing.append(f"{owner.__name__}.{name}")
    if missing:
        raise RuntimeError(f"pysyncobj internals changed: {', '.join(missing)} missing")


# ---- durability hooks -----------------------------------------------------------------------
_JOURNALS: dict[str, _DurableJournal] = {}


class _DurableJournal(pjournal.FileJournal):  # type: ignore[misc]
    def __init__(self, journal_file: str) -> None:
        existed = os.path.exists(journal_file)
        super().__init__(journal_file)
        self._path = journal_file
        self.dirty = False
        self.syncs = 0
        self.sync_seconds = 0.0
        self._sync_lock = threading.Lock()
        try:
            self._fd()
        except AttributeError as exc:
            raise RuntimeError("pysyncobj internals changed: the journal's file is gone") from exc
        if not existed:
            self.flush()
            fsync_dir(journal_file)
        else:
            # entries a kill -9 left in the page cache only: on disk before this node
            # acknowledges anything (``send`` syncs only what this process wrote)
            os.fdatasync(self._fd())

    def add(self, command: bytes, idx: int, term: int) -> None:
        super().add(command, idx, term)
        self.dirty = True

    def clear(self) -> None:
        super().clear()
        self.dirty = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        super().deleteEntriesFrom(entryFrom)
        self.dirty = True

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Log compaction after a snapshot: the entries kept go to a new file, which is fsync'd
        and renamed over the journal. pysyncobj rewrites the file in place (clear, then add each
        kept entry again from the start), so a crash midway lost every kept entry not yet
        written again: entries this node had acknowledged (and counted in majorities)."""
        mine = self.__dict__  # pysyncobj's private fields (name-mangled; ``check_internals``)
        kept = mine["_FileJournal__journal"][entryTo:]
        tmp = self._path + ".compact"
        for leftover in (tmp, tmp + ".meta"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        fresh = pjournal.FileJournal(tmp)
        try:
            for entry in kept:
                fresh.add(*entry)
            os.fdatasync(fresh.__dict__["_FileJournal__journalFile"]._ResizableFile__f.fileno())
            offset = fresh.__dict__["_FileJournal__currentOffset"]
        finally:
            fresh._destroy()
        with self._sync_lock:
            os.replace(tmp, self._path)
            try:
                fsync_dir(self._path)
                mine["_FileJournal__journalFile"]._destroy()
                mine["_FileJournal__journalFile"] = pjournal.ResizableFile(
                    self._path, defaultContent=self._FileJournal__getDefaultHeader()
                )
                mine["_FileJournal__journal"] = list(kept)
                mine["_FileJournal__currentOffset"] = offset
            except BaseException as exc:
                # the journal in memory still writes to the file just replaced: entries
                # acknowledged from here on would not be in the journal a restart reads
                stop_node(f"raft log compaction failed after its rename: {exc!r}")

    def _fd(self) -> int:
        """The journal file's descriptor (ResizableFile reopens it when it grows: ask each time;
        only the tick thread, which also writes and grows the log, calls this)."""
        fd: int = self._FileJournal__journalFile._ResizableFile__f.fileno()
        return fd

    def sync(self) -> None:
        if not self.dirty:
            return
        with self._sync_lock:
            if not self.dirty:
                return
            started = time.perf_counter()
            self.dirty = False
            # fdatasync writes back the shared mapping's dirty pages as msync would, but releases
            # the GIL: mmap.flush() stalls every thread of the node (the event loop included)
            # for the ~0.1 ms of each sync.
            try:
                os.fdatasync(self._fd())
            except BaseException:
                self.dirty = True  # not on disk: the next send or commit tries again
                raise
            self.syncs += 1
            self.sync_seconds += time.perf_counter() - started


def _create_journal(journal_file: str | None = None) -> Any:
    if journal_file is None:
        return pjournal.MemoryJournal()
    journal = _DurableJournal(journal_file)
    _JOURNALS[os.path.abspath(journal_file)] = journal
    return journal


def _store_meta(self: Any, meta: Any) -> None:
    path = self.getPath()
    with open(path + ".tmp", "wb") as f:
        f.write(pickle.dumps(meta))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_dir(path)


def _load_meta(self: Any) -> Any:
    # pysyncobj's own version leaves the file open (a ResourceWarning per start).
    try:
        with open(self.getPath(), "rb") as f:
            return pickle.loads(f.read())  # noqa: S301 (pysyncobj's own local file)
    except (OSError, pickle.UnpicklingError, EOFError):
        return {}


#: Where pysyncobj receives a snapshot from the leader (``<snapshot>`` + this).
INCOMING_SUFFIX = ".1.tmp"


def _durable_replace(src: str, dst: str) -> None:
    """pysyncobj's ``atomicReplace``: its own snapshot, or one received from the leader, put in
    place durably. A received one is checked first: pysyncobj renames it over this node's own
    snapshot before it is read, so a damaged transfer destroyed the snapshot the log starts at,
    and after a restart the node could never apply again (it still won elections). Refused
    here, the transfer fails, our snapshot stays, and the leader sends it again."""
    if src == dst + INCOMING_SUFFIX:
        try:
            read_snapshot_base(src, lambda _chunk: None)
        except ValueError as exc:
            log.error("raft snapshot received from the leader refused: %s", exc)
            with contextlib.suppress(OSError):
                os.remove(src)
            raise
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    fsync_dir(dst)


#: Extra fields of our own on pysyncobj's messages (older nodes ignore them): the number of an
#: append, and in the answer to it, the number it answers.
_SEQ = "callfs_seq"
_ACK = "callfs_ack"
#: Appends remembered per follower until answered (a follower that stopped answering).
_SENT_KEPT = 4096


class _DurableTransport(TCPTransport):  # type: ignore[misc]
    """Flushes the journal before any message leaves: nothing is acknowledged, by a follower or
    on the leader's behalf, that is not on this node's disk.

    It also gives the leader a read lease (Raft thesis §6.4.1). Each append carries a number
    that its answer echoes, so the leader knows when it SENT the newest append each follower
    answered (``acked_at``). A follower ignores votes for ``raftMinTimeout`` after an append of
    the current term (thesis §4.2.3), and starts no election of its own before that either. So
    while a majority's answered appends were sent less than ``raftMinTimeout`` ago, no other
    leader can have been elected, and the leader's own state is current: it may answer reads
    without a round trip. pysyncobj's own test (answers heard within ``leaderFallbackTimeout``,
    by when they arrived) let a leader cut off from its followers answer reads for about half a
    second after another leader took writes (found by review)."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        journal_file = syncObj.conf.journalFile
        self._journal = _JOURNALS.get(os.path.abspath(journal_file)) if journal_file else None
        #: Acknowledgements that would have moved a next index back (``_onMessageReceived``).
        self.index_restores = 0
        self._election_min = float(syncObj.conf.raftMinTimeout)
        self._seq = 0
        self._sent_at: dict[Any, dict[int, float]] = {}
        #: Per follower: when the newest append it answered was sent (monotonic).
        self.acked_at: dict[Any, float] = {}
        self._answering: dict[Any, int] = {}
        #: When an append of the current term last arrived here (monotonic).
        self.heard_at = -1e9
        #: Votes asked while a leader was heard from, not answered.
        self.votes_ignored = 0
        #: Set on a replica whose state machine broke: it drops a leader's "start an election
        #: now" (a leadership transfer), as it must not lead (``RaftNode._stand_aside``).
        self.refuse_leadership = False
        super().__init__(syncObj, selfNode, otherNodes)

    def _lease_checks(self, node: Any, message: dict[str, Any]) -> bool:
        """Bookkeeping for the read lease; False for a message to drop (a vote asked while the
        current leader is heard from)."""
        kind = message.get("type")
        if kind == "append_entries":
            seq = message.get(_SEQ)
            if isinstance(seq, int):
                self._answering[node] = seq
            else:
                self._answering.pop(node, None)
            term = message.get("term")
            if isinstance(term, int) and term >= self._syncObj.raftCurrentTerm:
                self.heard_at = time.monotonic()
        elif kind == "timeout_now":
            return not self.refuse_leadership
        elif kind == "request_vote":
            if time.monotonic() - self.heard_at < self._election_min:
                self.votes_ignored += 1
                return False
        elif kind == "next_node_idx":
            seq = message.get(_ACK)
            sent = self._sent_at.get(node)
            if isinstance(seq, int) and sent is not None and seq in sent:
                at = sent[seq]
                for old in [k for k in sent if k <= seq]:
                    del sent[old]
                if at > self.acked_at.get(node, -1e9):
                    self.acked_at[node] = at
            elif _ACK not in message:
                # a node of an older version echoes nothing: when the answer came, as before
                self.acked_at[node] = time.monotonic()
        return True

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        """The read lease's bookkeeping (a vote asked while a leader is heard from is dropped);
        then: keep the leader's next index for a follower from going backwards on an
        acknowledgement. pysyncobj 0.3.17 sets it to the acknowledged index + 1 even when later
        entries are already on their way (prompt replication keeps several in flight), so the
        next message resends them with an older previous index, and the follower, which
        truncates its log after that index unconditionally, drops entries it had acknowledged
        (logged as CRITICAL "truncating already-applied log entries") and writes them again:
        wasted work, and for a moment a follower counted in a majority without the entries.
        Messages arrive in order on one connection, so entries below the index already sent
        reach the follower unless the connection drops, which the follower reports by failing
        the next append (``reset``), the path left untouched here."""
        if isinstance(message, dict) and not self._lease_checks(node, message):
            return
        next_index = getattr(self._syncObj, _NEXT_INDEX, None)  # checked in RaftNode.start
        before = next_index.get(node) if next_index is not None else None
        super()._onMessageReceived(node, message)
        if (
            next_index is not None
            and before is not None
            and isinstance(message, dict)
            and message.get("type") == "next_node_idx"
            and message.get("success")
            and not message.get("reset")
        ):
            after = next_index.get(node)
            if after is not None and after < before:
                next_index[node] = before
                self.index_restores += 1

    def send(self, node: Any, message: Any) -> Any:
        journal = self._journal
        if journal is not None and journal.dirty:
            journal.sync()
        if isinstance(message, dict):
            kind = message.get("type")
            if kind == "append_entries":
                self._seq += 1
                message = {**message, _SEQ: self._seq}
                sent = self._sent_at.setdefault(node, {})
                sent[self._seq] = time.monotonic()
                if len(sent) > _SENT_KEPT:
                    for old in list(sent)[: _SENT_KEPT // 2]:
                        del sent[old]
            elif kind == "next_node_idx" and node in self._answering:
                message = {**message, _ACK: self._answering[node]}
        return super().send(node, message)

    def lease_holds(self, others: list[Any], window: float) -> bool:
        """A majority (this node included) answered appends sent within ``window``."""
        need = (len(others) + 1) // 2  # others needed beside this node for a majority
        if need == 0:
            return True
        sent = sorted((self.acked_at.get(n, -1e9) for n in others), reverse=True)
        return time.monotonic() - sent[need - 1] < window


_installed = False


def _install_durability() -> None:
    global _installed
    if _installed:
        return
    check_internals()
    psyncobj.createJournal = _create_journal
    pjournal.MetaStorer.storeMeta = _store_meta
    pjournal.MetaStorer.getMeta = _load_meta
    pserializer.atomicReplace = _durable_replace
    _installed = True


# ---- the replicated state ----------------------------------------------------------------------
class _Replica(SyncObjConsumer):  # type: ignore[misc]
    def __init__(self, fsm: StateMachine) -> None:
        # Set before super().__init__(): pysyncobj leaves it out of its own (unused) snapshot.
        self._fsm = fsm
        super().__init__()

    @replicated  # type: ignore[untyped-decorator]
    def apply(self, payload: bytes) -> bytes:
        return self._fsm.apply(payload)


#: Nice value of the snapshot copy thread.
_SNAPSHOT_NICE = 10
#: pysyncobj's Serializer keeps the snapshot transfers in progress here (open files it reads).
_TRANSMISSIONS_ATTR = "_Serializer__transmissions"
_SERIALIZER_ATTR = "_SyncObj__serializer"
#: Delta records are appended while replaying them would take less than the last copy of the
#: database took, or less than this (seconds of ``apply``): a small database is not copied at
#: every snapshot either, and a restart replays at most about this much more.
_REPLAY_FLOOR = 0.5


class _Snapshots:
    """pysyncobj's serializer hooks. A snapshot is a version-2 file (``fsm.py``): a copy of the
    database followed by delta records. Taking one appends a record of the commands applied
    since the last (fsync'd, in a thread); the database is copied again (in a thread, the copy
    pinned by a read transaction while ``apply`` goes on) only when replaying the records would
    take longer than that copy took (or ``_REPLAY_FLOOR``), so snapshot work follows the write
    rate instead of the namespace's size, and a restart or a fresh node replays at most about
    one copy's worth. The result is reported through the checker; ``retain`` older copies are
    kept."""

    def __init__(self, fsm: StateMachine, retain: int) -> None:
        self._fsm = fsm
        self._retain = max(1, retain)
        self._state = SERIALIZER_STATE.NOT_SERIALIZING
        #: Snapshots taken; of them, those that copied the database (the others appended).
        self.taken = 0
        self.copies = 0
        self.failed = 0
        self.last_seconds = 0.0
        self.restore_error: str | None = None
        #: Whether pysyncobj is sending the snapshot file to a node (set by ``RaftNode``): a
        #: record must not be appended under a reader that would send half of it.
        self.transmitting: Callable[[], bool] = lambda: False
        #: The Raft addresses of the voters (set by ``RaftNode``; None: the member table's rows).
        self.voters: Callable[[], list[str] | None] = lambda: None
        #: The node's durable log (set by ``RaftNode``).
        self.journal: Callable[[], _DurableJournal | None] = lambda: None
        self._copy_path = ""
        # What the snapshot file on disk holds (tick thread): its version, where the next record
        # goes, the seconds its records take to replay and its database took to copy. ``_file``
        # is bumped whenever another file replaces it (a snapshot installed from the leader).
        self._file = 0
        self._version = 0
        self._end = 0
        self._replay = 0.0
        self._copy = 0.0
        #: Run by ``check`` on success, on the tick thread (the file it describes, its update).
        self._done: tuple[int, Callable[[], None]] | None = None

    def serialize(self, tmp_file: str, raft_data: Any) -> None:
        # Tick thread. pysyncobj renames tmp_file over the snapshot as soon as this returns: none
        # must exist then (a leftover of an older build's crash would replace a good snapshot).
        # The rename fails and is ignored; the work is put in place by ``check``.
        final = tmp_file[: -len(".tmp")]
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_file)
        if self._fsm.broken:
            # A replica that failed to apply an entry holds a state the others do not: saved as a
            # snapshot, a restart would take it for good (and a leader would send it).
            log.warning("raft snapshot refused: %s", self._fsm.broken)
            self.failed += 1
            self._state = SERIALIZER_STATE.FAILED
            return
        started = time.perf_counter()
        data = pickle.dumps(raft_data)
        since = self._fsm.since
        count = len(since)
        cost = sum(seconds for _payload, seconds in since)
        fd = self._open_for_append(final, cost)
        work: Callable[[], Callable[[], None]]
        if fd is not None:
            payloads = [payload for payload, _seconds in since]
            offset = self._end

            def work() -> Callable[[], None]:
                try:
                    end = StateMachine.append_delta(fd, offset, data, payloads)
                finally:
                    os.close(fd)

                def appended() -> None:  # the record is on disk: only the bookkeeping
                    del self._fsm.since[:count]
                    self._end = end
                    self._replay += cost
                    self.taken += 1

                return appended
        else:
            version = 2 if self._level() >= SNAPSHOT2_LEVEL else 1
            rconn = self._fsm.pin()
            out = self._copy_path = final + COPY_SUFFIX

            def work() -> Callable[[], None]:
                end = StateMachine.copy_snapshot(rconn, data, out, version)
                seconds = time.perf_counter() - started

                def copied() -> None:
                    # Put in place here, on the tick thread: pysyncobj installs a snapshot from
                    # the leader on this thread too, and a copy finishing after that must not
                    # replace it (``check`` drops a copy once another file came).
                    self._rotate(final)
                    publish(out, final)
                    del self._fsm.since[:count]
                    self._version, self._end, self._replay, self._copy = version, end, 0.0, seconds
                    self.taken += 1
                    self.copies += 1

                return copied

        self._state = SERIALIZER_STATE.SERIALIZING
        file = self._file

        def run() -> None:
            # Background work: below the threads that serve requests when the cores are busy
            # (Linux sets a thread's nice value by its thread id).
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _SNAPSHOT_NICE)
            try:
                after = work()
            except Exception:
                log.exception("raft snapshot failed")
                self.failed += 1
                self._state = SERIALIZER_STATE.FAILED
                return
            self.last_seconds = time.perf_counter() - started
            self._done = (file, after)
            self._state = SERIALIZER_STATE.SUCCESS

        threading.Thread(target=run, name="callfs-raft-snapshot", daemon=True).start()

    def _open_for_append(self, final: str, cost: float) -> int | None:
        """The snapshot file, open for a delta record, when one should be appended rather than
        the database copied again: a version-2 file this node knows the end of, nobody reading
        it for a transfer, every member able to read it, and its records plus this one quicker
        to replay than the copy was."""
        if self._version != 2 or self._end <= 0 or self.transmitting():
            return None
        if self._replay + cost > max(self._copy, _REPLAY_FLOOR):
            return None
        if self._level() < SNAPSHOT2_LEVEL:
            return None
        try:
            return os.open(final, os.O_WRONLY)
        except OSError:
            return None

    def _level(self) -> int:
        return self._fsm.level(self.voters())

    def _rotate(self, final: str) -> None:
        for i in range(self._retain - 1, 0, -1):
            older = final if i == 1 else f"{final}.{i - 1}"
            if os.path.exists(older):
                # not ``.<i>.tmp``: ``.1.tmp`` is where pysyncobj receives a snapshot
                tmp = f"{final}.{i}.retain.tmp"
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)  # a crash's leftover: os.link would fail on it for good
                os.link(older, tmp)
                os.replace(tmp, f"{final}.{i}")

    def check(self) -> int:
        """Tick thread: the state of the snapshot under way; a finished one takes effect here."""
        state = self._state
        if state in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
            done, self._done = self._done, None
            self._state = SERIALIZER_STATE.NOT_SERIALIZING
            if state == SERIALIZER_STATE.SUCCESS and done is not None:
                if done[0] != self._file:
                    # a snapshot from the leader was installed meanwhile: it is newer, and this
                    # work describes (or would replace) a file that is gone
                    with contextlib.suppress(OSError):
                        os.remove(self._copy_path)
                    return int(SERIALIZER_STATE.FAILED)
                try:
                    done[1]()
                except OSError:
                    log.exception("raft snapshot could not be put in place")
                    self.failed += 1
                    return int(SERIALIZER_STATE.FAILED)
        return int(state)

    def deserialize(self, file_name: str) -> Any:
        """Tick thread: install a snapshot (our own at start, or one the leader sent)."""
        self._file += 1
        self._version = 0
        try:
            restored = self._fsm.restore(file_name)
        except Exception as exc:
            # pysyncobj would only log this and report success to the leader: make it loud, drop
            # the bad file (a restart then fetches a fresh snapshot) and stop serving reads.
            self.restore_error = str(exc)
            self._fsm.broken = f"snapshot could not be installed: {exc}"
            log.critical("raft snapshot %s rejected: %s; restart this node", file_name, exc)
            with contextlib.suppress(OSError):
                os.remove(file_name)
            raise
        self.restore_error = None
        self._version, self._end = restored.version, restored.end
        self._replay, self._copy = restored.replay_seconds, restored.copy_seconds
        data = pickle.loads(restored.raft_data)  # noqa: S301 (our own snapshot, checksummed; see docs/security.md)
        self._align_log(data)
        return data

    def _align_log(self, data: Any) -> None:
        """Start the log at the snapshot when it holds the snapshot's last two entries.
        pysyncobj keeps a log only if its first two entries are the snapshot's and clears it
        otherwise; after a crash between a snapshot and the log compaction that follows it, the
        log still starts earlier, and clearing it would drop entries after the snapshot that this
        node had acknowledged (on disk, counted towards their majority)."""
        journal = self.journal()
        if journal is None:
            return
        try:
            last, before = data[0], data[1]
            n = len(journal)
            at = before[1] - journal[0][1] if n else -1
            if 0 < at < n - 1 and journal[at] == before and journal[at + 1] == last:
                journal.deleteEntriesTo(at)
                journal.sync()
        except (TypeError, IndexError, KeyError, AttributeError):
            return  # not the shape pysyncobj writes: leave the log to pysyncobj


@dataclass(frozen=True, slots=True)
class RaftSettings:
    node_id: str
    bind_addr: str
    #: Raft addresses of the other voters at first start (the log's membership wins later).
    peers: tuple[str, ...]
    data_dir: str
    password: str
    snapshot_interval: float = 60.0
    snapshot_threshold: int = 256
    retain_snapshots: int = 2
    #: Neither sets the commit latency any more: a proposal wakes the tick thread and new entries
    #: and commit indexes go out at once (``_tick``); incoming messages wake it too. The tick
    #: bounds timer precision (elections, retries), the heartbeat keeps followers from electing
    #: (8 heartbeats per minimum election timeout). 5 ms / 10 ms cost each idle node 4.6-8 % of
    #: a core; 20 ms / 50 ms 1.7-2.1 %, with creates and reads as fast (bench/README.md).
    tick: float = 0.02
    heartbeat: float = 0.05
    election_min: float = 0.4
    election_max: float = 1.0
    leader_fallback: float = 1.0


class RaftNode:
    def __init__(self, settings: RaftSettings) -> None:
        if not settings.password:
            raise ConfigError("raft needs a secret (raft.secret or auth.internal_proxy_secret)")
        self.settings = settings
        self.fsm = StateMachine(os.path.join(settings.data_dir, "state.sqlite3"))
        self._snapshots = _Snapshots(self.fsm, settings.retain_snapshots)
        self._sync: SyncObj | None = None
        self._replica: _Replica | None = None
        self._journal: _DurableJournal | None = None
        self._membership = asyncio.Lock()
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._woken = False
        self._wake_lock = threading.Lock()
        self._sent: tuple[int, int] = (0, 0)
        self._serializer: Any = None
        #: Snapshot transfers this node dropped (``_drop_stale_transmissions``).
        self.transmissions_dropped = 0
        self.on_state_changed: Callable[[int, int], None] | None = None
        #: Set by ``hand_over``: the tick thread asks a follower to take over while this leads.
        self._handing_over = False

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Build the SyncObj. Must run on a thread that lives as long as the node (the main
        thread): pysyncobj's tick thread stops when its creator dies."""
        _install_durability()
        s = self.settings
        os.makedirs(s.data_dir, exist_ok=True)
        self.fsm.open_fresh()
        self._replica = _Replica(self.fsm)
        journal = os.path.join(s.data_dir, "raft.journal")
        # Before SyncObj(): its tick thread may load the snapshot before the constructor returns.
        self._snapshots.journal = lambda: _JOURNALS.get(os.path.abspath(journal))
        conf = SyncObjConf(
            password=s.password,
            autoTick=True,
            autoTickPeriod=s.tick,
            appendEntriesUseBatch=True,
            appendEntriesPeriod=s.heartbeat,
            raftMinTimeout=s.election_min,
            raftMaxTimeout=s.election_max,
            leaderFallbackTimeout=s.leader_fallback,
            # A snapshot transfer sends nothing back until its last chunk: a short timeout cuts it
            # and pysyncobj resumes it with a gap (LIBRARIES.md §1.13 trap 3).
            connectionTimeout=120.0,
            connectionRetryTime=0.5,
            commandsWaitLeader=False,
            journalFile=journal,
            fullDumpFile=os.path.join(s.data_dir, "raft.snapshot"),
            logCompactionMinEntries=s.snapshot_threshold,
            logCompactionMinTime=s.snapshot_interval,
            dynamicMembershipChange=True,
            maxBindRetries=3,
            serializer=self._snapshots.serialize,
            deserializer=self._snapshots.deserialize,
            serializeChecker=self._snapshots.check,
            onStateChanged=self._state_changed,
        )
        self._sync = SyncObj(
            s.bind_addr,
            list(s.peers),
            conf,
            consumers=[self._replica],
            transportClass=_DurableTransport,
        )
        for attr in (
            _NOOP_ATTR,
            _NEXT_SEND,
            _LAST_INDEX,
            _NEXT_INDEX,
            _TRANSPORT_ATTR,
            _ELECTION_DEADLINE,
            _SET_STATE,
            _LEADER_ATTR,
            "transferLeadership",
            "_poller",
        ):
            if not hasattr(self._sync, attr):
                raise RuntimeError(f"pysyncobj internals changed: SyncObj.{attr} missing")
        serializer = getattr(self._sync, _SERIALIZER_ATTR, None)
        if not isinstance(getattr(serializer, _TRANSMISSIONS_ATTR, None), dict):
            raise RuntimeError("pysyncobj internals changed: Serializer transmissions missing")
        self._snapshots.transmitting = lambda: bool(getattr(serializer, _TRANSMISSIONS_ATTR))
        self._serializer = serializer
        self._snapshots.voters = self.members
        self._journal = _JOURNALS.get(os.path.abspath(journal))
        self._sync.addOnTickCallback(self._tick)
        self._sync.waitBinded()

    def _tick(self) -> None:
        """Tick thread, after new commands joined the log and before the next poll."""
        # A group with no other voter sends no message that would flush the journal.
        journal = self._journal
        if journal is not None and journal.dirty:
            journal.sync()
        sync = self._sync
        if sync is None:
            return
        if self._wake_r is None:
            self._subscribe_wake(sync)
        transmissions = getattr(self._serializer, _TRANSMISSIONS_ATTR, None)
        if transmissions:
            self._drop_stale_transmissions(sync, transmissions)
        if self.fsm.broken is not None:
            self._stand_aside(sync)
            return
        transport = getattr(sync, _TRANSPORT_ATTR, None)
        if isinstance(transport, _DurableTransport) and transport.refuse_leadership:
            transport.refuse_leadership = False  # repaired (a snapshot installed): may lead again
        if self._handing_over and sync._isLeader():
            sync.transferLeadership()  # denied while no follower has every entry: asked again
        # Prompt replication: pysyncobj sends new entries (and a new commit index) only at the
        # next heartbeat. When either changed, send at the next tick instead, and wake the poller
        # so that tick comes now: a commit then costs a round trip, not a heartbeat period.
        if sync._isLeader():
            last = int(getattr(sync, _LAST_INDEX)())
            commit = int(sync.raftCommitIndex)
            if (last, commit) != self._sent:
                self._sent = (last, commit)
                setattr(sync, _NEXT_SEND, 0.0)
                self._wake()

    def _stand_aside(self, sync: SyncObj) -> None:
        """Tick thread, on a replica whose state machine broke (``StateMachine.broken``). As
        leader it answered every write with its own failure while the others applied fine,
        until someone restarted it. It now hands leadership to the most caught-up follower
        (Raft's TimeoutNow, best effort: the followers elect one anyway once its heartbeats
        stop), steps down, and never starts an election: it still votes and keeps its log (its
        journal is sound), so the group keeps its majority, and its API forwards writes to the
        new leader."""
        setattr(sync, _ELECTION_DEADLINE, time.monotonic() + _NO_ELECTION)
        transport = getattr(sync, _TRANSPORT_ATTR)
        if isinstance(transport, _DurableTransport):
            transport.refuse_leadership = True
        if not sync._isLeader():
            return
        sync.transferLeadership()
        getattr(sync, _SET_STATE)(psyncobj._RAFT_STATE.FOLLOWER)
        setattr(sync, _LEADER_ATTR, None)
        # Its proposals still in flight: discarded ones time out, applied ones are answered here
        # by the broken replica; ``propose`` turns both into "outcome unknown", and the proposer
        # asks the new leader with the same request id.
        log.error("raft: this replica is broken (%s); it stepped down as leader", self.fsm.broken)

    def _drop_stale_transmissions(self, sync: SyncObj, transmissions: dict[Any, Any]) -> None:
        """Tick thread. pysyncobj ends a snapshot transfer when its last chunk goes out, or from
        the leader's send loop when the receiver is a member that disconnected. A transfer under
        way when this node stopped leading, or to a node since removed, is never ended: its
        snapshot file stays open (its disk space with it) and ``_Snapshots`` keeps seeing a
        transfer, so every later snapshot copies the whole database instead of appending a
        record (at 1 M entries, a 450 MB copy per snapshot). Drop those."""
        nodes = list(transmissions)  # one C-level copy: no Python code runs while it iterates
        if sync._isLeader():
            members = sync.otherNodes | sync.readonlyNodes
            stale = [node for node in nodes if node not in members]
        else:
            stale = nodes
        for node in stale:
            transfer = transmissions.pop(node, None)
            fileobj = transfer.get("file") if isinstance(transfer, dict) else None
            if fileobj is not None:
                with contextlib.suppress(OSError):
                    fileobj.close()
            self.transmissions_dropped += 1
            log.info("raft: dropped a snapshot transfer to %s that no leader will finish", node)

    def _subscribe_wake(self, sync: SyncObj) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        sync._poller.subscribe(r, self._drain, POLL_EVENT_TYPE.READ)
        self._wake_r, self._wake_w = r, w

    def _drain(self, descr: int, _event: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(descr, 4096):
                pass
        # After reading, not before: a byte written once the flag was down could be read here,
        # leaving the flag up over an empty pipe, and no wake would ever write again (prompt
        # replication silently off: every new entry waited for the next tick). A wake that
        # finds the flag still up now is covered by the tick that follows this poll.
        self._woken = False

    def _wake(self) -> None:
        """Make the tick thread's poll return now (any thread). One byte until the tick thread
        drains it: a pipe write per commit cost the leader ~3% of its time."""
        if self._woken or self._wake_w is None:
            return
        with self._wake_lock:  # stop() closes the pipe under it: never a write to a reused fd
            w = self._wake_w
            if w is not None:
                self._woken = True
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(w, b"!")

    def _state_changed(self, old: int, new: int) -> None:
        if self.on_state_changed is not None:
            self.on_state_changed(old, new)

    def stop(self) -> None:
        sync = self._sync
        self._sync = None
        if sync is not None:
            sync.destroy_synchronous()
        with self._wake_lock:
            fds = (self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = None
            for fd in fds:
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self.fsm.close()

    @property
    def sync(self) -> SyncObj:
        if self._sync is None:
            raise NotApplied("raft is not running")
        return self._sync

    # ---- proposing ---------------------------------------------------------------------------
    async def propose(self, payload: bytes, wait: float) -> bytes:
        """Append ``payload`` through the leader and return ``apply``'s result once committed
        and applied here. ``NotApplied`` / ``OutcomeUnknown`` otherwise."""
        replica = self._replica
        if replica is None or self._sync is None:
            raise NotApplied("raft is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, int]] = loop.create_future()

        def settle(res: Any, err: int) -> None:
            if not future.done():
                future.set_result((res, err))

        def callback(res: Any, err: int) -> None:  # tick thread
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(settle, res, err)

        replica.apply(payload, callback=callback)
        self._wake()  # the tick thread picks the command up now, not at its next poll timeout
        try:
            res, err = await asyncio.wait_for(future, wait)
        except TimeoutError:
            raise OutcomeUnknown("commit timed out") from None
        if err == FAIL_REASON.SUCCESS:
            if self.fsm.broken is not None:
                # Applied by the group, but answered by this replica's broken state machine (a
                # leader that broke steps down with such commands still in flight): the proposer
                # asks the new leader, whose memory of the request id holds the real answer.
                raise OutcomeUnknown("this replica is broken: the result is asked of the leader")
            return bytes(res)
        if err in NOT_APPLIED:
            raise NotApplied(f"raft refused the command ({err})")
        raise OutcomeUnknown(f"raft outcome unknown ({err})")

    # ---- state -------------------------------------------------------------------------------
    def is_leader(self) -> bool:
        return self._sync is not None and bool(self._sync._isLeader())

    def leader_addr(self) -> str | None:
        if self._sync is None:
            return None
        leader = self._sync._getLeader()
        return None if leader is None else str(leader.address)

    def leader_ready(self) -> bool:
        """This leader has applied the no-op of its own term: its commit index now covers every
        entry any earlier leader acknowledged (Raft §8), so it may answer reads."""
        sync = self._sync
        if sync is None:
            return False
        noop = getattr(sync, _NOOP_ATTR, None)
        return noop is not None and int(sync.raftLastApplied) >= int(noop)

    def has_quorum(self) -> bool:
        return self._sync is not None and bool(self._sync.hasQuorum)

    def lease_holds(self) -> bool:
        """This node leads, and no other node can have been elected since a majority last
        answered it (``_DurableTransport``): its state is current, reads may be answered."""
        sync = self._sync
        if sync is None or not sync._isLeader():
            return False
        transport = getattr(sync, _TRANSPORT_ATTR, None)
        if not isinstance(transport, _DurableTransport):
            return False
        for _ in range(5):  # the tick thread may change the set meanwhile
            try:
                others = list(sync.otherNodes)
                break
            except RuntimeError:
                time.sleep(0.001)
        else:
            return False
        return transport.lease_holds(others, self.settings.election_min * LEASE_FRACTION)

    def answering(self) -> set[str]:
        """Leader: the Raft addresses of the voters connected now that answered an append sent
        within the longest election timeout, this node included."""
        sync = self.sync
        transport = getattr(sync, _TRANSPORT_ATTR, None)
        acked = transport.acked_at if isinstance(transport, _DurableTransport) else {}
        since = time.monotonic() - self.settings.election_max
        for _ in range(5):  # the tick thread may change the sets meanwhile
            try:
                others = list(sync.otherNodes)
                return {str(sync.selfNode.address)} | {
                    str(n.address)
                    for n in others
                    if sync.isNodeConnected(n) and acked.get(n, -1e9) > since
                }
            except RuntimeError:
                time.sleep(0.001)
        return {str(sync.selfNode.address)}

    @property
    def commit_index(self) -> int:
        return int(self.sync.raftCommitIndex)

    @property
    def last_applied(self) -> int:
        return int(self.sync.raftLastApplied)

    def status(self) -> dict[str, Any]:
        for _ in range(5):  # getStatus iterates sets the tick thread may change
            try:
                raw = dict(self.sync.getStatus())
                break
            except RuntimeError:
                time.sleep(0.001)
        else:
            raw = {}
        journal = self._journal
        return {
            "state": {0: "follower", 1: "candidate", 2: "leader"}.get(raw.get("state", -1), "?"),
            "leader": None if raw.get("leader") is None else str(raw["leader"]),
            "term": raw.get("raft_term"),
            "commit_index": raw.get("commit_idx"),
            "applied_index": raw.get("last_applied"),
            "leader_commit_index": raw.get("leader_commit_idx"),
            "log_len": raw.get("log_len"),
            "has_quorum": raw.get("has_quorum"),
            "members": self.members(),
            "connected": sorted(
                k.removeprefix("partner_node_status_server_")
                for k, v in raw.items()
                if k.startswith("partner_node_status_server_") and v == 2
            ),
            "snapshots_taken": self._snapshots.taken,
            "snapshots_failed": self._snapshots.failed,
            "snapshot_copies": self._snapshots.copies,
            "snapshot_seconds": self._snapshots.last_seconds,
            "snapshot_transfers_dropped": self.transmissions_dropped,
            "journal_syncs": journal.syncs if journal else 0,
            "broken": self.fsm.broken,
        }

    def members(self) -> list[str]:
        """Raft addresses of every voter (this node included)."""
        sync = self.sync
        for _ in range(5):
            try:
                others = [str(n.address) for n in list(sync.otherNodes)]
                return sorted({str(sync.selfNode.address), *others})
            except RuntimeError:
                time.sleep(0.001)
        return [str(sync.selfNode.address)]

    # ---- membership (one change at a time: pysyncobj does not guard it) ---------------------
    async def _change(self, start: Callable[..., None], addr: str, wait: float) -> None:
        async with self._membership:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[int] = loop.create_future()

            def settle(err: int) -> None:
                if not future.done():
                    future.set_result(err)

            def callback(_res: Any, err: int) -> None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(settle, err)

            start(addr, callback=callback)
            try:
                err = await asyncio.wait_for(future, wait)
            except TimeoutError:
                raise OutcomeUnknown(
                    "membership change not confirmed within raft.apply_timeout: it may still"
                    " take effect (see callfs cluster status)"
                ) from None
            if err != FAIL_REASON.SUCCESS:
                raise NotApplied(f"membership change refused ({err})")

    async def add_voter(self, addr: str, wait: float) -> None:
        await self._change(self.sync.addNodeToCluster, addr, wait)

    async def remove_voter(self, addr: str, wait: float) -> None:
        await self._change(self.sync.removeNodeFromCluster, addr, wait)

    async def hand_over(self, wait: float) -> str:
        """Leader: have the most caught-up follower take over (Raft's TimeoutNow, asked at each
        tick until another node leads); the new leader's Raft address. ``Unavailable`` if none
        leads within ``wait`` (this node may lead again then)."""
        deadline = time.monotonic() + wait
        self._handing_over = True
        self._wake()
        try:
            while True:
                leader = self.leader_addr()
                if leader is not None and leader != self.settings.bind_addr:
                    return leader
                if time.monotonic() > deadline:
                    raise Unavailable("no other node took over the leadership in time")
                await asyncio.sleep(0.05)
        finally:
            self._handing_over = False

    def force_snapshot(self) -> None:
        self.sync.forceLogCompaction()
