"""The notebook helpers and widgets at the end of viz.py: sliders moved programmatically change the decoded image,
and moving them back restores it exactly."""

from __future__ import annotations

import dataclasses
import io

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

matplotlib.use("Agg")

from vaehelpers import latents, viz, widgets  # noqa: E402
from vaehelpers.config import build_config, model_config  # noqa: E402
from vaehelpers.model import AutoencoderKL  # noqa: E402

pytest.importorskip("ipywidgets")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoencoderKL.from_preset("tiny").eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def png_array(data: bytes) -> np.ndarray:
    assert data[:8] == PNG_SIGNATURE
    return np.asarray(Image.open(io.BytesIO(data)))


def test_latent_explorer_sliders_change_the_decoded_image_and_back(model, images):
    explorer = widgets.LatentExplorer(model, images, height=64)
    assert len(explorer.offsets) == len(explorer.scales) == model.config.latent_channels
    start_png, start_image = explorer.image.value, explorer.decoded()
    assert png_array(start_png).shape == (64, 64 * 2 + 4, 3)  # original | decoded, 4 px apart
    assert torch.allclose(
        start_image, latents.decode(model, latents.encode(model, images[:1]))[0], atol=1e-4
    )  # at rest (batching moves the last bits)

    explorer.offsets[0].value = 2.0
    moved = explorer.decoded()
    assert explorer.image.value != start_png and not torch.allclose(moved, start_image)
    expected = explorer.latents[:1].clone()  # encoded once, as a batch
    expected[:, 0] += 2.0 * explorer.channel_std[0]
    assert torch.allclose(explorer.edited_latents(), expected)
    explorer.offsets[0].value = 0.0
    assert explorer.image.value == start_png

    explorer.scales[2].value = 0.0
    assert explorer.image.value != start_png
    explorer.scales[2].value = 1.0
    assert explorer.image.value == start_png

    explorer.picker.value = 2
    assert explorer.image.value != start_png and explorer.caption.value.startswith("image 2")
    explorer.picker.value = 0
    assert explorer.image.value == start_png


def test_latent_explorer_reset_and_static_figure(model, images):
    explorer = widgets.LatentExplorer(model, images, height=32)
    start_png = explorer.image.value
    explorer.offsets[1].value, explorer.scales[3].value = -1.5, 2.5
    assert explorer.image.value != start_png
    explorer.reset_button.click()
    assert [s.value for s in explorer.offsets] == [0.0] * 4 and [s.value for s in explorer.scales] == [1.0] * 4
    assert explorer.image.value == start_png
    figure = explorer.channel_figure()
    assert len([ax for ax in figure.axes if ax.images]) == 3 * model.config.latent_channels
    assert "application/vnd.jupyter.widget-view+json" in explorer._repr_mimebundle_()


@pytest.mark.slow
def test_interpolation_explorer(model, images):
    walk = widgets.InterpolationExplorer(model, images[0], images[1], height=32)
    middle_png = walk.image.value
    walk.slider.value = 0.0
    assert walk.image.value != middle_png
    assert torch.allclose(walk.decoded(), latents.decode(model, latents.encode(model, images[:1]))[0], atol=1e-4)
    walk.slider.value = 1.0
    assert torch.allclose(walk.decoded(), latents.decode(model, latents.encode(model, images[1:2]))[0], atol=1e-4)
    walk.slider.value = 0.5
    assert walk.image.value == middle_png
    assert len([ax for ax in walk.figure(steps=5).axes if ax.images]) == 5


@pytest.mark.slow
def test_interpolate_and_prior_samples(model, images):
    path = latents.interpolate(model, images[0], images[1], steps=4)
    assert path.shape == (4, 3, 32, 32)
    ends = latents.decode(model, latents.encode(model, images[:2]))
    assert torch.allclose(path[0], ends[0], atol=1e-4) and torch.allclose(path[-1], ends[1], atol=1e-6)
    samples = latents.prior_samples(model, 3, 32, generator=torch.Generator().manual_seed(0))
    again = latents.prior_samples(model, 3, 32, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 3, 32, 32) and torch.equal(samples, again)


def test_live_loss_plot_prints_or_redraws_in_place(monkeypatch, capsys):
    rows = [
        {"step": i, "epoch": round(0.1 * i, 4), "train/total_loss": 1.0 / i, "train/rec_loss": 0.5 / i}
        for i in range(1, 7)
    ]
    printer = widgets.LiveLossPlot(every=3, interactive=False)
    for row in rows:
        printer(row)
    assert capsys.readouterr().out.splitlines() == [
        "step 3  epoch 0.3  total_loss 0.3333  rec_loss 0.1667",
        "step 6  epoch 0.6  total_loss 0.1667  rec_loss 0.08333",
    ]

    shown = []

    class Handle:
        def update(self, figure):
            shown.append(("update", figure))

    import IPython.display

    monkeypatch.setattr(
        IPython.display, "display", lambda figure, display_id: shown.append(("display", figure)) or Handle()
    )
    plot = widgets.LiveLossPlot(every=2, interactive=True)
    for row in rows:
        plot(row)
    assert [kind for kind, _ in shown] == ["display", "update", "update"]  # one output, redrawn in place
    assert len(plot.rows) == 6 and plot.figure().axes


