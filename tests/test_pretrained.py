"""Pretrained files (pretrained.py, `vaehelpers weights`, the ldm and seed recipes with their weights present or missing).

No network and no file outside the tests' own temporary folders: stand-in weights carry the real file names, formats
and keys with random values (torchvision's vgg16() state dict saved as vgg16-397923af.pth), TORCH_HOME points at a
temporary folder, and downloads meet a fake at the URL-opening boundary (torch.hub's urlopen).
"""

from __future__ import annotations

import csv
import email.message
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vaehelpers import pretrained
from vaehelpers.cli import main as cli
from vaehelpers.config import TrainConfig, apply_overrides, build_config, recipe_settings
from vaehelpers.losses import VAELoss, kl_loss
from vaehelpers.sources import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
VGG16 = "vgg16-397923af.pth"
WAYS_OUT = ("vaehelpers weights download", "--weights-dir", "VAEHELPERS_WEIGHTS", "--recipe pixel")


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory) -> Path:
    """torchvision's vgg16() with random weights, saved under the real file name (528 MB, written once per module)."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("standin") / VGG16
    torch.save(vgg16().state_dict(), path)
    return path


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME for this test (torch.hub.get_dir() follows it) and no VAEHELPERS_WEIGHTS."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # undo any torch.hub.set_dir elsewhere
    monkeypatch.delenv(pretrained.WEIGHTS_ENV, raising=False)
    return home


def place(source: Path, folder: Path) -> Path:
    """A copy of a stand-in file in `folder` (a hard link: no second 528 MB write)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.link(source, folder / source.name)
    return folder / source.name


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    make_synthetic(folder, count=24, size=32, seed=3)
    return folder


def log_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- find / require


def test_missing_file_is_one_line_naming_file_folders_and_ways_out(torch_home, tmp_path):
    assert pretrained.find("vgg16") is None
    with pytest.raises(pretrained.MissingWeightsError) as error:
        pretrained.require("vgg16", tmp_path / "nowhere")
    message = str(error.value)
    assert "\n" not in message and VGG16 in message
    assert str(torch_home / "hub" / "checkpoints") in message and f"{tmp_path / 'nowhere'} (no such folder)" in message
    assert all(way in message for way in WAYS_OUT), message


def test_weights_dir_then_env_then_hub_cache(torch_home, tmp_path, monkeypatch, vgg16_file):
    in_hub = place(vgg16_file, torch_home / "hub" / "checkpoints")
    assert pretrained.find("vgg16") == in_hub
    nested = place(vgg16_file, tmp_path / "kaggle_input" / "vgg-weights" / "1")  # a Kaggle dataset nests folders
    assert pretrained.find("vgg16", tmp_path / "kaggle_input") == nested  # the user's folder comes first
    monkeypatch.setenv(pretrained.WEIGHTS_ENV, str(tmp_path / "kaggle_input"))
    assert pretrained.require("vgg16") == nested
    assert pretrained.find("vgg16", tmp_path / "elsewhere") == in_hub  # --weights-dir wins over the env variable


def test_lpips_layers_come_from_the_torchmetrics_wheel_with_the_registered_hash(torch_home):
    path = pretrained.find("lpips")
    assert path is not None and path.parts[-4:] == ("functional", "image", "lpips_models", "vgg.pth")
    assert "torchmetrics" in path.parts
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(pretrained.REGISTRY["lpips"].sha256_prefix)
    state = pretrained.load_state_dict("lpips")
    assert [tuple(state[f"lin{i}.model.1.weight"].shape) for i in range(5)] == [
        (1, 64, 1, 1),
        (1, 128, 1, 1),
        (1, 256, 1, 1),
        (1, 512, 1, 1),
        (1, 512, 1, 1),
    ]


def test_a_file_that_is_not_the_weights_is_reported_not_loaded(torch_home, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / VGG16).write_bytes(b"<html>a login page, not weights</html>")
    torch.save({"features.0.weight": torch.zeros(3)}, folder / "weights-inception-2015-12-05-6726825d.pth")
    with pytest.raises(pretrained.BadWeightsError, match=f"{VGG16} does not load"):
        pretrained.load_state_dict("vgg16", folder)
    with pytest.raises(pretrained.BadWeightsError, match="missing 2 key"):
        pretrained.load_state_dict("inception", folder)


