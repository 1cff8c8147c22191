"""What every command-line entry point shares: the one-line user error, an argument parser that
shows every default, running a main function with clean exits (errors, Ctrl-C, SIGTERM, a closed
pipe), where outputs go by default, the batch size of forward passes without gradients,
progress through batches (a bar on a terminal, lines elsewhere), and the rule for class names
that every written file and page shows."""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

MAX_ERROR_CHARS = 300  # an error line longer than this is cut in the middle
EVAL_BATCH_SIZE = 1024  # images a forward pass when no gradients are kept (scoring, predicting)


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` as one line of printable characters (others escaped, as \\x1b), at most `limit`
    long: a longer one loses its middle, so that the start and the advice at the end remain."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[: limit - tail - 5]} ... {text[-tail:]}"


class UserError(Exception):
    """Bad input or a bad flag: a CLI prints it as one `error:` line (printable, bounded) and
    exits with `exit_code`, 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class Terminated(Exception):
    """SIGTERM arrived: stop as Ctrl-C stops, keeping what was saved."""


def _terminate(signum, frame) -> None:
    raise Terminated


VERSION = "2026.12"  # the project's, by the month of its release


def version_line() -> str:
    """--version's answer: the project's version, and Python's and torch's (read without
    importing torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    return f"%(prog)s {VERSION} (Python {sys.version.split()[0]}, torch {torch})"


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's real default: none shown where there is none to show (None, or a
    help text that says it), a list as its words, a path inside the current folder as a
    relative one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default, text = action.default, action.help or ""
        unset = default is None or default is argparse.SUPPRESS
        if unset or "default:" in text or not action.option_strings:
            return text
        if isinstance(default, list | tuple):
            default = " ".join(map(str, default))
        if isinstance(default, os.PathLike):
            default = os.fspath(default)
        if isinstance(default, str) and os.path.isabs(default):
            relative = os.path.relpath(default)
            default = default if relative.startswith("..") else relative
        return f"{text} (default: {str(default).replace('%', '%%')})"


class CLIParser(argparse.ArgumentParser):
    """argparse with every default in --help and bad flags reported as one UserError line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version_line())

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a CLI entry point: a UserError becomes one line on stderr and its exit code (2, or 1
    for a failure that is not the user's); Ctrl-C and SIGTERM stop it with one line and 130 or
    143; output into a closed pipe ends it quietly with 141. The process's exit then skips the
    garbage collector's last pass."""
    # At the exit of a process that ran a command, every object left is moved out of the garbage
    # collector's sight (gc.freeze): its last collection would otherwise walk all of torch's
    # modules, about 0.4 s of every command. Registered once however many commands a process
    # runs; a script that only imports the project's modules keeps its last collection.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        signal.signal(signal.SIGTERM, _terminate)
    try:
        main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Terminated:
        print("terminated", file=sys.stderr)
        raise SystemExit(143) from None
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def first_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type's name: what a one-line
    error can quote of a library's multi-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


MAX_NAME_CHARS = 100  # a class name's length, in the CSVs, the report and the page


def class_names_problem(names) -> str | None:
    """What makes a checkpoint's or an export's class names unusable in the CSVs, the report
    and the page: not a list of names; an empty, overlong or repeated one; one with a comma, a
    quote or a control character. None when they are fine."""
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return "class_names is not a list of names"
    for name in names:
        if not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable() or set(name) & set(',"'):
            return (
                f"class name {name[:40]!r} is not 1..{MAX_NAME_CHARS} printable characters "
                "without a comma or a quote"
            )
    if len(set(names)) < len(names):
        return "class_names names a class twice"
    return None


def working_root() -> Path:
    """Where commands write by default: $KAGGLE_WORKING_ROOT, else /kaggle/working inside a Kaggle
    kernel (which sets KAGGLE_KERNEL_RUN_TYPE), else the current directory."""
    if "KAGGLE_WORKING_ROOT" in os.environ:
        return Path(os.environ["KAGGLE_WORKING_ROOT"])
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
        return Path("/kaggle/working")
    return Path()


PROGRESS_SECONDS = 30.0  # outside a terminal, a progress line about this often


class ProgressLines:
    """Progress through batches as a plain line on stderr about every `every` seconds, for
    where a bar cannot redraw: a log file, a notebook cell, Kaggle's batch log."""

    def __init__(self, label: str, batches: int, every: float) -> None:
        self.label, self.batches, self.every = label, batches, every
        self.started = self.last = time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.every

    def show(self, done: int, seen: int, stats: dict[str, str]) -> None:
        self.last = time.perf_counter()
        rate = seen / (self.last - self.started)
        left = (self.last - self.started) * (self.batches - done) / done
        shown = "".join(f"{name} {value}  " for name, value in stats.items())
        print(
            f"{self.label}  batch {done}/{self.batches}  {shown}"
            f"{rate:,.0f} images/s  {left:.0f}s left",
            file=sys.stderr,
            flush=True,
        )


class Progress:
    """Progress through `batches` batches labelled `label` (None: shown nowhere): a live tqdm
    bar when stderr is a terminal, else a ProgressLines line about every `every` seconds."""

    def __init__(self, label: str | None, batches: int, every: float | None = None) -> None:
        from tqdm import tqdm

        self.batches = batches
        self.live = label is not None and sys.stderr.isatty()
        every = PROGRESS_SECONDS if every is None else every
        quiet = label is None or self.live
        self.lines = None if quiet else ProgressLines(label, batches, every)
        self.bar = tqdm(total=batches, desc=label, leave=False, disable=not self.live, unit="batch")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def step(self, done: int, seen: int, stats: Callable[[], dict[str, str]] | None = None) -> None:
        """Batch `done` (from 1) is over and `seen` images with it; `stats` gives what else to
        show, called only when shown (it may wait for the device)."""
        if self.live:
            self.bar.update(1)
            if stats is not None and done % 20 == 1:
                self.bar.set_postfix(stats())
        elif self.lines is not None and self.lines.due() and done < self.batches:
            self.lines.show(done, seen, {} if stats is None else stats())
