"""The ``callfs`` command line (API.md §20). Parses, then calls the daemon; nothing else.

Start-up matters here (a ``callfs get`` is timed against ``curl``): this module imports only what
every command needs (click, and the client commands). The server stack (config, daemon, tls),
``importlib.metadata`` (``--version``), ``urllib.request`` (the cluster/admin commands) and
``concurrent.futures`` are imported inside the commands that use them."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import click

from callfs.client import commands as client_commands

CONTEXT = {"help_option_names": ["-h", "--help"]}
F = TypeVar("F", bound=Callable[..., Any])
JOIN_TIMEOUT = 15.0


def mask_dsn(dsn: str) -> str:
    if not dsn:
        return ""
    if len(dsn) > 20:
        return dsn[:10] + "***" + dsn[-7:]
    return "***"


def _load(config: str | None, dev: bool = False, listen: str | None = None) -> Any:
    from callfs.config import load_config

    env = None
    if listen is not None:  # the flag wins over every config layer
        env = {**os.environ, "CALLFS_SERVER__LISTEN_ADDR": listen}
    return load_config(config, dev=dev, env=env)


def package_version() -> str:
    """The installed distribution's version, else ``callfs.__version__`` (a source checkout)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("callfs")
    except importlib.metadata.PackageNotFoundError:
        import callfs

        return str(getattr(callfs, "__version__", "unknown"))


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"callfs {package_version()}")
        ctx.exit(0)


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="print the version and exit",
)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """CallFS: local disks and S3 buckets as one file namespace over HTTP.

    Start with `callfs server --dev` (a local node, nothing to configure) or
    `callfs server -c config.yaml`."""
    if ctx.invoked_subcommand is None:
        # API.md §20: no arguments at all runs `callfs server` (scripts rely on it). Without a
        # config it fails with a message that points at --dev and -c.
        ctx.invoke(server)


def _listen_addr(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--listen``: ``HOST:PORT`` or ``:PORT`` (all interfaces), port 1-65535."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or " " in host:
        raise click.BadParameter(f"expected HOST:PORT (e.g. 127.0.0.1:8080), got {value!r}")
    return value


_NO_KEYS_HINT = (
    'no API key is configured: run "callfs server --dev" for a local dev node with a generated '
    'key, or "callfs server -c FILE" with a config file that sets auth.api_keys '
    "(examples/config/single-node.yaml)"
)


@cli.command(context_settings=CONTEXT)
@click.option("--config", "-c", "config", default=None, help="config file (YAML or JSON)")
@click.option("--dev", is_flag=True, help="single dev node: no config needed (see README)")
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    callback=_listen_addr,
    help="main listener address (overrides server.listen_addr)",
)
def server(config: str | None, dev: bool, listen: str | None) -> None:
    """Serve until SIGINT or SIGTERM."""
    from callfs.errors import ConfigError

    try:
        cfg = _load(config, dev, listen)
    except ConfigError as exc:
        message = str(exc)  # every problem, not only the first (config/validate.py)
        if not dev and "auth.api_keys" in message and "at least one key" in message:
            message = f"{message}\n{_NO_KEYS_HINT}"
        raise click.ClickException(message) from exc
    from callfs.daemon import resolve_external_url, run

    on_ready = None
    if dev:
        # The banner shows the URL really served (derived from the listener unless set).
        cfg = resolve_external_url(cfg, warn=False)
        base = cfg.server.external_url
        # validation guarantees a key; api_keys may be emptied (CALLFS_AUTH__API_KEYS=) in
        # favour of api_key_users
        key = [*cfg.auth.api_keys, *cfg.auth.api_key_users.values()][0]

        def on_ready() -> None:
            click.echo(f"CallFS dev server listening on {base} (data in ./callfs-data)")
            click.echo(f"API key: {key}")
            click.echo(
                f"Try: curl -H \"Authorization: Bearer {key}\" --data-binary 'hello' "
                f"{base}/v1/files/hello.txt"
            )
            sys.stdout.flush()

    sys.exit(run(cfg, on_ready=on_ready))


@cli.group(context_settings=CONTEXT)
@click.option("--config", "-c", "config", default=None, help="config file (YAML or JSON)")
@click.pass_context
def config(ctx: click.Context, config: str | None) -> None:
    """Configuration tools."""
    ctx.obj = {"config": config}


