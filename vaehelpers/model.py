"""The KL autoencoder (Stable Diffusion's KL-f8 shape): encoder, decoder, posterior, save and load."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vaehelpers import tiling, weights
from vaehelpers.config import MODEL_PRESETS, ModelConfig, apply_overrides, config_diff, model_config
from vaehelpers.rundir import RunDir
from vaehelpers.weights import infer_config

# Module and parameter names follow diffusers' AutoencoderKL exactly, so that its state dicts load
# here with strict=True and ours load there. The code is our own; diffusers is only the test oracle.


# The posterior's log-variance is clamped to this range, as in LDM's DiagonalGaussianDistribution
# (CompVis/latent-diffusion, ldm/modules/distributions/distributions.py) and diffusers: exp(20)
# is about 5e8 and exp(-30) about 1e-13, which keeps exp() and the KL finite early in training.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussian:
    """The posterior q(z | x): a Gaussian with a diagonal covariance at every latent position.

    Built from the encoder's moments (B, 2L, h, w): the first L channels are the mean, the last L
    the log-variance (clamped to [-30, 20], see LOGVAR_MIN). All attributes have shape (B, L, h, w).
    """

    def __init__(self, moments: torch.Tensor) -> None:
        if moments.ndim != 4 or moments.shape[1] % 2:
            raise ValueError(f"moments must be (B, 2L, h, w) with an even channel count, got {tuple(moments.shape)}")
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, 2L, h, w) -> 2 x (B, L, h, w)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @property
    def shape(self) -> torch.Size:
        """Shape of one latent sample, (B, L, h, w)."""
        return self.mean.shape

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw latents mean + std * noise, (B, L, h, w); the noise comes from `generator` (None: global RNG).

        The noise is drawn on the generator's device and moved to the mean's device and dtype, so a
        CPU generator gives the same latents on CPU and CUDA (as diffusers' randn_tensor does).
        """
        noise_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely latents: the mean, (B, L, h, w)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, (B,): 0.5 * sum over C, H, W of mean^2 + var - 1 - logvar.

        Summed, not averaged, over the latent positions (as LDM); the batch reduction is losses.py's job.
        """
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.mean.shape)}, dtype={self.mean.dtype})"


# ---------------------------------------------------------------------------- building blocks


# ---- CPU fast paths, off by default (AutoencoderKL.enable_fast_paths): with them off, every layer runs the
# operation diffusers runs, in the same memory layout, so outputs match diffusers' to float rounding of the same ops.
# On: SiLU and the ResNet skip add in place, the attention residual in the layout that trains faster, and the
# upsampler fused into one transposed conv (see Upsample2D). train.py and bench.py turn them on.


def _silu(x: torch.Tensor, fast: bool) -> torch.Tensor:
    """SiLU; with `fast`, in place when autograd records nothing (encode/decode under no_grad or inference_mode).

    Every caller passes a fresh GroupNorm output that nothing else holds, so overwriting it is safe there;
    with gradients on it must stay out of place (SiLU's backward needs its input).
    """
    return F.silu(x, inplace=fast and not torch.is_grad_enabled())


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice plus a skip (1x1 conv when the width changes): (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.fast_paths = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_silu(self.norm1(x), self.fast_paths))
        h = self.conv2(_silu(self.norm2(h), self.fast_paths))  # SD's dropout is 0 for the autoencoder: left out
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        if (
            self.fast_paths and skip.dtype == h.dtype
        ):  # a conv's backward does not need its output: adding into it is safe
            return h.add_(skip)
        return skip + h  # diffusers' sum (and, under autocast, PyTorch's type promotion)


class Attention(nn.Module):
    """Single-head self-attention over the h*w positions, with a residual: (B, C, h, w) -> (B, C, h, w).

    Matches diffusers' Attention with its default processor (one head of width C, residual added,
    output rescale 1): GroupNorm, then to_q/to_k/to_v/to_out.0 as Linear layers on (B, h*w, C).
    """

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # a ModuleList so that the key is "to_out.0", as in diffusers (whose to_out.1 is a Dropout, no weights)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        self.fast_paths = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        q = self.to_q(tokens).unsqueeze(1)  # (B, h*w, C) -> (B, 1, h*w, C): one head
        k = self.to_k(tokens).unsqueeze(1)
        v = self.to_v(tokens).unsqueeze(1)
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, 1, h*w, C) -> (B, h*w, C)
        attended = self.to_out[0](attended).transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w), NHWC in memory
        # The sum's memory layout (not its values) follows the first operand, and every later layer keeps it.
        # diffusers adds `attended + residual`: NHWC, which is also the faster layout for convolutions without
        # gradients. The fast path trains in the input's layout: on CPU NCHW trains faster, because GroupNorm's
        # backward is several times slower on NHWC tensors (results/benchmarks.md).
        if self.fast_paths and torch.is_grad_enabled():
            return x + attended
        return attended + x


class Downsample2D(nn.Module):
    """Halve H and W as SD does: pad right and bottom by one, then a stride-2 3x3 conv with no padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric (0, 1, 0, 1) padding: LDM's choice, kept for weight compatibility
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)


