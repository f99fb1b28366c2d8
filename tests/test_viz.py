"""Static figures render on Agg and save non-empty PNGs."""

from __future__ import annotations

import csv

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from vaehelpers import viz  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _images(batch=4, size=16, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _saved_png(fig, path):
    written = viz.save_figure(fig, path)
    data = written.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    return written


def test_to_numpy_image_maps_range_and_layout():
    image = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 2, 2).expand(3, 2, 2)  # 3 overshoots
    array = viz.to_numpy_image(image)
    assert array.shape == (2, 2, 3) and array.dtype == np.float32
    assert np.allclose(array[..., 0], [[0, 0.5], [1, 1]])
    as_uint8 = viz.to_numpy_image(image[None], as_uint8=True)
    assert (
        as_uint8.dtype == np.uint8 and as_uint8[0, 0, 0] == 0 and as_uint8[0, 1, 0] == 128 and as_uint8[1, 1, 2] == 255
    )
    with pytest.raises(ValueError):
        viz.to_numpy_image(torch.zeros(2, 3, 4, 4))


def test_image_grid_layout_and_save(tmp_path):
    fig = viz.image_grid(_images(5), nrow=3, titles=list("abcde"))
    images_shown = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 6 and len(images_shown) == 5  # 2 rows of 3, the last panel blank
    assert images_shown[4].get_title() == "e"
    _saved_png(fig, tmp_path / "deep" / "grid.png")


def test_reconstruction_figure_rows_psnr_and_colorbar(tmp_path):
    images = _images(2) * 0.8 - 0.2  # [-1, 0.6]
    fig = viz.reconstruction_figure(images, images + 0.2, titles=["one", "two"])  # +0.1 on [0,1]: 20 dB
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 6 and len(fig.axes) == 8  # 2 rows x 3 panels + 2 colorbars
    titles = [ax.get_title() for ax in image_axes]
    assert sum("PSNR 20.00 dB" in t for t in titles) == 2 and "one" in titles[0]
    _saved_png(fig, tmp_path / "recon.png")


def test_latent_channels_figure_one_and_many(tmp_path):
    latents = torch.randn(2, 4, 4, 4)
    fig = viz.latent_channels_figure(latents)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 8 and len(fig.axes) == 16  # every channel has its colorbar
    low, high = image_axes[0].images[0].get_clim()
    assert low == -high and high > 0  # diverging, centred on 0
    _saved_png(fig, tmp_path / "latents.png")
    assert len([ax for ax in viz.latent_channels_figure(latents[0]).axes if ax.images]) == 4


def _write_log(path):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "step",
                "epoch",
                "train/total_loss",
                "train/rec_loss",
                "train/kl_loss",
                "train/g_loss",
                "val/rec_loss",
                "lr",
            ]
        )
        for step in range(1, 21):
            val = f"{0.5 / step:.4f}" if step % 5 == 0 else ""  # validation only every 5 steps
            writer.writerow([step, step / 10, 1 / step + 0.01, 1 / step, 0.01 * step, -0.1 * step, val, 1e-4])
    return path


def test_loss_curve_figure_from_csv_and_rows(tmp_path):
    log = _write_log(tmp_path / "log.csv")
    fig = viz.loss_curve_figure(log)
    log_ax, linear_ax = fig.axes  # positive terms on log scale, the signed GAN term on its own linear panel
    assert log_ax.get_yscale() == "log" and linear_ax.get_yscale() == "linear"
    assert {line.get_label() for line in log_ax.lines} == {
        "train/total_loss",
        "train/rec_loss",
        "train/kl_loss",
        "val/rec_loss",
    }
    assert [line.get_label() for line in linear_ax.lines] == ["train/g_loss"]
    val_line = next(line for line in log_ax.lines if line.get_label() == "val/rec_loss")
    assert len(val_line.get_xdata()) == 4  # empty cells skipped
    _saved_png(fig, tmp_path / "loss.png")

    rows = viz.read_log_csv(log)
    smoothed = viz.loss_curve_figure(rows, columns=["train/rec_loss"], smooth=5)
    assert len(smoothed.axes) == 1 and len(smoothed.axes[0].lines) == 2  # raw + moving average
    for empty in ([{"step": "1", "epoch": "0"}], []):  # mid-run logs: a placeholder, never an exception
        placeholder = viz.loss_curve_figure(empty)
        assert not placeholder.axes[0].lines and "no " in placeholder.axes[0].texts[0].get_text()
    header_only = tmp_path / "header.csv"
    header_only.write_text("step,epoch,train/total_loss\n")
    _saved_png(viz.loss_curve_figure(header_only), tmp_path / "empty.png")


def test_interpolation_and_prior_samples(tmp_path):
    row = _images(5)
    fig = viz.interpolation_figure(row)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles[0] == "t = 0.00" and titles[-1] == "t = 1.00" and len(titles) == 5
    _saved_png(fig, tmp_path / "interp.png")
    prior = viz.prior_samples_figure(_images(6), nrow=3)
    assert len([ax for ax in prior.axes if ax.images]) == 6
    _saved_png(prior, tmp_path / "prior.png")
