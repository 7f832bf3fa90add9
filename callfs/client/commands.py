"""``callfs put/get/ls/stat/rm/mv/mkdir/share/sync``: the client commands (docs/client.md).

Each command parses, builds a ``Client`` from the connection settings and calls it. Settings come
from ``--url``/``--api-key``, else ``CALLFS_URL``/``CALLFS_API_KEY``, else a profile of
``~/.config/callfs/client.yaml`` (``--profile``/``CALLFS_PROFILE``, else the file's
``default_profile``, else the profile named ``default``). A ``ClientError`` prints the server's
code and message (and, with ``--json``, an ``{"error": ...}`` object on stdout) and exits 1.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from callfs.client.errors import ClientError, TransportError
from callfs.client.model import (
    REMOTE_PREFIX,
    TUS_CHUNK,
    Entry,
    normalize,
    read_state,
    write_state,
)

if TYPE_CHECKING:
    # The transport (urllib3, and with it ssl and http.client) is imported by the command that
    # connects (``Ctx.client``), not by ``callfs --help`` or a usage error.
    from callfs.client.sync import Client, Progress, ResumeStore

CONTEXT = {"help_option_names": ["-h", "--help"]}
F = TypeVar("F", bound=Callable[..., Any])

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


# ---- settings ------------------------------------------------------------------------------
def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "callfs"


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "callfs"


def profile_file() -> Path:
    return config_dir() / "client.yaml"


@dataclass(frozen=True, slots=True)
class Settings:
    url: str
    api_key: str
    insecure: bool = False


def _profiles() -> tuple[dict[str, Any], str | None]:
    path = profile_file()
    if not path.exists():
        return {}, None
    import yaml

    try:
        text = path.read_text()
        if path.stat().st_mode & 0o077:
            click.echo(
                f"warning: {path} holds API keys and others may read it: chmod 600 {path}",
                err=True,
            )
        doc = yaml.safe_load(text) or {}
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, ValueError) as exc:
        # never PyYAML's own text: it quotes the line, and the line may be an API key
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise click.ClickException(f"cannot read {path}: not valid YAML{where}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("profiles", {}), dict):
        raise click.ClickException(f"{path}: expected a mapping with a 'profiles' mapping")
    default = doc.get("default_profile")
    return doc.get("profiles") or {}, str(default) if default else None


def resolve_settings(
    url: str | None, api_key: str | None, profile: str | None, insecure: bool
) -> Settings:
    """Flags, then environment, then the profile file (see the module docstring)."""
    url = url or os.environ.get("CALLFS_URL") or None
    api_key = api_key or os.environ.get("CALLFS_API_KEY") or None
    chosen = profile or os.environ.get("CALLFS_PROFILE") or None
    if url is None or api_key is None or chosen:
        profiles, default = _profiles()
        name = chosen or default or "default"
        entry = profiles.get(name)
        if entry is None and (chosen or default):
            raise click.ClickException(f"no profile {name!r} in {profile_file()}")
        if isinstance(entry, dict):
            url = url or (str(entry["url"]) if entry.get("url") else None)
            api_key = api_key or (str(entry["api_key"]) if entry.get("api_key") else None)
            flag = entry.get("insecure", False)
            if not isinstance(flag, bool):  # a quoted "false" was truthy: TLS checks went off
                raise click.ClickException(
                    f"profile {name!r} in {profile_file()}: insecure must be true or false"
                )
            insecure = insecure or flag
    if not url:
        raise click.ClickException(
            f"no server URL: use --url, set CALLFS_URL, or add a profile to {profile_file()}"
        )
    return Settings(url=url, api_key=api_key or "", insecure=insecure)


@dataclass
class Ctx:
    settings: Settings
    as_json: bool
    quiet: bool

    def client(self, connections: int = 16) -> Client:
        from callfs.client.sync import Client

        s = self.settings
        return Client(
            s.url,
            s.api_key or None,
            verify=not s.insecure,
            max_connections=connections,
        )

    def emit(self, doc: Any, text: str | None) -> None:
        if self.as_json:
            click.echo(json.dumps(doc))
        elif text is not None:
            click.echo(text)

    def show_progress(self) -> bool:
        return not self.as_json and not self.quiet and sys.stderr.isatty()


def client_command(name: str) -> Callable[[F], click.Command]:
    """A client command with the shared connection/output options; ``ClientError`` becomes the
    server's code and message on stderr (and JSON on stdout with ``--json``), exit 1."""

    def wrap(fn: F) -> click.Command:
        @functools.wraps(fn)
        def run(
            url: str | None,
            api_key: str | None,
            profile: str | None,
            insecure: bool,
            as_json: bool,
            quiet: bool,
            **kw: Any,
        ) -> Any:
            ctx = Ctx(resolve_settings(url, api_key, profile, insecure), as_json, quiet)
            try:
                return fn(ctx, **kw)
            except ClientError as exc:
                if as_json:
                    click.echo(json.dumps({"error": exc.as_dict()}))
                raise click.ClickException(str(exc)) from exc
            except OSError as exc:  # a local file or directory: one line, not a traceback
                where = f"{exc.filename}: " if exc.filename else ""
                message = f"{where}{exc.strerror or exc}"
                if as_json:
                    click.echo(
                        json.dumps(
                            {"error": {"status": 0, "code": "LOCAL_ERROR", "message": message}}
                        )
                    )
                raise click.ClickException(message) from exc

        options = [
            click.option("--url", default=None, help="server base URL [env CALLFS_URL]"),
            click.option("--api-key", default=None, help="API key [env CALLFS_API_KEY]"),
            click.option("--profile", default=None, help="profile of ~/.config/callfs/client.yaml"),
            click.option("--insecure", is_flag=True, help="do not verify the TLS certificate"),
            click.option("--json", "as_json", is_flag=True, help="print JSON for scripts"),
            click.option("--quiet", "-q", is_flag=True, help="no progress bar"),
        ]
        for option in reversed(options):
            run = option(run)
        return click.command(name, context_settings=CONTEXT)(run)

    return wrap


