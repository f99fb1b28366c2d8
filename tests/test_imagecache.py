"""Tests for imagecache.py and tarshards.py: parallel shard builds, resume after kill -9, a full disk, WebDataset
tar shards (split, bad samples, damaged shards), training and evaluating from shards, one build per machine."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaehelpers import imagecache
from vaehelpers.cli import main as cli
from vaehelpers.dataset import ImageFolderDataset, cache_file
from vaehelpers.imagecache import CacheWriteError
from vaehelpers.images import split_of
from vaehelpers.tarshards import expand_braces, shard_paths

ROOT = Path(__file__).resolve().parents[1]


def noise_png(seed: int, width: int = 24, height: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """60 small PNGs in two subfolders."""
    root = tmp_path / "images"
    for i in range(60):
        path = root / f"part{i % 2}" / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(noise_png(i))
    return root


def count_decoding(monkeypatch) -> list[Path]:
    calls, real = [], imagecache.load_image

    def counting(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(imagecache, "load_image", counting)
    return calls


def items(dataset: ImageFolderDataset) -> torch.Tensor:
    return torch.stack([dataset[i] for i in range(len(dataset))])


def indexed_images(cache: Path) -> int:
    """Good images that the cache's shard indexes name."""
    return sum(
        1
        for index in cache.glob("shard-*.json")
        for *_, rows in json.loads(index.read_text())["sources"]
        for row in rows
        if not row[2]
    )


# ---------------------------------------------------------------------------------------------
# building