# ----------------------------------------------------------------------------- status


def test_status_shows_found_missing_and_loads(torch_home, tmp_path, vgg16_file, capsys):
    rows = {row["name"]: row for row in pretrained.status()}
    assert (rows["vgg16"]["found"], rows["vgg16"]["loads"]) == (False, None)
    assert (rows["inception"]["found"], rows["inception"]["loads"]) == (False, None)
    assert (rows["lpips"]["found"], rows["lpips"]["loads"]) == (True, True)
    assert rows["vgg16"]["looked_in"] == [str(torch_home / "hub" / "checkpoints")]

    folder = tmp_path / "weights"
    place(vgg16_file, folder)
    (folder / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"truncated")
    assert cli(["weights", "status", "--weights-dir", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line.split() for line in lines[2:5]}
    assert row["vgg16"][2:4] == ["yes", "yes"] and row["vgg16"][4] == str(folder / VGG16)
    assert row["inception"][2:4] == ["yes", "NO"]
    assert row["lpips"][2:4] == ["yes", "yes"]
    assert any(line.startswith("problem:") and "weights-inception" in line for line in lines)

    assert cli(["weights", "status"]) == 0  # without the folder: VGG16 is missing again
    vgg_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("vgg16"))
    assert vgg_line.split()[2:4] == ["MISSING", "-"]


# ----------------------------------------------------------------------------- download


class FakeResponse:
    """What urlopen returns: headers via info(), the body via read(n), a context manager."""

    def __init__(self, body: bytes):
        self.body = io.BytesIO(body)
        self.headers = email.message.Message()
        self.headers["Content-Length"] = str(len(body))

    def info(self) -> email.message.Message:
        return self.headers

    def read(self, size: int = -1) -> bytes:
        return self.body.read(size)

    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc) -> None:
        self.body.close()


@pytest.fixture
def served(monkeypatch) -> dict:
    """A fake network at torch.hub's urlopen: serves served["body"], records the requests."""
    state = {"body": b"", "requests": []}

    def urlopen(request, *args, **kwargs):
        state["requests"].append(request)
        return FakeResponse(state["body"])

    monkeypatch.setattr(torch.hub, "urlopen", urlopen)
    return state


def test_download_keeps_a_file_whose_hash_matches(torch_home, tmp_path, served, monkeypatch):
    served["body"] = payload = b"stand-in bytes for the VGG16 file"
    # the real prefix 397923af cannot be met by test bytes: register this payload's own hash for the entry
    entry = pretrained.REGISTRY["vgg16"]
    monkeypatch.setitem(
        pretrained.REGISTRY,
        "vgg16",
        type(entry)(**{**entry.__dict__, "sha256_prefix": hashlib.sha256(payload).hexdigest()[:8]}),
    )
    assert cli(["weights", "download", "--dest", str(tmp_path / "dest"), "--only", "vgg16"]) == 0
    assert (tmp_path / "dest" / VGG16).read_bytes() == payload
    assert [request.full_url for request in served["requests"]] == ["https://download.pytorch.org/models/" + VGG16]
    assert served["requests"][0].get_header("User-agent") == "torch.hub"  # torch's own downloader made the request
    # already there: kept, nothing fetched again
    assert pretrained.download(tmp_path / "dest", ["vgg16"], say=lambda *a: None) == [tmp_path / "dest" / VGG16]
    assert len(served["requests"]) == 1


def test_download_refuses_a_wrong_hash_and_leaves_no_file(torch_home, served, capsys):
    served["body"] = b"bytes from a captive portal"
    assert cli(["weights", "download", "--only", "vgg16"]) == 1  # default destination: the torch hub cache
    stderr = capsys.readouterr().err  # torch's progress bar, then our one line
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("vaehelpers weights: error: could not download " + VGG16) and "Traceback" not in stderr
    assert "invalid hash value" in error and "nothing was written" in error
    checkpoints = torch_home / "hub" / "checkpoints"
    assert list(checkpoints.iterdir()) == []  # neither the file nor torch's .partial temp file