# ---- progress ------------------------------------------------------------------------------
class Bar:
    """A rich progress bar on stderr, or nothing (not a TTY, ``--json``, ``--quiet``, no rich).
    ``advance`` is thread-safe (rich locks)."""

    def __init__(self, enabled: bool, description: str, total: int | None) -> None:
        self._progress: Any = None
        self._task: Any = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
        except ImportError:  # the client extra is not installed: no bar
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> Bar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    @property
    def callback(self) -> Progress | None:
        return self.advance if self._progress is not None else None


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop returns


def resume_store() -> ResumeStore:
    from callfs.client.sync import ResumeStore

    return ResumeStore(state_dir() / "uploads.json")


def _into_directory(client: Client, name_from: str, remote: str) -> str:
    """``REMOTE`` itself, or ``REMOTE/<last element of name_from>`` when it ends in ``/`` or
    is an existing directory (as cp(1) and mv(1) read their target)."""
    name = normalize(name_from).rsplit("/", 1)[-1]
    if remote.endswith("/"):
        return normalize(remote + name)
    try:
        if client.stat(remote).is_dir:
            return normalize(remote + "/" + name)
    except ClientError as exc:
        if exc.status != 404:
            raise
    return normalize(remote)


# ---- commands ------------------------------------------------------------------------------
@client_command("put")
@click.argument("local", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("remote")
@click.option(
    "--resumable/--no-resumable",
    default=None,
    help="force tus (resumable) or plain PUT; default: tus for files of 16 MiB or more "
    "when the server offers it",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(1, 4096),
    default=TUS_CHUNK >> 20,
    show_default=True,
    help="MiB per resumable chunk",
)
def put(ctx: Ctx, local: str, remote: str, resumable: bool | None, chunk_size: int) -> None:
    """Upload LOCAL (a file, or - for stdin) to REMOTE (a path; a directory or a trailing /
    keeps LOCAL's name). Large files go through tus: after Ctrl-C or a broken connection, run
    the same command again to continue where it stopped."""
    with ctx.client() as client:
        if local == "-":
            target = normalize(remote)
            stdin = sys.stdin.buffer
            result = client.upload(target, iter(lambda: stdin.read(1 << 20), b""))
            ctx.emit(result.as_dict(), f"uploaded stdin to {target} ({human(result.size)})")
            return
        path = Path(local)
        if not path.is_file():
            raise click.ClickException(f"{local}: not a file (use `callfs sync` for a tree)")
        target = _into_directory(client, path.name, remote)
        size = path.stat().st_size
        bar = Bar(ctx.show_progress(), path.name, size)
        try:
            with bar:
                result = client.upload_file(
                    path,
                    target,
                    resumable=resumable,
                    chunk_size=chunk_size << 20,
                    progress=bar.callback,
                    resume_store=resume_store(),
                )
        except KeyboardInterrupt:
            click.echo("interrupted: run the same command again to resume the upload", err=True)
            sys.exit(EXIT_INTERRUPTED)
        note = f" (resumed at {human(result.resumed_from)})" if result.resumed_from else ""
        ctx.emit(result.as_dict(), f"uploaded {local} to {target} ({human(size)}){note}")


@client_command("get")
@click.argument("remote")
@click.argument("local", required=False, type=click.Path(allow_dash=True))
def get(ctx: Ctx, remote: str, local: str | None) -> None:
    """Download REMOTE to LOCAL (default: its name in the current directory; - for stdout; an
    existing directory keeps REMOTE's name). Streams; a partial file never replaces LOCAL."""
    with ctx.client() as client:
        if local == "-":
            with client.open(remote) as f:
                out = sys.stdout.buffer
                for chunk in f.iter_chunks():
                    out.write(chunk)
                out.flush()
            return
        entry = client.stat(remote)
        if entry.is_dir:
            raise click.ClickException(f"{entry.path} is a directory (use `callfs sync`)")
        target = Path(local) if local else Path(entry.name)
        if target.is_dir():
            target = target / entry.name
        with Bar(ctx.show_progress(), entry.name, entry.size) as bar:
            got = client.download(remote, target, progress=bar.callback)
        _set_mtime(target, got)
        doc = {"path": got.path, "local": str(target), "size": got.size}
        ctx.emit(doc, f"downloaded {got.path} to {target} ({human(got.size)})")


def _set_mtime(local: Path, entry: Entry) -> None:
    stamp = entry.mtime_epoch
    if stamp is not None:
        os.utime(local, (stamp, stamp))


def _long(entry: Entry) -> str:
    kind = "d" if entry.is_dir else "-"
    return f"{kind} {entry.owner:<12} {entry.size:>12} {entry.mtime:<20} {entry.path}"


@client_command("ls")
@click.argument("remote", default="/")
@click.option("--recursive", "-r", is_flag=True, help="the whole subtree")
@click.option("--long", "-l", "long_", is_flag=True, help="type, owner, size, mtime, path")
def ls(ctx: Ctx, remote: str, recursive: bool, long_: bool) -> None:
    """List a directory (names; directories end with /). --json prints one array of entries."""
    with ctx.client() as client:
        try:
            entries = list(
                client.list(remote, recursive=recursive, max_depth=1000 if recursive else None)
            )
        except ClientError as exc:
            if exc.status != 400:
                raise
            entries = [client.stat(remote)]  # a file lists as itself, like ls(1)
            if entries[0].is_dir:
                raise
            remote = entries[0].path.rsplit("/", 1)[0] or "/"
        if ctx.as_json:
            click.echo(json.dumps([e.as_dict() for e in entries]))
            return
        base = normalize(remote).rstrip("/") + "/"
        for e in entries:
            if long_:
                click.echo(_long(e))
            else:
                name = e.path[len(base) :] if e.path.startswith(base) else e.name
                click.echo(name + ("/" if e.is_dir else ""))


@client_command("stat")
@click.argument("remote")
def stat(ctx: Ctx, remote: str) -> None:
    """Show the type, size, mode, owner and mtime of REMOTE."""
    with ctx.client() as client:
        e = client.stat(remote)
        text = "\n".join(f"{k}: {v}" for k, v in e.as_dict().items())
        ctx.emit(e.as_dict(), text)


@client_command("rm")
@click.argument("remotes", nargs=-1, required=True)
@click.option("--recursive", "-r", is_flag=True, help="delete non-empty directories too")
def rm(ctx: Ctx, remotes: tuple[str, ...], recursive: bool) -> None:
    """Delete files or directories (a non-empty directory needs -r). Like rm(1), a path that
    cannot be deleted is reported and the others are still deleted; the exit code is then 1."""
    deleted: list[str] = []
    failed: list[dict[str, Any]] = []
    with ctx.client() as client:
        for remote in remotes:
            path = normalize(remote)
            try:
                client.delete(remote, recursive=recursive)
            except ClientError as exc:
                if isinstance(exc, TransportError):
                    raise  # the server is gone: the others would fail the same way
                failed.append({"path": path, "error": exc.as_dict()})
                if not ctx.as_json:
                    click.echo(f"Error: {path}: {exc}", err=True)
                continue
            deleted.append(path)
            if not ctx.as_json:
                click.echo(f"deleted {path}")
    if ctx.as_json:
        click.echo(json.dumps({"deleted": deleted, **({"failed": failed} if failed else {})}))
    if failed:
        sys.exit(1)


@client_command("mv")
@click.argument("src")
@click.argument("dst")
@click.option("--overwrite", "-f", is_flag=True, help="replace an existing destination")
@click.option("--parents", "-p", is_flag=True, help="create missing parents of DST")
@click.option(
    "--no-target-directory",
    "-T",
    "exact",
    is_flag=True,
    help="DST is the new path even if it is an existing directory",
)
def mv(ctx: Ctx, src: str, dst: str, overwrite: bool, parents: bool, exact: bool) -> None:
    """Move or rename SRC to DST on the server (no bytes are copied through the client). As with
    mv(1), an existing directory DST, or one written with a trailing /, receives SRC under its
    own name (-T: DST itself is the new path)."""
    with ctx.client() as client:
        if not exact:
            dst = _into_directory(client, src, dst)
        new = client.move(src, dst, overwrite=overwrite, create_parents=parents)
        ctx.emit({"from": normalize(src), "path": new}, f"moved {normalize(src)} to {new}")


@client_command("mkdir")
@click.argument("remotes", nargs=-1, required=True)
def mkdir(ctx: Ctx, remotes: tuple[str, ...]) -> None:
    """Create directories (and missing parents); an existing directory is fine."""
    with ctx.client() as client:
        done = [{"path": normalize(r), "created": client.mkdir(r)} for r in remotes]
    if ctx.as_json:
        click.echo(json.dumps(done))
        return
    for d in done:
        click.echo(f"{'created' if d['created'] else 'exists'} {d['path']}")


@client_command("share")
@click.argument("remote")
@click.option(
    "--expiry",
    type=click.IntRange(1, 86400),
    default=3600,
    show_default=True,
    help="seconds the link stays valid",
)
def share(ctx: Ctx, remote: str, expiry: int) -> None:
    """Print a single-use download link for a file (no API key needed to use it)."""
    with ctx.client() as client:
        link = client.share(remote, expiry)
        ctx.emit(link.as_dict(), link.url)


# ---- sync ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Job:
    rel: str
    size: int
    local: Path
    remote: str


def _local_tree(root: Path) -> tuple[dict[str, os.stat_result], list[str]]:
    files: dict[str, os.stat_result] = {}
    dirs: list[str] = []
    for here, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(here, root)
        for d in dirnames:
            dirs.append(Path(rel_dir, d).as_posix().removeprefix("./"))
        for name in sorted(filenames):
            path = Path(here, name)
            if name.endswith(".callfs-part") or not path.is_file():
                continue
            rel = Path(rel_dir, name).as_posix().removeprefix("./")
            files[rel] = path.stat()
    return files, dirs


def _remote_tree(client: Client, root: str) -> dict[str, Entry] | None:
    """Entries under ``root`` keyed by relative path; None when ``root`` does not exist."""
    try:
        top = client.stat(root)
    except ClientError as exc:
        if exc.status == 404:
            return None
        raise
    if not top.is_dir:
        raise click.ClickException(f"{top.path} is a file, not a directory")
    prefix = root.rstrip("/") + "/"
    return {
        e.path[len(prefix) :] if root != "/" else e.path[1:]: e
        for e in client.list(root, recursive=True, max_depth=1000)
    }


def _fresh(src_size: int, src_mtime: float | None, dst_size: int, dst_mtime: float | None) -> bool:
    """The destination is up to date: same size and not older than the source (whole seconds,
    the server's resolution)."""
    if src_size != dst_size or src_mtime is None or dst_mtime is None:
        return False
    return int(dst_mtime) >= int(src_mtime)


class _Synced:
    """What ``sync`` last uploaded from each local file (its size and mtime in ns just before),
    or downloaded to it (just after). Remote mtimes have whole seconds, so a same-size edit made
    in the second of the last upload looked "not newer" and was skipped by every later sync
    (found by audit); a local file that differs from its record has changed since, whatever the
    seconds say. Kept in ``$XDG_STATE_HOME/callfs/synced.json``; a file with no record is judged
    by size and mtime."""

    def __init__(self, path: Path, server: str) -> None:
        self.path = path
        self._server = server
        self._lock = threading.Lock()
        self._doc = read_state(path)
        self._mine: dict[str, list[int]] = {}  # this run's records, merged in at ``save``

    def _key(self, remote: str, local: Path) -> str:
        raw = f"{self._server}|{normalize(remote)}|{os.path.abspath(local)}"
        return hashlib.sha256(raw.encode()).hexdigest()

    def changed(self, remote: str, local: Path, st: os.stat_result) -> bool:
        """True if this file was uploaded by ``sync`` and has changed since."""
        seen = self._doc.get(self._key(remote, local))
        return seen is not None and seen != [st.st_size, st.st_mtime_ns]

    def record(self, remote: str, local: Path, st: os.stat_result) -> None:
        """``local`` was uploaded from (or downloaded to) ``remote``, as ``st`` shows it."""
        with self._lock:
            self._mine[self._key(remote, local)] = [st.st_size, st.st_mtime_ns]

    def save(self) -> None:
        """Merge this run's records into the file (another sync may have saved meanwhile); a
        state directory that cannot be written costs only a warning."""
        with self._lock:
            if not self._mine:
                return
            try:
                write_state(self.path, {**read_state(self.path), **self._mine})
            except OSError as exc:
                click.echo(f"warning: cannot save {self.path}: {exc.strerror or exc}", err=True)
                return
            self._mine.clear()


@client_command("sync")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 64),
    default=8,
    show_default=True,
    help="parallel transfers",
)
@click.option("--dry-run", "-n", is_flag=True, help="only list what would be transferred")
def sync(ctx: Ctx, src: str, dst: str, jobs: int, dry_run: bool) -> None:
    """Copy a whole tree: `callfs sync ./dir callfs:/dir` uploads, `callfs sync callfs:/dir
    ./dir` downloads (the remote side carries the callfs: prefix). Files whose destination has
    the same size and is not older are skipped; nothing is deleted."""
    up = dst.startswith(REMOTE_PREFIX)
    if up == src.startswith(REMOTE_PREFIX):
        raise click.UsageError("exactly one of SRC and DST must be remote (callfs:/path)")
    with ctx.client(connections=jobs) as client:
        if up:
            summary = _sync_up(ctx, client, Path(src), normalize(dst), jobs, dry_run)
        else:
            summary = _sync_down(ctx, client, normalize(src), Path(dst), jobs, dry_run)
    failed = summary["failed"]
    text = (
        f"{'would transfer' if dry_run else 'transferred'} {summary['transferred']} files "
        f"({human(summary['bytes'])}), skipped {summary['skipped']}, failed {len(failed)}"
    )
    if ctx.as_json:
        click.echo(json.dumps(summary))
    else:
        for f in failed:
            click.echo(f"failed: {f['path']}: {f['code']}: {f['message']}", err=True)
        click.echo(text)
    if failed:
        raise click.ClickException(f"{len(failed)} transfer(s) failed")


