"""The click group and what every command module shares: error handling, the store option,
byte formatting and the stdout console."""

from __future__ import annotations

import functools
import sys

import click
from rich.console import Console

from zreg import __version__
from zreg.registry.errors import ZregError

from .progress import console

# Tables go to stdout; wide enough that class names are not cut when piped.
out = Console(width=None if sys.stdout.isatty() else 160)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def fail_cleanly(fn):
    """Turn ZregError (and a few OS errors) into one line on stderr and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZregError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            console.print(f"[red]error:[/red] {where}{e.strerror or e}", highlight=False, soft_wrap=True)
            sys.exit(1)
    return wrapper


def store_option(fn):
    return click.option("--models", "models", envvar="ZREG_MODELS", type=click.Path(file_okay=False),
                        help="Store root (default $ZREG_MODELS or ~/.zreg/models).")(fn)


def waiting():
    console.print("waiting for another zreg process to release the store lock...")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zreg")
def cli():
    """zreg: package, move and run image-generation models."""