def test_parallel_build_equals_decoding_each_file(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(imagecache, "SHARD_BYTES", 3 * 16 * 19 * 7)  # 7 images (19x16) per shard: several
    built = ImageFolderDataset(folder, split="all", image_size=16, cache_dir=tmp_path / "c", cache_workers=2)
    uncached = ImageFolderDataset(folder, split="all", image_size=16, cache=False)
    assert built.paths == uncached.paths and len(built) == 60
    assert torch.equal(items(built), items(uncached))
    assert len(list(built.cache_path.glob("shard-*.bin"))) >= 8 and indexed_images(built.cache_path) == 60
    # a second construction reads every shard, decodes nothing
    calls = count_decoding(monkeypatch)
    again = ImageFolderDataset(folder, split="all", image_size=16, cache_dir=tmp_path / "c")
    assert calls == [] and torch.equal(items(again), items(uncached))


def test_removed_files_free_their_shards(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(imagecache, "SHARD_BYTES", 1)  # one image per shard (with one worker, in order)
    cache = ImageFolderDataset(folder, split="all", image_size=16, cache_dir=tmp_path / "c", cache_workers=1).cache_path
    assert len(list(cache.glob("shard-*.bin"))) == 60
    for path in sorted(folder.rglob("*.png"))[:10]:
        path.unlink()
    calls = count_decoding(monkeypatch)
    smaller = ImageFolderDataset(folder, split="all", image_size=16, cache_dir=tmp_path / "c")
    assert calls == [] and len(smaller) == 50
    assert len(list(cache.glob("shard-*.bin"))) == 50 and indexed_images(cache) == 50


BUILD_SLOWLY = """
import sys, time
from vaehelpers import imagecache
from vaehelpers.dataset import ImageFolderDataset, cache_file
imagecache.SHARD_BYTES = 3 * 16 * 19 * 5  # about 5 images per shard
real = imagecache.load_image
def slow(*args, **kwargs):
    time.sleep(0.05)
    return real(*args, **kwargs)
imagecache.load_image = slow
ImageFolderDataset(sys.argv[1], split="all", image_size=16, cache_dir=sys.argv[2], cache_workers=1)
"""


@pytest.mark.slow
def test_a_build_killed_mid_shard_resumes_where_it_stopped(folder, tmp_path, monkeypatch):
    cache_dir = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", BUILD_SLOWLY, str(folder), str(cache_dir)], env=env)
    deadline = time.monotonic() + 120
    # kill -9 once three shards are finished and a fourth is being written
    while time.monotonic() < deadline:
        indexes, bins = (len(list(cache_dir.glob(f"*/shard-*.{suffix}"))) for suffix in ("json", "bin"))
        if indexes >= 3 and bins > indexes:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (cache,) = cache_dir.iterdir()
    done = indexed_images(cache)
    assert 15 <= done < 60, done  # three shards or more finished, the build stopped well before the end
    assert len(list(cache.glob("shard-*.bin"))) == len(list(cache.glob("shard-*.json"))) + 1  # one half-written
    calls = count_decoding(monkeypatch)
    resumed = ImageFolderDataset(folder, split="all", image_size=16, cache_dir=cache_dir, cache_workers=1)
    assert len(calls) == 60 - done and len(set(calls)) == len(calls)  # only what no finished shard held
    assert torch.equal(items(resumed), items(ImageFolderDataset(folder, split="all", image_size=16, cache=False)))
    assert len(list(cache.glob("shard-*.bin"))) == len(list(cache.glob("shard-*.json")))  # the half shard is gone


def test_a_full_disk_stops_the_build_in_one_line_and_keeps_the_finished_shards(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(imagecache, "SHARD_BYTES", 3 * 16 * 19 * 10)  # about 10 images per shard
    cache_dir = tmp_path / "c"
    real_write, budget = os.write, [3 * 16 * 19 * 25]  # room for two shards and a half

    def write(handle: int, data) -> int:  # the disk as seen by the write system call: ENOSPC once it is full
        if str(cache_dir) in os.readlink(f"/proc/self/fd/{handle}"):
            if len(data) > budget[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            budget[0] -= len(data)
        return real_write(handle, data)

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", write)
        with pytest.raises(CacheWriteError) as caught:
            ImageFolderDataset(folder, split="all", image_size=16, cache_dir=cache_dir)
    message = str(caught.value)
    assert "\n" not in message and "the disk is full" in message and "2 shards" in message and str(cache_dir) in message
    (cache,) = cache_dir.iterdir()
    done = indexed_images(cache)
    assert 15 <= done <= 25 and len(list(cache.glob("shard-*.bin"))) == 2  # the half-written third is gone
    calls = count_decoding(monkeypatch)  # space again: the next build decodes only the rest (here: counted)
    dataset = ImageFolderDataset(folder, split="all", image_size=16, cache_dir=cache_dir, cache_workers=1)
    assert len(calls) == 60 - done
    assert torch.equal(items(dataset), items(ImageFolderDataset(folder, split="all", image_size=16, cache=False)))


def test_damaged_index_or_settings_are_rebuilt_not_trusted(folder, tmp_path, monkeypatch):
    cache = ImageFolderDataset(folder, split="all", image_size=16, cache_dir=tmp_path / "c").cache_path
    (index,) = cache.glob("shard-*.json")
    index.write_text(index.read_text()[:100])  # as a disk error might leave it
    calls = count_decoding(monkeypatch)
    dataset = ImageFolderDataset(folder, split="all", image_size=16, cache_dir=tmp_path / "c", cache_workers=1)
    assert len(calls) == 60 and len(dataset) == 60 and index not in cache.glob("shard-*.json")
    (bin_file,) = cache.glob("shard-*.bin")
    with open(bin_file, "r+b") as stream:
        stream.truncate(1000)  # pixels shorter than the index says: the images past byte 1000 are decoded again
    calls.clear()
    ImageFolderDataset(folder, split="all", image_size=16, cache_dir=tmp_path / "c", cache_workers=1)
    assert len(calls) == 59  # all but the first (19x16x3 = 912 bytes, wholly there)
    assert len(list(cache.glob("shard-*.json"))) == 2  # the damaged index was deleted


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards


def test_expand_braces_and_tell_shards_from_a_folder(folder, tmp_path):
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert shard_paths(folder) is None  # images: a folder of files
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("b.tar", "a.tar"):
        with tarfile.open(shards / name, "w"):
            pass
    assert shard_paths(shards) == [shards / "a.tar", shards / "b.tar"]  # a folder of shards only
    assert shard_paths(str(shards / "*.tar")) == [shards / "a.tar", shards / "b.tar"]
    assert shard_paths(shards / "a.tar") == [shards / "a.tar"]
    # a named shard that does not exist stays in the list, to be reported; a pattern naming nothing is an error
    assert shard_paths(f"{shards}/{{a,c}}.tar") == [shards / "a.tar", shards / "c.tar"]
    with pytest.raises(FileNotFoundError, match="no tar shard matches"):
        shard_paths(f"{shards}/{{0..3}}.tar")


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """Four WebDataset shards of 20 samples each (image + caption); shard 3 holds a sample without an image and
    one whose image is damaged."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(4):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for i in range(20):
                key = f"sample{shard * 20 + i:04d}"
                if (shard, i) == (3, 5):
                    add_member(archive, f"{key}.txt", b"a caption without its picture")
                    continue
                image = noise_png(shard * 20 + i)
                add_member(archive, f"{key}.png", image[: len(image) // 2] if (shard, i) == (3, 6) else image)
                add_member(archive, f"{key}.txt", f"caption {key}".encode())
    return folder


def test_shards_split_by_key_and_report_bad_samples(shards, tmp_path):
    pattern = f"{shards}/{{00000..00003}}.tar"
    train = ImageFolderDataset(pattern, split="train", image_size=16, cache_dir=tmp_path / "c", cache_workers=2)
    test = ImageFolderDataset(pattern, split="test", image_size=16, cache_dir=tmp_path / "c", allow_empty=True)
    keys = [f"sample{i:04d}" for i in range(80) if i not in (65, 66)]
    assert [p.stem for p in train.paths] == [k for k in keys if split_of(k) == "train"]
    assert [p.stem for p in test.paths] == [k for k in keys if split_of(k) == "test"]
    assert train.paths[0] == shards / "00000.tar" / f"{train.paths[0].stem}.png"  # named inside its shard
    everything = ImageFolderDataset(pattern, split="all", image_size=16, cache_dir=tmp_path / "c")
    reasons = {path.relative_to(shards).as_posix(): reason for path, reason in everything.bad_files}
    assert reasons == {
        "00003.tar/sample0065": "no image in sample (.txt)",
        "00003.tar/sample0066.png": "truncated image",
    }
    # the pixels are the images' own: the same as a folder of the same files
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in (0, 1, 79):
        (loose / f"sample{i:04d}.png").write_bytes(noise_png(i))
    files = ImageFolderDataset(loose, split="all", image_size=16, cache=False)
    positions = [[p.stem for p in everything.paths].index(f"sample{i:04d}") for i in (0, 1, 79)]
    assert torch.equal(torch.stack([everything[i] for i in positions]), items(files))


def test_damaged_shards_keep_their_good_samples_and_are_reported(shards, tmp_path):
    whole = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(whole[: len(whole) * 2 // 3])  # cut in the middle of a sample
    (shards / "00002.tar").write_bytes(b"this is not a tar archive" * 40)
    dataset = ImageFolderDataset(f"{shards}/{{00000..00004}}.tar", split="all", image_size=16, cache_dir=tmp_path / "c")
    reasons = {path.name: reason for path, reason in dataset.bad_files if path.suffix == ".tar"}
    assert reasons.keys() == {"00001.tar", "00002.tar", "00004.tar"}
    kept = [p for p in dataset.paths if p.parent.name == "00001.tar"]
    assert reasons["00001.tar"].startswith("truncated or damaged tar (")
    assert reasons["00001.tar"].endswith(f"; its {len(kept)} samples before that are kept")
    assert reasons["00002.tar"] == "not a tar archive (invalid header)"
    assert reasons["00004.tar"] == "unreadable: No such file or directory"
    assert 10 <= len(kept) < 20 and [p.stem for p in kept] == [f"sample{20 + i:04d}" for i in range(len(kept))]
    assert len(dataset) == 20 + len(kept) + 18 and all(x.shape == (3, 16, 16) for x in items(dataset))


def test_shards_without_the_cache_are_refused(shards):
    with pytest.raises(ValueError, match=r"tar shards are read through the image cache"):
        ImageFolderDataset(shards, cache=False)


@pytest.mark.slow
def test_a_folder_of_shards_trains_and_evaluates_like_a_folder_of_files(shards, tmp_path):
    run = tmp_path / "run"
    pattern = f"{shards}/{{00000..00003}}.tar"
    common = ["--image-size", "16", "--device", "cpu", "--no-progress"]
    train = [
        "train",
        "--data",
        pattern,
        "--run",
        str(run),
        "--preset",
        "tiny",
        "--recipe",
        "pixel",
        "--batch-size",
        "4",
    ]
    assert cli([*train, "--max-steps", "3", "--set", f"data.cache_dir={tmp_path / 'c'}", *common]) == 3  # 2 skipped
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["data_dir"] == pattern and (run / "model.safetensors").is_file()
    tested = [i for i in range(80) if split_of(f"sample{i:04d}") == "test"]
    status = 3 if {65, 66} & set(tested) else 0  # the bad samples count where they fall
    evaluate = ["evaluate", "--model", str(run), "--data", str(shards), "--json", str(tmp_path / "e.json"), "--no-fid"]
    assert cli([*evaluate, "--no-lpips", *common]) == status
    summary = json.loads((tmp_path / "e.json").read_text())
    expected = [i for i in tested if i not in (65, 66)]
    assert summary["n_images"] == len(expected) == len(summary["per_image"]) > 0


# ---------------------------------------------------------------------------------------------
# several processes on one machine


def _load_on_rank(rank: int, folder: str, cache_dir: str, log: str, port: int, break_rank_0: bool) -> None:
    """One rank of a 2-process gloo job: train.load_data, every decode appended to `log` as 'pid path'."""
    import torch.distributed as dist

    from vaehelpers import dataset as dataset_module
    from vaehelpers.config import build_config
    from vaehelpers.distributed import init_distributed
    from vaehelpers.train import load_data

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port), VAEHELPERS_DIST_TIMEOUT="60")
    real = imagecache.load_image

    def logged(path, *args, **kwargs):  # the cache's decode workers are forked from here: they log too
        with open(log, "a") as stream:
            stream.write(f"{os.getpid()} {path}\n")
        return real(path, *args, **kwargs)

    imagecache.load_image = logged
    if break_rank_0 and rank == 0:

        def full_disk(*args, **kwargs):
            raise CacheWriteError(f"image cache {cache_dir}: the disk is full")

        dataset_module.open_cache = full_disk
    ddp = init_distributed("cpu")
    settings = {"data.data_dir": folder, "data.image_size": 16, "data.cache_dir": cache_dir, "device": "cpu"}
    try:
        train_set, test_set, _ = load_data(build_config("tiny", "pixel", batch_size=4, **settings), ddp)
        outcome = [len(train_set), len(test_set), float(items(train_set).sum()), os.getpid()]
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    Path(f"{log}.rank{rank}").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_decode_each_image_once_in_total(folder, tmp_path):
    log = tmp_path / "decoded.log"
    args = (str(folder), str(tmp_path / "c"), str(log), _free_port(), False)
    torch.multiprocessing.spawn(_load_on_rank, args=args, nprocs=2)
    first, second = (json.loads(Path(f"{log}.rank{rank}").read_text()) for rank in (0, 1))
    assert first[:3] == second[:3] and first[0] + first[1] == 60  # both ranks read the same images
    decodes = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert sorted(path for _, path in decodes) == sorted(str(path) for path in folder.rglob("*.png"))  # once each
    assert second[3] not in {int(pid) for pid, _ in decodes}  # rank 1 decoded nothing: it read rank 0's cache


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_failed_build_stops_the_waiting_rank_with_one_line(folder, tmp_path):
    log = tmp_path / "decoded.log"
    args = (str(folder), str(tmp_path / "c"), str(log), _free_port(), True)
    torch.multiprocessing.spawn(_load_on_rank, args=args, nprocs=2)
    first, second = (json.loads(Path(f"{log}.rank{rank}").read_text()) for rank in (0, 1))
    assert first == f"CacheWriteError: image cache {tmp_path / 'c'}: the disk is full"
    assert (
        second == f"RuntimeError: rank 1: building the image cache of {folder} failed on another rank (see its error)"
    )
    assert not log.exists()  # and rank 1 did not try to build it on its own


def test_the_single_file_cache_of_earlier_versions_is_deleted(folder, tmp_path):
    old = cache_file(folder, "all", 16, "crop", tmp_path / "c").with_suffix(".pt")
    old.parent.mkdir()
    old.write_bytes(b"the whole folder's pixels, as one torch.save")
    dataset = ImageFolderDataset(folder, split="all", image_size=16, cache_dir=tmp_path / "c")
    assert not old.exists() and list((tmp_path / "c").iterdir()) == [dataset.cache_path]
