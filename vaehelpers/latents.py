"""Latents: encode and decode to CPU tensors, interpolation, prior samples, and the latent scale.

The scale is 1 / std of an autoencoder's latents over a dataset, stored as the run's model.scaling_factor.

A diffusion model trained on latents wants them at about unit variance. The LDM paper (sec. 4.3.2,
"scale_by_std") sets the scale to 1 / std of the *sampled* latents of the first training batch; SD's
0.18215 was measured that way. Here the std is taken over every latent value (all channels and positions)
of up to `max_images` images, by default also of posterior samples (drawn with a seeded generator, so the
result is reproducible); sample_posterior=False measures the posterior means (mode) instead. When no scale
is measured, ModelConfig's default 0.18215 stays.

Per latent channel, the same pass measures mean and std (model.latents_mean / latents_std, the fields diffusers'
AutoencoderKL config has for VAEs whose channels differ in offset and spread); prior samples use them when stored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaehelpers.config import ModelConfig, from_dict
from vaehelpers.rundir import RunDir, atomic_write, read_config, write_config

if TYPE_CHECKING:
    from vaehelpers import tiling

# ----------------------------------------------------------------------------- encode, decode, walk, sample


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def encode(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] -> posterior means (B, L, H/f, W/f), float32 on the CPU (no gradients)."""
    with torch.no_grad():
        return model.encode(images.to(_model_device(model))).mode().float().cpu()


