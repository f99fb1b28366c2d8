"""One training per run directory: an exclusive OS file lock on <run_dir>/.lock, held for the whole run.

Two trainings writing one run directory log every step twice and overwrite each other's checkpoint. The
lock is an OS lock (flock on POSIX, msvcrt on Windows), not a marker file: the kernel drops it when its
holder exits, however it exits (kill -9, out of memory, a closed notebook), so a dead run never leaves a
stale lock behind. The file also holds who took it (pid, host, when), for the message a second run gets.

Who holds it: the one process that writes the run directory. A single process locks it itself; under
torchrun only rank 0 does (every rank opening it would refuse its own siblings); under launch() the parent
(the notebook kernel) locks it before spawning and holds it until every process has ended, and its rank 0
knows not to lock again (LOCKED_BY_PARENT_ENV).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

LOCK_NAME = ".lock"
# Set by launch() in the processes it spawns to the launching process's pid: that process holds the lock.
LOCKED_BY_PARENT_ENV = "VAEHELPERS_RUN_LOCKED_BY"

F = TypeVar("F", bound=Callable[..., Any])


class RunDirInUse(RuntimeError):
    """Another process holds the run directory's lock: a training (or scale, convert, evaluate) writes there."""


def try_lock(fd: int) -> bool:
    """Take the exclusive lock on an open file without waiting; False when another process holds it."""
    if sys.platform == "win32":  # pragma: no cover - no Windows here
        import msvcrt

        os.lseek(fd, 1 << 20, os.SEEK_SET)  # lock one byte past the holder text, which others must read
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class RunLock:
    """The exclusive lock on run_dir/.lock; `with RunLock(run_dir):` holds it, or raises RunDirInUse."""

    def __init__(self, run_dir: str | Path, holder: str = "another training") -> None:
        self.run_dir = Path(run_dir)
        self.holder = holder  # who takes it, as a second process is told: "in use by <holder> (pid ...)"
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock now, or raise RunDirInUse naming the holder (pid, host, since when)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's details stay readable
        except OSError as error:  # the same words as train's own check of the run directory
            raise PermissionError(f"run directory {self.run_dir} is not writable: {error}") from error
        if not try_lock(fd):
            holder = holder_of(self.path)
            os.close(fd)
            raise RunDirInUse(
                f"{self.run_dir} is in use by {holder}: wait for it to end, stop it, or choose another run directory"
            )
        os.ftruncate(fd, 0)  # the lock is ours: replace a dead holder's details with ours
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(
            fd,
            json.dumps(
                {
                    "by": self.holder,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                }
            ).encode(),
        )
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the file releases it; the file stays, harmless)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def holder_of(path: str | Path) -> str:
    """Who holds a lock file, as 'another training (pid N on host H since T)' (from the details its holder wrote)."""
    try:
        details = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        details = {}
    if not details:
        return "another process (that has not written its details yet)"
    by = details.get("by", "another training")
    return f"{by} (pid {details.get('pid')} on host {details.get('host')} since {details.get('since')})"


def is_run_dir(folder: str | Path) -> bool:
    """A folder a training uses or used: it holds config.json or the lock file."""
    folder = Path(folder)
    return (folder / "config.json").is_file() or (folder / LOCK_NAME).is_file()


def lock_run_of(path: str | Path, holder: str) -> contextlib.AbstractContextManager[Any]:
    """The run lock of the run directory that `path` (a file or folder to be written) lies in, else a no-op.

    For the commands that write into a run directory (scale, convert, evaluate --json): a training there refuses
    them, and they refuse a training, instead of overwriting each other's files.
    """
    path = Path(path)
    for folder in (path, path.parent):
        if is_run_dir(folder):
            return RunLock(folder, holder)
    return contextlib.nullcontext()


def locked_by_parent() -> bool:
    """True in a process spawned by launch(), whose parent holds the run directory's lock."""
    return os.environ.get(LOCKED_BY_PARENT_ENV) == str(os.getppid())


def holds_run_dir(function: F) -> F:
    """Decorate train(cfg, ...): hold cfg.run_dir's lock for the call, in the process that writes the run.

    That is rank 0 (or the only process, as init_distributed decides), unless launch()'s parent holds it already.
    """

    @functools.wraps(function)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
        if (distributed and int(os.environ["RANK"]) != 0) or locked_by_parent():
            return function(cfg, *args, **kwargs)
        with RunLock(cfg.run_dir):
            return function(cfg, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
