"""Transfer commands: login, logout, push, pull, save, load."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from zreg.registry.archive import load_model, save_model
from zreg.registry.auth import remove_credentials, save_credentials
from zreg.registry.client import RegistryClient
from zreg.registry.errors import InvalidName
from zreg.registry.names import parse_name
from zreg.registry.store import Store
from zreg.registry.transfer import DEFAULT_CONCURRENCY, pull_model, push_model

from .app import cli, fail_cleanly, human_bytes, store_option
from .progress import TransferDisplay


def transfer_options(fn):
    fn = click.option("--insecure", is_flag=True, help="Use plain http (always used for loopback hosts).")(fn)
    fn = click.option("--concurrency", type=click.IntRange(1, 64), default=DEFAULT_CONCURRENCY, show_default=True,
                      help="Blobs transferred at once.")(fn)
    fn = click.option("--stall-timeout", type=click.FloatRange(1), default=30.0, show_default=True,
                      help="Seconds without data before a connection is retried.")(fn)
    return fn


def client_for(name, insecure: bool, stall_timeout: float) -> RegistryClient:
    return RegistryClient(name.host, insecure=insecure, stall_timeout=stall_timeout)


def summary(verb: str, name, result, seconds: float) -> str:
    rate = result.bytes / seconds / 1e6 if seconds > 0 else 0
    mounted = f", {result.mounted} mounted" if result.mounted else ""
    resumed = f", {human_bytes(result.resumed_bytes)} resumed" if result.resumed_bytes else ""
    return (f"{verb} {name.short()} ({result.digest[:19]}): {result.transferred} of {result.blobs} blobs sent "
            f"over the network ({human_bytes(result.bytes)}{resumed}), {result.skipped} already there{mounted}; "
            f"{seconds:.1f}s ({rate:.0f} MB/s)")


@cli.command()
@click.argument("host")
@click.option("-u", "--username", required=True)
@click.option("--password-stdin", is_flag=True, required=True, help="Read the password from standard input.")
@fail_cleanly
def login(host: str, username: str, password_stdin: bool):
    """Store credentials for a registry HOST (file mode 0600; the password is never printed)."""
    if "/" in host:
        raise InvalidName(f"login takes a registry host such as 127.0.0.1:5000, not {host!r}")
    password = sys.stdin.readline().rstrip("\r\n")
    path = save_credentials(host, username, password)
    click.echo(f"credentials for {username}@{host} saved in {path}")


@cli.command()
@click.argument("host")
@fail_cleanly
def logout(host: str):
    """Forget the credentials stored for HOST."""
    click.echo(f"removed credentials for {host}" if remove_credentials(host) else f"no credentials for {host}")


@cli.command()
@click.argument("name")
@click.option("--oci", is_flag=True, help="Push an OCI (CNCF ModelPack) manifest instead of Docker v2.")
@transfer_options
@store_option
@fail_cleanly
def push(name: str, oci: bool, insecure: bool, concurrency: int, stall_timeout: float, models: str | None):
    """Push a model to the registry its NAME carries (host[:port]/namespace/model:tag)."""
    model = parse_name(name)
    start = time.monotonic()
    with TransferDisplay(f"pushing {model.short()}") as display:
        result = push_model(Store(models), model, client_for(model, insecure, stall_timeout), oci=oci,
                            concurrency=concurrency, progress=display)
    click.echo(summary("pushed", model, result, time.monotonic() - start))


@cli.command()
@click.argument("name")
@transfer_options
@store_option
@fail_cleanly
def pull(name: str, insecure: bool, concurrency: int, stall_timeout: float, models: str | None):
    """Pull a model from the registry its NAME carries; only missing blobs are fetched."""
    model = parse_name(name)
    start = time.monotonic()
    with TransferDisplay(f"pulling {model.short()}") as display:
        result = pull_model(Store(models), model, client_for(model, insecure, stall_timeout),
                            concurrency=concurrency, progress=display)
    click.echo(summary("pulled", model, result, time.monotonic() - start))


@cli.command()
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Archive file (.tar, or .tar.zst for zstd).")
@store_option
@fail_cleanly
def save(name: str, output: Path, models: str | None):
    """Write a model as an OCI image layout archive, for sites with no registry."""
    start = time.monotonic()
    blobs, nbytes = save_model(Store(models), parse_name(name), output)
    click.echo(f"saved {parse_name(name).short()} to {output}: {blobs} blobs, {human_bytes(nbytes)}, "
               f"{output.stat().st_size / 1e6:.1f} MB on disk; {time.monotonic() - start:.1f}s")


@cli.command()
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-n", "--name", help="Model name (default: the one recorded in the archive).")
@store_option
@fail_cleanly
def load(archive: Path, name: str | None, models: str | None):
    """Load a model from an archive made by `zreg save`, verifying every blob."""
    model, stored, skipped = load_model(Store(models), archive, parse_name(name) if name else None)
    click.echo(f"loaded {model.short()} from {archive}: {stored} blobs stored, {skipped} already in the store")