class _Interrupted(BaseException):
    """Raised in a transfer thread at its next chunk once Ctrl-C was pressed (a BaseException:
    no retry or error handling on the way catches it; a download's part file is removed, a tus
    upload keeps its offset for the next run)."""


def _run_jobs(
    ctx: Ctx,
    todo: list[_Job],
    jobs: int,
    work: Callable[[_Job, Progress | None], None],
    direction: str,
) -> list[dict[str, Any]]:
    total = sum(j.size for j in todo)
    failed: list[dict[str, Any]] = []
    done = 0
    lock = threading.Lock()
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with Bar(ctx.show_progress(), f"{direction} 0/{len(todo)}", total) as bar:
        advance = bar.callback
        stop = threading.Event()

        def progress(n: int) -> None:
            if stop.is_set():
                raise _Interrupted
            if advance is not None:
                advance(n)

        def run(job: _Job, report: Progress | None) -> None:
            if stop.is_set():  # taken from the queue after Ctrl-C: do nothing
                raise _Interrupted
            work(job, report)

        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="callfs-sync")
        try:
            futures = {pool.submit(run, job, progress): job for job in todo}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    fut.result()
                except (ClientError, OSError) as exc:
                    code = exc.code if isinstance(exc, ClientError) else "LOCAL_ERROR"
                    message = exc.message if isinstance(exc, ClientError) else str(exc)
                    failed.append({"path": job.rel, "code": code, "message": message})
                with lock:
                    done += 1
                    bar.describe(f"{direction} {done}/{len(todo)}")
        except KeyboardInterrupt:
            # transfers not started are dropped; running ones stop at their next chunk (they
            # had run to their end, however large, before the process could exit)
            # (a thread freed by a stopped transfer could start a queued one, which then ran:
            # its first requests, or a whole small file; found by audit)
            pool.shutdown(wait=False, cancel_futures=True)
            stop.set()
            click.echo("interrupted: run the same command again to continue", err=True)
            pool.shutdown(wait=True)
            sys.exit(EXIT_INTERRUPTED)
        pool.shutdown()
    return failed


