"""Image files: listing, the path-hash split, safe decoding, scanning for bad files, and preprocessing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import stat
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger("vaehelpers.data")  # images, dataset and sources report under one name

Split = Literal["train", "test", "all"]
Resize = Literal["crop", "squash"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})  # compared lower-cased
MAX_PIXELS = 100_000_000  # larger images are refused as decompression bombs (PIL's own warning, ~89 MP, also counts)
MIN_SIZE = 8  # smaller images are refused: nothing useful survives the resize


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
        found += [
            Path(dirpath, name)
            for name in filenames
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def relative_key(path: str | Path, root: str | Path | None = None) -> str:
    """The posix path of `path` relative to `root` (or as given), NFC-normalised: the name the split hashes."""
    path = Path(path)
    if root is not None:
        path = path.relative_to(root)
    # macOS stores decomposed (NFD) names: normalising keeps a copied folder's split identical
    return unicodedata.normalize("NFC", path.as_posix())


def split_of(relative_path: str | Path, test_fraction: float = 0.1) -> Literal["train", "test"]:
    """ "test" for about `test_fraction` of paths, else "train"; depends on this one path only.

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


def load_image(
    path: str | Path,
    *,
    min_size: int = MIN_SIZE,
    max_pixels: int = MAX_PIXELS,
    draft_size: int | None = None,
    data: bytes | None = None,
) -> Image.Image:
    """Decode one file fully into an 8-bit RGB PIL image, upright (EXIF orientation applied).

    draft_size: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size
    (the whole stream is still read, so truncation is still caught). Raises BadImageError with a reason:
    "zero-byte file", "not an image", "truncated image", "too small (WxH < 8x8)", "decompression bomb (...)",
    "unreadable: <os error>", "corrupt image: ...", "unsupported colour mode ...".
    data: the file's bytes, already read (a member of a tar shard); `path` then only names it in errors.
    """
    path = Path(path)
    if data is None:
        try:
            info = path.stat()
        except OSError as error:
            raise BadImageError(path, f"unreadable: {error.strerror or error}") from None
        if not stat.S_ISREG(info.st_mode):
            raise BadImageError(path, "not a regular file")
    if (len(data) if data is not None else info.st_size) == 0:
        raise BadImageError(path, "zero-byte file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; a bomb must never be decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as image:
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
            raise NoImagesError(
                f"no usable images in {self.root} (split {self.split}): all {len(self.bad)} image "
                f"files are bad, e.g. {_display(self.bad[0][0], self.root)}: {self.bad[0][1]}"
            )
        if n_files:
            raise NoImagesError(
                f"split {self.split!r} of {self.root} is empty: its {n_files} image files all hash "
                f"into the other split (use --split all, or split='all' in Python, for a small folder)"
            )
        raise NoImagesError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {self.root}")


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def scan_images(
    root: str | Path,
    split: Split = "all",
    min_size: int = MIN_SIZE,
    *,
    test_fraction: float = 0.1,
    max_pixels: int = MAX_PIXELS,
) -> ScanReport:
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
    crop = image[:, top : top + image_size, left : left + image_size]  # (3, S, S)
    if flip:
        crop = crop.flip(-1)
    return crop.float().div_(127.5).sub_(1.0)  # .float() copies, so cached pixels are never written


def preprocess(
    image: Image.Image, image_size: int = 128, resize: Resize = "crop", generator: torch.Generator | None = None
) -> torch.Tensor:
    """RGB PIL image -> float (3, S, S) in [-1, 1]; eval transform without a generator, train with one."""
    return crop_image(resize_image(image, image_size, resize), image_size, generator)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator seeded from (seed, epoch, index) only: no global RNG, any number of workers."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(epoch)}/{int(index)}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits: a valid seed
