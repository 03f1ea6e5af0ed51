"""`zreg serve`: the OCI distribution API over the local store."""

from __future__ import annotations

from pathlib import Path

import click

from zreg.registry.names import default_host
from zreg.registry.store import Store
from zreg.registry.uploads import UPLOAD_MAX_AGE

from .app import cli, fail_cleanly, store_option
from .progress import console

# Loopback by default: serving the store to a network should be a choice. Ollama is 11434.
DEFAULT_ADDR = "127.0.0.1:11435"


@cli.command()
@click.option("--addr", default=DEFAULT_ADDR, show_default=True,
              help="HOST:PORT to listen on. Loopback by default; another host serves the store to that network.")
@click.option("--host-name", help="Serve the models stored under this registry host (default: the store's "
                                  "default host, $ZREG_DEFAULT_HOST or registry.ollama.ai).")
@click.option("--htpasswd", "htpasswd_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="bcrypt htpasswd file (`htpasswd -Bbn USER PASSWORD`): its users may push and delete. "
                   "Without it the registry is read-only.")
@click.option("--auth-reads", is_flag=True, help="Require credentials for pulls too (needs --htpasswd).")
@click.option("--upload-max-age", type=click.FloatRange(min=0, min_open=True), default=UPLOAD_MAX_AGE / 3600, show_default=True,
              help="Hours an idle upload session is kept before it is purged.")
@store_option
@fail_cleanly
def serve(addr: str, host_name: str | None, htpasswd_file: Path | None, auth_reads: bool,
          upload_max_age: float, models: str | None):
    """Serve the store over the OCI distribution API (/v2/) until Ctrl-C or SIGTERM."""
    # Imported here: aiohttp would slow every other zreg command's start.
    from zreg.registry.htpasswd import Htpasswd
    from zreg.registry.names import is_loopback
    from zreg.registry.server import make_app, parse_addr, run

    host, port = parse_addr(addr)
    if auth_reads and htpasswd_file is None:
        raise click.UsageError("--auth-reads needs --htpasswd")
    store = Store(models)
    htpasswd = Htpasswd(htpasswd_file) if htpasswd_file else None
    if htpasswd and htpasswd.skipped:
        console.print(f"ignoring non-bcrypt entries in {htpasswd_file} for: {', '.join(htpasswd.skipped)}")
    app = make_app(store, host_name=host_name, htpasswd=htpasswd, auth_reads=auth_reads,
                   upload_max_age=upload_max_age * 3600)
    if not is_loopback(host):
        console.print(f"note: listening on {host}: the store is readable from that network"
                      + (" and Basic credentials travel unencrypted (put a TLS proxy in front)" if htpasswd else ""))
    mode = "read-only" if htpasswd is None else \
        f"push with {htpasswd_file}" + (", pulls need credentials" if auth_reads else "")
    shown = f"[{host}]" if ":" in host else host

    def ready():
        click.echo(f"zreg serve: http://{shown}:{port}/v2/ over {store.root} "
                   f"(host {host_name or default_host()}, {mode}); Ctrl-C stops", err=True)

    run(app, host, port, on_ready=ready)
