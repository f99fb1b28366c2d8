"""Where images come from: procedural synthetic pictures (the offline default) and flickr8k (attached or downloaded)."""

from __future__ import annotations

import logging
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vaehelpers import kaggle

logger = logging.getLogger("vaehelpers.data")

FLICKR8K_DATASET = "adityajn105/flickr8k"  # Kaggle dataset: Images/ (8091 jpgs) + captions.txt
FLICKR8K_IMAGE_COUNT = 8091


class DownloadError(RuntimeError):
    """flickr8k could not be found or fetched; the message says what to do."""


class UnsafeArchiveError(DownloadError):
    """An archive entry that would land outside the destination (zip slip) or is a link."""


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


def find_flickr8k_input(kaggle_input: str | Path | None = None) -> Path | None:
    """An attached Kaggle input's flickr8k `Images` folder holding jpgs, or None (kaggle_input: default
    kaggle.kaggle_input(), read at each call).

    Looks at .../flickr8k*/Images up to four levels down (Kaggle's newer layout is
    /kaggle/input/datasets/<owner>/<slug>), then at kaggle_input/<any>/Images.
    """
    others: list[Path] = []
    for depth, folder in kaggle.input_folders(kaggle_input, max_depth=4, skip=("Images",)):
        if "flickr8k" in folder.name.lower() and _has_jpg(folder / "Images"):
            return folder / "Images"
        if depth == 0:
            others.append(folder / "Images")
    return next((images for images in others if _has_jpg(images)), None)


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


def get_flickr8k(
    dest: str | Path,
    client: Any = None,
    kaggle_input: str | Path | None = None,
    expected_count: int | None = None,
) -> Path:
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
        try:
            client = kaggle.api()
        except kaggle.KaggleLoginError as error:
            raise DownloadError(
                f"flickr8k is not attached and {error} Or attach the dataset to the notebook "
                f"(Kaggle: Add Input -> search '{FLICKR8K_DATASET}')."
            ) from None
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
        raise DownloadError(
            f"{images} holds {count} jpgs after extracting {archive}, expected {expected}; "
            f"delete {dest} and download again"
        )
    archive.unlink()  # about 1 GB that is no longer needed
    return images