def _upsample_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv weight (O, I, 3, 3) that runs after a nearest x2 upsample -> the transposed-conv weight
    (I, O, 4, 4) that gives the same output from the small image with stride 2 and padding 1.

    Along each axis, output 2i reads upsampled pixels 2i-1, 2i, 2i+1, i.e. input pixels i-1, i, i (taps w0
    and w1 + w2), and output 2i+1 reads input pixels i, i, i+1 (taps w0 + w1 and w2). A stride-2 transposed
    conv whose kernel is [w2, w1 + w2, w0 + w1, w0] reads exactly those: 16 multiply-adds per input pixel
    and channel pair instead of 36, and no upsampled image is ever built.
    """
    w0, w1, w2 = weight.unbind(2)  # (O, I, 3) each: kernel rows
    rows = torch.stack([w2, w1 + w2, w0 + w1, w0], dim=2)  # (O, I, 4, 3)
    c0, c1, c2 = rows.unbind(3)  # (O, I, 4) each: kernel columns
    taps = torch.stack([c2, c1 + c2, c0 + c1, c0], dim=3)  # (O, I, 4, 4)
    return taps.transpose(0, 1)  # conv_transpose2d wants (in, out, kH, kW)


class Upsample2D(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv.

    On CPU the two can run as one stride-2 transposed conv with summed taps (see _upsample_conv_weight):
    the same function with 16/36 of the FLOPs, which rounds differently (within 1e-5 of diffusers).
    `fused` = "auto" (default) follows the model's fast paths (off: diffusers' two ops); with them on it fuses
    when autograd records nothing (encode/decode) and when training under bf16 autocast, where bf16 rounding
    dwarfs the difference (bf16 on the 2-core CPU: decode 0.91x and the
    train step 0.92x the unfused time, results/benchmarks.md). fp32 training keeps diffusers' two ops, so
    fp32 runs stay comparable at 1e-5 (fused, a two-process run drifted 1.8e-5 from one process after four
    Adam steps, against 4e-6 unfused). "always" and "never" force it (benchmark ablations). Other devices
    (not measured) always run upsample + conv.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.fused: Literal["auto", "always", "never"] = "auto"
        self.fast_paths = False

    def _use_fused(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or self.fused == "never":
            return False
        if self.fused == "always":
            return True
        if not self.fast_paths:
            return False
        if not torch.is_grad_enabled():
            return True
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_fused(x):
            weight = _upsample_conv_weight(self.conv.weight)
            return F.conv_transpose2d(x, weight, self.conv.bias, stride=2, padding=1)  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, H, W) -> (B, C, 2H, 2W)


class DownEncoderBlock2D(nn.Module):
    """One encoder level: `layers` ResNet blocks, then an optional downsampler."""

    def __init__(
        self, in_channels: int, out_channels: int, layers: int, downsample: bool, groups: int, eps: float
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, eps) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """One decoder level: `layers` ResNet blocks, then an optional upsampler."""

    def __init__(
        self, in_channels: int, out_channels: int, layers: int, upsample: bool, groups: int, eps: float
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, eps) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock2D(nn.Module):
    """ResNet - attention - ResNet at the lowest resolution; without attention, two ResNets and no
    `attentions` entry at all (diffusers' `mid_block_add_attention=False` has the same keys)."""

    def __init__(self, channels: int, attention: bool, groups: int, eps: float) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups, eps)]) if attention else None
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, groups, eps) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def _run(block: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Run a block, recomputing its activations in the backward pass when gradient checkpointing is on."""
    if use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class Encoder(nn.Module):
    """images (B, C_in, H, W) -> moments (B, 2L, H/f, W/f), before quant_conv (f = config.downsample_factor)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        groups, eps = config.norm_num_groups, config.norm_eps
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(widths[max(i - 1, 0)], width, config.layers_per_block, i < len(widths) - 1, groups, eps)
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock2D(widths[-1], config.mid_attention, groups, eps)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=eps)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)  # mean and logvar
        self.gradient_checkpointing = False
        self.fast_paths = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)
        for block in self.down_blocks:
            x = _run(block, x, self.gradient_checkpointing)
        x = _run(self.mid_block, x, self.gradient_checkpointing)
        moments = self.conv_out(_silu(self.conv_norm_out(x), self.fast_paths))
        return _callers_layout(moments, images)


