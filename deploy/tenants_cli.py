"""`knnssd tenants add|remove|list`: manage tenants in Redis (default) or in a tenants YAML file (--file).

`add` prints the new key once; only its salted hash is stored. Heavy imports stay inside the commands.
"""

from __future__ import annotations

from typing import Optional

import typer

tenants_app = typer.Typer(no_args_is_help=True, help="Tenants and their API keys.")

_FILE = typer.Option(None, "--file", "-f", help="Tenants YAML file to edit instead of Redis.")
_CONFIG = typer.Option(None, "--config", "-c", help="Service config YAML (for redis_url and redis_prefix).")
_URL = typer.Option(None, "--redis-url", help="Redis URL (default: the config's, else $REDIS_URL or localhost).")
_PREFIX = typer.Option(None, "--prefix", help="Redis key prefix (default: the config's, 'knnssd:').")


def _store(config: Optional[str], redis_url: Optional[str], prefix: Optional[str]):
    import redis

    from services.config import AppConfig
    from services.tenants import TenantStore

    cfg = AppConfig.load(config)
    client = redis.Redis.from_url(redis_url or cfg.redis_url, socket_timeout=5, socket_connect_timeout=5)
    return TenantStore(client, prefix=prefix if prefix is not None else cfg.redis_prefix), client


@tenants_app.command("add")
def add(
    name: str = typer.Argument(..., help="Tenant name (letters, digits, '_', '.', '-')."),
    rpm: Optional[int] = typer.Option(None, "--rpm", min=0, help="Requests per minute; default from config; 0 = unlimited."),
    tpm: Optional[int] = typer.Option(None, "--tpm", min=0, help="Tokens per minute; default from config; 0 = unlimited."),
    index_version: Optional[str] = typer.Option(None, "--index-version", help="Pin the tenant to an index version."),
    max_concurrent: Optional[int] = typer.Option(
        None, "--max-concurrent", min=0, help="Requests in flight per gateway replica; default from config; 0 = unlimited."
    ),
    max_prompt_tokens: Optional[int] = typer.Option(
        None, "--max-prompt-tokens", min=0, help="Longest prompt in tokens; default from config; 0 = the model's context."
    ),
    admin: bool = typer.Option(False, "--admin", help="The key may also read /metrics."),
    file: Optional[str] = _FILE,
    config: Optional[str] = _CONFIG,
    redis_url: Optional[str] = _URL,
    prefix: Optional[str] = _PREFIX,
) -> None:
    """Add a tenant and print its API key (shown only this once)."""
    kw = {"rpm": rpm, "tpm": tpm, "index_version": index_version, "max_concurrent": max_concurrent,
          "max_prompt_tokens": max_prompt_tokens, "admin": admin}
    try:
        if file:
            from services.tenants import add_tenant_to_file

            tenant, key = add_tenant_to_file(file, name, **kw)
        else:
            store, client = _store(config, redis_url, prefix)
            try:
                tenant, key = store.add(name, **kw)
            finally:
                client.close()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"tenant {tenant.name} added; its API key (shown once, store it now):", err=True)
    typer.echo(key)


@tenants_app.command("remove")
def remove(
    name: str = typer.Argument(..., help="Tenant to remove."),
    file: Optional[str] = _FILE,
    config: Optional[str] = _CONFIG,
    redis_url: Optional[str] = _URL,
    prefix: Optional[str] = _PREFIX,
) -> None:
    """Remove a tenant; its key stops working at once on every gateway (its name may be added again later,
    with a fresh id: limits and usage start anew)."""
    if file:
        from services.tenants import remove_tenant_from_file

        removed = remove_tenant_from_file(file, name)
    else:
        store, client = _store(config, redis_url, prefix)
        try:
            removed = store.remove(name)
        finally:
            client.close()
    if not removed:
        typer.echo(f"error: no tenant {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"tenant {name} removed")


@tenants_app.command("list")
def list_(
    file: Optional[str] = _FILE,
    config: Optional[str] = _CONFIG,
    redis_url: Optional[str] = _URL,
    prefix: Optional[str] = _PREFIX,
) -> None:
    """List tenants and their limits (never keys)."""
    from rich.console import Console
    from rich.table import Table

    if file:
        from services.tenants import load_tenants_file

        rows = [(t, "file") for t in load_tenants_file(file)]
    else:
        store, client = _store(config, redis_url, prefix)
        try:
            rows = store.list_tenants()
        finally:
            client.close()
    table = Table("name", "id", "rpm", "tpm", "concurrent", "prompt tokens", "index version", "admin", "source")

    def limit(v: int | None) -> str:
        return "default" if v is None else str(v)

    for t, source in rows:
        table.add_row(t.name, t.id, limit(t.rpm), limit(t.tpm), limit(t.max_concurrent), limit(t.max_prompt_tokens),
                      t.index_version or "current", "yes" if t.admin else "", source)
    Console(width=120).print(table)
