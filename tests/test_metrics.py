"""Metrics on hand-made tensors, evaluate() on a tiny random model, JSON/CSV files, reconstruct_files."""

from __future__ import annotations

import csv
import json
import math
import re
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vaehelpers import metrics
from vaehelpers.dataset import ImageFolderDataset
from vaehelpers.latents import pad_to_multiple, reconstruct_image
from vaehelpers.model import AutoencoderKL
from vaehelpers.reconstruct import format_rows, reconstruct_files

DESIGN_KEYS = {"n_images", "image_size", "pixel_range", "mae", "mse", "psnr", "ssim", "lpips", "per_image"}
SUMMARY_KEYS = DESIGN_KEYS | {
    "psnr_from_mean_mse",
    "psnr_cap_db",
    "mae_pm1",
    "mse_pm1",
    "pm1_range",
    "rfid",
    "n_skipped",
    "skipped",
    "notes",
    "lpips_net",
}
FINITE_KEYS = ("mae", "mse", "psnr", "psnr_from_mean_mse", "ssim", "mae_pm1", "mse_pm1")


def _images(batch=3, size=32, seed=0):
    """(B, 3, S, S) in [-1, 0.6], i.e. [0, 0.8] on [0, 1], so that +0.1 on [0, 1] stays in range."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 1.6 - 1


def _write_pngs(folder, count=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # smooth-ish images: a gradient plus noise, so that SSIM is meaningful
        ramp = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
        pixels = np.clip(ramp * rng.uniform(0.3, 1) + rng.normal(0, 20, (size, size, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return AutoencoderKL.from_preset("tiny").eval()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = _write_pngs(tmp_path_factory.mktemp("images"), count=6, size=32)
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


@pytest.fixture
def offline_vgg(monkeypatch, tmp_path):
    """Make torchvision's VGG16 download fail as it does here, even on a machine with a network or a cached copy."""
    import torchvision.models._api as tv_api

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known (simulated offline)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)


# ----------------------------------------------------------------------------- per_image_metrics


def test_identical_images_are_perfect():
    images = _images()
    values = metrics.per_image_metrics(images, images.clone())
    assert set(values) == {"mae", "mse", "psnr", "ssim", "mae_pm1", "mse_pm1"}
    for name in ("mae", "mse", "mae_pm1", "mse_pm1"):
        assert torch.equal(values[name], torch.zeros(3)), name
    assert torch.isinf(values["psnr"]).all() and (values["psnr"] > 0).all()
    assert torch.allclose(values["ssim"], torch.ones(3), atol=1e-5)


def test_constant_offset_gives_known_values():
    images = _images()
    reconstructions = images + 0.2  # +0.1 on [0, 1]
    values = metrics.per_image_metrics(images, reconstructions)
    assert torch.allclose(values["mae"], torch.full((3,), 0.1), atol=1e-5)
    assert torch.allclose(values["mse"], torch.full((3,), 0.01), atol=1e-5)
    assert torch.allclose(values["psnr"], torch.full((3,), 20.0), atol=1e-3)
    assert torch.allclose(values["mae_pm1"], torch.full((3,), 0.2), atol=1e-5)  # 2x on [-1, 1]
    assert torch.allclose(values["mse_pm1"], torch.full((3,), 0.04), atol=1e-5)  # 4x on [-1, 1]
    assert (values["ssim"] < 1).all() and (values["ssim"] > 0.5).all()


def test_reconstructions_are_clamped_before_measuring():
    images = torch.ones(1, 3, 16, 16)  # white
    overshoot = torch.full((1, 3, 16, 16), 3.0)  # decoders overshoot; displayed it is still white
    values = metrics.per_image_metrics(images, overshoot)
    assert values["mae"].item() == 0 and values["mse_pm1"].item() == 0


def test_ssim_ranks_a_noisier_reconstruction_lower_and_fits_small_images():
    images = _images(batch=1, size=8)  # smaller than the 11-pixel window
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    slight = metrics.per_image_metrics(images, images + 0.05 * noise)["ssim"]
    heavy = metrics.per_image_metrics(images, images + 0.5 * noise)["ssim"]
    assert torch.isfinite(slight).all() and slight.item() > heavy.item()


# ----------------------------------------------------------------------------- Evaluator and files


def _evaluator_with_exact_copy():
    evaluator = metrics.Evaluator()
    images = _images(batch=2)
    reconstructions = torch.stack([images[0], images[1] + 0.2])  # one exact copy, one at 20 dB
    evaluator.update(images, reconstructions, paths=["exact.png", "offset.png"])
    return evaluator.summary()