class Decoder(nn.Module):
    """latents (B, L, h, w), after post_quant_conv -> images (B, C_out, h*f, w*f)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in reversed(config.channel_multipliers)]
        groups, eps = config.norm_num_groups, config.norm_eps
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock2D(widths[0], config.mid_attention, groups, eps)
        # one more ResNet per level than the encoder, as in SD
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                widths[max(i - 1, 0)], width, config.layers_per_block + 1, i < len(widths) - 1, groups, eps
            )
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=eps)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)
        self.gradient_checkpointing = False
        self.fast_paths = False

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(latents)
        x = _run(self.mid_block, x, self.gradient_checkpointing)
        for block in self.up_blocks:
            x = _run(block, x, self.gradient_checkpointing)
        images = self.conv_out(_silu(self.conv_norm_out(x), self.fast_paths))
        return _callers_layout(images, latents)


# ---------------------------------------------------------------------------- the autoencoder


def _callers_layout(output: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """`output` as an NCHW-contiguous tensor when the caller's `given` was not NHWC (see Attention.forward)."""
    if output.is_contiguous() or given.is_contiguous(memory_format=torch.channels_last):
        return output
    return output.contiguous()


def _check_config(config: ModelConfig) -> None:
    """Raise a ValueError naming the field when a ModelConfig cannot build a model."""
    if not config.channel_multipliers:
        raise ValueError("channel_multipliers must have at least one level")
    widths = [config.base_channels * m for m in config.channel_multipliers]
    if min(widths) <= 0 or config.layers_per_block < 1 or config.latent_channels < 1:
        raise ValueError(f"widths, layers_per_block and latent_channels must be positive: {config}")
    bad = [w for w in widths if w % config.norm_num_groups]
    if bad:
        raise ValueError(f"norm_num_groups={config.norm_num_groups} must divide every width {widths} (not {bad})")


