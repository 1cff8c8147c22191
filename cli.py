"""What every command-line entry point shares: the one-line user error, an argument parser that
shows every default, running a main function with clean exits, and where outputs go by default."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """Bad input or a bad flag: a CLI prints it as one `error:` line and exits with code 2."""


class CLIParser(argparse.ArgumentParser):
    """argparse with every default in --help and bad flags reported as one UserError line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a CLI entry point, turning a UserError into one line on stderr and exit code 2."""
    try:
        main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None


def first_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type's name: what a one-line
    error can quote of a library's multi-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def working_root() -> Path:
    """Where commands write by default: $KAGGLE_WORKING_ROOT, else /kaggle/working inside a Kaggle
    kernel (which sets KAGGLE_KERNEL_RUN_TYPE), else the current directory."""
    if "KAGGLE_WORKING_ROOT" in os.environ:
        return Path(os.environ["KAGGLE_WORKING_ROOT"])
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
        return Path("/kaggle/working")
    return Path()
