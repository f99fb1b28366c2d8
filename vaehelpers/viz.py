"""Figures: image grids, reconstructions with error maps, latent channels, loss curves, interpolations, loss weights.

Every function returns a matplotlib Figure built without pyplot (no global figure registry, works on the
Agg backend, shows once in Jupyter when it is a cell's value). Save one with `save_figure(fig, path)`.
Images are tensors (3, H, W) or (B, 3, H, W) in [-1, 1], as the model takes and returns them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from vaehelpers.metrics import image_psnr

PANEL_INCHES = 2.2  # size of one image panel
ERROR_CMAP = "magma"  # sequential: 0 error is black
LATENT_CMAP = "RdBu_r"  # diverging, centred on 0: latents are signed


# --------------------------------------------------------------------------- conversions


def to_numpy_image(image: Tensor, *, as_uint8: bool = False) -> np.ndarray:
    """(3, H, W) (or (1, 3, H, W)) in [-1, 1] -> (H, W, 3) float32 in [0, 1], or uint8 with as_uint8."""
    image = image.detach().float().cpu()
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise ValueError(f"expected one image (3, H, W), got shape {tuple(image.shape)}")
    if image.shape[0] == 1:  # grey: show as RGB
        image = image.expand(3, -1, -1)
    array = ((image + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, 3)
    if as_uint8:
        return (array * 255).round().astype(np.uint8)
    return array


def _as_list(images: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A (B, 3, H, W) tensor, one (3, H, W) tensor, or a list of (3, H, W) tensors -> a list of (3, H, W)."""
    if isinstance(images, Tensor):
        return [images] if images.dim() == 3 else list(images)
    return list(images)


def _message_figure(message: str) -> Figure:
    """A small figure that only says `message` (for an empty input, where raising would stop a caller's run)."""
    fig = Figure(figsize=(6, 1.5))
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return fig


def _aspect(image: Tensor) -> float:
    """Height / width of a (..., H, W) tensor, bounded so that extreme panoramas still get a usable panel."""
    return min(3.0, max(1 / 3, image.shape[-2] / image.shape[-1]))


