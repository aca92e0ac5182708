"""`shardlm models ...`: fetch the default model, list the cache. Registered by cli.py."""
from __future__ import annotations

import json
import sys

import click

from .config import ModelError
from .fetch import KNOWN, fetch, list_cached, shardlm_home


@click.group("models")
def models() -> None:
    """Model cache: fetch the default model, list what is cached (under $SHARDLM_HOME); write a
    model's client part without its weight matrices (export-client)."""


@models.command("fetch")
@click.argument("name", metavar=f"NAME ({'|'.join(sorted(KNOWN))})")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def fetch_cmd(name: str, as_json: bool) -> None:
    """Download and convert NAME into the cache (a no-op when it is already there).

    Progress goes to stderr; the model directory (or JSON) to stdout.
    """
    try:
        path = fetch(name, progress=True)
    except ModelError as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "name": name, "error": str(e)}))
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps({"ok": True, "name": name, "path": str(path)}) if as_json else str(path))


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def list_cmd(as_json: bool) -> None:
    """Show the cached models."""
    cached = list_cached()
    if as_json:
        click.echo(json.dumps({"home": str(shardlm_home()), "models": cached}))
        return
    if not cached:
        click.echo(f"no models cached in {shardlm_home()} (try: shardlm models fetch smollm2)", err=True)
        return
    for m in cached:
        click.echo(f"{m['name']:<12} {m['bytes'] / 1e6:8.1f} MB  {m['path']}")


if __name__ == "__main__":  # python -m shardlm.models.commands
    sys.exit(models())