def test_download_skips_what_is_found_and_fetches_the_rest(torch_home, served, monkeypatch):
    served["body"] = payload = b"inception stand-in"
    entry = pretrained.REGISTRY["inception"]
    monkeypatch.setitem(
        pretrained.REGISTRY,
        "inception",
        type(entry)(**{**entry.__dict__, "sha256_prefix": hashlib.sha256(payload).hexdigest()[:8]}),
    )
    paths = pretrained.download(names=["lpips", "inception"], say=lambda *a: None, progress=False)
    assert paths[0] == pretrained.find("lpips") and "torchmetrics" in paths[0].parts  # the wheel's copy counts
    assert paths[1] == torch_home / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert [request.full_url for request in served["requests"]] == [entry.url]


# ----------------------------------------------------------------------------- recipes


def test_ldm_recipe_constants_and_lr_scaling():
    cfg = build_config("sd")  # the default recipe
    assert cfg.recipe == "ldm"
    assert (cfg.optimizer, cfg.betas, cfg.weight_decay, cfg.grad_clip, cfg.ema_decay) == (
        "adam",
        (0.5, 0.9),
        0.0,
        0.0,
        0.0,
    )
    loss = cfg.loss
    assert (loss.reconstruction, loss.nll_reduction, loss.perceptual, loss.perceptual_weight) == (
        "l1",
        "sum",
        "lpips",
        1.0,
    )
    assert (loss.kl_weight, loss.kl_reduction, loss.disc_weight, loss.disc_start) == (1e-6, "sum", 0.5, 50001)
    assert cfg.lr == pytest.approx(4.5e-6 * 16) and cfg.lr_per_image == 4.5e-6
    assert build_config("sd", batch_size=64).lr == pytest.approx(4.5e-6 * 64)  # --batch-size scales it
    explicit = build_config("sd", batch_size=64, lr=1e-4)  # --lr given explicitly wins
    assert (explicit.lr, explicit.lr_per_image) == (1e-4, 0.0)


def test_default_is_a_deprecated_alias_of_pixel(capsys):
    old = build_config("tiny", "default")
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "'default' is deprecated" in notice and "'pixel'" in notice
    assert old == build_config("tiny", "pixel") and old.recipe == "pixel"
    assert capsys.readouterr().err == ""  # the new name: no notice
    assert recipe_settings("default") == recipe_settings("pixel") == {}


@pytest.mark.slow
def test_runs_resume_with_the_recipe_they_started_with(torch_home, images, tmp_path, capsys):
    base = [
        "train",
        "--data",
        str(images),
        "--preset",
        "tiny",
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--no-progress",
        "--set",
        "data.cache=false",
    ]
    run = tmp_path / "pixel_run"
    assert cli([*base, "--run", str(run), "--recipe", "pixel", "--max-steps", "1"]) == 0
    # no --recipe on resume: the run's own (pixel), not today's default (ldm, which would need VGG16 here)
    assert cli([*base, "--run", str(run), "--resume", "--max-steps", "2"]) == 0
    assert json.loads((run / "config.json").read_text())["recipe"] == "pixel"
    # a run directory from before the rename says "default"
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "recipe": "default"}))
    assert cli([*base, "--run", str(run), "--resume", "--max-steps", "3"]) == 0
    (run / "config.json").write_text(json.dumps({**config, "recipe": "default"}))
    assert cli([*base, "--run", str(run), "--resume", "--max-steps", "4", "--recipe", "default"]) == 0  # old command
    assert "'default' is deprecated" in capsys.readouterr().err
    assert len(log_rows(run)) == 4


# ----------------------------------------------------------------------------- a missing file stops the run first