@config.command("validate", context_settings=CONTEXT)
@click.option("--config", "-c", "config_path", default=None, help="config file (YAML or JSON)")
@click.option(
    "--summary", is_flag=True, help="also print what will run: store, backends, locks, listeners"
)
@click.pass_context
def config_validate(ctx: click.Context, config_path: str | None, summary: bool) -> None:
    """Load and validate the configuration; print its main settings. Every problem is listed
    (the contract's message first); warnings go to stderr."""
    from callfs.config.loader import ConfigProblems, load_config_report
    from callfs.config.validate import summary as describe
    from callfs.errors import ConfigError

    path = config_path or (ctx.obj or {}).get("config")
    click.echo("Validating configuration...")
    try:
        loaded = load_config_report(path)
    except ConfigError as exc:
        click.echo(f"Configuration validation failed: {exc.message}")
        if isinstance(exc, ConfigProblems):
            for problem in exc.problems[1:]:
                click.echo(f"  - {problem}")
            for warning in exc.warnings:
                click.echo(f"  - warning: {warning}")
        sys.exit(1)
    cfg = loaded.config
    for warning in loaded.warnings:
        click.echo(f"Warning: {warning}", err=True)
    click.echo("Configuration is valid")
    click.echo(f"Instance ID: {cfg.instance_discovery.instance_id}")
    click.echo(f"Listen Address: {cfg.server.listen_addr}")
    click.echo(f"Metadata Store DSN: {mask_dsn(cfg.metadata_store.dsn)}")
    click.echo(f"Redis Address: {cfg.dlm.redis_addr}")
    click.echo(f"Local FS Root: {cfg.backend.localfs_root_path}")
    if cfg.backend.s3_bucket_name:
        click.echo(f"S3 Bucket: {cfg.backend.s3_bucket_name}")
        click.echo(f"S3 Region: {cfg.backend.s3_region}")
    if summary:
        for line in describe(cfg):
            click.echo(line)


@cli.group(context_settings=CONTEXT)
@click.option("--config", "-c", "config", default=None, help="config file (YAML or JSON)")
@click.pass_context
def cluster(ctx: click.Context, config: str | None) -> None:
    """Cluster membership."""
    ctx.obj = {"config": config}


@cluster.command("join", context_settings=CONTEXT)
@click.option("--leader", default=None, help="API base URL of the Raft leader")
@click.option("--config", "-c", "config_path", default=None)
@click.option("--node-id", default="")
@click.option("--raft-addr", default="")
@click.option("--api-endpoint", default="")
@click.option("--internal-secret", default="")
@click.pass_context
def cluster_join(
    ctx: click.Context,
    leader: str | None,
    config_path: str | None,
    node_id: str,
    raft_addr: str,
    api_endpoint: str,
    internal_secret: str,
) -> None:
    """Ask the leader to add this node to the Raft group."""
    if not leader:
        raise click.ClickException('required flag(s) "leader" not set')
    values = {
        "node_id": node_id.strip(),
        "raft_addr": raft_addr.strip(),
        "api_endpoint": api_endpoint.strip(),
        "secret": internal_secret.strip(),
    }
    values = _config_defaults(
        ctx,
        config_path,
        values,
        lambda cfg: {
            "node_id": cfg.raft.node_id,
            "raft_addr": cfg.raft.bind_addr,
            "api_endpoint": cfg.server.external_url,
            "secret": cfg.auth.internal_proxy_secret,
        },
    )
    missing = [
        ("node_id", "node id (use --node-id or set raft.node_id in config) is required"),
        ("raft_addr", "raft address (use --raft-addr or set raft.bind_addr in config) is required"),
        (
            "api_endpoint",
            "api endpoint (use --api-endpoint or set server.external_url in config) is required",
        ),
        (
            "secret",
            "internal secret (use --internal-secret or set auth.internal_proxy_secret in config)"
            " is required",
        ),
    ]
    for name, message in missing:
        if not values[name]:
            raise click.ClickException(message)
    body = {
        "node_id": values["node_id"],
        "raft_addr": values["raft_addr"],
        "api_endpoint": values["api_endpoint"],
    }
    try:
        status, raw = _internal_call(
            leader, "/v1/internal/raft/join", values["secret"], body, JOIN_TIMEOUT
        )
    except _NET_ERRORS as exc:
        raise click.ClickException(f"failed to contact leader: {_reason(exc)}") from exc
    answer = _decode("join", status, raw)
    if status != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        if error:
            raise click.ClickException(f"join failed: {error}")
        raise click.ClickException(f"join failed with status {status}")
    click.echo(
        f"Join successful: node={values['node_id']} leader={answer.get('leader_id', '')} "
        f"status={answer.get('status', '')}"
    )


