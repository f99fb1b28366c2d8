"""The image cache: decoded, resized uint8 images appended to shards on disk by parallel workers, read memory-mapped.

Layout of one cache folder (one image folder or set of tar shards, one split, size and resize mode):

    settings.json                  what the pixels depend on; a mismatch empties the folder
    lock                           flock'ed by the one process that builds (other processes, other machines wait)
    shard-000000-<token>.bin       uint8 pixels of images, (3, h, w) each, end to end (append-only)
    shard-000000-<token>.json      the index of the sources (files or tar shards) completed while that shard was
                                   open: per image its key, name, reason if bad, and (shard, offset, h, w)

A shard is closed once it holds SHARD_BYTES: its pixels are fsynced, then its index is written atomically (a
temporary file, fsync, rename). An index only names pixels that are already on disk, so a build killed at any
moment loses the shard it was writing and nothing else, and a reader never sees half-written pixels. Sources
are keyed by (relative path, size, mtime): a rebuild decodes only sources that are new or changed, and shards
that no current source uses are deleted. The random token in each shard's name means a number is never reused
for other pixels. Peak memory does not grow with the number of images: workers hand each decoded image to the
writer through a bounded queue, and the writer appends it to the open shard.

Several processes: in a distributed run local rank 0 of each machine builds (once_per_machine) while the other
ranks wait, then they all read. Machines that share the cache folder (one network disk) take turns through the
folder's lock: the first builds, the others wait for the lock, find every source indexed and only read. A lock
rather than a cache per machine, because per-machine caches decode every image once per machine and store it
once per machine (8 machines: 8x the decode time of the slowest and 8x the disk), while the lock costs the
others only the wait. flock works on local disks and NFSv4; on a filesystem without working locks (some Lustre
or old NFS mounts) give each machine its own data.cache_dir.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import multiprocessing
import os
import queue
import secrets
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from vaehelpers.images import BadImageError, load_image, resize_image, split_of
from vaehelpers.tarshards import NotATarError, read_samples

logger = logging.getLogger("vaehelpers.data")

CACHE_VERSION = 2  # bump when the layout or the resize changes
SHARD_BYTES = 64 * 2**20  # ~1300 images at 128 px: the most a killed build can lose
INDEX_FORMAT = "vaehelpers image cache shard"
SETTINGS_FILE, LOCK_FILE = "settings.json", "lock"
SMALL_BUILD = 16  # sources per worker below which forking workers costs more than it saves
T = TypeVar("T")


class CacheWriteError(RuntimeError):
    """The cache could not be written (disk full, quota, I/O error); the finished shards stay usable."""


@dataclass(frozen=True)
class Source:
    """One unit of decoding: an image file, or a WebDataset tar shard of many samples."""

    key: str  # path relative to the data's root, posix and NFC: a file's split key, or the shard's name
    path: Path
    size: int  # bytes and mtime (ns) at listing time: a change means the source is decoded again
    mtime: int
    kind: Literal["file", "tar"] = "file"


@dataclass(frozen=True)
class Entry:
    """One image of a source (a file has one; a shard one per sample) and where its pixels are, or why it is bad."""

    key: str  # the key the split hashes: a file's relative path, a sample's WebDataset key
    name: str  # shown to the user, relative to the root: 'sub/a.jpg', 'shards/000.tar/0001.jpg'
    reason: str  # "" for a usable image
    shard: str = ""  # the stem of the .bin file holding the pixels
    offset: int = 0
    height: int = 0
    width: int = 0


@dataclass(frozen=True)
class DecodeOptions:
    """Everything a worker needs to turn a source into cache entries (pickled to each worker)."""

    image_size: int
    resize: str
    min_size: int
    max_pixels: int
    draft_size: int
    split: str  # tar samples are filtered by the split of their key here (files are filtered when listed)
    test_fraction: float


def default_workers() -> int:
    """Every core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Decoding (in worker processes, or in this one for small builds)

Item = tuple[str, str, str, bytes | None, int, int]  # key, name, reason, pixels (3*h*w bytes), height, width