def test_missing_weights_stop_train_before_anything_in_one_line(torch_home, images, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    env.pop(pretrained.WEIGHTS_ENV, None)
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "vaehelpers",
            "train",
            "--data",
            str(images),
            "--run",
            str(run),
            "--device",
            "cpu",
            "--image-size",
            "32",
            "--max-steps",
            "2",
            "--set",
            "data.cache_dir=" + str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert finished.returncode == 1, finished.stdout + finished.stderr
    assert finished.stdout == ""
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaehelpers train: error: missing pretrained file " + VGG16)
    assert str(torch_home / "hub" / "checkpoints") in lines[0] and all(way in lines[0] for way in WAYS_OUT)
    # nothing ran: no run directory (so no step, no checkpoint, no log) and no image was scanned into a cache
    assert not run.exists() and not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- training with stand-in weights


@pytest.mark.slow
@pytest.mark.parametrize("where", ["hub_cache", "weights_dir"])
def test_ldm_trains_with_perceptual_kl_and_gan_from_disc_start(where, torch_home, images, tmp_path, vgg16_file):
    folder = torch_home / "hub" / "checkpoints" if where == "hub_cache" else tmp_path / "attached"
    place(vgg16_file, folder)
    run = tmp_path / "run"
    extra = ["--weights-dir", str(folder)] if where == "weights_dir" else []
    assert (
        cli(
            [
                "train",
                "--data",
                str(images),
                "--run",
                str(run),
                "--preset",
                "tiny",
                "--image-size",
                "32",
                "--batch-size",
                "4",
                "--max-steps",
                "4",
                "--device",
                "cpu",
                "--precision",
                "fp32",
                "--no-progress",
                "--set",
                "loss.disc_start=2",
                "--set",
                "data.cache=false",
                *extra,
            ]
        )
        == 0
    )
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == "ldm" and config["lr"] == pytest.approx(4.5e-6 * 4)
    assert config["weights_dir"] == (str(folder) if extra else "")
    rows = log_rows(run)
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    for row in rows:
        rec, perceptual = float(row["train/rec_loss"]), float(row["train/perceptual_loss"])
        assert perceptual > 1e-4 and float(row["train/kl_loss"]) > 0 and float(row["train/kl_weight"]) == 1e-6
        assert float(row["train/nll_loss"]) == pytest.approx((rec + perceptual) * 3 * 32 * 32, rel=1e-5)  # LDM: sum
    # steps are counted from 0, and a row is logged after its step: disc_start=2 is the third row
    for row in rows[:2]:
        assert float(row["train/disc_factor"]) == 0 and float(row["train/g_loss"]) == 0
        assert float(row["train/d_weight"]) == 0 and row["train/disc_loss"] == ""
    for row in rows[2:]:
        assert float(row["train/disc_factor"]) == 1 and float(row["train/d_weight"]) > 0
        assert float(row["train/g_loss"]) != 0 and float(row["train/disc_loss"]) > 0


@pytest.mark.slow
def test_seed_recipe_with_weights_present_is_the_seeds_vgg_relu3_3_loss(torch_home, tmp_path, vgg16_file, images):
    from torchvision.models import vgg16

    folder = tmp_path / "attached"
    place(vgg16_file, folder)
    cfg = apply_overrides(TrainConfig(), recipe_settings("seed")).loss
    loss_fn = VAELoss(cfg, weights_dir=folder)  # loads vgg16-397923af.pth itself, as a run does

    class Posterior:
        def __init__(self, mean, logvar):
            self.mean, self.logvar = mean, logvar

    g = torch.Generator().manual_seed(0)
    images_ = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    reconstructions = (images_ + 0.3 * torch.randn(4, 3, 32, 32, generator=g)).clamp(-1.2, 1.2)
    posterior = Posterior(torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, 4, 4, 4, generator=g) * 0.1)
    total, logs = loss_fn(images_, reconstructions, posterior, step=0, epoch=5.0)

    # independently: torchvision's VGG16 with the same file, conv1_1..relu3_3, ImageNet normalisation, MSE
    reference = vgg16()
    reference.load_state_dict(torch.load(folder / VGG16, weights_only=True))
    trunk = reference.features[:16].eval()
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        vgg_mse = F.mse_loss(trunk(((reconstructions + 1) / 2 - mean) / std), trunk(((images_ + 1) / 2 - mean) / std))
    bce = F.binary_cross_entropy(((reconstructions + 1) / 2).clamp(1e-6, 1 - 1e-6), (images_ + 1) / 2)
    kl = (0.5 * (posterior.mean**2 + posterior.logvar.exp() - 1 - posterior.logvar)).sum(dim=1).mean()
    expected = 500 * (bce / 4 + 0.1 * vgg_mse) + (5.0 / 20) * kl
    assert logs["train/perceptual_loss"] == pytest.approx(float(vgg_mse), rel=1e-5) and float(vgg_mse) > 0
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    assert float(kl_loss(posterior, "seed")) == pytest.approx(float(kl), rel=1e-6)

    # and a seed run trains with the file found in --weights-dir
    run = tmp_path / "run"
    assert (
        cli(
            [
                "train",
                "--data",
                str(images),
                "--run",
                str(run),
                "--recipe",
                "seed",
                "--preset",
                "tiny",
                "--image-size",
                "32",
                "--batch-size",
                "4",
                "--max-steps",
                "2",
                "--device",
                "cpu",
                "--no-progress",
                "--weights-dir",
                str(folder),
                "--set",
                "data.cache=false",
            ]
        )
        == 0
    )
    assert all(float(row["train/perceptual_loss"]) > 0 for row in log_rows(run))