STATUS_TIMEOUT = 3.0
REMOVE_TIMEOUT = 15.0


#: ``erasure repair`` reads every shard of every file it checks: allow it time.
REPAIR_TIMEOUT = 3600.0


def _decode(what: str, status: int, raw: bytes) -> dict[str, Any]:
    """The JSON object of an internal answer; otherwise the error names the HTTP status and
    the start of the body (an HTML 404 from something that is not a CallFS node, a proxy page)."""
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        snippet = raw[:200].decode("utf-8", errors="replace")
        raise click.ClickException(
            f"failed to decode {what} response: HTTP {status}, body {snippet!r}"
        )
    return answer


def _internal_call(
    base: str, path: str, secret: str, body: dict[str, Any] | None, timeout: float
) -> tuple[int, bytes]:
    """One internal request (GET without ``body``, POST with it), answered within ``timeout``
    seconds in all: a socket timeout bounds each operation only, so a node dripping its answer
    could take any time. Network errors propagate as ``_NET_ERRORS``."""
    outcome: list[tuple[int, bytes] | BaseException] = []

    def call() -> None:
        try:
            outcome.append(_internal_call_once(base, path, secret, body, timeout))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    worker = threading.Thread(target=call, name="callfs-internal-call", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise TimeoutError("timed out")
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _internal_call_once(
    base: str, path: str, secret: str, body: dict[str, Any] | None, timeout: float
) -> tuple[int, bytes]:
    """The request itself, with http.client so that the connection is closed here whatever
    happens: a call abandoned at its timeout ends on its own thread with its socket closed
    (urllib left one for the garbage collector when the peer hung up mid-answer)."""
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(base.strip().rstrip("/") + path)  # ValueError if malformed
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"unknown url type: {base.strip()!r}")
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request(
            "GET" if body is None else "POST",
            url.path + (f"?{url.query}" if url.query else ""),
            body=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {secret}"},
        )
        answer = conn.getresponse()
        return answer.status, answer.read()
    except http.client.HTTPException as exc:  # not an HTTP answer, or one cut short
        raise OSError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


#: What a failed internal call raises (socket errors and timeouts are ``OSError``s; a malformed
#: URL is a ``ValueError``).
_NET_ERRORS = (OSError, ValueError)


def _reason(exc: Exception) -> object:
    return getattr(exc, "reason", exc)


def _config_defaults(
    ctx: click.Context,
    config_path: str | None,
    values: dict[str, str],
    defaults: Callable[[Any], dict[str, str]],
) -> dict[str, str]:
    """Empty ``values`` filled from the config's ``defaults``, but only if the config loads and
    validates (API.md §20.4); flags win."""
    if all(values.values()):
        return values
    from callfs.errors import ConfigError

    try:
        cfg = _load(config_path or (ctx.obj or {}).get("config"))
    except ConfigError:
        return values
    if cfg is None:
        return values
    from callfs.daemon import resolve_external_url

    # the endpoint the node itself uses (an unset external_url follows the listener): a join
    # had advertised the bare default "localhost:8443", an https URL nothing listens on
    found = defaults(resolve_external_url(cfg, warn=False))
    return {k: v or found[k].strip() for k, v in values.items()}


def _node_settings(
    ctx: click.Context, config_path: str | None, url: str, secret: str
) -> tuple[str, str]:
    """``--url``/``--internal-secret``, else ``server.external_url``/``auth.internal_proxy_secret``
    (only if the config loads and validates, like ``cluster join``)."""
    values = _config_defaults(
        ctx,
        config_path,
        {"url": url.strip(), "secret": secret.strip()},
        lambda cfg: {"url": cfg.server.external_url, "secret": cfg.auth.internal_proxy_secret},
    )
    if not values["url"]:
        raise click.ClickException(
            "node url (use --url or set server.external_url in config) is required"
        )
    if not values["secret"]:
        raise click.ClickException(
            "internal secret (use --internal-secret or set auth.internal_proxy_secret in config)"
            " is required"
        )
    return values["url"], values["secret"]


def _raft_status(base: str, secret: str, timeout: float) -> dict[str, Any]:
    """``GET /v1/internal/raft/status``; a ``ClickException`` for anything but a 200 JSON object."""
    try:
        status, raw = _internal_call(base, "/v1/internal/raft/status", secret, None, timeout)
    except _NET_ERRORS as exc:
        raise click.ClickException(f"failed to contact node: {_reason(exc)}") from exc
    answer = _decode("status", status, raw)
    if status != 200:
        error = answer.get("error")
        if error:
            raise click.ClickException(f"status failed: {error}")
        raise click.ClickException(f"status failed with status {status}")
    return answer


