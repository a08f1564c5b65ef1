"""Entry point of ``python -m dress_lightning`` and the ``dress-lightning`` script.

Project subcommands (``data ...``) are dispatched here; each imports its heavy
dependencies lazily so that ``--help`` and data tools start fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

USAGE = """usage: dress-lightning COMMAND [ARGS...]

commands:
  data      build, convert and inspect WebDataset shards (shapeworld, convert-*, inspect)

Run `dress-lightning COMMAND --help` for the options of a command."""


def _data_main(argv: Sequence[str]) -> int:
    from dress_lightning.data.commands import main

    return main(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "data": _data_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a project subcommand; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    return COMMANDS[command](rest)
