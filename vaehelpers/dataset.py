"""The training and evaluation dataset: one split of an image folder, decoded once into a uint8 cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from vaehelpers.config import DataConfig
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

logger = logging.getLogger("vaehelpers.data")

CACHE_DIRNAME = ".vaehelpers_cache"  # default cache folder inside the image folder (hidden, so never listed)
CACHE_VERSION = 1  # bump when the cache layout or the resize changes


# ---------------------------------------------------------------------------------------------
# Cache


def cache_file(root: str | Path, split: str, image_size: int, resize: str, cache_dir: str | Path | None = None) -> Path:
    """Where the uint8 cache of one (folder, split, size, resize mode) lives.

    cache_dir, else <root>/.vaehelpers_cache, else (read-only folders such as /kaggle/input)
    $XDG_CACHE_HOME/vaehelpers or ~/.cache/vaehelpers. The name carries a hash of the absolute folder path.
    """
    root = Path(root).expanduser().resolve()
    if cache_dir:
        folder = Path(cache_dir).expanduser()
    elif (root / CACHE_DIRNAME).is_dir() or os.access(root, os.W_OK):
        folder = root / CACHE_DIRNAME
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vaehelpers"
    folder_hash = hashlib.sha256(str(root).encode("utf-8")).hexdigest()[:10]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.name) or "root"
    return folder / f"{name}-{split}-{image_size}-{resize}-{folder_hash}.pt"


def _file_stat(path: Path) -> tuple[int, int]:
    try:
        info = path.stat()
        return info.st_size, info.st_mtime_ns
    except OSError:  # a dangling link: never matches, so it is re-checked (and reported) every time
        return -1, -1


def _read_cache(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        try:  # memory-mapped: instant, and DataLoader workers share the pages
            cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file: rebuild it
        logger.warning("ignoring unreadable image cache %s: %s", path, error)
        return None
    keys = {"format", "settings", "files", "sizes", "mtimes", "reasons", "shapes", "offsets", "pixels"}
    if not isinstance(cache, dict) or cache.get("format") != "vaehelpers image cache" or not keys <= cache.keys():
        logger.warning("ignoring image cache %s: not written by this version of vaehelpers", path)
        return None
    return cache


def _write_cache(path: Path, cache: dict[str, Any]) -> None:
    """torch.save to a temporary file beside `path`, fsync, then os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(cache, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


# ---------------------------------------------------------------------------------------------
# Dataset


def check_data_dir(data: DataConfig) -> None:
    """Raise before a run starts (FileNotFoundError, NoImagesError: one line naming the folder) unless data.data_dir
    is a folder whose train split holds at least one image file (their contents are checked when the run reads them).
    """
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
    """The images of one split of a folder as float tensors (3, S, S) in [-1, 1].

    augment=False: eval transform (shorter side to S, center crop; or squash to SxS). augment=True: random crop
    and horizontal flip (squash: flip only), drawn from a generator seeded by (seed, epoch, index), so a resumed
    run sees the same crops whatever the number of workers. Call set_epoch(epoch) before each epoch.

    With cache=True every good image is decoded once, resized (shorter side S, or SxS for squash) and kept as
    uint8 in a single file (see cache_file); later constructions decode only new or changed files. Raises
    NoImagesError when the split holds no usable image, unless allow_empty (the test split of a tiny folder).
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
    ):
        if resize not in ("crop", "squash"):
            raise ValueError(f"unknown resize {resize!r}: choose crop or squash")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = Path(root).expanduser()
        self.split, self.image_size, self.resize = split, int(image_size), resize
        self.augment, self.seed, self.test_fraction = augment, int(seed), test_fraction
        self.min_size, self.max_pixels = min_size, max_pixels
        # shared memory: set_epoch reaches DataLoader workers even when they are persistent
        self._epoch = torch.zeros((), dtype=torch.int64)
        with contextlib.suppress(RuntimeError):  # no shared memory here: only non-persistent workers see set_epoch
            self._epoch.share_memory_()
        self.cache_path = cache_file(self.root, split, self.image_size, resize, cache_dir) if cache else None

        exclude = [self.cache_path.parent] if self.cache_path else []
        all_files = list_images(self.root, exclude=exclude)
        files = select_split(all_files, self.root, split, test_fraction)
        self._pixels: torch.Tensor | None = None  # uint8 (total,): every cached image, flattened, end to end
        self._offsets: torch.Tensor | None = None  # int64 (n,): where image i starts in _pixels
        self._shapes: torch.Tensor | None = None  # int64 (n, 2): its height and width
        if cache:
            good, bad = self._load_or_build_cache(files)
        else:
            good, bad = self._check(files)
        self.report = ScanReport(root=self.root, split=split, good=good, bad=bad)
        for path, reason in bad:  # once per file, here, never per item or epoch
            logger.warning("skipping %s: %s", path, reason)
        if not allow_empty:
            self.report.raise_if_empty(len(all_files))
        elif not good:
            logger.warning("%s", self.report.summary())
        self.paths: list[Path] = good
        self.bad_files: list[tuple[Path, str]] = bad

    @classmethod
    def from_config(
        cls, cfg: DataConfig, split: Split = "train", augment: bool = False, seed: int = 0, allow_empty: bool = False
    ) -> ImageFolderDataset:
        """The dataset that a DataConfig describes (data_dir, image_size, resize, test_fraction, cache)."""
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

    def _settings(self) -> str:
        return json.dumps(
            {
                "version": CACHE_VERSION,
                "split": self.split,
                "image_size": self.image_size,
                "resize": self.resize,
                "test_fraction": self.test_fraction,
                "min_size": self.min_size,
                "max_pixels": self.max_pixels,
                "draft_size": self._draft_size(),
            },
            sort_keys=True,
        )

    def _load_or_build_cache(self, files: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
        assert self.cache_path is not None
        names = [relative_key(path, self.root) for path in files]
        stats = [_file_stat(path) for path in files]
        settings = self._settings()
        old = _read_cache(self.cache_path)
        if old is not None and old["settings"] != settings:
            old = None
        if old is not None and old["files"] == names and list(zip(old["sizes"], old["mtimes"])) == stats:
            return self._use_cache(old, files)

        # reuse what is unchanged (same name, size and mtime); decode the rest
        reusable: dict[tuple[str, int, int], tuple[str, torch.Tensor | None]] = {}
        if old is not None:
            good_index = 0
            for name, size, mtime, reason in zip(old["files"], old["sizes"], old["mtimes"], old["reasons"]):
                image = None
                if not reason:
                    offset, (height, width) = int(old["offsets"][good_index]), old["shapes"][good_index].tolist()
                    image = old["pixels"][offset : offset + 3 * height * width].view(3, height, width)
                    good_index += 1
                reusable[(name, size, mtime)] = (reason, image)
        started, decoded = time.perf_counter(), 0
        reasons: list[str] = []
        images: list[torch.Tensor] = []
        for path, name, (size, mtime) in zip(files, names, stats):
            hit = reusable.get((name, size, mtime))
            if hit is None:
                decoded += 1
                try:
                    hit = ("", self._decode(path))
                except BadImageError as error:
                    hit = (error.reason, None)
            reasons.append(hit[0])
            if hit[1] is not None:
                images.append(hit[1])
        logger.info(
            "%s: decoded %d of %d images for the cache in %.1f s",
            self.root,
            decoded,
            len(files),
            time.perf_counter() - started,
        )
        shapes = torch.tensor([list(image.shape[1:]) for image in images], dtype=torch.int64).view(-1, 2)
        sizes = shapes.prod(dim=1) * 3
        offsets = torch.cumsum(sizes, 0) - sizes
        pixels = torch.cat([image.reshape(-1) for image in images]) if images else torch.zeros(0, dtype=torch.uint8)
        cache = {
            "format": "vaehelpers image cache",
            "settings": settings,
            "files": names,
            "sizes": [size for size, _ in stats],
            "mtimes": [mtime for _, mtime in stats],
            "reasons": reasons,
            "shapes": shapes,
            "offsets": offsets,
            "pixels": pixels,
        }
        if images:  # an empty result raises in __init__; nothing worth keeping
            try:
                _write_cache(self.cache_path, cache)
            except OSError as error:
                warnings.warn(
                    f"image cache {self.cache_path} cannot be written ({error}); running without a cache, "
                    f"so every epoch decodes the images again",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.cache_path = None
                good, bad = self._use_cache(cache, files)
                self._pixels = self._offsets = self._shapes = None
                return good, bad
        return self._use_cache(cache, files)

    def _use_cache(self, cache: dict[str, Any], files: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
        self._pixels, self._offsets, self._shapes = cache["pixels"], cache["offsets"], cache["shapes"]
        good = [path for path, reason in zip(files, cache["reasons"]) if not reason]
        bad = [(path, reason) for path, reason in zip(files, cache["reasons"]) if reason]
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
        assert self._offsets is not None and self._shapes is not None
        offset, (height, width) = int(self._offsets[index]), self._shapes[index].tolist()
        return self._pixels[offset : offset + 3 * height * width].view(3, height, width)

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
