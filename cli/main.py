"""Entry point of the `zreg` command: the group and every command module that adds to it."""

from . import store_commands  # noqa: F401  (registers the commands)
from . import serve_commands  # noqa: F401
from . import transfer_commands  # noqa: F401
from . import run_commands  # noqa: F401
from .app import cli


def main():
    cli()


if __name__ == "__main__":
    main()
