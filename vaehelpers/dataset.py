"""The training and evaluation dataset: one split of an image folder or of tar shards, decoded once into the image cache."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from vaehelpers.config import DataConfig
from vaehelpers.imagecache import CACHE_VERSION, DecodeOptions, Entry, ShardReader, Source, open_cache
from vaehelpers.images import (
    MAX_PIXELS,
    MIN_SIZE,
    BadImageError,
    NoImagesError,
    Resize,
    ScanReport,
    Split,
    crop_image,
    item_generator,
    list_images,
    load_image,
    relative_key,
    resize_image,
    select_split,
)
from vaehelpers.tarshards import shard_paths, shards_root

logger = logging.getLogger("vaehelpers.data")

CACHE_DIRNAME = ".vaehelpers_cache"  # default cache folder inside the image folder (hidden, so never listed)


# ---------------------------------------------------------------------------------------------
# Cache


def is_writable(folder: str | Path) -> bool:
    """Whether we may write into `folder`: os.access, and (because os.access says yes to root for any folder on a
    writable filesystem) at least one write bit in its mode. A folder made read-only with chmod a-w stays untouched."""
    try:
        return os.access(folder, os.W_OK) and bool(os.stat(folder).st_mode & 0o222)
    except OSError:
        return False


def cache_file(root: str | Path, split: str, image_size: int, resize: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of the image cache (imagecache.py) of one (folder or shard set, split, size, resize mode).

    cache_dir, else <root>/.vaehelpers_cache, else (read-only folders such as /kaggle/input)
    $XDG_CACHE_HOME/vaehelpers or ~/.cache/vaehelpers. root: the image folder, or a WebDataset shard pattern
    (then its name and hash come from the pattern, and the default place is beside the shards).
    """
    shards = shard_paths(root)
    pattern = str(root)
    root = shards_root(shards) if shards else Path(root).expanduser().resolve()
    if cache_dir:
        folder = Path(cache_dir).expanduser()
    elif (root / CACHE_DIRNAME).is_dir() or is_writable(root):
        folder = root / CACHE_DIRNAME
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vaehelpers"
    # the pattern, not the shards it matches today: a shard added to a glob extends the cache rather than forking it
    identity = f"{root}\n{os.path.abspath(os.path.expanduser(pattern))}" if shards else str(root)
    folder_hash = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:10]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.name) or "root"
    if shards:
        name += "-shards" if len(shards) > 1 or "{" in pattern else "-" + shards[0].name.replace(".", "_")
    return folder / f"{name}-{split}-{image_size}-{resize}-{folder_hash}"


def _file_stat(path: Path) -> tuple[int, int]:
    try:
        info = path.stat()
        return info.st_size, info.st_mtime_ns
    except OSError:  # a dangling link: never matches, so it is re-checked (and reported) every time
        return -1, -1


# ---------------------------------------------------------------------------------------------
# Dataset


def check_data_dir(data: DataConfig) -> None:
    """Raise before a run starts (FileNotFoundError, NoImagesError: one line naming the folder) unless data.data_dir
    is a folder whose train split holds at least one image file (their contents are checked when the run reads them).
    Tar shards pass when the pattern matches one (else FileNotFoundError): the dataset reports each bad shard or sample
    as it reads them, and listing their samples here would read every shard once more.
    """
    if shard_paths(data.data_dir) is not None:
        return
    root = Path(data.data_dir).expanduser()
    all_files = list_images(root)
    train_files = select_split(all_files, root, "train", data.test_fraction)
    if all_files and not train_files:
        raise NoImagesError(
            f"the train split of {root} is empty: its {len(all_files)} image file(s) all hash into the test split; "
            "training needs more images (about 90% of a folder's files go to train)"
        )
    ScanReport(root=root, split="train", good=train_files).raise_if_empty(len(all_files))