def test_mean_psnr_caps_an_exact_copy_and_files_stay_strict(tmp_path):
    summary = _evaluator_with_exact_copy()
    assert summary["per_image"][0]["psnr"] == math.inf
    assert summary["psnr"] == pytest.approx((metrics.PSNR_CAP_DB + 20.0) / 2, abs=1e-3)
    assert summary["psnr_from_mean_mse"] == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-3)
    path = metrics.write_json(summary, tmp_path / "sub" / "eval.json")
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["per_image"][0]["psnr"] == "inf"
    rows = list(csv.DictReader(open(metrics.write_per_image_csv(summary, tmp_path / "rows.csv"))))
    assert float(rows[0]["psnr"]) == math.inf and float(rows[1]["psnr"]) == pytest.approx(20.0, abs=1e-3)


def test_evaluate_on_tiny_model_reports_every_key(tiny_model, image_folder, offline_vgg, tmp_path):
    dataset = ImageFolderDataset(image_folder, split="all", image_size=32, cache=False)
    with pytest.warns(RuntimeWarning, match="vgg16-397923af.pth") as caught:
        summary = metrics.evaluate(tiny_model, dataset, batch_size=4, progress=False)
    assert len([w for w in caught if "LPIPS" in str(w.message)]) == 1  # said once
    assert SUMMARY_KEYS <= set(summary)
    assert summary["n_images"] == 6 and len(summary["per_image"]) == 6
    assert summary["image_size"] == 32 and summary["pixel_range"] == "[0,1]" and summary["pm1_range"] == "[-1,1]"
    for key in FINITE_KEYS:
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert summary["mae_pm1"] == pytest.approx(2 * summary["mae"]) and summary["mse_pm1"] == pytest.approx(
        4 * summary["mse"]
    )
    assert summary["lpips"] is None and summary["rfid"] is None
    assert any("vgg16-397923af.pth" in note and "lpips=False" in note for note in summary["notes"])
    assert summary["n_skipped"] == 1 and summary["skipped"][0]["path"].endswith("broken.png")
    assert {row["path"].rsplit("/", 1)[-1] for row in summary["per_image"]} == {f"img_{i}.png" for i in range(6)}
    assert set(summary["per_image"][0]) == set(metrics.PER_IMAGE_FIELDS)
    assert not tiny_model.training

    loaded = json.loads(metrics.write_json(summary, tmp_path / "eval.json").read_text())
    assert DESIGN_KEYS <= set(loaded) and loaded["lpips"] is None and loaded["n_images"] == 6
    rows = list(csv.DictReader(open(metrics.write_per_image_csv(summary, tmp_path / "eval.csv"))))
    assert len(rows) == 6 and list(rows[0]) == list(metrics.PER_IMAGE_FIELDS) and rows[0]["lpips"] == ""
    table = metrics.format_table(summary)
    assert "[0,1]" in table and "[-1,1]" in table and "LPIPS" in table and "broken.png" in table


def test_lpips_true_fails_with_the_missing_file_named(tiny_model, image_folder, offline_vgg):
    dataset = ImageFolderDataset(image_folder, split="all", image_size=32, cache=False)
    with pytest.raises(RuntimeError, match="vgg16-397923af.pth"):
        metrics.evaluate(tiny_model, dataset, lpips=True, progress=False)


def test_evaluate_without_the_weights_never_fetches_them(tiny_model, image_folder, monkeypatch, tmp_path):
    # 05_evaluation at smoke scale: no 528 MB VGG16 download; LPIPS is reported as None, with the reason noted
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.delenv("VAEHELPERS_WEIGHTS", raising=False)
    fetched = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, *args, **kwargs: fetched.append(url))
    dataset = ImageFolderDataset(image_folder, split="all", image_size=32, cache=False)
    with pytest.warns(RuntimeWarning, match="missing pretrained file vgg16-397923af.pth"):
        summary = metrics.evaluate(tiny_model, dataset, batch_size=4, progress=False)
    assert fetched == [] and summary["lpips"] is None and summary["n_images"] == 6
    assert any("vgg16-397923af.pth" in note and "--no-lpips" in note for note in summary["notes"])


