"""Command line interface: ``python -m backpack_tn <command> [options]``.

Commands are registered in :data:`COMMANDS`; each adds its subparser and sets
the default ``command_fn(args, parser) -> exit code`` (and optionally
``command_parser``, passed as ``parser``). :data:`DEFAULT_COMMAND` names the
command run without arguments. Option errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from backpack_tn.benchmark.cli import add_bench_parser
from backpack_tn.benchmark.network_run import add_run_parser


class _Parser(argparse.ArgumentParser):
    """Argument parser whose errors are one line (plus exit code 2)."""

    def error(self, message: str):
        """Print ``prog: error: message`` and exit with code 2.

        Args:
            message: What was wrong.
        """
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: Subcommands: each function adds a subparser to the given subparsers object.
COMMANDS: tuple[
    Callable[[argparse._SubParsersAction], argparse.ArgumentParser], ...
] = (add_run_parser, add_bench_parser)

#: Command run when none is given (``None``: print the help).
DEFAULT_COMMAND: str | None = "run"

HELP = ("-h", "--help")

#: Internal commands, dispatched before argument parsing and not listed in --help.
_INTERNAL = {
    "fork-server": "backpack_tn.benchmark.fork_server:serve",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with all subcommands.

    Returns:
        The parser.
    """
    parser = _Parser(
        prog="python -m backpack_tn",
        description="backpack_tn: BackPACK's Jacobian products for Linear, Conv and "
        "ConvTranspose layers through einsum tensor networks.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit code.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    starts_with_option = argv and argv[0].startswith("-")
    if DEFAULT_COMMAND and (not argv or starts_with_option and argv[0] not in HELP):
        # no command: the default one, with its options given directly
        argv = [DEFAULT_COMMAND, *argv]
    if argv and argv[0] in _INTERNAL:
        module, function = _INTERNAL[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command_fn"):
        parser.print_help()
        return 0
    return args.command_fn(args, getattr(args, "command_parser", None))


if __name__ == "__main__":
    sys.exit(main())