def decode(model: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """latents (B, L, h, w), unscaled -> images (B, 3, h*f, w*f), float32 on the CPU (no gradients)."""
    with torch.no_grad():
        return model.decode(latents.to(_model_device(model))).float().cpu()


def reconstruct(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] -> reconstructions from the posterior mean, float32 on the CPU: encode ->
    mode -> decode in eval mode (the model's mode is restored), without gradients."""
    was_training = model.training
    model.eval()
    try:
        return decode(model, encode(model, images))
    finally:
        model.train(was_training)


def pad_to_multiple(images: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) on the bottom and right up to multiples of `multiple`; returns it and the original (H, W).

    Reflection padding keeps the border statistics natural (zeros would add a dark frame the model must
    reproduce); an image smaller than the pad cannot be reflected and is edge-replicated instead.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        images = F.pad(images, (0, pad_w, 0, pad_h), mode=mode)  # (left, right, top, bottom)
    return images, (height, width)


@torch.no_grad()
def reconstruct_image(
    model: nn.Module,
    image: Tensor,
    *,
    mode: Literal["pad", "resize"] = "pad",
    tiled: tiling.Tiling | None = None,
) -> tuple[Tensor, Tensor]:
    """One image (3, H, W) in [-1, 1] -> (reconstruction (3, H, W), latents (L, h, w)), posterior mode.

    mode="pad" pads H and W up to multiples of the model's downsample factor and crops the reconstruction
    back to H x W; mode="resize" expects H and W to be multiples already (see data.preprocess).
    tiled: encode and decode tile by tile with these settings (model.tiled), else in one piece.
    """
    if tiled is not None:
        with model.tiled(tiled.tile, tiled.overlap, tiled.stats_tiles, tiled.attention):
            return reconstruct_image(model, image, mode=mode)
    device = next(model.parameters(), torch.empty(0)).device
    images = image[None].to(device)  # (1, 3, H, W)
    factor = model.config.downsample_factor
    if mode == "pad":
        images, (height, width) = pad_to_multiple(images, factor)
    else:
        height, width = images.shape[-2:]
    latents = model.encode(images).mode()  # (1, L, H'/f, W'/f)
    reconstructions = model.decode(latents)[..., :height, :width]  # crop the padding away
    return reconstructions[0].float().cpu(), latents[0].float().cpu()


def interpolate(model: nn.Module, image_a: torch.Tensor, image_b: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Decoded images along the straight line between two images' latents: (steps, 3, H, W), t = 0 ... 1."""
    latents = encode(model, torch.stack([image_a, image_b]))  # (2, L, h, w)
    t = torch.linspace(0, 1, steps).view(-1, 1, 1, 1)
    return decode(model, (1 - t) * latents[0] + t * latents[1])


def prior_latents(config: ModelConfig, count: int, side: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents (count, L, side, side) drawn to look like the model's own: per channel N(latents_mean_c,
    latents_std_c^2) where `vaehelpers scale` measured them, else N(0, 1 / scaling_factor^2) (scaling_factor is
    1/std of real latents)."""
    noise = torch.randn(count, config.latent_channels, side, side, generator=generator)
    if config.latents_std:
        mean = torch.tensor(config.latents_mean or [0.0] * config.latent_channels).view(1, -1, 1, 1)
        return noise * torch.tensor(config.latents_std).view(1, -1, 1, 1) + mean
    return noise / config.scaling_factor


def prior_samples(
    model: nn.Module, count: int = 8, image_size: int = 128, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Decode latents drawn from the prior (prior_latents: the measured per-channel mean and std where stored, else
    N(0, I) / scaling_factor; the model's latents are unscaled), (count, 3, image_size, image_size)."""
    side = image_size // model.config.downsample_factor
    return decode(model, prior_latents(model.config, count, side, generator))


# ----------------------------------------------------------------------------- the latent scale


@dataclass
class LatentStats:
    """Statistics of latent values over a dataset; scaling_factor = 1 / std."""

    std: float  # unbiased std over every latent value (as torch.std in LDM's scale_by_std)
    mean: float
    n_images: int
    n_values: int  # latent values counted: n_images * L * h * w
    latents: str  # "posterior samples" or "posterior mode"
    channel_mean: tuple[float, ...] = ()  # (L,) per latent channel, over images and positions
    channel_std: tuple[float, ...] = ()  # (L,) unbiased, likewise

    @property
    def scaling_factor(self) -> float:
        return 1.0 / self.std


def _images(item: Any) -> torch.Tensor:
    """A dataset item's image (3, S, S): the item itself or the first entry of a tuple."""
    return item[0] if isinstance(item, (tuple, list)) else item


@torch.no_grad()
def latent_statistics(
    model: nn.Module,
    dataset: Any,
    *,
    max_images: int | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    sample_posterior: bool = True,
    seed: int = 0,
) -> LatentStats:
    """Mean and std of all latents of the first `max_images` images of `dataset` (None: all of them).

    model: an AutoencoderKL (encode(images) -> posterior). dataset: items (3, S, S) in [-1, 1], or tuples
    starting with one (e.g. ImageFolderDataset). sample_posterior: latents are posterior samples drawn with a
    CPU generator seeded by `seed` (LDM's definition, the default), else the posterior means. The model runs
    in float32 and eval mode (its training mode is restored); the statistics accumulate in float64, over all
    values and per latent channel (channel_mean, channel_std).
    """
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    if count < 1:
        raise ValueError("no images to measure the latent scale on")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    generator = torch.Generator("cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    # running count, mean and sum of squared deviations (Chan et al.), over everything and per channel (L,)
    n_values, mean, m2 = 0, 0.0, 0.0
    channel_n, channel_mean, channel_m2 = 0, None, None
    try:
        for start in range(0, count, batch_size):
            images = torch.stack([_images(dataset[i]) for i in range(start, min(start + batch_size, count))])
            posterior = model.encode(images.to(device, torch.float32))
            latents = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, L, h, w)
            values = latents.double().flatten()
            batch_n, batch_mean = values.numel(), values.mean().item()
            batch_m2 = (values - batch_mean).pow(2).sum().item()
            total = n_values + batch_n
            delta = batch_mean - mean
            mean += delta * batch_n / total
            m2 += batch_m2 + delta * delta * n_values * batch_n / total
            n_values = total
            per_channel = latents.double().transpose(0, 1).flatten(1).cpu()  # (L, B*h*w)
            batch_n, batch_mean = per_channel.shape[1], per_channel.mean(1)
            batch_m2 = (per_channel - batch_mean[:, None]).pow(2).sum(1)
            if channel_mean is None:
                channel_n, channel_mean, channel_m2 = batch_n, batch_mean, batch_m2
            else:
                total = channel_n + batch_n
                delta = batch_mean - channel_mean
                channel_mean = channel_mean + delta * batch_n / total
                channel_m2 = channel_m2 + batch_m2 + delta.square() * channel_n * batch_n / total
                channel_n = total
    finally:
        model.train(was_training)
    std = math.sqrt(m2 / max(n_values - 1, 1))
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent std is {std}: cannot set a scale (are the weights trained and finite?)")
    channel_std = (channel_m2 / max(channel_n - 1, 1)).sqrt()
    return LatentStats(
        std=std,
        mean=mean,
        n_images=count,
        n_values=n_values,
        latents="posterior samples" if sample_posterior else "posterior mode",
        channel_mean=tuple(channel_mean.tolist()),
        channel_std=tuple(channel_std.tolist()),
    )


def measure_scale(
    model: nn.Module,
    dataset: Any,
    *,
    max_images: int | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    sample_posterior: bool = True,
    seed: int = 0,
) -> float:
    """1 / std of the latents of up to `max_images` images of `dataset`: the scaling_factor for this model.

    See latent_statistics for the arguments; latents are posterior samples unless sample_posterior=False.
    """
    return latent_statistics(
        model,
        dataset,
        max_images=max_images,
        batch_size=batch_size,
        device=device,
        sample_posterior=sample_posterior,
        seed=seed,
    ).scaling_factor


def store_scale(
    run_dir: str | Path,
    value: float,
    details: dict[str, Any] | None = None,
    *,
    latents_mean: Sequence[float] | None = None,
    latents_std: Sequence[float] | None = None,
) -> Path:
    """Set model.scaling_factor in run_dir/config.json to `value` (AutoencoderKL.load then has it), and
    model.latents_mean / latents_std (one value per latent channel) when given.

    config.json may be a run config ({"model": {...}, ...}) or a bare ModelConfig; nothing else in it
    changes. details (e.g. dataclasses.asdict(LatentStats) and the data used) go to run_dir/scale.json.
    Returns config.json's path.
    """
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scaling_factor must be a positive finite number, got {value}")
    run = RunDir(run_dir)
    if not run.config.exists():
        raise FileNotFoundError(f"no {run.config.name} in {run.root}: not a run directory")
    settings = read_config(run.root)
    model_settings = settings["model"] if isinstance(settings, dict) and "model" in settings else settings
    current = from_dict(ModelConfig, model_settings)  # raises unless it is a ModelConfig
    model_settings["scaling_factor"] = value
    for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
        if values is None:
            continue
        values = [float(v) for v in values]
        if len(values) != current.latent_channels or not all(map(math.isfinite, values)):
            raise ValueError(
                f"{name} must be {current.latent_channels} finite numbers (one per latent channel), got {values}"
            )
        if name == "latents_std" and min(values) <= 0:
            raise ValueError(f"latents_std must be positive, got {values}")
        model_settings[name] = values
    write_config(run.root, settings)
    if details is not None:
        record = {"scaling_factor": value, **details}
        atomic_write(run.scale, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return run.config
