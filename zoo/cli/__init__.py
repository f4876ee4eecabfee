"""The `zoo` command. Each subcommand lives in its own module with `add_parser(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# modules that contribute subcommands; each defines add_parser(subparsers)
COMMAND_MODULES = ["zoo.cli.models", "zoo.cli.generate", "zoo.cli.classify", "zoo.cli.train", "zoo.cli.bench"]


class CliError(Exception):
    """An error worth one line to the user (no traceback unless --verbose)."""


class UsageError(CliError):
    """Arguments argparse refused (exit status 2, as argparse's own)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to find the usage, not the usage itself."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="zoo",
        description="attnzoo: efficient-attention vision backbones and diffusion generators.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    for command in sub.choices.values():  # `zoo train --verbose` as well as `zoo --verbose train`
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    return parser


def one_line(error: BaseException) -> str:
    """The first line of `error`'s message; further lines are joined when short, else counted."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    rest = "; ".join(lines[1:])
    if not rest:
        return lines[0]
    return f"{lines[0]}; {rest}" if len(rest) <= 300 else f"{lines[0]} (and {len(lines) - 1} more lines: rerun with --verbose)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as e:  # a command that parses arguments of its own (`zoo bench model ...`)
        print(e, file=sys.stderr)
        return 2
    except BrokenPipeError:  # `zoo list | head`: the reader left; stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's exit-time flush of stdout would raise again
        return 0
    except KeyboardInterrupt:
        print(f"zoo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the one-line promise covers every error; --verbose shows the traceback
        if args.verbose:
            raise
        expected = isinstance(e, (CliError, ValueError, FileNotFoundError, RuntimeError, OSError, ImportError))
        message = one_line(e) if expected else f"{type(e).__name__}: {one_line(e)} (rerun with --verbose for the traceback)"
        print(f"zoo {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