def _node_row(
    node_id: str, endpoint: str, view: dict[str, Any] | None, error: str
) -> dict[str, Any]:
    view = view or {}
    return {
        "node_id": node_id,
        "api_endpoint": endpoint,
        "role": view.get("state", "down") if not error else "down",
        "term": view.get("term"),
        "commit_index": view.get("commit_index"),
        "applied_index": view.get("applied_index"),
        "lag": None,
        "error": error,
        "status": view or None,
    }


def _collect_status(base: str, secret: str) -> dict[str, Any]:
    """Ask ``base``, then every node it lists, for its own view; work out leader and lag."""
    first = _raft_status(base, secret, STATUS_TIMEOUT)
    nodes: dict[str, Any] = dict(first.get("nodes") or {})
    first_id = str(first.get("node_id") or "")
    voters = {str(a) for a in first.get("members") or []}
    named = {str((v or {}).get("raft_addr") or "") for v in nodes.values()}
    # A config peer that is not (or no longer) a voter is listed but not asked; a voter with no
    # node ID is shown under its Raft address.
    outside = {i for i, v in nodes.items() if voters and (v or {}).get("raft_addr") not in voters}
    for addr in sorted(voters - named):
        nodes[addr] = {"raft_addr": addr, "api_endpoint": ""}

    def ask(node_id: str) -> tuple[dict[str, Any] | None, str]:
        if node_id == first_id:
            return first, ""
        if node_id in outside:
            return None, "not a member"
        endpoint = str((nodes.get(node_id) or {}).get("api_endpoint") or "")
        if not endpoint:
            return None, "no api endpoint known"
        try:
            return _raft_status(endpoint, secret, STATUS_TIMEOUT), ""
        except click.ClickException as exc:
            return None, exc.format_message()

    from concurrent.futures import ThreadPoolExecutor

    ids = sorted(set(nodes) | ({first_id} if first_id else set()))
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(ids)))) as pool:
        views = dict(zip(ids, pool.map(ask, ids), strict=True))
    rows = [
        _node_row(i, str((nodes.get(i) or {}).get("api_endpoint") or ""), *views[i]) for i in ids
    ]
    # The leader: a node that says so itself (highest term wins), else who the asked node names.
    leaders = [r for r in rows if r["role"] == "leader"]
    leaders.sort(key=lambda r: r["term"] or 0, reverse=True)
    leader_id = leaders[0]["node_id"] if leaders else first.get("leader_id")
    for row in rows:
        if row["node_id"] in outside and row["node_id"] != first_id:
            row["role"] = "not-member"
    leader_view = next((r["status"] for r in rows if r["node_id"] == leader_id), None)
    problems = []
    if leader_view and leader_view.get("state") == "leader":
        leader_commit = leader_view.get("commit_index")
        # The leader's voters decide who is a member: a removed node started again still
        # counts itself in (asked first, it listed itself as a member, and status exited 0).
        group = {str(a) for a in leader_view.get("members") or []}
        for row in rows:
            addr = str((nodes.get(row["node_id"]) or {}).get("raft_addr") or row["node_id"])
            if row["status"] and group and addr not in group:
                row["role"] = "not-member"
                problems.append(
                    f"node {row['node_id']} runs but is not a member of the group"
                    f" {leader_id} leads (removed? stop it, or join it again)"
                )
    else:
        leader_commit = first.get("leader_commit_index")
    for row in rows:
        if isinstance(leader_commit, int) and isinstance(row["applied_index"], int):
            row["lag"] = leader_commit - row["applied_index"]
    if not leader_id:
        problems.append("no leader known")
    if len(leaders) > 1:
        problems.append(
            "more than one node says it is leader: " + ", ".join(r["node_id"] for r in leaders)
        )
    down = [r for r in rows if r["role"] == "down"]
    for row in down:
        problems.append(f"node {row['node_id']} did not answer: {row['error']}")
    for row in rows:
        if row["role"] == "candidate":
            problems.append(f"node {row['node_id']} is a candidate: it hears no leader")
        if row["status"] and row["status"].get("broken"):
            problems.append(f"node {row['node_id']} is broken: {row['status']['broken']}")
    return {
        "asked": base,
        "leader_id": leader_id,
        "leader_commit_index": leader_commit,
        "members": first.get("members"),
        "nodes": rows,
        "ok": not problems,
        "problems": problems,
    }


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