def _decode_image(path: Path, key: str, name: str, data: bytes | None, options: DecodeOptions) -> Item:
    try:
        image = load_image(
            path, min_size=options.min_size, max_pixels=options.max_pixels, draft_size=options.draft_size, data=data
        )
    except BadImageError as error:
        return key, name, error.reason, None, 0, 0
    pixels = resize_image(image, options.image_size, options.resize)  # uint8 (3, h, w)
    return key, name, "", pixels.numpy().tobytes(), int(pixels.shape[1]), int(pixels.shape[2])


def _decode_source(source: Source, options: DecodeOptions) -> Iterator[Item]:
    """The entries of one source, in order. A damaged shard keeps the samples before the damage and adds one
    entry for the shard itself (key "") saying what happened."""
    if source.kind == "file":
        yield _decode_image(source.path, source.key, source.key, None, options)
        return

    def wanted(key: str) -> bool:
        return options.split == "all" or split_of(key, options.test_fraction) == options.split

    seen = 0
    try:
        for sample in read_samples(source.path, wanted):
            seen += 1
            name = f"{source.key}/{sample.name}"
            if sample.reason:
                yield sample.key, name, sample.reason, None, 0, 0
            else:
                yield _decode_image(source.path / sample.name, sample.key, name, sample.data, options)
    except FileNotFoundError as error:
        yield "", source.key, f"unreadable: {error.strerror}", None, 0, 0
    except NotATarError as error:
        yield "", source.key, str(error), None, 0, 0
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        yield "", source.key, f"truncated or damaged tar ({error}); its {seen} samples before that are kept", None, 0, 0


def _worker(sources: list[Source], tasks: Any, results: Any, options: DecodeOptions) -> None:
    torch.set_num_threads(1)  # one core per worker, as DataLoader workers do
    while (index := tasks.get()) is not None:
        try:
            for item in _decode_source(sources[index], options):
                results.put(("item", index, item))
        except Exception as error:  # a bug or an unexpected library error: the build names the source and stops
            results.put(("error", index, f"{type(error).__name__}: {error}"))
            return
        results.put(("done", index, None))


def _decode_all(sources: list[Source], options: DecodeOptions, workers: int) -> Iterator[tuple[str, int, Any]]:
    """("item", source index, Item) for every image and ("done", source index, None) after each source's last.

    Items of one source come in order; sources complete in any order. workers <= 1: decoded here, in order.
    """
    if workers <= 1:
        threads = torch.get_num_threads()
        # one thread, as in the workers: resize_image's small tensor copy is otherwise an OpenMP parallel loop,
        # measured 20x slower per image on a busy 2-core machine (24 ms against 1.3 ms)
        torch.set_num_threads(1)
        try:
            for index, source in enumerate(sources):
                for item in _decode_source(source, options):
                    yield "item", index, item
                yield "done", index, None
        finally:
            torch.set_num_threads(threads)
        return
    # fork, as DataLoader's workers on Linux: nothing to import again, and the workers only decode
    context = multiprocessing.get_context("fork")
    tasks, results = context.Queue(), context.Queue(maxsize=8 * workers)  # bounded: memory stays flat
    for index in range(len(sources)):  # numbers only: the workers inherit `sources` through fork, unpickled
        tasks.put(index)
    for _ in range(workers):
        tasks.put(None)
    processes = [
        context.Process(target=_worker, args=(sources, tasks, results, options), daemon=True) for _ in range(workers)
    ]
    for process in processes:
        process.start()
    remaining = len(sources)
    try:
        while remaining:
            try:
                kind, index, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [process.exitcode for process in processes if process.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"an image-decoding worker died (exit code {dead[0]})") from None
                continue
            if kind == "error":
                raise RuntimeError(f"decoding {sources[index].path} failed: {payload}")
            remaining -= kind == "done"
            yield kind, index, payload
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
        tasks.cancel_join_thread()
        tasks.close()
        results.close()