class ImageFolderDataset(torch.utils.data.Dataset):
    """The images of one split of a folder (or of WebDataset tar shards) as float tensors (3, S, S) in [-1, 1].

    root: an image folder (every image under it, recursively; the split hashes each file's relative path), or
    WebDataset shards: 'DIR/{00000..00099}.tar', a glob, one .tar, or a folder holding only .tar files (the split
    hashes each sample's key; see tarshards.py). augment=False: eval transform (shorter side to S, center crop;
    or squash to SxS). augment=True: random crop and horizontal flip (squash: flip only), drawn from a generator
    seeded by (seed, epoch, index), so a resumed run sees the same crops whatever the number of workers. Call
    set_epoch(epoch) before each epoch.

    With cache=True every good image is decoded once (by cache_workers processes; None: every core), resized
    (shorter side S, or SxS for squash) and appended as uint8 to the shards of an image cache (imagecache.py,
    placed by cache_file) that is read memory-mapped; later constructions decode only new or changed files.
    Shards need the cache. Raises NoImagesError when the split holds no usable image, unless allow_empty (the
    test split of a tiny folder).
    """

    def __init__(
        self,
        root: str | Path,
        split: Split = "train",
        image_size: int = 128,
        resize: Resize = "crop",
        augment: bool = False,
        cache: bool = True,
        cache_dir: str | Path | None = None,
        test_fraction: float = 0.1,
        seed: int = 0,
        *,
        allow_empty: bool = False,
        min_size: int = MIN_SIZE,
        max_pixels: int = MAX_PIXELS,
        cache_workers: int | None = None,
    ):
        if resize not in ("crop", "squash"):
            raise ValueError(f"unknown resize {resize!r}: choose crop or squash")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        shards = shard_paths(root)
        if shards and not cache:
            raise ValueError(f"--data {root}: tar shards are read through the image cache; turn data.cache on")
        self.root = shards_root(shards) if shards else Path(root).expanduser()
        self.split, self.image_size, self.resize = split, int(image_size), resize
        self.augment, self.seed, self.test_fraction = augment, int(seed), test_fraction
        self.min_size, self.max_pixels = min_size, max_pixels
        # shared memory: set_epoch reaches DataLoader workers even when they are persistent
        self._epoch = torch.zeros((), dtype=torch.int64)
        with contextlib.suppress(RuntimeError):  # no shared memory here: only non-persistent workers see set_epoch
            self._epoch.share_memory_()
        self.cache_path = cache_file(root, split, self.image_size, resize, cache_dir) if cache else None
        self._pixels: ShardReader | None = None  # image i's uint8 pixels, memory-mapped from the cache's shards

        if shards:
            sources = [Source(relative_key(p.resolve(), self.root), p, *_file_stat(p), kind="tar") for p in shards]
            logger.info("%s: reading %d WebDataset shard%s", root, len(shards), "" if len(shards) == 1 else "s")
            n_files = None
        else:
            exclude = [self.cache_path.parent] if self.cache_path else []
            all_files = list_images(self.root, exclude=exclude)
            files = select_split(all_files, self.root, split, test_fraction)
            sources = [Source(relative_key(path, self.root), path, *_file_stat(path)) for path in files]
            n_files = len(all_files)
        if cache:
            good, bad = self._load_or_build_cache(sources, cache_workers)
        else:
            good, bad = self._check([source.path for source in sources])
        self.report = ScanReport(root=self.root, split=split, good=good, bad=bad)
        for path, reason in bad:  # once per file, here, never per item or epoch
            logger.warning("skipping %s: %s", path, reason)
        if not allow_empty:
            self.report.raise_if_empty(n_files)
        elif not good:
            logger.warning("%s", self.report.summary())
        self.paths: list[Path] = good
        self.bad_files: list[tuple[Path, str]] = bad

    @classmethod
    def from_config(
        cls, cfg: DataConfig, split: Split = "train", augment: bool = False, seed: int = 0, allow_empty: bool = False
    ) -> ImageFolderDataset:
        """The dataset that a DataConfig describes (data_dir, image_size, resize, test_fraction, cache...)."""
        if not cfg.data_dir:
            raise ValueError("DataConfig.data_dir is empty: give the image folder (--data DIR)")
        return cls(
            cfg.data_dir,
            split=split,
            image_size=cfg.image_size,
            resize=cfg.resize,
            augment=augment,
            cache=cfg.cache,
            cache_dir=cfg.cache_dir or None,
            test_fraction=cfg.test_fraction,
            seed=seed,
            allow_empty=allow_empty,
            cache_workers=cfg.cache_workers or None,
        )

    # -- building -------------------------------------------------------------------------------

    def _draft_size(self) -> int:
        return 2 * self.image_size  # JPEG DCT scaling only down to twice the target: the bicubic does the rest

    def _decode(self, path: Path) -> torch.Tensor:
        """uint8 (3, h, w), resized; raises BadImageError."""
        image = load_image(path, min_size=self.min_size, max_pixels=self.max_pixels, draft_size=self._draft_size())
        return resize_image(image, self.image_size, self.resize)

    def _check(self, files: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
        """Without a cache: decode everything once so that bad files are known before training starts."""
        good, bad = [], []
        for path in files:
            try:
                load_image(path, min_size=self.min_size, max_pixels=self.max_pixels, draft_size=self._draft_size())
                good.append(path)
            except BadImageError as error:
                bad.append((path, error.reason))
        return good, bad

    def _settings(self) -> dict[str, Any]:
        return {
            "version": CACHE_VERSION,
            "split": self.split,
            "image_size": self.image_size,
            "resize": self.resize,
            "test_fraction": self.test_fraction,
            "min_size": self.min_size,
            "max_pixels": self.max_pixels,
            "draft_size": self._draft_size(),
        }

    def _load_or_build_cache(
        self, sources: list[Source], workers: int | None
    ) -> tuple[list[Path], list[tuple[Path, str]]]:
        assert self.cache_path is not None
        options = DecodeOptions(
            self.image_size,
            self.resize,
            self.min_size,
            self.max_pixels,
            self._draft_size(),
            self.split,
            self.test_fraction,
        )
        try:
            found = open_cache(self.cache_path, self._settings(), sources, options, workers)
        except OSError as error:  # the folder cannot be made or locked (CacheWriteError, a full disk, is no OSError)
            if any(source.kind == "tar" for source in sources):
                raise OSError(
                    f"image cache {self.cache_path} cannot be written ({error}); set data.cache_dir"
                ) from None
            warnings.warn(
                f"image cache {self.cache_path} cannot be written ({error}); running without a cache, "
                f"so every epoch decodes the images again",
                RuntimeWarning,
                stacklevel=3,
            )
            self.cache_path = None
            return self._check([source.path for source in sources])
        good_entries: list[Entry] = []
        good: list[Path] = []
        bad: list[tuple[Path, str]] = []
        for source, entries in zip(sources, found):
            for entry in entries:
                # a file is its own entry; a sample is named inside its shard (shard.tar/member), the shard itself by key ""
                path = source.path if source.kind == "file" else self.root / entry.name
                if entry.reason:
                    bad.append((path, entry.reason))
                else:
                    good.append(path)
                    good_entries.append(entry)
        self._pixels = ShardReader(self.cache_path, good_entries)
        return good, bad

    # -- access ---------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draws of this epoch (they depend on seed, epoch and index only)."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.paths)

    def get_path(self, index: int) -> Path:
        return self.paths[index]

    def get_uint8(self, index: int) -> torch.Tensor:
        """The resized image before cropping: uint8 (3, h, w), shorter side S (crop) or SxS (squash)."""
        if self._pixels is None:
            return self._decode(self.paths[index])
        return self._pixels[index]

    def __getitem__(self, index: int) -> torch.Tensor:
        """float (3, S, S) in [-1, 1]."""
        index = range(len(self.paths))[index]  # bounds check; negative indices get their positive seed
        generator = item_generator(self.seed, self.epoch, index) if self.augment else None
        return crop_image(self.get_uint8(index), self.image_size, generator)

    def __repr__(self) -> str:
        mode = "augment" if self.augment else "eval"
        return (
            f"{type(self).__name__}({str(self.root)!r}, split={self.split!r}, {len(self)} images, "
            f"{len(self.bad_files)} bad, {self.image_size}px {self.resize}, {mode}, "
            f"cache={str(self.cache_path) if self._pixels is not None else None!r})"
        )