def _sync_up(
    ctx: Ctx, client: Client, root: Path, remote: str, jobs: int, dry_run: bool
) -> dict[str, Any]:
    if not root.is_dir():
        raise click.ClickException(f"{root}: not a directory")
    files, dirs = _local_tree(root)
    existing = _remote_tree(client, remote) or {}
    synced = _Synced(state_dir() / "synced.json", client.url)
    todo: list[_Job] = []
    skipped = 0
    for rel, st in files.items():
        have = existing.get(rel)
        target = _join(remote, rel)
        if (
            have is not None
            and not have.is_dir
            and not synced.changed(target, root / rel, st)
            and _fresh(st.st_size, st.st_mtime, have.size, have.mtime_epoch)
        ):
            skipped += 1
            continue
        todo.append(_Job(rel, st.st_size, root / rel, target))
    missing_dirs = [d for d in dirs if d not in existing]
    store = resume_store()

    def work(job: _Job, progress: Progress | None) -> None:
        before = job.local.stat()  # an edit during the upload shows next time
        client.upload_file(job.local, job.remote, progress=progress, resume_store=store)
        synced.record(job.remote, job.local, before)

    failed: list[dict[str, Any]] = []
    if not dry_run:
        for d in [remote, *(_join(remote, d) for d in missing_dirs)]:
            with contextlib.suppress(ClientError):
                client.mkdir(d)
        try:
            failed = _run_jobs(ctx, todo, jobs, work, "up")
        finally:
            synced.save()  # after Ctrl-C too: what was sent is known
    return _summary("up", todo, skipped, failed, dry_run)


