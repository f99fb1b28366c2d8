"""Image folders: listing, path-hash split, safe decoding, preprocessing, uint8 cache, synthetic images, flickr8k."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import stat
import tempfile
import time
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from vaehelpers.config import DataConfig

logger = logging.getLogger("vaehelpers.data")

Split = Literal["train", "test", "all"]
Resize = Literal["crop", "squash"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})  # compared lower-cased
CACHE_DIRNAME = ".vaehelpers_cache"  # default cache folder inside the image folder (hidden, so never listed)
MAX_PIXELS = 100_000_000  # larger images are refused as decompression bombs (PIL's own warning, ~89 MP, also counts)
MIN_SIZE = 8  # smaller images are refused: nothing useful survives the resize
CACHE_VERSION = 1  # bump when the cache layout or the resize changes

FLICKR8K_DATASET = "adityajn105/flickr8k"  # Kaggle dataset: Images/ (8091 jpgs) + captions.txt
FLICKR8K_IMAGE_COUNT = 8091
KAGGLE_INPUT = Path("/kaggle/input")


# ---------------------------------------------------------------------------------------------
# Errors


class BadImageError(ValueError):
    """An image file that cannot be used; `.path` and `.reason` say which and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # keeps the two-argument form through pickling (DataLoader workers)
        return (type(self), (self.path, self.reason))


class NoImagesError(ValueError):
    """A folder (or one split of it) without a single usable image."""


class DownloadError(RuntimeError):
    """flickr8k could not be found or fetched; the message says what to do."""


class UnsafeArchiveError(DownloadError):
    """An archive entry that would land outside the destination (zip slip) or is a link."""


# ---------------------------------------------------------------------------------------------
# Listing and splitting


def _dir_key(path: Path) -> tuple[int, int]:
    st = path.stat()  # follows links: two routes to one folder give the same key
    return (st.st_dev, st.st_ino)