def _hide_axes(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- static figures


def image_grid(
    images: Tensor | Sequence[Tensor],
    nrow: int = 8,
    *,
    titles: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Images in a grid of `nrow` images per row (torchvision's make_grid convention).

    images: (B, 3, H, W) in [-1, 1] or a list of (3, H, W) (sizes may differ); titles: one per image.
    """
    images = _as_list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    ncol = max(1, min(nrow, len(images)))
    nrows = math.ceil(len(images) / ncol)
    fig = Figure(figsize=(PANEL_INCHES * ncol, PANEL_INCHES * nrows + (0.4 if title else 0)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncol, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        _hide_axes(ax)
        if i >= len(images):
            ax.set_axis_off()
            continue
        ax.imshow(to_numpy_image(images[i]))
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def reconstruction_figure(
    images: Tensor | Sequence[Tensor],
    reconstructions: Tensor | Sequence[Tensor],
    titles: Sequence[str] | None = None,
) -> Figure:
    """One row per image: original | reconstruction (PSNR on [0, 1] in its title) | absolute-error heatmap.

    images, reconstructions: (B, 3, H, W) in [-1, 1] (or lists of (3, H, W)); titles: one label per row.
    The heatmap is the mean over channels of |reconstruction - original| on [0, 1], with a colorbar.
    """
    images, reconstructions = _as_list(images), _as_list(reconstructions)
    if len(images) != len(reconstructions):
        raise ValueError(f"{len(images)} images but {len(reconstructions)} reconstructions")
    row_inches = PANEL_INCHES * _aspect(images[0]) + 0.5  # + room for two lines of titles
    fig = Figure(figsize=(PANEL_INCHES * 3 + 0.6, row_inches * len(images)), layout="constrained")
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, (image, reconstruction) in enumerate(zip(images, reconstructions)):
        original_ax, reconstruction_ax, error_ax = axes[row]
        original, reconstructed = to_numpy_image(image), to_numpy_image(reconstruction)
        error = np.abs(reconstructed - original).mean(axis=2)  # (H, W) in [0, 1]
        original_ax.imshow(original)
        reconstruction_ax.imshow(reconstructed)
        heatmap = error_ax.imshow(error, cmap=ERROR_CMAP, vmin=0)
        fig.colorbar(heatmap, ax=error_ax, fraction=0.046, pad=0.04)
        label = f"{titles[row]}\n" if titles is not None else ""
        original_ax.set_title(f"{label}original", fontsize=9)
        reconstruction_ax.set_title(f"reconstruction\nPSNR {image_psnr(image, reconstruction):.2f} dB", fontsize=9)
        error_ax.set_title(f"|error| on [0,1]\nmean {error.mean():.4f}", fontsize=9)
        for ax in (original_ax, reconstruction_ax, error_ax):
            _hide_axes(ax)
    return fig


def latent_channels_figure(latents: Tensor, titles: Sequence[str] | None = None) -> Figure:
    """Each latent channel as an image on a diverging colormap centred on 0, with a colorbar.

    latents: (C, h, w) or (B, C, h, w), e.g. posterior.mode(); one row per image, one column per channel.
    """
    latents = latents.detach().float().cpu()
    if latents.dim() == 3:
        latents = latents[None]  # (1, C, h, w)
    if latents.dim() != 4:
        raise ValueError(f"expected latents (B, C, h, w) or (C, h, w), got shape {tuple(latents.shape)}")
    batch, channels = latents.shape[:2]
    row_inches = PANEL_INCHES * _aspect(latents) + 0.5
    fig = Figure(figsize=(PANEL_INCHES * 1.2 * channels, row_inches * batch), layout="constrained")
    axes = fig.subplots(batch, channels, squeeze=False)
    for b in range(batch):
        for c in range(channels):
            ax, channel = axes[b][c], latents[b, c].numpy()
            limit = float(np.abs(channel).max()) or 1.0  # symmetric range so that 0 is the neutral colour
            im = ax.imshow(channel, cmap=LATENT_CMAP, vmin=-limit, vmax=limit)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            label = f"{titles[b]}\n" if titles is not None and c == 0 else ""
            ax.set_title(f"{label}channel {c}  (std {channel.std():.2f})", fontsize=9)
            _hide_axes(ax)
    return fig


def read_log_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a training log.csv as dicts of strings (header names as keys)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _float_or_nan(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over the last `window` finite values (NaNs, e.g. rows without a validation value, are skipped)."""
    finite = np.isfinite(values)
    sums = np.convolve(np.where(finite, values, 0.0), np.ones(window), mode="full")[: len(values)]
    counts = np.convolve(finite.astype(float), np.ones(window), mode="full")[: len(values)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, sums / counts, np.nan)


def loss_curve_figure(
    log: str | Path | Iterable[dict[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    smooth: int = 0,
) -> Figure:
    """Loss terms against the optimiser step, from a log.csv path or its rows (dicts).

    columns: which to plot; default every column with "loss" in its name that has a number (train/total_loss,
    train/rec_loss, train/kl_loss, val/..., as present). Columns whose values are all positive go on a
    log-scale panel; any with zeros or negatives (e.g. a GAN term) on a second, linear panel.
    smooth: window of a trailing moving average drawn over the faint raw curve (0: raw only).
    A log without rows or numbers gives a figure that says so instead of raising.
    """
    rows = read_log_csv(log) if isinstance(log, (str, Path)) else list(log)
    if not rows:  # a run that has not logged yet: a placeholder, not an error (train.py saves this mid-run)
        return _message_figure("no rows in the log yet")
    header = list(rows[0].keys())
    x_name = "step" if "step" in header else header[0]
    x = np.array([_float_or_nan(row.get(x_name)) for row in rows])
    if columns is None:
        columns = [name for name in header if "loss" in name]
    series = {}
    for name in columns:
        values = np.array([_float_or_nan(row.get(name)) for row in rows])
        if np.isfinite(values).any():
            series[name] = values
    if not series:
        return _message_figure(f"no numeric loss values to plot; columns are {', '.join(header)}")
    positive = {name: v for name, v in series.items() if (v[np.isfinite(v)] > 0).all()}
    signed = {name: v for name, v in series.items() if name not in positive}
    panels = [(group, scale) for group, scale in ((positive, "log"), (signed, "linear")) if group]
    fig = Figure(figsize=(7, 3.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (group, scale) in zip(axes, panels):
        for name, values in group.items():
            keep = np.isfinite(values) & np.isfinite(x)
            if smooth > 1:
                (line,) = ax.plot(x[keep], values[keep], alpha=0.3, linewidth=0.8)
                ax.plot(x[keep], _moving_average(values[keep], smooth), color=line.get_color(), label=name)
            else:
                ax.plot(x[keep], values[keep], label=name, marker="." if keep.sum() < 30 else None)
        ax.set_yscale(scale)
        ax.set_xlabel(x_name)
        ax.set_ylabel("loss" + (" (log scale)" if scale == "log" else ""))
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def interpolation_figure(images_row: Tensor | Sequence[Tensor], titles: Sequence[str] | None = None) -> Figure:
    """Decoded images along a latent interpolation, in one row; titles default to t = 0 ... 1."""
    images = _as_list(images_row)
    if titles is None:
        steps = max(1, len(images) - 1)
        titles = [f"t = {i / steps:.2f}" for i in range(len(images))]
    return image_grid(images, nrow=len(images), titles=titles)


def prior_samples_figure(images: Tensor | Sequence[Tensor], nrow: int = 8) -> Figure:
    """Images decoded from latents drawn from the prior (latents.prior_latents)."""
    return image_grid(images, nrow=nrow, title="decoded samples from the latent prior")


# --------------------------------------------------------------------------- saving


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write a figure (PNG, PDF, SVG by the suffix), creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


# =========================================================================== the loss and the notebooks' figures

# --------------------------------------------------------------------------- the loss, pictured


def loss_weights_figure(loss_configs: dict[str, Any], epochs: float, image_size: int | None = None) -> Figure:
    """The weight each loss term gets over training, one panel per named LossConfig (log scale).

    Reconstruction and perceptual weights are per-pixel-mean weights, so that recipes compare: they include the
    seed recipe's overall scale, and with nll_reduction "sum" (ldm: a per-sample sum over 3 x H x W, as
    losses.VAELoss computes it) the factor 3 * image_size**2, which image_size (pixels per side) must then give.
    The KL weight follows its linear warm-up (losses.kl_weight_at). A GAN term is noted in the title: it starts
    at a step, not an epoch.
    """
    from vaehelpers.losses import kl_weight_at

    epoch_axis = np.linspace(0, epochs, 400)
    fig = Figure(figsize=(4.8 * len(loss_configs), 3.4), layout="constrained")
    axes = fig.subplots(1, len(loss_configs), squeeze=False)[0]
    for ax, (name, cfg) in zip(axes, loss_configs.items()):
        scale, reduction = cfg.seed_scale, ""
        if cfg.nll_reduction == "sum":
            if not image_size:
                raise ValueError(f"recipe {name!r} sums its reconstruction over the pixels: pass image_size")
            scale, reduction = scale * 3 * image_size**2, f", summed over 3x{image_size}x{image_size}"
        kl = [kl_weight_at(epoch, cfg.kl_weight, cfg.kl_warmup_epochs) for epoch in epoch_axis]
        ax.plot(epoch_axis, kl, label=f"KL ({cfg.kl_reduction})")
        ax.plot(
            epoch_axis,
            np.full_like(epoch_axis, scale * cfg.reconstruction_weight),
            label=f"reconstruction ({cfg.reconstruction}{' / batch size' if cfg.batch_scaled_reconstruction else ''}"
            f"{reduction})",
        )
        if cfg.perceptual_weight > 0:
            ax.plot(
                epoch_axis,
                np.full_like(epoch_axis, scale * cfg.perceptual_weight),
                label=f"perceptual ({cfg.perceptual}{reduction})",
            )
        gan = f"; GAN x{cfg.disc_weight:g} from step {cfg.disc_start}" if cfg.disc_weight > 0 else ""
        ax.set_title(f"recipe {name}{gan}", fontsize=10)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("weight (per-pixel mean)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def perceptual_figure(images: Tensor, reconstructions: Tensor, backbone: Any = None) -> Figure:
    """What the LPIPS perceptual term compares, for the first image: where the VGG16 features of the
    reconstruction differ from the original's at each tap (relu1_2 ... relu5_3), weighted as LPIPS weighs them.
    The panel titles give each layer's share of the distance. Without the pretrained VGG16 weights on disk
    (pretrained.py; nothing is downloaded here), a figure that says so and how to get them, instead of an error.
    """
    import textwrap

    import torch

    from vaehelpers.losses import LPIPS

    try:
        lpips = LPIPS(backbone).to(images.device)
    except RuntimeError as error:
        fig = Figure(figsize=(9, 2.2))
        ax = fig.subplots()
        ax.set_axis_off()
        ax.text(
            0,
            0.5,
            "The perceptual term is not shown here:\n" + textwrap.fill(str(error), 110),
            va="center",
            fontsize=8,
            family="monospace",
        )
        return fig
    with torch.no_grad():
        pairs = zip(lpips.linears, lpips.features(images[:1]), lpips.features(reconstructions[:1]))
        maps = [linear((target - features).pow(2))[0, 0].cpu() for linear, target, features in pairs]  # (h, w) each
    layers = ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"]
    fig = Figure(figsize=(PANEL_INCHES * (len(maps) + 2), PANEL_INCHES + 0.6), layout="constrained")
    axes = fig.subplots(1, len(maps) + 2)
    axes[0].imshow(to_numpy_image(images[0]))
    axes[0].set_title("original", fontsize=9)
    axes[1].imshow(to_numpy_image(reconstructions[0]))
    axes[1].set_title(f"reconstruction\nLPIPS {sum(float(m.mean()) for m in maps):.3f}", fontsize=9)
    for ax, layer, difference in zip(axes[2:], layers, maps):
        ax.imshow(difference.numpy(), cmap=ERROR_CMAP, vmin=0)
        ax.set_title(f"{layer}\n{float(difference.mean()):.4f}", fontsize=9)
    for ax in axes:
        _hide_axes(ax)
    return fig