# ---------------------------------------------------------------------------------------------
# Files on disk


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to open or sync a folder: the rename still stands
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _write_json(path: Path, value: Any) -> None:
    """Write to a temporary file beside `path`, fsync, rename: a reader sees the old file or the new, never half."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(value, stream, separators=(",", ":"))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(path.parent)


def _write_all(handle: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(handle, view) :]


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the folder's build lock: one builder per cache, across processes and machines sharing the disk.

    flock, released by the kernel when its holder exits however it exits, so a killed build never leaves a
    stale lock. Where the filesystem has no locks (ENOLCK) the build goes on unlocked, with a warning.
    """
    handle = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is building the image cache %s", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            logger.warning("cannot lock %s (%s): building without a lock", folder / LOCK_FILE, error.strerror)
        yield
    finally:
        os.close(handle)


@dataclass
class _State:
    """What the folder holds: completed sources by (key, size, mtime) and the size of each shard's pixels."""

    sources: dict[tuple[str, int, int], list[Entry]]
    live_in_index: dict[str, set[tuple[str, int, int]]]  # index stem -> the sources it records
    bins: dict[str, int]  # shard stem -> bytes on disk
    broken: list[str]  # index files that cannot be read: deleted by the next build

    def lookup(self, source: Source) -> list[Entry] | None:
        """The entries of an unchanged source whose pixels are all on disk, else None."""
        if source.size < 0:  # could not be read when listed (a dangling link, a missing shard): look again each time
            return None
        entries = self.sources.get((source.key, source.size, source.mtime))
        if entries is None:
            return None
        for entry in entries:
            if not entry.reason and self.bins.get(entry.shard, -1) < entry.offset + 3 * entry.height * entry.width:
                return None
        return entries


def _read_state(folder: Path, settings: dict[str, Any]) -> _State | None:
    """None when the folder holds a cache of other settings (or none); unreadable indexes are ignored."""
    try:
        saved = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if saved != settings:
        return None
    state = _State({}, {}, {}, [])
    names = sorted(os.listdir(folder))
    for name in names:
        if name.startswith("shard-") and name.endswith(".bin"):
            with contextlib.suppress(OSError):
                state.bins[name[:-4]] = (folder / name).stat().st_size
    for name in names:  # in shard order: a source recorded twice takes its latest entries
        if not (name.startswith("shard-") and name.endswith(".json")):
            continue
        try:
            index = json.loads((folder / name).read_text(encoding="utf-8"))
            if index.get("format") != INDEX_FORMAT:
                raise ValueError("not a shard index")
            recorded = set()
            for key, size, mtime, rows in index["sources"]:
                state.sources[(key, size, mtime)] = [Entry(*row) for row in rows]
                recorded.add((key, size, mtime))
            state.live_in_index[name[:-5]] = recorded
        except (OSError, ValueError, TypeError, KeyError) as error:
            logger.warning("ignoring unreadable cache index %s: %s", folder / name, error)
            state.broken.append(name)
    return state


