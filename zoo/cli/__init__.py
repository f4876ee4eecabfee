"""The `zoo` command. Each subcommand lives in its own module with `add_parser(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

# modules that contribute subcommands; each defines add_parser(subparsers)
COMMAND_MODULES = ["zoo.cli.models", "zoo.cli.generate", "zoo.cli.classify", "zoo.cli.train", "zoo.cli.bench"]


class CliError(Exception):
    """An error worth one line to the user (no traceback unless --verbose)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoo",
        description="attnzoo: efficient-attention vision backbones and diffusion generators.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, FileNotFoundError, RuntimeError, OSError, ImportError) as e:
        if args.verbose:
            raise
        print(f"zoo {args.command}: error: {e}".splitlines()[0] if "\n" not in str(e) else f"zoo {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