def test_loss_weights_figure():
    recipes = {"pixel": build_config("tiny", "pixel").loss, "seed": build_config("tiny", "seed").loss}
    figure = viz.loss_weights_figure(recipes, epochs=40)
    default_ax, seed_ax = figure.axes
    assert len(default_ax.lines) == 2 and len(seed_ax.lines) == 3  # the seed recipe adds the perceptual term
    kl = seed_ax.lines[0].get_ydata()
    assert kl[0] == 0 and kl[-1] == 1.0  # the seed's KL warm-up


def test_loss_weights_figure_counts_the_ldm_pixel_sum():
    # ldm sums L1 + LPIPS over 3 x H x W per image (VAELoss's nll_reduction "sum"): per pixel that is 3*H*W times
    # the weight 1.0 the config holds, against a KL of 1e-6
    recipes = {"ldm": build_config("tiny", "ldm").loss, "pixel": build_config("tiny", "pixel").loss}
    ldm_ax, pixel_ax = viz.loss_weights_figure(recipes, epochs=10, image_size=32).axes
    kl, reconstruction, perceptual = (line.get_ydata() for line in ldm_ax.lines)
    assert set(reconstruction) == set(perceptual) == {3 * 32 * 32} and set(kl) == {1e-6}
    assert "GAN x0.5 from step 50001" in ldm_ax.get_title()
    assert set(pixel_ax.lines[1].get_ydata()) == {1.0}  # a per-pixel mean: the weight as configured
    with pytest.raises(ValueError, match="image_size"):
        viz.loss_weights_figure(recipes, epochs=10)


@pytest.mark.slow
def test_perceptual_figure_with_and_without_weights(monkeypatch, images, tmp_path):
    from torchvision.models import vgg16

    torch.manual_seed(0)
    figure = viz.perceptual_figure(images, images.flip(-1), backbone=vgg16(weights=None).features)  # stand-in weights
    assert len(figure.axes) == 7
    assert [ax.get_title().split("\n")[0] for ax in figure.axes[2:]] == [
        "relu1_2",
        "relu2_2",
        "relu3_3",
        "relu4_3",
        "relu5_3",
    ]

    # offline, without the file: an empty torch hub cache and no weights folder
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.delenv("VAEHELPERS_WEIGHTS", raising=False)
    fetched = []  # 03_loss at smoke scale must never start the 528 MB download
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, *args, **kwargs: fetched.append(url))
    figure = viz.perceptual_figure(images, images)
    text = figure.axes[0].texts[0].get_text().replace("\n", " ")
    assert "missing pretrained file vgg16-397923af.pth" in text and "vaehelpers weights download" in text
    assert fetched == []


def test_png_bytes_scales_each_panel(images):
    array = png_array(widgets.png_bytes([images[0], images[1][:, :, :16]], height=48))
    assert array.shape == (48, 48 + 4 + 24, 3)


def test_prior_samples_use_measured_channel_statistics():
    plain = model_config("tiny")
    measured = dataclasses.replace(plain, latents_mean=(1.0, -2.0, 0.5, 0.0), latents_std=(0.5, 2.0, 1.0, 3.0))
    drawn = latents.prior_latents(measured, 32, 16, generator=torch.Generator().manual_seed(0))  # 8192 values a channel
    assert drawn.shape == (32, 4, 16, 16)
    assert drawn.mean(dim=(0, 2, 3)).tolist() == pytest.approx([1.0, -2.0, 0.5, 0.0], abs=0.1)
    assert drawn.std(dim=(0, 2, 3)).tolist() == pytest.approx([0.5, 2.0, 1.0, 3.0], rel=0.05)
    unmeasured = latents.prior_latents(plain, 2, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unmeasured, torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)) / 0.18215)

    torch.manual_seed(0)
    model = AutoencoderKL(measured).eval()
    samples = latents.prior_samples(model, 2, 32, generator=torch.Generator().manual_seed(2))
    expected = latents.decode(model, latents.prior_latents(measured, 2, 4, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(samples, expected)
    model.config = plain  # the same weights without the statistics decode other images
    assert not torch.allclose(latents.prior_samples(model, 2, 32, generator=torch.Generator().manual_seed(2)), samples)


def test_latent_explorer_steps_by_the_measured_channel_std(images):
    torch.manual_seed(0)
    config = dataclasses.replace(model_config("tiny"), latents_mean=(0.0,) * 4, latents_std=(0.5, 2.0, 1.0, 3.0))
    explorer = widgets.LatentExplorer(AutoencoderKL(config).eval(), images[:2, :, :16, :16])
    assert explorer.channel_std.tolist() == [0.5, 2.0, 1.0, 3.0]