def test_lpips_metric_uses_the_same_files_and_names_its_own_way_out(torch_home, tmp_path, vgg16_file):
    from vaehelpers import metrics
    from vaehelpers.losses import LPIPS

    with pytest.raises(pretrained.MissingWeightsError, match="--no-lpips"):
        metrics.build_lpips("cpu")
    folder = tmp_path / "attached"
    place(vgg16_file, folder)
    lpips = metrics.build_lpips("cpu", folder)
    images01 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    other01 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = LPIPS(weights_dir=folder).per_sample(images01 * 2 - 1, other01 * 2 - 1)
    torch.testing.assert_close(lpips(images01, other01), expected)
    assert float(lpips(images01, images01).abs().max()) < 1e-6 and float(expected.min()) > 0


def test_notebook_check_downloads_what_the_recipe_needs_or_says_why_not(torch_home, served, monkeypatch, vgg16_file):
    from vaehelpers.train import check_pretrained

    cfg = build_config("tiny", "ldm")
    served["body"] = b"an error page"
    with pytest.raises(pretrained.MissingWeightsError) as error:
        check_pretrained(cfg, download=True)  # internet "on", but the bytes are wrong
    assert "\n" not in str(error.value) and "invalid hash value" in str(error.value) and VGG16 in str(error.value)
    assert list((torch_home / "hub" / "checkpoints").iterdir()) == []

    served["body"] = payload = vgg16_file.read_bytes()  # a file that loads: check_pretrained loads what it fetched
    entry = pretrained.REGISTRY["vgg16"]
    monkeypatch.setitem(
        pretrained.REGISTRY,
        "vgg16",
        type(entry)(**{**entry.__dict__, "sha256_prefix": hashlib.sha256(payload).hexdigest()[:8]}),
    )
    check_pretrained(cfg, download=True)
    assert (torch_home / "hub" / "checkpoints" / VGG16).read_bytes() == payload
    assert [request.full_url for request in served["requests"]] == [entry.url, entry.url]  # lpips: the wheel's copy
    check_pretrained(build_config("tiny", "pixel"), download=True)  # pixel needs nothing
    assert len(served["requests"]) == 2


def test_launch_stops_before_spawning_when_a_file_is_missing(torch_home, images, tmp_path):
    from vaehelpers.launch import launch

    cfg = build_config(
        "tiny",
        "ldm",
        device="cpu",
        max_steps=1,
        run_dir=str(tmp_path / "run"),
        **{"data.data_dir": str(images), "data.image_size": 16},
    )
    with pytest.raises(pretrained.MissingWeightsError, match=VGG16):
        launch(cfg, 2)  # would start two processes that each fail the same way
    assert not (tmp_path / "run").exists()
