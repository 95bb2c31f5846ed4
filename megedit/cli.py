"""``megedit`` command line: ``edit`` (apply MeG and report pre/post metrics) plus the commands in ``COMMANDS``."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys

# subcommand modules: each has add_parser(subparsers) and main(args)
COMMANDS = ["megedit.cli_edit", "megedit.cli_stats", "megedit.cli_run", "megedit.cli_ask"]
# a user's mistake (bad value, missing or unwritable path), reported in one line; anything else is a bug and keeps its
# traceback. HParamsError, yaml and JSON errors reach here as ValueError.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
DEBUG_ENV = "MEGEDIT_DEBUG"  # set to 1 to see the traceback of every error, a user's mistake too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megedit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of every error (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["megedit", *(sys.argv[1:] if argv is None else argv)])  # kept with results
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    # each command replaces this once it knows whether its work is checkpointed
    args.on_interrupt = "nothing was saved; run the command again to start over"
    try:
        return args.func(args) or 0
    except USER_ERRORS as e:  # bad input: one clear line, no traceback
        if debug:
            raise
        print(f"megedit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nmegedit {args.command}: interrupted; {args.on_interrupt}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