class _ShardWriter:
    """Appends pixels to the open shard; closes it (fsync, then its index, atomically) once it is full."""

    def __init__(self, folder: Path, number: int, shard_bytes: int) -> None:
        self.folder, self.number, self.shard_bytes = folder, number, shard_bytes
        self.handle: int | None = None
        self.stem, self.size = "", 0
        self.completed: list[list[Any]] = []  # sources finished while this shard is open, as the index lists them
        self.closed_shards = 0

    def append(self, pixels: bytes) -> tuple[str, int]:
        """(shard stem, offset) where the pixels now are."""
        if self.handle is None:
            self.stem, self.size = f"shard-{self.number:06d}-{secrets.token_hex(4)}", 0
            self.handle = os.open(self.folder / f"{self.stem}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        offset = self.size
        _write_all(self.handle, pixels)
        self.size += len(pixels)
        return self.stem, offset

    def complete(self, source: Source, entries: list[Entry]) -> None:
        rows = [[e.key, e.name, e.reason, e.shard, e.offset, e.height, e.width] for e in entries]
        self.completed.append([source.key, source.size, source.mtime, rows])
        if self.size >= self.shard_bytes:
            self.close()

    def close(self) -> None:
        """Make the open shard and the sources completed in it durable (a no-op when there is nothing)."""
        if self.handle is not None:
            os.fsync(self.handle)  # the pixels are on disk before any index names them
            os.close(self.handle)
            self.handle = None
        elif not self.completed:
            return
        else:  # only bad files since the last shard: an index without pixels of its own
            self.stem, self.size = f"shard-{self.number:06d}-{secrets.token_hex(4)}", 0
        _write_json(
            self.folder / f"{self.stem}.json",
            {"format": INDEX_FORMAT, "version": CACHE_VERSION, "bytes": self.size, "sources": self.completed},
        )
        self.number, self.completed, self.closed_shards = self.number + 1, [], self.closed_shards + 1

    def abandon(self) -> None:
        """After a failed write: drop the open shard (its index was never written, so nothing names it)."""
        if self.handle is not None:
            with contextlib.suppress(OSError):
                os.close(self.handle)
            with contextlib.suppress(OSError):
                os.unlink(self.folder / f"{self.stem}.bin")
            self.handle = None


def _remove_unused(folder: Path, state: _State, live: set[tuple[str, int, int]]) -> None:
    """Delete shards and indexes that no current source needs, and leftovers of killed builds (no index names
    their pixels, or a temporary index that was never renamed)."""
    used_bins = {entry.shard for source in live for entry in state.sources[source] if not entry.reason}
    for name in os.listdir(folder):
        stem, _, suffix = name.rpartition(".")
        unused = (
            (suffix == "bin" and name.startswith("shard-") and stem not in used_bins)
            or (suffix == "json" and stem in state.live_in_index and not state.live_in_index[stem] & live)
            or (suffix == "tmp" and name.startswith("."))
            or name in state.broken
        )
        if unused:
            with contextlib.suppress(OSError):
                os.unlink(folder / name)


# ---------------------------------------------------------------------------------------------
# The one entry point


def open_cache(
    folder: Path,
    settings: dict[str, Any],
    sources: list[Source],
    options: DecodeOptions,
    workers: int | None = None,
    shard_bytes: int | None = None,
) -> list[list[Entry]]:
    """The entries of every source, in order, decoding (in `workers` processes, default every core) only the
    sources that the cache in `folder` lacks. Raises CacheWriteError when the disk fills up or fails; OSError
    when the folder cannot be created or locked (the caller may go on without a cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = _read_state(folder, settings)
    if state is not None:
        found = [state.lookup(source) for source in sources]
        if all(entries is not None for entries in found):
            live = {(source.key, source.size, source.mtime) for source in sources}
            if not live.issuperset(state.sources):  # files were removed or changed: free what only they used
                with _locked(folder):
                    state = _read_state(folder, settings)
                    if state is not None:
                        _remove_unused(folder, state, live)
            return found  # type: ignore[return-value]  # checked: none is None
    with _locked(folder):
        return _build(folder, settings, sources, options, workers or default_workers(), shard_bytes or SHARD_BYTES)


def _build(
    folder: Path,
    settings: dict[str, Any],
    sources: list[Source],
    options: DecodeOptions,
    workers: int,
    shard_bytes: int,
) -> list[list[Entry]]:
    state = _read_state(folder, settings)  # again, under the lock: another process may have built it meanwhile
    old_layout = folder.with_name(f"{folder.name}.pt")  # vaehelpers' cache before the shards: one file, now unused
    if old_layout.is_file():
        logger.info("deleting %s: the image cache moved to %s", old_layout, folder)
        with contextlib.suppress(OSError):
            old_layout.unlink()
    if state is None:  # other settings, an older layout, or nothing yet: start empty
        for name in os.listdir(folder):
            if name.startswith("shard-") or name.endswith(".pt") or name.endswith(".tmp"):
                os.unlink(folder / name)
        _write_json(folder / SETTINGS_FILE, settings)
        state = _State({}, {}, {}, [])
    found = [state.lookup(source) for source in sources]
    missing = [index for index, entries in enumerate(found) if entries is None]
    if missing:
        _remove_unused(folder, state, {(s.key, s.size, s.mtime) for s, e in zip(sources, found) if e is not None})
        numbers = [int(name.split("-")[1]) for name in os.listdir(folder) if name.startswith("shard-")]
        writer = _ShardWriter(folder, max(numbers, default=-1) + 1, shard_bytes)
        todo = [sources[index] for index in missing]
        has_tar = any(source.kind == "tar" for source in todo)
        workers = max(1, min(workers, len(todo) if has_tar else len(todo) // SMALL_BUILD))
        started, images = time.perf_counter(), 0
        pending: dict[int, list[Entry]] = {}
        try:
            for kind, index, payload in _decode_all(todo, options, workers):
                if kind == "item":
                    key, name, reason, pixels, height, width = payload
                    shard, offset = writer.append(pixels) if pixels is not None else ("", 0)
                    pending.setdefault(index, []).append(Entry(key, name, reason, shard, offset, height, width))
                    images += pixels is not None
                else:
                    entries = pending.pop(index, [])
                    writer.complete(todo[index], entries)
                    found[missing[index]] = entries
            writer.close()
        except OSError as error:
            writer.abandon()
            what = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror or error
            raise CacheWriteError(
                f"image cache {folder}: {what}; the {writer.closed_shards} shards finished by this build are kept "
                f"and the next run goes on from them (free space, or set data.cache_dir to a larger disk)",
            ) from None
        finally:
            writer.abandon()
        logger.info(
            "image cache %s: decoded %d images from %d new or changed of %d sources in %.1f s (%d worker%s)",
            folder,
            images,
            len(todo),
            len(sources),
            time.perf_counter() - started,
            workers,
            "" if workers == 1 else "s",
        )
    state = _read_state(folder, settings)
    assert state is not None
    _remove_unused(folder, state, {(s.key, s.size, s.mtime) for s in sources})
    return found  # type: ignore[return-value]  # every missing source was decoded above


# ---------------------------------------------------------------------------------------------
# Reading


class ShardReader:
    """uint8 images (3, h, w) from the cache's shards, memory-mapped (read-only, copy-on-write: DataLoader workers
    share the pages). The mappings are opened on first use in each process and never pickled."""

    def __init__(self, folder: Path, entries: list[Entry]) -> None:
        self.folder = folder
        self.shards = sorted({entry.shard for entry in entries})
        number = {stem: i for i, stem in enumerate(self.shards)}
        # (n, 4) int64: shard number, byte offset, height, width of image i
        self.locations = torch.tensor(
            [[number[e.shard], e.offset, e.height, e.width] for e in entries], dtype=torch.int64
        ).view(-1, 4)
        self._maps: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> torch.Tensor:
        shard, offset, height, width = self.locations[index].tolist()
        pixels = self._maps.get(shard)
        if pixels is None:
            path = self.folder / f"{self.shards[shard]}.bin"
            pixels = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
            self._maps[shard] = pixels
        return pixels[offset : offset + 3 * height * width].view(3, height, width)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # a spawned worker maps the files itself


# ---------------------------------------------------------------------------------------------
# Several processes


def once_per_machine(make: Callable[[], T], ddp: Any, what: str) -> T:
    """make() on local rank 0 of each machine first (it builds the cache), then on every other rank (they read it).

    ddp: a distributed.Distributed. The others wait in a collective bounded by the process group's timeout;
    when a builder fails every rank stops with one line saying so. Not distributed: just make().
    """
    if not ddp.enabled:
        return make()
    import torch.distributed as dist

    from vaehelpers.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV

    result, failure = None, None
    if ddp.local_rank == 0:
        try:
            result = make()
        except Exception as error:  # every rank must hear of it, or they would wait for the full timeout
            failure = error
    failed = torch.tensor([float(failure is not None)], device=ddp.device)
    try:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    except RuntimeError as error:
        timeout = os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
        raise RuntimeError(
            f"rank {ddp.rank}: no word from the process building the image cache of {what} within the "
            f"distributed timeout ({timeout} s; a first build of a large set may need a larger ${TIMEOUT_ENV}): {error}"
        ) from None
    if failure is not None:
        raise failure
    if float(failed) > 0:
        raise RuntimeError(
            f"rank {ddp.rank}: building the image cache of {what} failed on another rank (see its error)"
        )
    return result if ddp.local_rank == 0 else make()  # type: ignore[return-value]
