"""`zreg serve`: the OCI distribution API over the local store."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from zreg.registry.errors import ZregError
from zreg.registry.names import default_host
from zreg.registry.store import Store
from zreg.registry.uploads import UPLOAD_MAX_AGE
from zreg.runtime.service import DEFAULT_MAX_QUEUE

from .app import cli, fail_cleanly, store_option
from .progress import console

# Loopback by default: serving the store to a network should be a choice. Ollama is 11434.
DEFAULT_ADDR = "127.0.0.1:11435"
DEFAULT_IMAGE_TTL = 3600.0   # seconds a `response_format: "url"` image stays downloadable


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
@click.option("--keep-alive", default=None, help="How long a model stays loaded after a request (300, 5m, 1h; "
                                               "-1 forever). Default $ZREG_KEEP_ALIVE or 5m.")
@click.option("--max-queue", type=click.IntRange(0, 1000), default=DEFAULT_MAX_QUEUE, show_default=True,
              help="Image requests that may wait while one runs; more get 503 with Retry-After.")
@click.option("--image-ttl", type=click.FloatRange(1), default=DEFAULT_IMAGE_TTL, show_default=True,
              help="Seconds an image answered with response_format=url stays downloadable.")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default=None,
              help="Where images are generated (default: $ZREG_DEVICE, else the GPU when MLX has one).")
@store_option
@fail_cleanly
def serve(addr: str, host_name: str | None, htpasswd_file: Path | None, auth_reads: bool,
          upload_max_age: float, keep_alive: str | None, max_queue: int, image_ttl: float,
          device: str | None, models: str | None):
    """Serve the store: the OCI distribution API (/v2/) and the OpenAI-compatible image API
    (/v1/images/generations, /api/ps, /api/stop, /api/tags), until Ctrl-C or SIGTERM."""
    from zreg.runtime import blas

    # Image generation uses MLX's CPU matmuls: before MLX runs. The BLAS threads' idle policy
    # follows the largest model stored (see runtime/blas.py); an empty store means real-size.
    from zreg.registry.inspect_model import list_models

    blas.reexec_with_fast_blas(lambda: max((m.size for m in list_models(Store(models))), default=None))
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
    from zreg.runtime.api import ImageStore, add_image_routes
    from zreg.runtime.backend import select
    from zreg.runtime.service import ModelService

    backend = select(device)
    images = ImageStore(Path(tempfile.mkdtemp(prefix="zreg-images-")), image_ttl)
    add_image_routes(app, ModelService(store, backend, max_queue=max_queue, keep_alive=keep_alive), images)
    if not is_loopback(host):
        console.print(f"note: listening on {host}: the store is readable from that network"
                      + (" and Basic credentials travel unencrypted (put a TLS proxy in front)" if htpasswd else ""))
    mode = "read-only" if htpasswd is None else \
        f"push with {htpasswd_file}" + (", pulls need credentials" if auth_reads else "")
    shown = f"[{host}]" if ":" in host else host

    def ready():
        click.echo(f"zreg serve: http://{shown}:{port}/v2/ over {store.root} "
                   f"(host {host_name or default_host()}, {mode}); images on {backend.describe()} at "
                   f"http://{shown}:{port}/v1/images/generations; Ctrl-C stops", err=True)

    run(app, host, port, on_ready=ready)


def server_address(host: str | None) -> str:
    host = host or os.environ.get("ZREG_HOST") or DEFAULT_ADDR
    return host if host.startswith("http") else f"http://{host}"


def api_call(method: str, host: str | None, path: str, body: dict | None = None) -> dict:
    import requests

    url = server_address(host) + path
    try:
        resp = requests.request(method, url, json=body, timeout=30)
    except requests.RequestException:
        raise ZregError(f"no zreg server at {server_address(host)} (start one with `zreg serve`)") from None
    data = resp.json()
    if resp.status_code != 200:
        raise ZregError(data.get("error", {}).get("message", f"{url} answered {resp.status_code}"))
    return data


@cli.command()
@click.option("--host", help="Server address (default $ZREG_HOST or 127.0.0.1:11435).")
@fail_cleanly
def ps(host: str | None):
    """List the models a running `zreg serve` has loaded."""
    from rich.table import Table

    from .app import human_bytes, out

    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "ID", "SIZE", "UNTIL", "ACTIVE"):
        table.add_column(col)
    for m in api_call("GET", host, "/api/ps")["models"]:
        table.add_row(m["name"], m["digest"][7:19], human_bytes(m["size"]), m["expires_at"] or "forever",
                      str(m["active"]))
    out.print(table)


@cli.command()
@click.argument("name")
@click.option("--host", help="Server address (default $ZREG_HOST or 127.0.0.1:11435).")
@fail_cleanly
def stop(name: str, host: str | None):
    """Unload a model from a running `zreg serve`."""
    result = api_call("POST", host, "/api/stop", {"model": name})
    click.echo(f"{result['model']}: {result['status']}")