class AutoencoderKL(nn.Module):
    """The KL autoencoder: images (B, 3, H, W) in [-1, 1] -> posterior over latents (B, L, H/f, W/f) -> images.

    With the `sd` preset this is Stable Diffusion's KL-f8 autoencoder (f = 8, L = 4, 83,653,863
    parameters); state-dict keys are those of diffusers' AutoencoderKL. Latents are unscaled: multiply
    by `config.scaling_factor` before handing them to a diffusion model, as diffusers does.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = ModelConfig() if config is None else dataclasses.replace(config)
        _check_config(config)
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self._tiling: tiling.Tiling | None = None  # set by tiled(): encode and decode then work tile by tile

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AutoencoderKL:
        """A freshly initialised model of a named preset (tiny, small, sd), with ModelConfig fields overridden."""
        return cls(apply_overrides(model_config(name), overrides))

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final conv weight (C_out, C, 3, 3): the layer LDM's adaptive GAN weight differentiates."""
        return self.decoder.conv_out.weight

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass: less memory, about a third more compute. Off by default."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def disable_gradient_checkpointing(self) -> None:
        self.enable_gradient_checkpointing(False)

    def enable_fast_paths(self, enabled: bool = True) -> AutoencoderKL:
        """Turn the CPU fast paths on (off by default, where every layer runs diffusers' own operation):
        in-place SiLU and skip adds without gradients, the attention residual in the layout that trains
        faster, and the upsampler fused into one transposed conv without gradients and in bf16 training
        (Upsample2D). Decode then differs from diffusers by about 1e-5 of the output's range (README). Returns self.
        """
        for module in self.modules():
            if hasattr(module, "fast_paths"):
                module.fast_paths = enabled
        return self

    def disable_fast_paths(self) -> AutoencoderKL:
        return self.enable_fast_paths(False)

    @contextmanager
    def tiled(
        self,
        tile: int = 512,
        overlap: int = 64,
        stats_tiles: int | None = None,
        attention: Literal["auto", "global", "tile"] = "auto",
    ) -> Iterator[AutoencoderKL]:
        """Within this context, encode and decode images larger than `tile` pixels tile by tile, with GroupNorm
        statistics over the whole image (see tiling.py and tiling.Tiling for the settings):

            with model.tiled(tile=512, overlap=64):
                reconstructions = model.decode(model.encode(images).mode())
        """
        chosen = tiling.Tiling(tile=tile, overlap=overlap, stats_tiles=stats_tiles, attention=attention)
        chosen.check(self.config.downsample_factor)
        previous, self._tiling = self._tiling, chosen
        try:
            yield self
        finally:
            self._tiling = previous

    def _tiles(self, height: int, width: int) -> bool:
        """Whether an image of height x width pixels goes through tiles now."""
        return self._tiling is not None and max(height, width) > self._tiling.tile

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, C_in, H, W) in [-1, 1], H and W multiples of f -> posterior over (B, L, H/f, W/f)."""
        f, c = self.config.downsample_factor, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"encode expects images of shape (B, {c}, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % f or width % f:
            raise ValueError(
                f"encode expects H and W to be multiples of the downsample factor {f}, got {height}x{width}; "
                f"resize or crop to e.g. {height // f * f or f}x{width // f * f or f}"
            )
        if self._tiles(height, width):
            moments = tiling.run_tiled(
                lambda part: self.quant_conv(self.encoder(part)), self, images, self._tiling, factor_in=f, factor_out=1
            )
        else:
            moments = self.quant_conv(self.encoder(images))  # (B, 2L, H/f, W/f)
        return DiagonalGaussian(moments)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, L, h, w), unscaled -> reconstructions (B, C_out, h*f, w*f), roughly in [-1, 1] (not clamped)."""
        latent = self.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != latent:
            raise ValueError(f"decode expects latents of shape (B, {latent}, h, w), got {tuple(latents.shape)}")
        f = self.config.downsample_factor
        if self._tiles(latents.shape[-2] * f, latents.shape[-1] * f):
            return tiling.run_tiled(
                lambda part: self.decoder(self.post_quant_conv(part)),
                self,
                latents,
                self._tiling,
                factor_in=1,
                factor_out=f,
            )
        return self.decoder(self.post_quant_conv(latents))

    def forward(
        self, images: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """images (B, C_in, H, W) in [-1, 1] -> (reconstructions (B, C_out, H, W), posterior).

        Decodes the posterior's mean, or a sample drawn with `generator` when `sample_posterior` (training).
        """
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(latents), posterior

    # ------------------------------------------------------------------------ save and load (weights.py)

    def save(self, run_dir: str | Path) -> Path:
        """Write run_dir/model.safetensors and, if missing, run_dir/config.json as {"model": ModelConfig}.

        An existing run config.json must hold this model's settings (else a ValueError, before anything is
        written). Returns the weights' path. The same as weights.export(model, run_dir, "vaehelpers").
        """
        weights.export(self, run_dir, "vaehelpers")
        return RunDir(run_dir).weights

    @classmethod
    def load(
        cls, src: str | Path, config: ModelConfig | None = None, *, like: ModelConfig | None = None
    ) -> AutoencoderKL:
        """A model (float32, CPU) from any source weights.load reads: a run directory, a .safetensors file,
        a diffusers folder, an LDM/SD checkpoint or a Hub id. config: build this shape instead of the one the
        source names; like: settings a bare file cannot show (weights.load). Keys and shapes are checked strictly.
        """
        return cls.from_weights(weights.load(src, like), config)

    @classmethod
    def from_weights(cls, loaded: weights.Weights, config: ModelConfig | None = None) -> AutoencoderKL:
        """A model holding `loaded` (built on the meta device: no random init), after a strict check of every key
        and shape; a mismatch raises a ValueError naming the source, the keys and the config fields that differ."""
        config = config or loaded.config
        try:
            with torch.device("meta"):
                model = cls(config)
        except ValueError as error:
            raise ValueError(
                f"{loaded.source}: no model can be built for these weights ({error}); norm_num_groups "
                "cannot be read from weights: pass like=ModelConfig(norm_num_groups=...)"
            ) from error
        problems = state_dict_mismatch(model.state_dict(), loaded.state_dict)
        missing = sorted(set(model.state_dict()) - set(loaded.state_dict))
        if problems and loaded.kind == "ldm" and missing:
            levels = len(config.channel_multipliers)
            problems += "\n  missing keys with their LDM names:\n    " + weights.ldm_names(missing[:12], levels)
        if problems:
            raise ValueError(f"{loaded.source}: {problems}")
        model.load_state_dict(loaded.state_dict, strict=True, assign=True)
        return model.float()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """load_state_dict(strict=True), raising a ValueError that explains any key or shape mismatch."""
        problems = state_dict_mismatch(self.state_dict(), state_dict)
        if problems:
            raise ValueError(problems)
        self.load_state_dict(state_dict, strict=True)


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """'' when `found` has exactly the keys and shapes of `expected`, else a readable report."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{key}: model {tuple(expected[key].shape)}, weights {tuple(found[key].shape)}"
        for key in set(expected) & set(found)
        if expected[key].shape != found[key].shape
    )
    if not (missing or unexpected or shapes):
        return ""

    def listing(title: str, items: list[str], limit: int = 12) -> str:
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more if items else ""

    report = "weights do not match the model" + listing("missing keys", missing)
    report += listing("unexpected keys", unexpected) + listing("shape mismatches", shapes)
    try:
        model_cfg, weights_cfg = infer_config(expected), infer_config(found)
        report += f"\n  config fields that likely differ (model vs weights): {config_diff(model_cfg, weights_cfg)}"
    except (KeyError, ValueError, IndexError):
        report += "\n  the weights do not look like a diffusers-named AutoencoderKL (weights.py converts LDM/SD names)"
    return report


# ---------------------------------------------------------------------------- inspection


def parameter_table(model: AutoencoderKL) -> list[tuple[str, int]]:
    """Parameter counts per part, in data-flow order, ending with ("total", n)."""

    def count(*modules: nn.Module) -> int:
        return sum(p.numel() for module in modules for p in module.parameters())

    encoder, decoder = model.encoder, model.decoder
    rows = [
        ("encoder.conv_in", count(encoder.conv_in)),
        ("encoder.down_blocks", count(encoder.down_blocks)),
        ("encoder.mid_block", count(encoder.mid_block)),
        ("encoder.out (conv_norm_out + conv_out)", count(encoder.conv_norm_out, encoder.conv_out)),
        ("quant_conv", count(model.quant_conv)),
        ("post_quant_conv", count(model.post_quant_conv)),
        ("decoder.conv_in", count(decoder.conv_in)),
        ("decoder.mid_block", count(decoder.mid_block)),
        ("decoder.up_blocks", count(decoder.up_blocks)),
        ("decoder.out (conv_norm_out + conv_out)", count(decoder.conv_norm_out, decoder.conv_out)),
    ]
    return rows + [("total", count(model))]


def preset_name(config: ModelConfig) -> str | None:
    """The name of the preset equal to `config`, or None."""
    return next((name for name, preset in MODEL_PRESETS.items() if preset == config), None)


def trace_shapes(model: AutoencoderKL, images: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(part, output shape) after each encoder and decoder level for one forward of `images`, by hooks."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("input", tuple(images.shape))]
    parts = [("encoder.conv_in", model.encoder.conv_in)]
    parts += [(f"encoder.down_blocks.{i}", block) for i, block in enumerate(model.encoder.down_blocks)]
    parts += [("encoder.mid_block", model.encoder.mid_block), ("moments (quant_conv)", model.quant_conv)]
    parts += [("decoder.conv_in", model.decoder.conv_in), ("decoder.mid_block", model.decoder.mid_block)]
    parts += [(f"decoder.up_blocks.{i}", block) for i, block in enumerate(model.decoder.up_blocks)]
    hooks = [
        module.register_forward_hook(lambda _m, _i, output, name=name: shapes.append((name, tuple(output.shape))))
        for name, module in parts
    ]
    try:
        with torch.no_grad():
            reconstructions, posterior = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    position = next(i for i, (name, _) in enumerate(shapes) if name.startswith("moments")) + 1
    shapes.insert(position, ("latents", tuple(posterior.shape)))
    shapes.append(("output", tuple(reconstructions.shape)))
    return shapes


def describe(config: ModelConfig, image_size: int | tuple[int, int] = 128) -> str:
    """What `vaehelpers info` prints: preset, parameters per part, and shapes from input to output.

    image_size is S (square) or (H, W), multiples of the downsample factor. The model is built on the
    meta device, so this allocates no weights and takes well under a second even for `sd`.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    f = config.downsample_factor
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} must be a multiple of the downsample factor {f}")
    with torch.device("meta"):
        model = AutoencoderKL(config)
        shapes = trace_shapes(model, torch.zeros(1, config.in_channels, height, width))
    name = preset_name(config)
    widths = [config.base_channels * m for m in config.channel_multipliers]
    lines = [
        f"AutoencoderKL, preset {name}" if name else "AutoencoderKL (custom config)",
        f"  widths {widths}, {config.layers_per_block} ResNet blocks per encoder level "
        f"({config.layers_per_block + 1} per decoder level), mid attention {'on' if config.mid_attention else 'off'}",
        f"  downsample factor {f}, {config.latent_channels} latent channels, scaling factor {config.scaling_factor}",
        "",
        "Parameters",
    ]
    lines += [f"  {part:<40}{n:>14,}" for part, n in parameter_table(model)]
    lines += ["", f"Shapes for one {height}x{width} image"]
    lines += [f"  {part:<40}{str(shape):>24}" for part, shape in shapes]
    latent_shape = next(shape for part, shape in shapes if part == "latents")
    latent_values = math.prod(latent_shape[1:])
    pixel_values = config.in_channels * height * width
    lines += [
        "",
        f"latent {latent_shape}: {latent_values:,} values per image, "
        f"{pixel_values / latent_values:.0f}x fewer than the {pixel_values:,} pixel values",
    ]
    return "\n".join(lines)