def test_injected_lpips_and_fid_features_are_used(tiny_model, image_folder, recwarn):
    dataset = ImageFolderDataset(image_folder, split="all", image_size=32, cache=False)
    calls = []

    def fake_lpips(images01, reconstructions01):
        assert images01.min() >= 0 and images01.max() <= 1 and reconstructions01.max() <= 1
        calls.append(len(images01))
        return (images01 - reconstructions01).abs().flatten(1).mean(1) * 0 + 0.25  # (B,)

    features = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())  # (B, 12) stand-in for Inception
    summary = metrics.evaluate(tiny_model, dataset, batch_size=4, lpips=fake_lpips, fid=features, progress=False)
    assert sum(calls) == 6
    assert summary["lpips"] == pytest.approx(0.25) and all(
        row["lpips"] == pytest.approx(0.25) for row in summary["per_image"]
    )
    assert isinstance(summary["rfid"], float) and math.isfinite(summary["rfid"]) and summary["rfid"] >= 0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert re.search(r"^LPIPS \(vgg\) +0\.25$", metrics.format_table(summary), re.M)


def test_sample_posterior_uses_the_generator(tiny_model, image_folder):
    dataset = ImageFolderDataset(image_folder, split="all", image_size=32, cache=False)
    run = lambda **kw: metrics.evaluate(tiny_model, dataset, lpips=False, progress=False, **kw)["mse"]  # noqa: E731
    mode = run()
    first = run(sample_posterior=True, generator=torch.Generator().manual_seed(3))
    second = run(sample_posterior=True, generator=torch.Generator().manual_seed(3))
    assert first == second and first != mode and mode == run()


# ----------------------------------------------------------------------------- reconstruct_files


@pytest.mark.slow
def test_reconstruct_odd_size_image_pads_and_crops_back(tiny_model, tmp_path):
    odd = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (53, 37, 3), dtype=np.uint8)).save(
        odd
    )  # 37 wide, 53 high
    image = torch.rand(3, 53, 37) * 2 - 1
    reconstruction, latents = reconstruct_image(tiny_model, image)
    assert reconstruction.shape == (3, 53, 37) and latents.shape == (4, 7, 5)  # ceil(53/8), ceil(37/8)

    rows = reconstruct_files(tiny_model, [odd, tmp_path / "missing.jpg"], tmp_path / "out")
    assert rows[0]["error"] is None and (rows[0]["width"], rows[0]["height"]) == (37, 53)
    assert all(math.isfinite(rows[0][key]) for key in ("mae", "mse", "psnr"))
    for key, name in (("reconstruction_png", "odd_reconstruction.png"), ("latents_png", "odd_latents.png")):
        written = tmp_path / "out" / name
        assert rows[0][key] == str(written) and written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rows[1]["error"] and rows[1]["mae"] is None  # skipped, with the reason
    printed = format_rows(rows)
    assert "1 reconstructed, 1 skipped" in printed and "missing.jpg" in printed and "37x53" in printed


def test_reconstruct_skips_a_corrupt_file_and_resizes(tiny_model, tmp_path):
    folder = _write_pngs(tmp_path / "in", count=1, size=40)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = reconstruct_files(
        tiny_model, [folder / "img_0.png", folder / "bad.png"], tmp_path / "out", mode="resize", image_size=16
    )
    assert rows[0]["error"] is None and (rows[0]["width"], rows[0]["height"]) == (40, 40)
    assert rows[1]["error"] and rows[1]["path"].endswith("bad.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img_0_latents.png", "img_0_reconstruction.png"]


def test_pad_to_multiple_handles_images_smaller_than_the_pad():
    images = torch.arange(9.0).reshape(1, 1, 3, 3)
    padded, size = pad_to_multiple(images, 8)
    assert padded.shape == (1, 1, 8, 8) and size == (3, 3) and torch.equal(padded[..., :3, :3], images)
    reflected, _ = pad_to_multiple(torch.rand(1, 3, 13, 16), 8)
    assert reflected.shape == (1, 3, 16, 16)


@pytest.mark.slow
def test_reconstruct_a_real_photo_keeps_its_size(tiny_model, bsds500, tmp_path):
    photo = sorted((bsds500 / "test").glob("*.jpg"))[0]  # 481x321 or 321x481: neither side a multiple of 8
    rows = reconstruct_files(tiny_model, [photo], tmp_path)
    assert rows[0]["error"] is None and {rows[0]["width"], rows[0]["height"]} == {481, 321}
    assert 0 < rows[0]["mse"] < 1 and math.isfinite(rows[0]["psnr"])
    assert (tmp_path / f"{photo.stem}_reconstruction.png").stat().st_size > 1000
