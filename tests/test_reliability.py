"""Bad input, kill -9, untrusted checkpoints and failing disks: nothing crashes bare, nothing is lost."""

import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaehelpers import rundir
from vaehelpers.cli import EXIT_SKIPPED_FILES
from vaehelpers.cli import main as cli
from vaehelpers.config import build_config
from vaehelpers.images import load_image
from vaehelpers.model import AutoencoderKL
from vaehelpers.rundir import CheckpointError, load_checkpoint
from vaehelpers.sources import make_synthetic
from vaehelpers.train import train

ROOT = Path(__file__).resolve().parents[1]


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG header that declares a huge image (a decompression bomb) without holding its pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def make_corpus(folder: Path) -> tuple[dict[str, str], list[str]]:
    """Write the odd-but-good and the bad files; return {bad name: expected reason word} and the good names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)  # height 40, width 24
    rgb = Image.fromarray(pixels)
    good = {
        "gray.png": rgb.convert("L"),
        "la.png": rgb.convert("LA"),
        "rgba.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "plain.jpg": rgb,
        "ÜnïcødéBild 写真.png": rgb,
    }
    for name, image in good.items():
        image.save(folder / name)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette_transparent.png", transparency=0)
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    rgb.save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    (folder / "nested").mkdir(exist_ok=True)
    rgb.save(folder / "nested" / "UPPER.JPEG")

    jpeg, png = io.BytesIO(), io.BytesIO()
    rgb.save(jpeg, "JPEG")
    rgb.save(png, "PNG")
    bad = {
        "zero.jpg": "zero-byte",
        "truncated.jpg": "truncated",
        "truncated.png": "truncated",
        "random.jpg": "not an image",
        "text.png": "not an image",
        "one.png": "too small",
        "seven.png": "too small",
        "bomb.png": "decompression bomb",
        "dangling.jpg": "unreadable",
    }
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "random.jpg").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (folder / "text.png").write_text("this is not a picture\n")
    Image.new("RGB", (1, 1)).save(folder / "one.png")
    Image.new("RGB", (7, 7)).save(folder / "seven.png")
    (folder / "bomb.png").write_bytes(_png_declaring(30_000, 30_000))
    # we run as root, so chmod 000 cannot make a file unreadable: a link to nowhere is the unreadable file
    os.symlink(folder / "does-not-exist.jpg", folder / "dangling.jpg")
    (folder / "loop").mkdir(exist_ok=True)
    os.symlink(folder, folder / "loop" / "back")  # a directory symlink cycle must not hang the scan
    return bad, [
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name not in bad and "loop" not in p.parts
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    bad, good = make_corpus(folder)
    make_synthetic(folder / "synthetic", count=20, size=32, seed=3)
    good += [f"synthetic/synthetic_{i:05d}.png" for i in range(20)]
    return folder, bad, good


def test_odd_images_are_converted_and_oriented(corpus):
    folder, _, _ = corpus
    assert load_image(folder / "exif_rotated.jpg").size == (40, 24)  # width and height swapped by the EXIF tag
    for name in ("gray.png", "la.png", "rgba.png", "cmyk.jpg", "palette_transparent.png", "sixteen_bit.png"):
        image = load_image(folder / name)
        assert image.mode == "RGB" and image.size == (24, 40), name
    sixteen = np.asarray(load_image(folder / "sixteen_bit.png"))[..., 0]
    original = np.asarray(Image.open(folder / "plain.jpg"))  # same source pixels, JPEG-compressed
    assert (
        sixteen.max() > 200 and abs(float(sixteen.mean()) - float(original[..., 0].mean())) < 8
    )  # scaled, not clipped


def _bad_lines(output: str, bad: dict[str, str]) -> dict[str, list[str]]:
    return {name: [line for line in output.splitlines() if name in line] for name in bad}


@pytest.mark.slow
def test_train_evaluate_reconstruct_report_each_bad_file_once_and_go_on(corpus, tmp_path):
    folder, bad, good = corpus
    run = tmp_path / "run"
    base = [sys.executable, "-m", "vaehelpers"]
    trained = subprocess.run(
        base
        + [
            "train",
            "--data",
            str(folder),
            "--run",
            str(run),
            "--preset",
            "tiny",
            "--image-size",
            "16",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--recipe",
            "pixel",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    output = trained.stdout + trained.stderr
    assert trained.returncode == EXIT_SKIPPED_FILES, output
    for name, lines in _bad_lines(output, bad).items():
        assert len(lines) == 1 and bad[name] in lines[0], (name, lines)
    assert f"skipped files: {len(bad)}" in output

    evaluated = subprocess.run(
        base
        + [
            "evaluate",
            "--run",
            str(run),
            "--data",
            str(folder),
            "--split",
            "all",
            "--no-progress",
            "--json",
            str(tmp_path / "e.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert evaluated.returncode == EXIT_SKIPPED_FILES, evaluated.stderr
    summary = json.loads((tmp_path / "e.json").read_text())
    assert summary["n_images"] == len(good) and summary["n_skipped"] == len(bad)
    assert {Path(row["path"]).name for row in summary["skipped"]} == set(bad)

    reconstructed = subprocess.run(
        base
        + [
            "reconstruct",
            "--run",
            str(run),
            str(folder / "exif_rotated.jpg"),
            str(folder / "truncated.jpg"),
            str(folder / "ÜnïcødéBild 写真.png"),
            "--out",
            str(tmp_path / "rec"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert reconstructed.returncode == EXIT_SKIPPED_FILES, reconstructed.stderr
    assert "2 reconstructed, 1 skipped" in reconstructed.stdout and "truncated" in reconstructed.stdout
    assert len(list((tmp_path / "rec").glob("*_reconstruction.png"))) == 2


def test_folder_without_usable_images_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("no")
    assert (
        cli(["train", "--data", str(tmp_path), "--run", str(tmp_path / "run"), "--device", "cpu", "--recipe", "pixel"])
        == 1
    )
    error = capsys.readouterr().err
    assert str(tmp_path) in error and "Traceback" not in error


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path):
    images = tmp_path / "images"
    make_synthetic(images, count=24, size=16, seed=2)
    run, total = tmp_path / "run", 40
    command = [
        sys.executable,
        "-m",
        "vaehelpers",
        "train",
        "--data",
        str(images),
        "--run",
        str(run),
        "--preset",
        "tiny",
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--max-steps",
        str(total),
        "--checkpoint-every",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--resume",
        "--recipe",
        "pixel",
    ]
    chooser = random.Random(0)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _kill in range(4):
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=environment
        )
        start_step = (
            load_checkpoint(run / "checkpoints" / "last.pt")["step"]
            if (run / "checkpoints" / "last.pt").exists()
            else 0
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until this process is training, then kill it soon after
            if (run / "checkpoints" / "last.pt").exists() and load_checkpoint(run / "checkpoints" / "last.pt")[
                "step"
            ] > start_step:
                break
            time.sleep(0.05)
        time.sleep(chooser.uniform(0.0, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        for file in (run / "checkpoints").iterdir():  # no torn file: only last.pt and maybe an abandoned temp file
            assert file.name == "last.pt" or file.name.endswith(".tmp"), file
            if file.name == "last.pt":
                state = load_checkpoint(file)
                assert all(torch.isfinite(t).all() for t in state["model"].values())
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == total
    steps = [int(line.split(",")[0]) for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, total + 1))  # every step once, none lost, none repeated
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.pt"]  # abandoned temp files cleared
    assert AutoencoderKL.load(run) is not None


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker, bad = tmp_path / "pwned", tmp_path / "last.pt"
    torch.save({"model": _RunsCode(marker)}, bad)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_resume_from_a_malicious_checkpoint_fails_cleanly(tmp_path, capsys):
    images = tmp_path / "images"
    make_synthetic(images, count=12, size=16)
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(images),
        "--run",
        str(run),
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--max-steps",
        "1",
        "--no-progress",
        "--recipe",
        "pixel",
    ]
    assert cli(args) == 0
    marker = tmp_path / "pwned"
    torch.save({"model": _RunsCode(marker)}, run / "checkpoints" / "last.pt")
    assert cli(args + ["--resume", "--max-steps", "2"]) == 1
    assert "refusing to load" in capsys.readouterr().err and not marker.exists()


def test_weights_with_another_config_name_the_differing_fields(tmp_path):
    model = AutoencoderKL.from_preset("tiny")
    model.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="latent_channels"):
        AutoencoderKL.load(tmp_path)


def test_unwritable_run_directory_fails_before_training(tmp_path):
    images = tmp_path / "images"
    make_synthetic(images, count=12, size=16)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = build_config(
        "tiny",
        "pixel",
        device="cpu",
        max_steps=1,
        run_dir=str(blocker / "run"),
        **{"data.data_dir": str(images), "data.image_size": 16},
    )
    with pytest.raises(PermissionError, match="not writable"):
        train(cfg, progress=False)


def test_failing_disk_at_save_time_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    images = tmp_path / "images"
    make_synthetic(images, count=12, size=16)
    cfg = build_config(
        "tiny",
        "pixel",
        device="cpu",
        max_steps=2,
        batch_size=4,
        run_dir=str(tmp_path / "run"),
        **{"data.data_dir": str(images), "data.image_size": 16},
    )
    train(cfg, progress=False)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    before = load_checkpoint(path)

    def disk_full(state, file):
        Path(file).write_bytes(b"partial")  # a torn write, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        train(
            build_config(
                "tiny",
                "pixel",
                device="cpu",
                max_steps=4,
                batch_size=4,
                run_dir=str(tmp_path / "run"),
                **{"data.data_dir": str(images), "data.image_size": 16},
            ),
            resume=True,
            progress=False,
        )
    after = load_checkpoint(path)
    assert after["step"] == before["step"] == 2
    assert not [p for p in path.parent.iterdir() if p.name != "last.pt"]  # the temp file was cleaned up