def _sync_down(
    ctx: Ctx, client: Client, remote: str, root: Path, jobs: int, dry_run: bool
) -> dict[str, Any]:
    tree = _remote_tree(client, remote)
    if tree is None:
        raise ClientError(404, "FILE_NOT_FOUND", f"{remote}: file not found")
    todo: list[_Job] = []
    skipped = 0
    entries: dict[str, Entry] = {}
    dirs_failed: list[dict[str, Any]] = []
    if not dry_run:
        root.mkdir(parents=True, exist_ok=True)  # a file there: one error line, nothing done
    for rel, e in tree.items():
        if e.is_dir:
            if not dry_run:
                try:
                    (root / rel).mkdir(parents=True, exist_ok=True)
                except OSError as exc:  # a local file in the way: reported, the others go on
                    dirs_failed.append({"path": rel, "code": "LOCAL_ERROR", "message": str(exc)})
            continue
        local = root / rel
        try:
            st = local.stat()
        except OSError:
            st = None
        if st is not None and _fresh(e.size, e.mtime_epoch, st.st_size, st.st_mtime):
            skipped += 1
            continue
        entries[rel] = e
        todo.append(_Job(rel, e.size, local, e.path))

    synced = _Synced(state_dir() / "synced.json", client.url)

    def work(job: _Job, progress: Progress | None) -> None:
        job.local.parent.mkdir(parents=True, exist_ok=True)
        got = client.download(job.remote, job.local, progress=progress)
        _set_mtime(job.local, got)
        # a later sync up sees the file unchanged since (not sent back)
        synced.record(job.remote, job.local, job.local.stat())

    failed: list[dict[str, Any]] = []
    if not dry_run:
        try:
            failed = _run_jobs(ctx, todo, jobs, work, "down")
        finally:
            synced.save()
    return _summary("down", todo, skipped, dirs_failed + failed, dry_run)


def _join(remote: str, rel: str) -> str:
    return normalize(remote.rstrip("/") + "/" + rel)


def _summary(
    direction: str, todo: list[_Job], skipped: int, failed: list[dict[str, Any]], dry_run: bool
) -> dict[str, Any]:
    bad = {f["path"] for f in failed}
    ok = [j for j in todo if j.rel not in bad]
    return {
        "direction": direction,
        "dry_run": dry_run,
        "transferred": len(ok),
        "bytes": sum(j.size for j in ok),
        "skipped": skipped,
        "failed": failed,
        "files": [j.rel for j in ok],
    }


COMMANDS = (put, get, ls, stat, rm, mv, mkdir, share, sync)


def register(group: click.Group) -> None:
    """Add the client commands to the ``callfs`` group (cli.py)."""
    for command in COMMANDS:
        group.add_command(command)