@cluster.command("status", context_settings=CONTEXT)
@click.option("--config", "-c", "config_path", default=None)
@click.option("--url", default="", help="API base URL of any node (default: server.external_url)")
@click.option("--internal-secret", default="")
@click.option("--json", "as_json", is_flag=True, help="print the collected data as JSON")
@click.pass_context
def cluster_status(
    ctx: click.Context, config_path: str | None, url: str, internal_secret: str, as_json: bool
) -> None:
    """Show every Raft node's role, term, indexes and lag; exit 1 unless all is well."""
    base, secret = _node_settings(ctx, config_path, url, internal_secret)
    report = _collect_status(base, secret)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        header = ("NODE", "ENDPOINT", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG")
        lines = [header] + [
            (
                r["node_id"],
                r["api_endpoint"],
                r["role"],
                *(_cell(r[k]) for k in ("term", "commit_index", "applied_index", "lag")),
            )
            for r in report["nodes"]
        ]
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        for line in lines:
            click.echo(
                "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            )
    if report["problems"]:
        raise click.ClickException("; ".join(report["problems"]))


@cluster.command("remove", context_settings=CONTEXT)
@click.argument("node")
@click.option("--config", "-c", "config_path", default=None)
@click.option("--url", default="", help="API base URL of any node (default: server.external_url)")
@click.option("--internal-secret", default="")
@click.pass_context
def cluster_remove(
    ctx: click.Context, node: str, config_path: str | None, url: str, internal_secret: str
) -> None:
    """Ask the leader to take NODE out of the Raft group (the leader itself hands the leadership
    over first); stop NODE once it is out."""
    node_id = node.strip()
    if not node_id:
        raise click.ClickException("node id is required")
    base, secret = _node_settings(ctx, config_path, url, internal_secret)
    view = _raft_status(base, secret, STATUS_TIMEOUT)
    leader_id = view.get("leader_id")
    if view.get("state") == "leader":
        target = base
    elif not leader_id:
        raise click.ClickException(f"remove failed: no leader known by {base}")
    else:
        target = str((view.get("nodes") or {}).get(leader_id, {}).get("api_endpoint") or "")
        if not target:
            raise click.ClickException(
                f"remove failed: no api endpoint known for leader {leader_id}"
            )
    nodes = view.get("nodes") or {}
    for _ in range(2):  # the leader asked to remove itself hands over first: ask the new one
        try:
            status, raw = _internal_call(
                target, "/v1/internal/raft/remove", secret, {"node_id": node_id}, REMOVE_TIMEOUT
            )
        except _NET_ERRORS as exc:
            raise click.ClickException(f"failed to contact leader: {_reason(exc)}") from exc
        answer = _decode("remove", status, raw)
        moved = answer.get("leader_id") if answer.get("error") == "not leader" else None
        endpoint = str((nodes.get(moved) or {}).get("api_endpoint") or "") if moved else ""
        if status != 502 or not endpoint or endpoint == target:
            break
        target = endpoint
    if status != 200:
        error = answer.get("error")
        if error:
            raise click.ClickException(f"remove failed: {error}")
        raise click.ClickException(f"remove failed with status {status}")
    click.echo(f"Removed node={answer.get('node_id') or node_id}")


#: ``cluster drain`` / ``cluster rebalance``: how often the job's progress is asked for.
JOB_POLL = 1.0
JOB_TIMEOUT = 30.0


def _size(n: object) -> str:
    value = float(n) if isinstance(n, int | float) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def _job_line(job: dict[str, Any]) -> str:
    return (
        f"{job.get('kind')} {job.get('state')}: moved {job.get('files_moved')}/"
        f"{job.get('files_total')} files ({_size(job.get('bytes_moved'))} of "
        f"{_size(job.get('bytes_total'))}), {job.get('files_remaining')} remaining, "
        f"{job.get('files_failed')} failed"
    )


def _run_job(base: str, secret: str, kind: str, body: dict[str, Any], wait: bool) -> None:
    """Start a drain or rebalance on ``base`` (or follow the one already running there), print
    its progress until it ends; exit 1 if some file could not be moved."""
    import time

    try:
        status, raw = _internal_call(base, f"/v1/internal/nodes/{kind}", secret, body, JOB_TIMEOUT)
    except _NET_ERRORS as exc:
        raise click.ClickException(f"failed to contact node: {_reason(exc)}") from exc
    answer = _decode(kind, status, raw)
    coordinator = answer.get("coordinator_url") if status == 409 else None
    if isinstance(coordinator, str) and coordinator and coordinator != base:
        click.echo(f"running the {kind} on the coordinator {coordinator}")
        _run_job(coordinator, secret, kind, body, wait)
        return
    running = answer.get("job") if status == 409 else None
    if isinstance(running, dict) and (running.get("kind"), running.get("node")) == (
        kind,
        body.get("node"),
    ):
        click.echo(f"a {kind} is already running on {base}; following it")
    elif status != 202:
        raise click.ClickException(f"{kind} failed: {answer.get('error') or status}")
    job = answer.get("job") if status == 409 else answer
    last = ""
    while wait:
        try:
            status, raw = _internal_call(base, "/v1/internal/nodes/job", secret, None, JOB_TIMEOUT)
        except _NET_ERRORS as exc:
            raise click.ClickException(f"lost contact with the node: {_reason(exc)}") from exc
        job = _decode("job", status, raw)
        if status != 200:
            raise click.ClickException(f"{kind} status failed: {job.get('error') or status}")
        line = _job_line(job)
        if line != last:
            click.echo(line)
            last = line
        if job.get("state") not in ("planning", "running"):
            break
        time.sleep(JOB_POLL)
    if not wait or not isinstance(job, dict):
        click.echo(f"{kind} started on {base}; follow it with the same command")
        return
    planned = job.get("planned_bytes") or {}
    for node in sorted(planned):
        click.echo(f"  {node}: {_size(planned[node])}")
    for item in job.get("failed") or []:
        click.echo(f"failed: {item}")
    if job.get("state") != "done":
        raise click.ClickException(
            f"{kind} {job.get('state')}: {job.get('error') or 'see the node log'}"
        )


def _throttled_job(command: F) -> F:
    """``--parallel``, ``--rate`` and ``--no-wait`` of a background move job (drain, rebalance),
    in that order in the help."""
    command = click.option("--no-wait", is_flag=True, help="start the job and return")(command)
    command = click.option(
        "--rate", default=0.0, type=click.FloatRange(min=0), help="MB/s at most (0: no limit)"
    )(command)
    return click.option("--parallel", default=2, show_default=True, type=click.IntRange(1, 64))(
        command
    )


@cluster.command("drain", context_settings=CONTEXT)
@click.argument("node")
@click.option("--config", "-c", "config_path", default=None)
@click.option("--url", default="", help="API base URL of the node that runs the job")
@click.option("--internal-secret", default="")
@_throttled_job
@click.pass_context
def cluster_drain(
    ctx: click.Context,
    node: str,
    config_path: str | None,
    url: str,
    internal_secret: str,
    parallel: int,
    rate: float,
    no_wait: bool,
) -> None:
    """Move every localfs file owned by NODE to the other live nodes (fewest bytes first), so
    NODE can be stopped and removed. Re-running continues where a stopped drain left off."""
    node_id = node.strip()
    if not node_id:
        raise click.ClickException("node id is required")
    base, secret = _node_settings(ctx, config_path, url, internal_secret)
    body = {"node": node_id, "parallel": parallel, "rate": rate * 1_000_000}
    _run_job(base, secret, "drain", body, not no_wait)


@cluster.command("rebalance", context_settings=CONTEXT)
@click.option("--config", "-c", "config_path", default=None)
@click.option("--url", default="", help="API base URL of the node that runs the job")
@click.option("--internal-secret", default="")
@click.option(
    "--tolerance",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="stop when every node holds the mean bytes within this fraction",
)
@_throttled_job
@click.pass_context
def cluster_rebalance(
    ctx: click.Context,
    config_path: str | None,
    url: str,
    internal_secret: str,
    tolerance: float,
    parallel: int,
    rate: float,
    no_wait: bool,
) -> None:
    """Even out the localfs bytes of the live nodes (after a node joined): files move from the
    fullest node to the emptiest until each is within the tolerance of the mean."""
    base, secret = _node_settings(ctx, config_path, url, internal_secret)
    body = {"tolerance": tolerance, "parallel": parallel, "rate": rate * 1_000_000}
    _run_job(base, secret, "rebalance", body, not no_wait)


@cli.group(context_settings=CONTEXT)
def erasure() -> None:
    """Erasure-coded files."""


@erasure.command("repair", context_settings=CONTEXT)
@click.argument("path", required=False, default="")
@click.option("--config", "-c", "config_path", default=None)
@click.option("--url", default="", help="API base URL of any node (default: server.external_url)")
@click.option("--internal-secret", default="")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.pass_context
def erasure_repair(
    ctx: click.Context,
    path: str,
    config_path: str | None,
    url: str,
    internal_secret: str,
    as_json: bool,
) -> None:
    """Check every shard of the erasure-coded files at or below PATH (default: all) and rebuild
    missing or corrupt ones onto live nodes. Exits 1 if a file could not be repaired."""
    base, secret = _node_settings(ctx, config_path, url, internal_secret)
    try:
        status, raw = _internal_call(
            base, "/v1/internal/erasure/repair", secret, {"path": path.strip()}, REPAIR_TIMEOUT
        )
    except _NET_ERRORS as exc:
        raise click.ClickException(f"failed to contact node: {_reason(exc)}") from exc
    answer = _decode("repair", status, raw)
    if status != 200:
        raise click.ClickException(f"repair failed: {answer.get('error') or status}")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        click.echo(
            f"checked={answer['checked']} healthy={answer['healthy']} "
            f"repaired={answer['repaired']} shards_rebuilt={answer['shards_rebuilt']}"
        )
        for what in ("unrecoverable", "failed"):
            for item in answer.get(what) or []:
                click.echo(f"{what}: {item}")
    if answer.get("unrecoverable") or answer.get("failed"):
        ctx.exit(1)


#: ``fsck`` lists every node's data and walks the whole namespace: allow it time.
FSCK_TIMEOUT = 6 * 3600.0


def _finding_line(f: dict[str, Any]) -> str:
    where = f"{f.get('node') or '-'} {f.get('backend')}/{f.get('area')}"
    parts = [f"{f.get('kind', '?'):<13}", where, str(f.get("key"))]
    if f.get("path"):
        parts.append(f"path={f['path']}")
    if f.get("size") is not None:
        parts.append(f"size={f['size']}")
    if f.get("expected_size") is not None:
        parts.append(f"expected={f['expected_size']}")
    if f.get("age") is not None:
        parts.append(f"age={f['age']}s")
    if f.get("repaired"):
        parts.append("[repaired]")
    if f.get("detail"):
        parts.append(f"({f['detail']})")
    return " ".join(parts)


#: Below this grace, ``fsck --repair`` warns: a write's or a move's bytes wait this long at most
#: between publish and commit (lock wait, store and Raft timeouts) in any sane configuration.
SAFE_GRACE = 600.0


@cli.command("fsck", context_settings=CONTEXT)
@click.option("--repair", is_flag=True, help="remove orphans and stale temp files, re-queue copies")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=None,
    help="only bytes older than this many seconds count as orphans or stale (default 3600)",
)
@click.option("--config", "-c", "config_path", default=None)
@click.option("--url", default="", help="API base URL of any node (default: server.external_url)")
@click.option("--internal-secret", default="")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.pass_context
def fsck(
    ctx: click.Context,
    repair: bool,
    grace: float | None,
    config_path: str | None,
    url: str,
    internal_secret: str,
    as_json: bool,
) -> None:
    """Check that metadata and the bytes on every node agree: orphans (bytes no record names),
    missing bytes, size mismatches, stale temp files. --repair removes orphans and stale temp
    files older than the grace and re-queues missing replica copies; it never deletes bytes a
    record names. Exits 0 when clean (or everything was repaired), 1 otherwise."""
    base, secret = _node_settings(ctx, config_path, url, internal_secret)
    body: dict[str, Any] = {"repair": repair}
    if grace is not None:
        body["grace"] = grace
        if repair and grace < SAFE_GRACE:
            click.echo(
                f"warning: --repair with a grace under {SAFE_GRACE:.0f} s can remove the new bytes"
                " of a write or move in progress (published, not yet committed), losing it; use"
                " it only while nothing writes to the cluster",
                err=True,
            )
    try:
        status, raw = _internal_call(base, "/v1/internal/fsck", secret, body, FSCK_TIMEOUT)
    except _NET_ERRORS as exc:
        raise click.ClickException(f"failed to contact node: {_reason(exc)}") from exc
    answer = _decode("fsck", status, raw)
    if status != 200:
        raise click.ClickException(f"fsck failed: {answer.get('error') or status}")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        nodes = answer.get("nodes") or {}
        click.echo(
            f"fsck of {len(nodes)} node(s) via {answer.get('coordinator')}: "
            f"{answer.get('entries_checked')} records checked in {answer.get('elapsed')}s"
        )
        counts = answer.get("counts") or {}
        click.echo(
            " ".join(f"{k}={v}" for k, v in counts.items())
            + f" repaired={answer.get('repaired')} unrepaired={answer.get('unrepaired')}"
        )
        for finding in answer.get("findings") or []:
            click.echo(_finding_line(finding))
        for error in answer.get("errors") or []:
            click.echo(f"error: {error.get('node')}: {error.get('error')}")
    if not answer.get("clean"):
        ctx.exit(1)


_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"


def valid_cert_host(host: str) -> bool:
    """An IP address, or a host name per RFC 1123 (a leading ``*.`` label allowed for a
    wildcard certificate; one trailing dot allowed)."""
    import ipaddress
    import re

    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if labels[-1].isdigit():  # "10.0.0.999" is a mistyped address, not a name (RFC 3696 §2)
        return False
    label_re = re.compile(_DNS_LABEL)
    return all(label_re.fullmatch(label) for label in labels)


@cli.group(context_settings=CONTEXT)
def cert() -> None:
    """TLS certificates."""


@cert.command("generate", context_settings=CONTEXT)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    required=True,
    help="DNS name or IP address the certificate is valid for (repeat for several)",
)
@click.option("--cert-file", default="server.crt", show_default=True)
@click.option("--key-file", default="server.key", show_default=True)
@click.option("--days", default=825, show_default=True, type=click.IntRange(min=1))
@click.option("--force", is_flag=True, help="overwrite existing certificate and key files")
def cert_generate(
    hosts: tuple[str, ...], cert_file: str, key_file: str, days: int, force: bool
) -> None:
    """Write a self-signed certificate (its own CA) and key (mode 0600) for a cluster."""
    from pathlib import Path

    from callfs.tls import generate_self_signed

    names = [h.strip() for item in hosts for h in item.split(",") if h.strip()]
    if not names:
        raise click.ClickException("--host: at least one host name or IP address is required")
    for name in names:
        if not valid_cert_host(name):
            raise click.ClickException(
                f"--host {name!r} is neither an IP address nor a valid host name "
                "(letters, digits and '-' in dot-separated labels of 1-63 characters; "
                "'*.' may start a wildcard name)"
            )
    for option, file in (("--cert-file", cert_file), ("--key-file", key_file)):
        path = Path(file)
        parent = path.parent
        if not parent.is_dir():
            raise click.ClickException(
                f"{option}: directory {str(parent)!r} does not exist; create it first"
            )
        if path.exists() and not force:
            raise click.ClickException(
                f"{option}: {file!r} already exists; pass --force to overwrite it"
            )
    if Path(cert_file).resolve() == Path(key_file).resolve():
        raise click.ClickException("--cert-file and --key-file must be different files")
    generate_self_signed(names, Path(cert_file), Path(key_file), days=days)
    click.echo(f"Wrote {cert_file} and {key_file} for {', '.join(names)}")