def list_images(root: str | Path, exclude: Iterable[str | Path] = ()) -> list[Path]:
    """Every image file under root, recursively, sorted by relative posix path.

    Hidden files and folders (names starting with ".", which includes the cache) are skipped, and so are
    the folders in `exclude`. Linked folders are followed once each, so link cycles cannot loop.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder of images")
    seen = {_dir_key(root)}
    for folder in exclude:
        with contextlib.suppress(OSError):
            seen.add(_dir_key(Path(folder)))
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            try:
                key = _dir_key(Path(dirpath, name))
            except OSError:  # a dangling link
                continue
            if key not in seen:  # a visited folder again means a link cycle or a second link to it
                seen.add(key)
                kept.append(name)
        dirnames[:] = kept
        found += [Path(dirpath, name) for name in filenames
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def relative_key(path: str | Path, root: str | Path | None = None) -> str:
    """The posix path of `path` relative to `root` (or as given), NFC-normalised: the name the split hashes."""
    path = Path(path)
    if root is not None:
        path = path.relative_to(root)
    # macOS stores decomposed (NFD) names: normalising keeps a copied folder's split identical
    return unicodedata.normalize("NFC", path.as_posix())


def split_of(relative_path: str | Path, test_fraction: float = 0.1) -> Literal["train", "test"]:
    """"test" for about `test_fraction` of paths, else "train"; depends on this one path only.

    The first 8 bytes of sha256(relative posix path) as a number in [0, 1) are compared with
    test_fraction, so adding or removing other files never moves a file between splits.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    digest = hashlib.sha256(relative_key(relative_path).encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    return "test" if position < test_fraction else "train"


def select_split(paths: Sequence[Path], root: str | Path, split: Split, test_fraction: float = 0.1) -> list[Path]:
    """The paths of one split ("train" or "test"), or all of them ("all"); order is kept."""
    if split == "all":
        return list(paths)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: choose train, test or all")
    return [path for path in paths if split_of(relative_key(path, root), test_fraction) == split]


# ---------------------------------------------------------------------------------------------
# Decoding


def _gray_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale one channel of a 16/32-bit or float image to uint8 (PIL's own convert clips at 255)."""
    values = values.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
        values = values / 257.0  # 16-bit: 65535 -> 255
    elif mode == "I" and low >= 0 and high <= 255:
        pass  # already 8-bit values stored as 32-bit integers
    elif mode == "F" and low >= 0 and high <= 1:
        values = values * 255.0
    else:  # unknown range (32-bit integers, HDR floats): stretch what is there
        values = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB copy of any PIL image: transparency composited on white, 16-bit scaled, not clipped."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        gray = _gray_to_uint8(np.asarray(image), mode)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")  # applies P/L/RGB transparency keys (tRNS) too
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # RGB (a copy), L, 1, P, CMYK, YCbCr, HSV
    except ValueError as error:
        raise ValueError(f"cannot convert colour mode {mode} to RGB") from error


def _exif_transpose(image: Image.Image, path: Path) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # a malformed EXIF block should not cost an otherwise good photo
        logger.debug("%s: ignoring unreadable EXIF orientation (%s)", path, error)
        return image


def load_image(path: str | Path, *, min_size: int = MIN_SIZE, max_pixels: int = MAX_PIXELS,
               draft_size: int | None = None) -> Image.Image:
    """Decode one file fully into an 8-bit RGB PIL image, upright (EXIF orientation applied).

    draft_size: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size
    (the whole stream is still read, so truncation is still caught). Raises BadImageError with a reason:
    "zero-byte file", "not an image", "truncated image", "too small (WxH < 8x8)", "decompression bomb (...)",
    "unreadable: <os error>", "corrupt image: ...", "unsupported colour mode ...".
    """
    path = Path(path)
    try:
        info = path.stat()
    except OSError as error:
        raise BadImageError(path, f"unreadable: {error.strerror or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadImageError(path, "not a regular file")
    if info.st_size == 0:
        raise BadImageError(path, "zero-byte file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; a bomb must never be decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise BadImageError(path, f"decompression bomb ({width}x{height} pixels > {max_pixels:,})")
                if width < min_size or height < min_size:
                    raise BadImageError(path, f"too small ({width}x{height} < {min_size}x{min_size})")
                if draft_size and image.format == "JPEG":
                    image.draft(None, (draft_size, draft_size))
                try:
                    image.load()  # decode now, so that a truncated file fails here and not in a worker
                except OSError as error:
                    reason = "truncated image" if "truncated" in str(error) else f"corrupt image: {error}"
                    raise BadImageError(path, reason) from None
                upright = _exif_transpose(image, path)
                try:
                    return to_rgb(upright)
                except ValueError as error:
                    raise BadImageError(path, f"unsupported {error}") from None
    except BadImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise BadImageError(path, f"decompression bomb ({error})") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image") from None
    except OSError as error:
        raise BadImageError(path, f"unreadable: {error.strerror or error}") from None
    except Exception as error:  # decoders raise SyntaxError, ValueError, struct.error... on damaged data
        raise BadImageError(path, f"corrupt image: {type(error).__name__}: {error}") from None


# ---------------------------------------------------------------------------------------------
# Scanning


@dataclass
class ScanReport:
    """The usable (`good`) and unusable (`bad`: path, reason) image files of one split of a folder."""

    root: Path
    split: str = "all"
    good: list[Path] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines: counts, then one line per bad file."""
        lines = [f"{self.root} (split {self.split}): {len(self.good)} usable images, {len(self.bad)} skipped"]
        for path, reason in self.bad:
            lines.append(f"  skipped {_display(path, self.root)}: {reason}")
        return "\n".join(lines)

    def raise_if_empty(self, n_files: int | None = None) -> None:
        """NoImagesError naming the folder when nothing usable is left."""
        if self.good:
            return
        if self.bad:
            raise NoImagesError(f"no usable images in {self.root} (split {self.split}): all {len(self.bad)} image "
                                f"files are bad, e.g. {_display(self.bad[0][0], self.root)}: {self.bad[0][1]}")
        if n_files:
            raise NoImagesError(f"split {self.split!r} of {self.root} is empty: its {n_files} image files all hash "
                                f"into the other split (use split='all' for a small folder)")
        raise NoImagesError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {self.root}")


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def scan_images(root: str | Path, split: Split = "all", min_size: int = MIN_SIZE, *, test_fraction: float = 0.1,
                max_pixels: int = MAX_PIXELS) -> ScanReport:
    """Decode every image of one split; bad files are reported (path, reason) and skipped.

    Raises NoImagesError naming the folder when no usable image is left.
    """
    root = Path(root).expanduser()
    all_files = list_images(root)
    files = select_split(all_files, root, split, test_fraction)
    report = ScanReport(root=root, split=split)
    for path in files:
        try:
            load_image(path, min_size=min_size, max_pixels=max_pixels)
            report.good.append(path)
        except BadImageError as error:
            report.bad.append((path, error.reason))
    report.raise_if_empty(len(all_files))
    return report


# ---------------------------------------------------------------------------------------------
# Preprocessing


def resize_image(image: Image.Image, image_size: int = 128, resize: Resize = "crop") -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, h, w): shorter side = image_size ("crop"), or image_size^2 ("squash").

    Bicubic in PIL, which widens its kernel when shrinking (antialiased), as torchvision's PIL path does.
    """
    if resize not in ("crop", "squash"):
        raise ValueError(f"unknown resize {resize!r}: choose crop or squash")
    width, height = image.size
    if resize == "squash":
        target = (image_size, image_size)
    elif width <= height:  # torchvision's rule: the longer side is truncated, never below image_size
        target = (image_size, max(image_size, int(image_size * height / width)))
    else:
        target = (max(image_size, int(image_size * width / height)), image_size)
    if target != image.size:
        image = image.resize(target, Image.Resampling.BICUBIC)
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (h, w, 3)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()  # (3, h, w)


def crop_image(image: torch.Tensor, image_size: int = 128, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (3, h, w) with h, w >= image_size -> float (3, S, S) in [-1, 1].

    No generator: center crop (eval). A generator: random crop then a horizontal flip with probability 1/2
    (train); the draws come from it alone, in a fixed order, so the same generator state gives the same result.
    """
    _, height, width = image.shape
    if height < image_size or width < image_size:
        raise ValueError(f"image {height}x{width} is smaller than the crop {image_size}")
    if generator is None:
        top, left, flip = round((height - image_size) / 2), round((width - image_size) / 2), False
    else:
        top = int(torch.randint(0, height - image_size + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - image_size + 1, (1,), generator=generator))
        flip = bool(torch.rand((), generator=generator) < 0.5)
    crop = image[:, top:top + image_size, left:left + image_size]  # (3, S, S)
    if flip:
        crop = crop.flip(-1)
    return crop.float().div_(127.5).sub_(1.0)  # .float() copies, so cached pixels are never written


def preprocess(image: Image.Image, image_size: int = 128, resize: Resize = "crop",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """RGB PIL image -> float (3, S, S) in [-1, 1]; eval transform without a generator, train with one."""
    return crop_image(resize_image(image, image_size, resize), image_size, generator)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator seeded from (seed, epoch, index) only: no global RNG, any number of workers."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(epoch)}/{int(index)}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits: a valid seed


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


class ImageFolderDataset(torch.utils.data.Dataset):
    """The images of one split of a folder as float tensors (3, S, S) in [-1, 1].

    augment=False: eval transform (shorter side to S, center crop; or squash to SxS). augment=True: random crop
    and horizontal flip (squash: flip only), drawn from a generator seeded by (seed, epoch, index), so a resumed
    run sees the same crops whatever the number of workers. Call set_epoch(epoch) before each epoch.

    With cache=True every good image is decoded once, resized (shorter side S, or SxS for squash) and kept as
    uint8 in a single file (see cache_file); later constructions decode only new or changed files. Raises
    NoImagesError when the split holds no usable image, unless allow_empty (the test split of a tiny folder).
    """

    def __init__(self, root: str | Path, split: Split = "train", image_size: int = 128, resize: Resize = "crop",
                 augment: bool = False, cache: bool = True, cache_dir: str | Path | None = None,
                 test_fraction: float = 0.1, seed: int = 0, *, allow_empty: bool = False,
                 min_size: int = MIN_SIZE, max_pixels: int = MAX_PIXELS):
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
    def from_config(cls, cfg: DataConfig, split: Split = "train", augment: bool = False, seed: int = 0,
                    allow_empty: bool = False) -> ImageFolderDataset:
        """The dataset that a DataConfig describes (data_dir, image_size, resize, test_fraction, cache)."""
        if not cfg.data_dir:
            raise ValueError("DataConfig.data_dir is empty: give the image folder (--data DIR)")
        return cls(cfg.data_dir, split=split, image_size=cfg.image_size, resize=cfg.resize, augment=augment,
                   cache=cfg.cache, cache_dir=cfg.cache_dir or None, test_fraction=cfg.test_fraction, seed=seed,
                   allow_empty=allow_empty)

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
        return json.dumps({"version": CACHE_VERSION, "split": self.split, "image_size": self.image_size,
                           "resize": self.resize, "test_fraction": self.test_fraction, "min_size": self.min_size,
                           "max_pixels": self.max_pixels, "draft_size": self._draft_size()}, sort_keys=True)

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
                    image = old["pixels"][offset:offset + 3 * height * width].view(3, height, width)
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
        logger.info("%s: decoded %d of %d images for the cache in %.1f s", self.root, decoded, len(files),
                    time.perf_counter() - started)
        shapes = torch.tensor([list(image.shape[1:]) for image in images], dtype=torch.int64).view(-1, 2)
        sizes = shapes.prod(dim=1) * 3
        offsets = torch.cumsum(sizes, 0) - sizes
        pixels = torch.cat([image.reshape(-1) for image in images]) if images else torch.zeros(0, dtype=torch.uint8)
        cache = {"format": "vaehelpers image cache", "settings": settings, "files": names,
                 "sizes": [size for size, _ in stats], "mtimes": [mtime for _, mtime in stats], "reasons": reasons,
                 "shapes": shapes, "offsets": offsets, "pixels": pixels}
        if images:  # an empty result raises in __init__; nothing worth keeping
            try:
                _write_cache(self.cache_path, cache)
            except OSError as error:
                warnings.warn(f"image cache {self.cache_path} cannot be written ({error}); running without a cache, "
                              f"so every epoch decodes the images again", RuntimeWarning, stacklevel=3)
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
        return self._pixels[offset:offset + 3 * height * width].view(3, height, width)

    def __getitem__(self, index: int) -> torch.Tensor:
        """float (3, S, S) in [-1, 1]."""
        index = range(len(self.paths))[index]  # bounds check; negative indices get their positive seed
        generator = item_generator(self.seed, self.epoch, index) if self.augment else None
        return crop_image(self.get_uint8(index), self.image_size, generator)

    def __repr__(self) -> str:
        mode = "augment" if self.augment else "eval"
        return (f"{type(self).__name__}({str(self.root)!r}, split={self.split!r}, {len(self)} images, "
                f"{len(self.bad_files)} bad, {self.image_size}px {self.resize}, {mode}, "
                f"cache={str(self.cache_path) if self._pixels is not None else None!r})")


# ---------------------------------------------------------------------------------------------
# Synthetic images


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    first = rng.uniform(0, 1, 3)
    second = np.clip(1.0 - first + rng.normal(0, 0.25, 3), 0, 1)  # roughly complementary: visible contrast
    return first.astype(np.float32), second.astype(np.float32)


def _texture(rng: np.random.Generator, size: int) -> Image.Image:
    """One procedural RGB fill of size x size: a gradient, stripes, checkers, smooth noise or a flat colour."""
    x = (np.arange(size, dtype=np.float32) / size)[None, :]  # (1, size) in [0, 1): broadcasts against y
    y = (np.arange(size, dtype=np.float32) / size)[:, None]  # (size, 1)
    first, second = _two_colours(rng)
    kind = rng.choice(["linear", "radial", "stripes", "checkers", "noise", "flat"])
    if kind == "linear":
        angle = rng.uniform(0, 2 * np.pi)
        weight = (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle) + 0.5
    elif kind == "radial":
        cy, cx = rng.uniform(0.2, 0.8, 2)
        weight = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / rng.uniform(0.4, 0.9)
    elif kind == "stripes":
        angle, frequency = rng.uniform(0, np.pi), rng.uniform(3, 14)
        weight = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)))
    elif kind == "checkers":
        cells = int(rng.integers(2, 10))
        weight = (np.floor(x * cells) + np.floor(y * cells)) % 2
    elif kind == "noise":  # smooth value noise: a few random colours, bicubic-upsampled
        cells = int(rng.integers(3, 9))
        coarse = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        return coarse.resize((size, size), Image.Resampling.BICUBIC)
    else:
        weight = np.zeros((size, size), dtype=np.float32)
    weight = np.clip(np.broadcast_to(weight, (size, size)), 0, 1)[..., None].astype(np.float32)  # (size, size, 1)
    return Image.fromarray(((first + weight * (second - first)) * 255).astype(np.uint8))  # (size, size, 3)


def synthetic_image(rng: np.random.Generator, size: int = 128) -> Image.Image:
    """A procedural RGB picture: a textured background and 2-6 shapes (ellipses, rectangles, polygons)."""
    canvas_size = 2 * size  # drawn at twice the size, then box-filtered: antialiased edges
    canvas = _texture(rng, canvas_size)
    for _ in range(int(rng.integers(2, 7))):
        mask = Image.new("L", (canvas_size, canvas_size), 0)
        draw = ImageDraw.Draw(mask)
        kind = rng.choice(["ellipse", "rectangle", "polygon"])
        if kind == "polygon":
            cx, cy, radius = *rng.uniform(0.1, 0.9, 2) * canvas_size, rng.uniform(0.1, 0.4) * canvas_size
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
            draw.polygon([(float(cx + radius * np.cos(a)), float(cy + radius * np.sin(a))) for a in angles], fill=255)
        else:
            x0, y0 = rng.uniform(-0.1, 0.8, 2) * canvas_size
            width, height = rng.uniform(0.1, 0.6, 2) * canvas_size
            box = [float(x0), float(y0), float(x0 + width), float(y0 + height)]
            (draw.ellipse if kind == "ellipse" else draw.rectangle)(box, fill=255)
        if rng.uniform() < 0.5:  # half the shapes are flat colour, half carry their own texture
            canvas.paste(tuple(int(v) for v in rng.integers(0, 256, 3)), (0, 0, canvas_size, canvas_size), mask)
        else:
            canvas.paste(_texture(rng, canvas_size), (0, 0), mask)
    return canvas.resize((size, size), Image.Resampling.BOX)


def make_synthetic(dest: str | Path, count: int = 256, size: int = 128, seed: int = 0) -> list[Path]:
    """Write `count` procedural PNGs synthetic_00000.png... (size x size RGB) into dest; returns their paths.

    Image i depends only on (seed, i), and the same seed gives byte-identical files.
    """
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = synthetic_image(np.random.default_rng([seed, index]), size)
        path = dest / f"synthetic_{index:05d}.png"
        image.save(path, format="PNG")  # PIL writes no timestamp: same pixels, same bytes
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# flickr8k


def _count_jpgs(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    with os.scandir(folder) as entries:
        return sum(1 for entry in entries if entry.name.lower().endswith((".jpg", ".jpeg")) and entry.is_file())


def _has_jpg(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    with os.scandir(folder) as entries:
        return any(entry.name.lower().endswith((".jpg", ".jpeg")) for entry in entries)


def find_flickr8k_input(kaggle_input: str | Path = KAGGLE_INPUT) -> Path | None:
    """An attached Kaggle input's flickr8k `Images` folder holding jpgs, or None.

    Looks at .../flickr8k*/Images up to four levels down (Kaggle's newer layout is
    /kaggle/input/datasets/<owner>/<slug>), then at kaggle_input/<any>/Images.
    """
    kaggle_input = Path(kaggle_input)
    if not kaggle_input.is_dir():
        return None
    others: list[Path] = []
    level = [kaggle_input]
    for depth in range(4):  # bounded: never walk the whole of a large attached dataset
        below: list[Path] = []
        for folder in level:
            with contextlib.suppress(OSError), os.scandir(folder) as entries:
                below += sorted(Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir())
        for folder in below:
            if "flickr8k" in folder.name.lower() and _has_jpg(folder / "Images"):
                return folder / "Images"
            if depth == 0:
                others.append(folder / "Images")
        level = [folder for folder in below if folder.name != "Images"]  # never list the photos themselves
    return next((images for images in others if _has_jpg(images)), None)


def kaggle_credentials() -> str | None:
    """Where the kaggle package would find credentials (a short description), or None; reads nothing secret."""
    env = os.environ
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME and KAGGLE_KEY"
    if env.get("KAGGLE_API_V1_TOKEN") and Path(env["KAGGLE_API_V1_TOKEN"]).is_file():
        return "KAGGLE_API_V1_TOKEN (inside a Kaggle notebook)"
    home = Path.home() / ".kaggle"
    if env.get("KAGGLE_CONFIG_DIR"):
        config_dirs = [Path(env["KAGGLE_CONFIG_DIR"])]
    else:  # kaggle falls back to the XDG folder when ~/.kaggle is missing
        config_dirs = [home, Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"]
    candidates = [directory / "kaggle.json" for directory in config_dirs]
    candidates += [home / "access_token", home / "access_token.txt", home / "credentials.json"]
    return next((str(path) for path in candidates if path.is_file()), None)


_CREDENTIALS_HELP = (
    "Either attach the dataset to the notebook (Kaggle: Add Input -> search 'adityajn105/flickr8k'), or give the "
    "kaggle package an API token: create one at https://www.kaggle.com/settings/api, then "
    "`export KAGGLE_API_TOKEN=<token>` or save it to ~/.kaggle/access_token; the legacy kaggle.json goes in "
    "~/.kaggle/ (or $KAGGLE_CONFIG_DIR) with `chmod 600`, or set KAGGLE_USERNAME and KAGGLE_KEY."
)


def _kaggle_api() -> Any:
    """The authenticated kaggle.api; the package is imported only here (it authenticates at import)."""
    source = kaggle_credentials()
    if source is None:
        raise DownloadError(f"flickr8k is not attached and no Kaggle credentials were found. {_CREDENTIALS_HELP}")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # kaggle prints a long help text when it cannot log in
            import kaggle

            api = kaggle.api
            if not getattr(api, "_authenticated", False):
                api.authenticate()
    except ImportError as error:
        # kaggle 2.2 also imports `six` without declaring it
        raise DownloadError(f"cannot import the kaggle package ({error}): pip install kaggle six") from error
    except SystemExit:  # KaggleApi.authenticate() calls exit(1) on failure
        raise DownloadError(f"Kaggle did not accept the credentials from {source}. {_CREDENTIALS_HELP}") from None
    except Exception as error:  # token checks go over the network
        raise DownloadError(f"could not log in to Kaggle with {source}: {type(error).__name__}: {error}") from error
    return api


def _is_safe_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return not (name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts)


def safe_extract(archive: str | Path, dest: str | Path, max_bytes: int = 20 * 2**30) -> list[Path]:
    """Extract a zip into dest, refusing (before writing anything) absolute paths, entries that resolve outside
    dest, symlink entries and archives over max_bytes uncompressed. Returns the extracted files."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        zip_file = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as error:
        raise DownloadError(f"{archive} is not a zip archive ({error}); delete it and download again") from None
    with zip_file:
        members = zip_file.infolist()
        targets = []
        for member in members:
            if stat.S_ISLNK(member.external_attr >> 16):
                raise UnsafeArchiveError(f"refusing {archive}: entry {member.filename!r} is a symbolic link")
            target = (root / member.filename).resolve()
            if not _is_safe_name(member.filename) or not target.is_relative_to(root):
                raise UnsafeArchiveError(f"refusing {archive}: entry {member.filename!r} would land outside {dest}")
            targets.append(target)
        total = sum(member.file_size for member in members)
        if total > max_bytes:
            raise UnsafeArchiveError(f"refusing {archive}: {total:,} bytes uncompressed, over the {max_bytes:,} limit")
        written = []
        for member, target in zip(members, targets):
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zip_file.open(member) as source, open(target, "wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
            written.append(target)
    return written


def get_flickr8k(dest: str | Path, client: Any = None, kaggle_input: str | Path = KAGGLE_INPUT,
                 expected_count: int | None = None) -> Path:
    """The folder of flickr8k's 8091 jpgs: an attached Kaggle input as it is, else downloaded into dest/Images.

    client: anything with kaggle's `dataset_download_files(dataset, path=, unzip=, quiet=)`; None builds the
    real kaggle.api (credentials are checked first, and the kaggle package is imported only then).
    Idempotent: dest/Images with the full count is returned without downloading.
    """
    expected = FLICKR8K_IMAGE_COUNT if expected_count is None else expected_count
    attached = find_flickr8k_input(kaggle_input)
    if attached is not None:
        logger.info("using the attached flickr8k at %s", attached)
        return attached
    dest = Path(dest).expanduser()
    images = dest / "Images"
    if _count_jpgs(images) == expected:
        return images
    if client is None:
        client = _kaggle_api()
    dest.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s into %s", FLICKR8K_DATASET, dest)
    try:
        client.dataset_download_files(FLICKR8K_DATASET, path=str(dest), unzip=False, quiet=False)
    except Exception as error:  # network, quota, licence not accepted...: one error type for callers
        reason = f"{type(error).__name__}: {error}"
        raise DownloadError(f"downloading {FLICKR8K_DATASET} into {dest} failed: {reason}") from error
    archive = dest / (FLICKR8K_DATASET.split("/")[1] + ".zip")  # kaggle names it after the dataset slug
    if not archive.is_file():
        zips = sorted(dest.glob("*.zip"))
        if len(zips) != 1:
            raise DownloadError(f"the download of {FLICKR8K_DATASET} left no single zip in {dest} (found {len(zips)})")
        archive = zips[0]
    safe_extract(archive, dest)
    count = _count_jpgs(images)
    if count != expected:
        raise DownloadError(f"{images} holds {count} jpgs after extracting {archive}, expected {expected}; "
                            f"delete {dest} and download again")
    archive.unlink()  # about 1 GB that is no longer needed
    return images
