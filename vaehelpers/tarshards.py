"""WebDataset tar shards as an image source: telling a shard pattern from a folder, and reading a shard's samples.

A WebDataset shard is a plain tar whose members are grouped into samples by key: `dir/0001.jpg`, `dir/0001.txt`
and `dir/0001.json` are one sample with key `dir/0001` (the member name up to the first dot of its basename),
stored next to each other. The image of a sample is its first member with an image extension.

Read here with the standard library's streaming tarfile reader rather than the `webdataset` package: vaehelpers
reads each shard once, front to back, into its image cache (imagecache.py) and trains from the cache with the
same seeded, resumable, map-style sampling as a folder; webdataset's value is its streaming training pipeline,
which that design does not use, and a dependency that only groups tar members by key is not worth its upgrades.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vaehelpers.images import IMAGE_EXTENSIONS

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # tarfile's "r|*" reads plain and gzip-compressed shards alike
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")  # {00000..00099}: zero-padded like its first bound
_CHOICES = re.compile(r"\{([^{}]*,[^{}]*)\}")  # {a,b,c}


def expand_braces(pattern: str) -> list[str]:
    """'shards/{000..002}.tar' -> ['shards/000.tar', 'shards/001.tar', 'shards/002.tar'] (also {a,b}), in order."""
    matches = [match for match in (_RANGE.search(pattern), _CHOICES.search(pattern)) if match is not None]
    if not matches:
        return [pattern]
    match = min(matches, key=lambda found: found.start())  # leftmost first, as a shell expands
    if match.re is _RANGE:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        values = [f"{number:0{width}d}" for number in range(int(first), int(last) + step, step)]
    else:
        values = match.group(1).split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for value in values for name in expand_braces(head + value + tail)]


def is_shard(path: str | Path) -> bool:
    return str(path).lower().endswith(SHARD_SUFFIXES)


def shard_paths(data: str | Path) -> list[Path] | None:
    """The tar shards `data` names, or None when it is an image folder (read as files).

    Shards: a brace pattern ('DIR/{00000..00099}.tar'), a glob ('DIR/*.tar'), one .tar file, or a folder whose
    top level holds .tar files and no image file. Shards a brace pattern names but that do not exist stay in the
    list (each is reported as unreadable, like a dangling file); a pattern matching nothing raises FileNotFoundError.
    """
    text = os.path.expanduser(str(data))
    if "{" in text or any(char in text for char in "*?["):
        names = [name for part in expand_braces(text) for name in (sorted(glob.glob(part)) or [part])]
        paths = [Path(name) for name in dict.fromkeys(names) if not glob.has_magic(name)]
        if not any(path.is_file() for path in paths):
            raise FileNotFoundError(f"--data {data}: no tar shard matches this pattern")
        return paths
    path = Path(text)
    if path.is_file() and is_shard(path):
        return [path]
    if path.is_dir():
        with os.scandir(path) as entries:
            names = sorted(entry.name for entry in entries if entry.is_file() and not entry.name.startswith("."))
        shards = [path / name for name in names if is_shard(name)]
        if shards and not any(os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for name in names):
            return shards
    return None


def shards_root(shards: list[Path]) -> Path:
    """The folder that holds every shard (their keys in the cache are relative to it)."""
    return Path(os.path.commonpath([str(path.resolve().parent) for path in shards]))


class NotATarError(tarfile.ReadError):
    """The file does not start with a tar header (damage further in raises tarfile's own errors)."""


@dataclass
class TarSample:
    """One sample of a shard: its key, the image member's name and bytes, or the reason it has no usable image."""

    key: str  # WebDataset __key__: the split hashes it
    name: str  # the image member's name, else the key
    data: bytes | None
    reason: str = ""


def _split_name(name: str) -> tuple[str, str]:
    """'dir/0001.seg.png' -> ('dir/0001', 'seg.png'); webdataset's base_plus_ext rule."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (extension if dot else "")


def _image_member(extensions: dict[str, str]) -> str | None:
    for extension, name in extensions.items():
        if "." + extension.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return name
    return None


def read_samples(path: str | Path, wanted: Callable[[str], bool] = lambda key: True) -> Iterator[TarSample]:
    """Every sample of one shard, front to back, streaming (the shard is read once, never held in memory).

    wanted(key) False: the sample's bytes are skipped (another split). A sample without an image member comes
    back with reason "no image in sample (...)". Raises NotATarError for a file that is not a tar, and
    tarfile.ReadError or OSError for a shard that ends early or is damaged, after the samples before the damage
    (the caller reports the shard and keeps them).
    """
    key, extensions, images = None, {}, {}

    def sample() -> TarSample:
        member = _image_member(extensions)
        if member is None:
            found = ", ".join("." + extension for extension in extensions) or "no members"
            return TarSample(key, key, None, f"no image in sample ({found})")
        return TarSample(key, member, images[member])

    try:
        archive = tarfile.open(path, mode="r|*")
    except tarfile.ReadError as error:  # raised at the first header, before any sample
        raise NotATarError(f"not a tar archive ({error})") from None
    with archive:
        for member in archive:
            if not member.isfile():
                continue
            member_key, extension = _split_name(member.name)
            if not extension or os.path.basename(member.name).startswith("."):
                continue  # not part of a sample (webdataset skips these too)
            if member_key != key:
                if key is not None and wanted(key):
                    yield sample()
                key, extensions, images = member_key, {}, {}
            extensions[extension] = member.name
            if wanted(key) and "." + extension.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and len(images) == 0:
                stream = archive.extractfile(member)
                images[member.name] = stream.read() if stream is not None else b""
        if key is not None and wanted(key):
            yield sample()
