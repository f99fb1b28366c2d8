"""latents.py's scale and `vaehelpers scale`: 1/std of the latents, stored as the run's model.scaling_factor."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vaehelpers import AutoencoderKL, ModelConfig
from vaehelpers.cli import main
from vaehelpers.dataset import ImageFolderDataset
from vaehelpers.latents import latent_statistics, measure_scale, store_scale
from vaehelpers.rundir import SCALE_NAME
from vaehelpers.sources import make_synthetic

SMALL = ModelConfig(base_channels=8, channel_multipliers=(1, 2), layers_per_block=1, norm_num_groups=4)


def small_model() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(SMALL).eval()


def test_mode_scale_is_one_over_the_std_of_all_latent_means():
    model = small_model()
    images = [torch.rand(3, 16, 16) * 2 - 1 for _ in range(7)]
    with torch.no_grad():
        means = model.encode(torch.stack(images[:5])).mean  # (5, 4, 8, 8)
    value = measure_scale(model, images, max_images=5, batch_size=2, sample_posterior=False)
    assert value == pytest.approx(1 / means.double().std().item(), rel=1e-6)


def test_sampled_scale_is_seeded_and_differs_from_the_mode():
    model = small_model()
    images = [(torch.rand(3, 16, 16) * 2 - 1, "label") for _ in range(4)]  # tuples: the image comes first
    first = latent_statistics(model, images, batch_size=3, seed=1)
    assert first == latent_statistics(model, images, batch_size=3, seed=1)
    assert first.latents == "posterior samples" and first.n_images == 4 and first.n_values == 4 * 4 * 8 * 8
    assert first.std != latent_statistics(model, images, sample_posterior=False).std
    with pytest.raises(ValueError, match="no images"):
        measure_scale(model, [])


def test_per_channel_statistics_match_a_direct_computation():
    model = small_model()
    images = [torch.rand(3, 16, 16) * 2 - 1 for _ in range(5)]
    stats = latent_statistics(model, images, batch_size=2, sample_posterior=False)  # batches of 2, 2, 1
    with torch.no_grad():
        means = model.encode(torch.stack(images)).mean.double()  # (5, 4, 8, 8)
    per_channel = means.transpose(0, 1).flatten(1)  # (4, 5*8*8)
    assert len(stats.channel_mean) == len(stats.channel_std) == 4
    # float32 latents from batches of 2, 2, 1 vs one batch of 5: agreement to float32 precision
    assert stats.channel_mean == pytest.approx(per_channel.mean(1).tolist(), rel=1e-6, abs=1e-8)
    assert stats.channel_std == pytest.approx(per_channel.std(1).tolist(), rel=1e-6)
    assert len(set(stats.channel_std)) == 4  # really per channel, not one number four times


def test_store_scale_changes_only_the_scaling_factor(tmp_path):
    model = small_model()
    (tmp_path / "config.json").write_text(
        json.dumps({"model": dataclasses.asdict(SMALL), "lr": 0.001, "data": {"image_size": 16}})
    )
    model.save(tmp_path)
    store_scale(tmp_path, 1.25)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["scaling_factor"] == 1.25 and saved["lr"] == 0.001 and saved["data"] == {"image_size": 16}
    assert AutoencoderKL.load(tmp_path).config.scaling_factor == 1.25
    with pytest.raises(ValueError, match="positive"):
        store_scale(tmp_path, float("nan"))
    assert ModelConfig().scaling_factor == 0.18215  # SD's value stays the default when nothing is measured
    assert ModelConfig().latents_mean == () and ModelConfig().latents_std == ()  # empty: not measured
    with pytest.raises(ValueError, match="4 finite numbers"):
        store_scale(tmp_path, 1.0, latents_mean=[0.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        store_scale(tmp_path, 1.0, latents_mean=[0.0] * 4, latents_std=[1.0, 1.0, 0.0, 1.0])
    assert AutoencoderKL.load(tmp_path).config.latents_mean == ()  # nothing written by the refused calls


def test_cli_scale_writes_one_over_std_into_the_run(tmp_path, capsys):
    data = tmp_path / "images"
    make_synthetic(data, count=6, size=32, seed=0)
    run = tmp_path / "run"
    small_model().save(run)
    assert (
        main(
            [
                "scale",
                "--run",
                str(run),
                "--data",
                str(data),
                "--split",
                "all",
                "--max-images",
                "4",
                "--image-size",
                "16",
                "--batch-size",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "scaling_factor" in capsys.readouterr().out

    dataset = ImageFolderDataset(data, split="all", image_size=16, augment=False)
    expected = latent_statistics(small_model(), dataset, max_images=4, batch_size=3, seed=0)
    model = AutoencoderKL.load(run)
    assert model.config.scaling_factor == pytest.approx(1 / expected.std, rel=1e-6)
    record = json.loads((run / SCALE_NAME).read_text())
    assert record["latents"] == "posterior samples" and record["n_images"] == 4
    assert record["previous_scaling_factor"] == 0.18215

    assert model.config.latents_mean == pytest.approx(expected.channel_mean, rel=1e-9)
    assert model.config.latents_std == pytest.approx(expected.channel_std, rel=1e-9)
    assert json.loads((run / "config.json").read_text())["model"]["latents_std"] == list(model.config.latents_std)

    from vaehelpers.weights import export, load  # an export carries the measured statistics

    export(model, tmp_path / "diffusers", "diffusers")
    written = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    assert written["scaling_factor"] == model.config.scaling_factor
    assert written["latents_mean"] == list(model.config.latents_mean) and written["shift_factor"] is None
    assert written["latents_std"] == list(model.config.latents_std)
    export(model, tmp_path / "vae.safetensors", "ldm")
    for exported in (tmp_path / "diffusers", tmp_path / "vae.safetensors"):  # and an import reads them back
        config = load(exported).config
        assert (config.latents_mean, config.latents_std) == (model.config.latents_mean, model.config.latents_std)

    import diffusers  # diffusers itself reads our fields as its own

    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "diffusers")
    assert list(theirs.config.latents_std) == list(model.config.latents_std)
