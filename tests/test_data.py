"""Tests for images.py, dataset.py and sources.py: listing, split, decoding, preprocessing, cache, synthetic images, flickr8k."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaehelpers import dataset as dataset_module
from vaehelpers import imagecache, images, kaggle, sources
from vaehelpers.config import DataConfig
from vaehelpers.dataset import ImageFolderDataset
from vaehelpers.images import (
    BadImageError,
    NoImagesError,
    crop_image,
    list_images,
    load_image,
    preprocess,
    resize_image,
    scan_images,
    select_split,
    split_of,
)
from vaehelpers.sources import (
    DownloadError,
    UnsafeArchiveError,
    find_flickr8k_input,
    get_flickr8k,
    make_synthetic,
    safe_extract,
)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries almost no data (a decompression bomb's header)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# synthetic images


def test_synthetic_is_deterministic_with_count_and_size(tmp_path):
    first = make_synthetic(tmp_path / "a", count=12, size=48, seed=3)
    second = make_synthetic(tmp_path / "b", count=12, size=48, seed=3)
    other = make_synthetic(tmp_path / "c", count=12, size=48, seed=4)
    assert [p.name for p in first] == [f"synthetic_{i:05d}.png" for i in range(12)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [p.name for p in first]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert sum(p.read_bytes() != q.read_bytes() for p, q in zip(first, other)) == 12
    for path in first:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (48, 48))


def test_synthetic_images_are_varied(tmp_path):
    paths = make_synthetic(tmp_path, count=32, size=64, seed=0)
    images = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in paths])  # (32, 64, 64, 3)
    assert images.std(axis=0).mean() > 40  # pixels differ from image to image
    assert np.median(images.reshape(32, -1).std(axis=1)) > 25  # and within an image: not flat
    assert len({tuple(np.round(m)) for m in images.mean(axis=(1, 2))}) == 32  # every image its own colours


# ---------------------------------------------------------------------------------------------
# listing and split


def test_split_fraction_disjoint_and_stable():
    names = [f"folder{i % 7}/photo_{i:05d}.jpg" for i in range(4000)]
    root = Path("/data")
    paths = [root / name for name in names]
    train, test = select_split(paths, root, "train"), select_split(paths, root, "test")
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(paths)
    assert sorted(train + test) == sorted(paths) == sorted(select_split(paths, root, "all"))
    assert 0.07 < len(test) / len(paths) < 0.13
    # each file's split depends on its own path only: adding or removing others moves nothing
    fewer = paths[::3] + [root / f"extra/new_{i}.png" for i in range(500)]
    assert set(select_split(fewer, root, "test")) & set(paths) == set(test) & set(fewer)
    assert [split_of(n) for n in names[:50]] == [split_of(Path(n)) for n in names[:50]]
    assert {split_of(n, 0.0) for n in names[:50]} == {"train"} and {split_of(n, 1.0) for n in names[:50]} == {"test"}
    with pytest.raises(ValueError):
        select_split(paths, root, "validation")


def test_list_images_recursive_sorted_and_safe(tmp_path):
    pixel = encoded(noise_image(8, 8), "PNG")
    for name in [
        "b.PNG",
        "a/z.jpg",
        "a/B.JpEg",
        "c/d/e.TIFF",
        "c/x.webp",
        "c/y.bmp",
        ".hidden.png",
        ".secret/i.png",
        ".vaehelpers_cache/j.png",
        "notes.txt",
        "a/data.npy",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(pixel)
    (tmp_path / "c" / "d" / "loop").symlink_to(tmp_path, target_is_directory=True)  # a cycle
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/B.JpEg", "a/z.jpg", "b.PNG", "c/d/e.TIFF", "c/x.webp", "c/y.bmp"]
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")


def test_split_of_real_files_is_stable_when_files_are_added(tmp_path):
    for i in range(60):
        (tmp_path / f"img_{i}.png").write_bytes(b"x")
    before = {p.name: split_of(p.relative_to(tmp_path).as_posix()) for p in list_images(tmp_path)}
    for i in range(60, 120):
        (tmp_path / f"img_{i}.png").write_bytes(b"x")
    (tmp_path / "img_0.png").unlink()
    after = {p.name: split_of(p.relative_to(tmp_path).as_posix()) for p in list_images(tmp_path)}
    assert all(after[name] == split for name, split in before.items() if name in after)


# ---------------------------------------------------------------------------------------------
# real photos


def test_bsds500_listing_split_and_items(bsds500, tmp_path):
    paths = list_images(bsds500)
    assert len(paths) == 500 and len(set(paths)) == 500
    train, test = select_split(paths, bsds500, "train"), select_split(paths, bsds500, "test")
    assert set(train).isdisjoint(test) and sorted(train + test) == sorted(paths)
    assert select_split(list_images(bsds500), bsds500, "test") == test  # stable across calls
    assert 0.05 < len(test) / 500 < 0.15
    dataset = ImageFolderDataset(bsds500, split="test", cache_dir=tmp_path / "cache")  # never write into shared/
    assert dataset.paths == test and dataset.bad_files == []
    for index in (0, len(dataset) - 1):
        item = dataset[index]
        assert item.shape == (3, 128, 128) and item.dtype == torch.float32
        assert -1.0 <= item.min() < item.max() <= 1.0
    assert not (bsds500 / ".vaehelpers_cache").exists()


# ---------------------------------------------------------------------------------------------
# bad files


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    noise_image(40, 30, seed=1).save(folder / "good_a.png")
    noise_image(30, 40, seed=2).save(folder / "good_b.jpg", quality=90)
    jpeg, png = encoded(noise_image(64, 64, seed=3), "JPEG", quality=90), encoded(noise_image(64, 64, seed=4), "PNG")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "random.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (folder / "text.png").write_text("this is not a picture\n")
    noise_image(4, 4).save(folder / "tiny.png")
    (folder / "bomb.png").write_bytes(png_header(20000, 20000))  # 400 MP declared
    (folder / "bomb_b.png").write_bytes(png_header(9500, 9800))  # 93 MP: under MAX_PIXELS, over PIL's warning limit
    return folder


EXPECTED_REASONS = {
    "zero.jpg": "zero-byte file",
    "cut.jpg": "truncated image",
    "cut.png": "truncated image",
    "random.jpg": "not an image",
    "text.png": "not an image",
    "tiny.png": "too small (4x4 < 8x8)",
    "bomb.png": "decompression bomb",
    "bomb_b.png": "decompression bomb",
}


def test_scan_reports_each_bad_file_and_keeps_the_good(mixed_folder):
    report = scan_images(mixed_folder)
    assert [p.name for p in report.good] == ["good_a.png", "good_b.jpg"]
    reasons = {path.name: reason for path, reason in report.bad}
    assert reasons.keys() == EXPECTED_REASONS.keys()
    for name, reason in EXPECTED_REASONS.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    assert all(path.parent == mixed_folder for path, _ in report.bad)
    summary = report.summary()
    assert "2 usable images, 8 skipped" in summary and "cut.png: truncated image" in summary
    for path in report.good:
        assert load_image(path).mode == "RGB"


def test_load_image_errors_name_path_and_reason(mixed_folder):
    with pytest.raises(BadImageError, match="cut.jpg: truncated image") as caught:
        load_image(mixed_folder / "cut.jpg")
    assert isinstance(caught.value, ValueError) and caught.value.path == mixed_folder / "cut.jpg"
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(mixed_folder / "good_a.png", max_pixels=1000)  # 40x30 = 1200 pixels
    with pytest.raises(BadImageError, match="unreadable"):
        load_image(mixed_folder / "absent.png")
    with pytest.raises(BadImageError, match=r"too small \(40x30 < 64x64\)"):
        load_image(mixed_folder / "good_a.png", min_size=64)


def test_dataset_skips_and_logs_bad_files_once(mixed_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vaehelpers.data"):
        dataset = ImageFolderDataset(mixed_folder, split="all", image_size=16, cache_dir=tmp_path / "cache")
        assert [dataset[i].shape for i in range(len(dataset))] == [(3, 16, 16)] * 2
    assert [p.name for p in dataset.paths] == ["good_a.png", "good_b.jpg"]
    assert {p.name for p, _ in dataset.bad_files} == EXPECTED_REASONS.keys()
    for name in EXPECTED_REASONS:
        assert sum(name in record.getMessage() for record in caplog.records) == 1, name
    cached = ImageFolderDataset(mixed_folder, split="all", image_size=16, cache_dir=tmp_path / "cache")
    assert cached.bad_files == dataset.bad_files  # still reported when everything comes from the cache


def test_all_bad_or_empty_folder_raises_naming_it(mixed_folder, tmp_path):
    for name in ("good_a.png", "good_b.jpg"):
        (mixed_folder / name).unlink()
    with pytest.raises(NoImagesError, match=f"{mixed_folder}.*all 8 image files are bad"):
        scan_images(mixed_folder)
    with pytest.raises(NoImagesError, match=str(mixed_folder)):
        ImageFolderDataset(mixed_folder, split="all", cache_dir=tmp_path / "cache")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoImagesError, match=f"no image files .* under {empty}"):
        ImageFolderDataset(empty, cache=False)


def test_empty_split_raises_unless_allowed(tmp_path):
    names = [f"img_{i}.png" for i in range(40)]
    train_name = next(n for n in names if split_of(n) == "train")
    noise_image(16, 16).save(tmp_path / train_name)
    with pytest.raises(NoImagesError, match="split 'test'.* is empty"):
        ImageFolderDataset(tmp_path, split="test", cache=False)
    assert len(ImageFolderDataset(tmp_path, split="test", cache=False, allow_empty=True)) == 0


# ---------------------------------------------------------------------------------------------
# colour modes and orientation


def pixel(path: Path, xy=(0, 0)) -> tuple[int, ...]:
    image = load_image(path)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_mode_conversion_to_rgb(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    assert pixel(tmp_path / "l.png") == (77, 77, 77)

    la = Image.new("LA", (8, 8), (100, 0))
    la.putpixel((1, 0), (100, 255))
    la.save(tmp_path / "la.png")
    assert pixel(tmp_path / "la.png") == (255, 255, 255) and pixel(tmp_path / "la.png", (1, 0)) == (100, 100, 100)

    rgba = Image.new("RGBA", (8, 8), (200, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    r, g, b = pixel(tmp_path / "rgba.png")
    assert abs(r - 227) <= 1 and abs(g - 127) <= 1 and abs(b - 127) <= 1  # half red over white, not black

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=1)
    assert pixel(tmp_path / "p.png") == (255, 0, 0) and pixel(tmp_path / "p.png", (1, 0)) == (255, 255, 255)

    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 255))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    cmyk.putpixel((2, 0), (0, 0, 0, 0))
    cmyk.save(tmp_path / "cmyk.tif")
    assert [pixel(tmp_path / "cmyk.tif", (x, 0)) for x in range(3)] == [(0, 0, 0), (0, 255, 255), (255, 255, 255)]

    deep = np.zeros((8, 8), dtype=np.uint16)
    deep[0, :4] = [0, 65535, 32896, 1028]
    Image.fromarray(deep).save(tmp_path / "i16.png")
    with Image.open(tmp_path / "i16.png") as image:
        assert image.mode.startswith("I")
    assert [pixel(tmp_path / "i16.png", (x, 0)) for x in range(4)] == [(0,) * 3, (255,) * 3, (128,) * 3, (4,) * 3]

    wide = Image.fromarray(np.full((8, 8), 40000, dtype=np.int32), "I")  # 32-bit integers holding 16-bit values
    assert images.to_rgb(wide).getpixel((0, 0)) == (156, 156, 156)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    upright = load_image(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top after rotating


# ---------------------------------------------------------------------------------------------
# preprocessing


def column_image(width: int, height: int) -> Image.Image:
    """Red encodes the column, green the row: crops can be read off the pixels."""
    columns, rows = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([columns * 5, rows * 5, np.full_like(rows, 9)], -1).astype(np.uint8))


def test_eval_center_crop_of_a_wide_image(tmp_path):
    column_image(24, 16).save(tmp_path / "wide.png")
    item = ImageFolderDataset(tmp_path, split="all", image_size=16, cache=False)[0]
    assert item.shape == (3, 16, 16)
    pixels = torch.round((item + 1) * 127.5)
    assert pixels[0, 0].tolist() == [5.0 * c for c in range(4, 20)]  # columns 4..19: the center
    assert pixels[1, :, 0].tolist() == [5.0 * r for r in range(16)]
    # resizing: the shorter side goes to S, the other keeps the aspect ratio
    assert resize_image(noise_image(300, 200), 100).shape == (3, 100, 150)
    assert resize_image(noise_image(200, 300), 100).shape == (3, 150, 100)
    assert resize_image(noise_image(300, 200), 64, "squash").shape == (3, 64, 64)
    eval_item = preprocess(noise_image(300, 200), 100)
    assert eval_item.shape == (3, 100, 100) and -1 <= eval_item.min() and eval_item.max() <= 1
    assert torch.equal(eval_item, crop_image(resize_image(noise_image(300, 200), 100)[:, :, 25:125], 100))


def test_train_crops_depend_on_seed_epoch_index_only(tmp_path):
    for i in range(4):
        noise_image(48, 32, seed=i).save(tmp_path / f"n{i}.png")
    dataset = ImageFolderDataset(tmp_path, split="all", image_size=16, augment=True, seed=7, cache=False)
    dataset.set_epoch(0)
    first = [dataset[i] for i in range(4)]
    torch.manual_seed(123)  # global RNG state must not matter
    assert all(torch.equal(a, dataset[i]) for i, a in enumerate(first))
    again = ImageFolderDataset(tmp_path, split="all", image_size=16, augment=True, seed=7, cache=False)
    assert all(torch.equal(a, again[i]) for i, a in enumerate(first))
    dataset.set_epoch(1)
    assert not all(torch.equal(a, dataset[i]) for i, a in enumerate(first))
    other_seed = ImageFolderDataset(tmp_path, split="all", image_size=16, augment=True, seed=8, cache=False)
    assert not all(torch.equal(a, other_seed[i]) for i, a in enumerate(first))
    assert all(x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 for x in first)


def test_set_epoch_reaches_persistent_workers(tmp_path):
    for i in range(4):
        noise_image(40, 24, seed=i).save(tmp_path / f"n{i}.png")
    dataset = ImageFolderDataset(tmp_path, split="all", image_size=16, augment=True, seed=1, cache_dir=tmp_path / "c")
    expected = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        expected.append(torch.stack([dataset[i] for i in range(4)]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=True)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        assert torch.equal(torch.cat(list(loader)), expected[epoch]), epoch


def test_squash_resizes_to_square_and_only_flips(tmp_path):
    noise_image(60, 30).save(tmp_path / "wide.png")
    plain = ImageFolderDataset(tmp_path, split="all", image_size=24, resize="squash", cache=False)[0]
    augmented = ImageFolderDataset(tmp_path, split="all", image_size=24, resize="squash", augment=True, cache=False)
    assert plain.shape == (3, 24, 24)
    items = []
    for epoch in range(8):
        augmented.set_epoch(epoch)
        items.append(augmented[0])
    assert all(torch.equal(x, plain) or torch.equal(x, plain.flip(-1)) for x in items)
    assert any(torch.equal(x, plain.flip(-1)) for x in items) and any(torch.equal(x, plain) for x in items)


# ---------------------------------------------------------------------------------------------
# cache


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, (width, height) in enumerate([(40, 30), (30, 50), (32, 32), (64, 20), (25, 25), (50, 40)]):
        noise_image(width, height, seed=i).save(folder / ("sub" if i % 2 else ".") / f"p{i}.png")
    return folder


def forbid_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(dataset_module, "load_image", refuse)
    monkeypatch.setattr(imagecache, "load_image", refuse)  # where the cache build decodes


def count_decoding(monkeypatch) -> list[Path]:
    calls, real = [], dataset_module.load_image

    def counting(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "load_image", counting)
    monkeypatch.setattr(imagecache, "load_image", counting)
    return calls


def cache_files(folder: Path) -> dict[str, int]:
    """name -> mtime (ns) of every file in a cache folder."""
    return {path.name: path.stat().st_mtime_ns for path in sorted(folder.iterdir())}


def test_cache_is_reused_and_invalidated(photo_folder, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    built = ImageFolderDataset(photo_folder, split="all", image_size=16, augment=True, cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == [built.cache_path]  # one cache folder: settings, lock, one shard, its index
    assert [Path(name).suffix for name in cache_files(built.cache_path)] == ["", ".json", ".bin", ".json"]
    expected = [built[i] for i in range(len(built))]
    uncached = ImageFolderDataset(photo_folder, split="all", image_size=16, augment=True, cache=False)
    assert all(torch.equal(a, uncached[i]) for i, a in enumerate(expected))

    with monkeypatch.context() as patch:
        forbid_decoding(patch)
        written = cache_files(built.cache_path)
        loaded = ImageFolderDataset(photo_folder, split="all", image_size=16, augment=True, cache_dir=cache_dir)
        assert all(torch.equal(a, loaded[i]) for i, a in enumerate(expected))
        assert loaded.paths == built.paths and cache_files(built.cache_path) == written  # read, not rewritten

    with monkeypatch.context() as patch:  # touching one file re-decodes that file only
        calls = count_decoding(patch)
        stat = (photo_folder / "p0.png").stat()
        os.utime(photo_folder / "p0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        ImageFolderDataset(photo_folder, split="all", image_size=16, cache_dir=cache_dir)
        assert calls == [photo_folder / "p0.png"]

    with monkeypatch.context() as patch:  # so does adding one
        calls = count_decoding(patch)
        noise_image(20, 20, seed=9).save(photo_folder / "sub" / "new.png")
        grown = ImageFolderDataset(photo_folder, split="all", image_size=16, cache_dir=cache_dir)
        assert calls == [photo_folder / "sub" / "new.png"] and len(grown) == len(built) + 1

    with monkeypatch.context() as patch:  # other settings: everything again
        calls = count_decoding(patch)
        ImageFolderDataset(photo_folder, split="all", image_size=16, cache_dir=cache_dir, test_fraction=0.2)
        assert len(calls) == len(grown)


def shard_index(folder: Path) -> dict:
    (index,) = folder.glob("shard-*.json")
    return json.loads(index.read_text())


def test_cache_file_format(photo_folder, tmp_path):
    dataset = ImageFolderDataset(photo_folder, split="all", image_size=16, cache_dir=tmp_path / "cache")
    settings = json.loads((dataset.cache_path / "settings.json").read_text())
    assert settings["image_size"] == 16 and settings["version"] == imagecache.CACHE_VERSION
    index = shard_index(dataset.cache_path)
    assert index["format"] == "vaehelpers image cache shard"
    names = [p.relative_to(photo_folder).as_posix() for p in list_images(photo_folder)]
    assert sorted(source[0] for source in index["sources"]) == names
    rows = [row for *_, rows in index["sources"] for row in rows]  # key, name, reason, shard, offset, height, width
    assert [row[2] for row in rows] == [""] * 6 and min(min(row[5:]) for row in rows) == 16  # shorter side S
    (shard,) = dataset.cache_path.glob("shard-*.bin")
    assert {row[3] for row in rows} == {shard.stem} and index["bytes"] == shard.stat().st_size
    assert sum(3 * row[5] * row[6] for row in rows) == shard.stat().st_size  # pixels end to end, nothing else
    squash = ImageFolderDataset(photo_folder, split="all", image_size=16, resize="squash", cache_dir=tmp_path / "cache")
    assert squash.cache_path != dataset.cache_path
    assert [row[5:] for *_, rows in shard_index(squash.cache_path)["sources"] for row in rows] == [[16, 16]] * 6


def test_default_cache_beside_the_data_and_not_listed(photo_folder):
    dataset = ImageFolderDataset(photo_folder, split="all", image_size=16)
    assert dataset.cache_path.parent == photo_folder.resolve() / ".vaehelpers_cache"
    assert dataset.cache_path.is_dir() and len(list_images(photo_folder)) == 6


def test_read_only_folder_caches_in_the_user_cache(photo_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(dataset_module.os, "access", lambda path, mode: False)  # as /kaggle/input: read-only
    dataset = ImageFolderDataset(photo_folder, split="all", image_size=16)
    assert dataset.cache_path.parent == tmp_path / "xdg" / "vaehelpers" and dataset.cache_path.is_dir()
    assert not (photo_folder / ".vaehelpers_cache").exists()


def test_unwritable_cache_warns_and_still_works(photo_folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageFolderDataset(photo_folder, split="all", image_size=16, cache_dir=blocker / "cache")
        items = [dataset[i] for i in range(len(dataset))]
    assert [str(w.message).count("cannot be written") for w in caught] == [1]
    assert dataset.cache_path is None and all(x.shape == (3, 16, 16) for x in items)


def test_from_config(photo_folder, tmp_path):
    cfg = DataConfig(
        data_dir=str(photo_folder), image_size=16, resize="squash", cache_dir=str(tmp_path / "c"), test_fraction=0.0
    )
    dataset = ImageFolderDataset.from_config(cfg, split="train", augment=True, seed=3)
    assert (len(dataset), dataset.image_size, dataset.resize, dataset.seed) == (6, 16, "squash", 3)
    assert dataset.get_path(0) == list_images(photo_folder)[0] and dataset.cache_path.parent == tmp_path / "c"
    with pytest.raises(ValueError, match="data_dir"):
        ImageFolderDataset.from_config(DataConfig())


# ---------------------------------------------------------------------------------------------
# flickr8k


def write_zip(path: Path, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)


class FakeKaggle:
    """Stands in for kaggle.api: writes a small flickr8k-like zip where the real one would."""

    def __init__(self, count: int = 5):
        self.count, self.calls = count, []

    def dataset_download_files(self, dataset, path=None, unzip=False, quiet=True):
        self.calls.append((dataset, path, unzip))
        jpeg = encoded(noise_image(12, 10), "JPEG")
        entries = {f"Images/{i}_photo.jpg": jpeg for i in range(self.count)}
        write_zip(Path(path) / "flickr8k.zip", {**entries, "captions.txt": b"image,caption\n"})


def test_flickr8k_download_extract_and_count(tmp_path, monkeypatch):
    client, dest = FakeKaggle(count=5), tmp_path / "flickr8k"
    images = get_flickr8k(dest, client=client, kaggle_input=tmp_path / "no_input", expected_count=5)
    assert images == dest / "Images" and len(list(images.glob("*.jpg"))) == 5
    assert client.calls == [("adityajn105/flickr8k", str(dest), False)] and not (dest / "flickr8k.zip").exists()
    assert get_flickr8k(dest, client=client, kaggle_input=tmp_path / "no_input", expected_count=5) == images
    assert len(client.calls) == 1  # idempotent: already there
    monkeypatch.setattr(sources, "FLICKR8K_IMAGE_COUNT", 5)  # the default count is read at call time
    assert get_flickr8k(dest, client=client, kaggle_input=tmp_path / "no_input") == images
    with pytest.raises(DownloadError, match="holds 4 jpgs.*expected 5"):
        get_flickr8k(tmp_path / "short", client=FakeKaggle(count=4), kaggle_input=tmp_path / "no_input")


def test_safe_extract_refuses_escaping_entries(tmp_path):
    dest = tmp_path / "dest"
    bad_zip = tmp_path / "evil.zip"
    write_zip(bad_zip, {"Images/ok.jpg": b"fine", "../evil.txt": b"gotcha"})
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./evil\.txt'"):
        safe_extract(bad_zip, dest)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "Images").exists()  # nothing written at all
    write_zip(bad_zip, {"/tmp/absolute.txt": b"x"})
    with pytest.raises(UnsafeArchiveError, match="absolute.txt"):
        safe_extract(bad_zip, dest)
    with zipfile.ZipFile(bad_zip, "w") as archive:
        link = zipfile.ZipInfo("Images/link.jpg")
        link.external_attr = 0o120777 << 16  # a symlink entry
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract(bad_zip, dest)
    write_zip(bad_zip, {"Images/a.jpg": b"1", "captions.txt": b"2"})
    assert sorted(p.relative_to(dest).as_posix() for p in safe_extract(bad_zip, dest)) == [
        "Images/a.jpg",
        "captions.txt",
    ]


def test_flickr8k_refuses_an_unsafe_download(tmp_path):
    class EvilKaggle:
        def dataset_download_files(self, dataset, path=None, unzip=False, quiet=True):
            write_zip(Path(path) / "flickr8k.zip", {"../evil.txt": b"x"})

    with pytest.raises(UnsafeArchiveError, match="evil.txt"):
        get_flickr8k(tmp_path / "dest", client=EvilKaggle(), kaggle_input=tmp_path / "none")
    assert not (tmp_path / "evil.txt").exists()


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle_config"))
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_V1_TOKEN", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name in [m for m in sys.modules if m == "kaggle" or m.startswith("kaggle.")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


def test_missing_credentials_give_one_clear_error_without_importing_kaggle(no_credentials):
    with pytest.raises(DownloadError, match="no Kaggle credentials.*KAGGLE_API_TOKEN.*kaggle.json"):
        get_flickr8k(no_credentials / "dest", kaggle_input=no_credentials / "none")
    assert "kaggle" not in sys.modules
    assert kaggle.credentials() is None


def test_credentials_are_found_where_kaggle_looks(no_credentials, monkeypatch):
    config = no_credentials / "kaggle_config"
    config.mkdir()
    (config / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert kaggle.credentials() == str(config / "kaggle.json")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "abc")
    assert kaggle.credentials() == "KAGGLE_API_TOKEN"
    assert "kaggle" not in sys.modules


def test_kaggle_input_is_used_without_copying(tmp_path):
    class NoDownloads:
        def dataset_download_files(self, *args, **kwargs):
            raise AssertionError("should not download")

    jpeg = encoded(noise_image(12, 10), "JPEG")
    root = tmp_path / "input"
    (root / "other" / "Images").mkdir(parents=True)  # no jpgs: not it
    assert find_flickr8k_input(root) is None and find_flickr8k_input(tmp_path / "missing") is None
    nested = root / "datasets" / "adityajn105" / "flickr8k" / "Images"  # Kaggle's newer layout
    nested.mkdir(parents=True)
    (nested / "1.jpg").write_bytes(jpeg)
    assert get_flickr8k(tmp_path / "dest", client=NoDownloads(), kaggle_input=root) == nested
    assert not (tmp_path / "dest").exists()
    classic = root / "flickr8k" / "Images"
    classic.mkdir(parents=True)
    (classic / "2.JPG").write_bytes(jpeg)
    assert find_flickr8k_input(root) == classic
    plain = tmp_path / "plain"
    (plain / "some-upload" / "Images").mkdir(parents=True)
    (plain / "some-upload" / "Images" / "3.jpg").write_bytes(jpeg)
    assert find_flickr8k_input(plain) == plain / "some-upload" / "Images"