@cli.command("help", context_settings=CONTEXT)
@click.argument("command", nargs=-1)
@click.pass_context
def help_(ctx: click.Context, command: tuple[str, ...]) -> None:
    """Show help for a command."""
    group: click.Command = cli
    sub_ctx = ctx.parent or ctx
    for name in command:
        if not isinstance(group, click.Group) or name not in group.commands:
            raise click.ClickException(f'unknown command "{name}"')
        group = group.commands[name]
        sub_ctx = click.Context(group, info_name=name, parent=sub_ctx)
    click.echo(group.get_help(sub_ctx))


@cli.command(context_settings=CONTEXT)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print a shell completion script."""
    from click.shell_completion import get_completion_class

    comp_cls = get_completion_class(shell)
    assert comp_cls is not None
    comp = comp_cls(cli, {}, "callfs", "_CALLFS_COMPLETE")
    click.echo(comp.source())


# The client commands (put/get/ls/stat/rm/mv/mkdir/share/sync): callfs/client/commands.py.
client_commands.register(cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors print ``Error: <message>`` on stderr and exit 1 (§20)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        code = cli.main(args=args, prog_name="callfs", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Error: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            click.echo(exc.ctx.get_usage(), err=True)
        sys.exit(1)
    if isinstance(code, int) and code:  # ``ctx.exit(n)``: click returns n in this mode
        sys.exit(code)
