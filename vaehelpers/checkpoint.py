"""Checkpoint files: atomic writes (temp file, fsync, rename) and safe loading (weights_only)."""
from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the file."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write `path` by calling write(temp_path) on a temp file beside it, fsync, then rename over it.

    A reader (or a run killed mid-write) sees either the old file or the new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointError(f"could not write {path}: {error}; the previous file (if any) is untouched") from error
        raise
    # fsync the directory so the rename itself survives a power cut
    with contextlib.suppress(OSError):  # some filesystems refuse a directory fsync
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save `state` atomically."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True: a file that would run code is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain containers "
            f"(it could run code when loaded). Only load checkpoints you trust; details: {error}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
