"""The ``callfs`` command line (API.md §20). Parses, then calls the daemon; nothing else."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from callfs.errors import ConfigError

CONTEXT = {"help_option_names": ["-h", "--help"]}
JOIN_TIMEOUT = 15.0


def mask_dsn(dsn: str) -> str:
    if not dsn:
        return ""
    if len(dsn) > 20:
        return dsn[:10] + "***" + dsn[-7:]
    return "***"


def _load(config: str | None, dev: bool = False) -> Any:
    from callfs.config import load_config

    return load_config(config, dev=dev)


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """CallFS: local disks and S3 buckets as one file namespace over HTTP."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(server)


@cli.command(context_settings=CONTEXT)
@click.option("--config", "-c", "config", default=None, help="config file (YAML or JSON)")
@click.option("--dev", is_flag=True, help="single dev node: no config needed (see README)")
def server(config: str | None, dev: bool) -> None:
    """Serve until SIGINT or SIGTERM."""
    try:
        cfg = _load(config, dev)
    except ConfigError as exc:
        raise click.ClickException(exc.message) from exc
    from callfs.daemon import run

    on_ready = None
    if dev:
        base = cfg.server.external_url
        key = cfg.auth.api_keys[0]

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
@click.pass_context
def config_validate(ctx: click.Context, config_path: str | None) -> None:
    """Load and validate the configuration; print its main settings."""
    path = config_path or (ctx.obj or {}).get("config")
    click.echo("Validating configuration...")
    try:
        cfg = _load(path)
    except ConfigError as exc:
        click.echo(f"Configuration validation failed: {exc.message}")
        sys.exit(1)
    click.echo("Configuration is valid")
    click.echo(f"Instance ID: {cfg.instance_discovery.instance_id}")
    click.echo(f"Listen Address: {cfg.server.listen_addr}")
    click.echo(f"Metadata Store DSN: {mask_dsn(cfg.metadata_store.dsn)}")
    click.echo(f"Redis Address: {cfg.dlm.redis_addr}")
    click.echo(f"Local FS Root: {cfg.backend.localfs_root_path}")
    if cfg.backend.s3_bucket_name:
        click.echo(f"S3 Bucket: {cfg.backend.s3_bucket_name}")
        click.echo(f"S3 Region: {cfg.backend.s3_region}")


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
    if not all(values.values()):
        try:
            cfg = _load(config_path or (ctx.obj or {}).get("config"))
        except ConfigError:
            cfg = None
        if cfg is not None:
            defaults = {
                "node_id": cfg.raft.node_id,
                "raft_addr": cfg.raft.bind_addr,
                "api_endpoint": cfg.server.external_url,
                "secret": cfg.auth.internal_proxy_secret,
            }
            values = {k: v or defaults[k].strip() for k, v in values.items()}
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
    body = json.dumps(
        {
            "node_id": values["node_id"],
            "raft_addr": values["raft_addr"],
            "api_endpoint": values["api_endpoint"],
        }
    ).encode()
    request = urllib.request.Request(  # noqa: S310 - an operator-given http(s) URL
        leader.strip().rstrip("/") + "/v1/internal/raft/join",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {values['secret']}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=JOIN_TIMEOUT) as resp:  # noqa: S310
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"failed to contact leader: {reason}") from exc
    try:
        answer = json.loads(raw)
    except ValueError as exc:
        raise click.ClickException(f"failed to decode join response: {exc}") from exc
    if status != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        if error:
            raise click.ClickException(f"join failed: {error}")
        raise click.ClickException(f"join failed with status {status}")
    click.echo(
        f"Join successful: node={values['node_id']} leader={answer.get('leader_id', '')} "
        f"status={answer.get('status', '')}"
    )


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
@click.option("--days", default=825, show_default=True, type=int)
def cert_generate(hosts: tuple[str, ...], cert_file: str, key_file: str, days: int) -> None:
    """Write a self-signed certificate (its own CA) and key (mode 0600) for a cluster."""
    from callfs.tls import generate_self_signed

    names = [h.strip() for item in hosts for h in item.split(",") if h.strip()]
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors print ``Error: <message>`` on stderr and exit 1 (§20)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="callfs", standalone_mode=False)
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
