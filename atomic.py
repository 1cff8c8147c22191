"""Atomic file writes: everything goes to a temporary file beside its target, then `os.replace`.
A write that fails leaves the old file as it was and raises WriteError, one line naming the path
and the reason; temporary files that a killed process left behind are swept up by the next write
of the same target. A folder that one process writes is locked against a second (folder_lock)."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from cli import UserError

# Reasons a user fixes by choosing another place (exit 2); others, such as a full disk or an I/O
# error, are not the user's doing (exit 1).
USER_ERRNOS = {errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST}
USER_ERRNOS.add(errno.ENAMETOOLONG)


class WriteError(UserError):
    """A file could not be written: its path and the system's reason, in one line."""

    def __init__(self, path: Path, error: OSError, flag: str = "") -> None:
        reason = error.strerror or type(error).__name__
        where = f"{flag} {path}" if flag else str(path)
        super().__init__(f"{where}: cannot write: {reason} (nothing there was changed)")
        self.exit_code = 2 if error.errno in USER_ERRNOS else 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path`, named after it and this process."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        return tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
    except OSError as e:
        raise WriteError(path, e) from None


def _sweep_stale_temporaries(path: Path) -> None:
    """Remove temporary files of `path` whose writing process is gone (killed mid-write)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.\w+\.tmp")
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        match = pattern.fullmatch(leftover.name)
        if match and not _alive(int(match[1])):
            with suppress(OSError):
                leftover.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces `path` only when the block succeeds."""
    path = Path(path)
    fd, tmp = _temporary(path)
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    try:
        with os.fdopen(fd, mode, **text) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(path, e) from None
        raise
    _sweep_stale_temporaries(path)


def write_files(contents: dict[Path, bytes]) -> None:
    """Write several files so that a failure changes none of them: every one to its temporary
    file first, then each put in place, in the order given."""
    temporaries = {}
    try:
        for path, data in contents.items():
            fd, tmp = _temporary(path)
            temporaries[path] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~_umask())
    except BaseException as e:
        for tmp in temporaries.values():
            with suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(path, e) from None
        raise
    for path, tmp in temporaries.items():
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise WriteError(path, e) from None
        _sweep_stale_temporaries(path)


def _missing_folders(directory: Path) -> list[Path]:
    """`directory` and those of its parents that do not exist yet, the deepest first: what
    making it makes, and what to remove again."""
    missing, folder = [], directory
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def ensure_writable(directory: str | Path, flag: str, create: bool = False) -> None:
    """Check that files can be written in `directory` (given as `flag`), before work that would
    be lost if they could not, with a probe file there. Folders made for the probe are removed
    again unless `create` says to keep them (the first write makes them), so that a refused run
    leaves no empty folder behind."""
    directory = Path(directory)
    missing = _missing_folders(directory)  # what the probe makes
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise WriteError(directory, e, flag) from None
    finally:
        for made in [] if create else missing:  # the deepest first
            with suppress(OSError):
                made.rmdir()


LOCK_NAME = ".lock"  # in a folder a process holds (folder_lock): the holder's pid


@contextmanager
def folder_lock(directory: str | Path, flag: str) -> Iterator[None]:
    """Hold `directory` (given as `flag`) while the block runs: another process that asks for it
    meanwhile gets a UserError naming this one's pid. The lock (flock on DIR/.lock) ends with
    the block or with the process, even a killed one."""
    import fcntl

    directory = Path(directory)
    missing = _missing_folders(directory)  # what the lock makes
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteError(path, e, flag) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(
            f"{flag} {directory}: another run (pid {holder}) is writing there; wait for it to "
            f"end or give {flag} another folder"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    except BaseException:
        if missing:  # a refused run leaves no folder it made behind
            with suppress(OSError):
                if [p.name for p in directory.iterdir()] == [LOCK_NAME]:
                    path.unlink()
                for made in missing:
                    made.rmdir()
        raise
    finally:
        os.close(fd)  # releases the lock


def write_json(path: str | Path, obj: object) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
