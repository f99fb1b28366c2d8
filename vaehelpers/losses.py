"""The autoencoder's loss: reconstruction, perceptual (VGG features or LPIPS), KL and a PatchGAN.

Everything here follows latent-diffusion's `LPIPSWithDiscriminator` (contperceptual.py) in shape:
the loss is an `nn.Module` that owns its perceptual network and discriminator and returns
`(loss, logs)`; the generator and discriminator objectives are separate methods, and the decoder's
last layer is passed in explicitly for the adaptive GAN weight.

Sources for the constants below:
- LPIPS scaling layer shift (-.030, -.088, -.188) and scale (.458, .448, .450), the VGG16 taps
  (relu1_2 ... relu5_3), channel unit-normalisation with eps 1e-10 and the 1x1 linear weights
  ("v0.1"): Zhang et al. 2018, richzhang/PerceptualSimilarity lpips/lpips.py and
  lpips/pretrained_networks.py; the same file ships in the torchmetrics and lpips wheels, and is the
  one latent-diffusion trains with (taming-transformers' MD5); pretrained.py finds it ("lpips").
- ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225): torchvision's VGG16_Weights
  transforms, which those weights were trained with.
- Adaptive weight ||grad nll|| / (||grad g|| + 1e-4), clamped to [0, 1e4] and detached, and the
  hinge discriminator loss 0.5 * (mean relu(1 - real) + mean relu(1 + fake)): CompVis/latent-diffusion
  ldm/modules/losses/contperceptual.py and taming-transformers vqperceptual.py (Esser et al. 2021).
- PatchGAN layout (4x4 convs, stride 2, LeakyReLU 0.2, BatchNorm, ndf 64, 3 layers) and the init
  conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02), bias 0: pix2pix (Isola et al. 2017),
  as copied into taming-transformers' discriminator/model.py.
- The seed recipe (500 * (BCE / B + 0.1 * VGG relu3_3 MSE) + min(1, epoch / 20) * KL): DESIGN.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaehelpers.config import LossConfig

RELU3_3 = 15  # index of relu3_3 in torchvision's vgg16().features
LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features
LPIPS_CHANNELS = (64, 128, 256, 512, 512)  # widths at those taps
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # PerceptualSimilarity ScalingLayer
LPIPS_SCALE = (0.458, 0.448, 0.450)


# ----------------------------------------------------------------------------- reconstruction


def reconstruction_loss(
    images: Tensor,
    reconstructions: Tensor,
    kind: Literal["l1", "l2", "bce", "l1+l2"] = "l1",
    eps: float = 1e-6,
) -> Tensor:
    """Mean per-pixel reconstruction error; images and reconstructions (B, 3, H, W) in [-1, 1] -> scalar.

    "bce" is binary cross-entropy on [0, 1], as the seed project trained with: the target is
    (images + 1) / 2 and the prediction (reconstructions + 1) / 2 clamped to [eps, 1 - eps]. We clamp
    rather than put a sigmoid on the decoder so that the decoder's output keeps the same meaning
    (an image in [-1, 1]) for every loss; the price is that a pixel pushed beyond [-1, 1] gets no
    gradient from this term until it comes back. For identical inputs the BCE is not 0 but the
    target's own binary entropy, its minimum over predictions (0 only for pure black/white pixels).
    Computed in float32 (BCE is not safe under fp16 autocast).
    """
    images, reconstructions = images.float(), reconstructions.float()
    if kind == "l1":
        return (reconstructions - images).abs().mean()
    if kind == "l2":
        return (reconstructions - images).pow(2).mean()
    if kind == "l1+l2":
        difference = reconstructions - images
        return difference.abs().mean() + difference.pow(2).mean()
    if kind == "bce":
        target = ((images + 1) / 2).clamp(0, 1)
        prediction = ((reconstructions + 1) / 2).clamp(eps, 1 - eps)
        return -(target * prediction.log() + (1 - target) * (1 - prediction).log()).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}: choose l1, l2, l1+l2 or bce")


# ----------------------------------------------------------------------------- perceptual


def load_vgg16_features(weights_dir: str | Path | None = None) -> nn.Sequential:
    """torchvision's ImageNet VGG16 `features` (conv part) with the pretrained weights (pretrained.py finds them).

    The file vgg16-397923af.pth is looked for in weights_dir (else $VAEHELPERS_WEIGHTS) and the torch hub cache;
    nothing is downloaded here. Raises pretrained.MissingWeightsError (one line: the file, the folders searched,
    the ways out) when it is nowhere, BadWeightsError when it does not load.
    """
    from torchvision.models import vgg16

    from vaehelpers import pretrained

    state = pretrained.load_state_dict("vgg16", weights_dir)
    with torch.device("meta"):  # the classifier (102 M weights) is never used: build no memory, no random init
        model = vgg16()
    features = model.features.to_empty(device="cpu")
    features.load_state_dict(
        {key[len("features.") :]: value for key, value in state.items() if key.startswith("features.")}
    )
    return features


def _frozen(module: nn.Module) -> nn.Module:
    """Freeze a module in place: no parameter gradients, eval mode."""
    module.requires_grad_(False)
    return module.eval()


class _FrozenModule(nn.Module):
    """A module that never leaves eval mode (its backbone has no trainable state)."""

    def train(self, mode: bool = True) -> _FrozenModule:
        return super().train(False)


class VGGFeatureLoss(_FrozenModule):
    """The seed's perceptual term: MSE between VGG16 features up to relu3_3 of two images.

    images (B, 3, H, W) in [-1, 1] are mapped to [0, 1] and ImageNet-normalised first. Only the
    reconstructions carry gradients; the target branch runs under no_grad; the backbone is frozen.
    """

    def __init__(self, vgg_features: nn.Sequential | None = None, weights_dir: str | Path | None = None):
        super().__init__()
        vgg_features = load_vgg16_features(weights_dir) if vgg_features is None else vgg_features
        self.backbone = _frozen(vgg_features[: RELU3_3 + 1])  # conv1_1 ... relu3_3
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> relu3_3 features (B, 256, H/4, W/4)."""
        return self.backbone(((images + 1) / 2 - self.mean) / self.std)

    def forward(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        """images (targets) and reconstructions (B, 3, H, W) in [-1, 1] -> scalar feature MSE."""
        with torch.no_grad():
            target_features = self.features(images)
        return F.mse_loss(self.features(reconstructions).float(), target_features.float())


def lpips_linear_weights(weights_dir: str | Path | None = None) -> list[Tensor]:
    """The published LPIPS v0.1 VGG linear-layer weights [(1, C, 1, 1) for C in 64, 128, 256, 512, 512].

    pretrained.py finds them: weights_dir, the torch hub cache, else the copy shipped in the torchmetrics wheel.
    """
    from vaehelpers import pretrained

    state = pretrained.load_state_dict("lpips", weights_dir)
    return [state[f"lin{index}.model.1.weight"] for index in range(len(LPIPS_TAPS))]  # .1: after Dropout


class LPIPS(_FrozenModule):
    """LPIPS (VGG, v0.1) as a loss: per-sample distance between images in [-1, 1].

    Scaling layer -> VGG16 taps relu1_2 ... relu5_3 -> unit-normalise each position's channel vector
    -> squared difference -> published 1x1 linear weights -> spatial mean -> sum over the five taps.
    Only the reconstructions carry gradients; the target branch runs under no_grad; everything is
    frozen. Matches torchmetrics' and the `lpips` package's VGG LPIPS for the same backbone.
    """

    def __init__(self, vgg_features: nn.Sequential | None = None, weights_dir: str | Path | None = None):
        super().__init__()
        linear_weights = lpips_linear_weights(weights_dir)  # first: the small file says "missing" before VGG loads
        vgg_features = load_vgg16_features(weights_dir) if vgg_features is None else vgg_features
        self.backbone = _frozen(vgg_features[: LPIPS_TAPS[-1] + 1])  # conv1_1 ... relu5_3
        self.linears = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in LPIPS_CHANNELS)
        for linear, weight in zip(self.linears, linear_weights):
            linear.weight.data.copy_(weight)
        _frozen(self.linears)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def features(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> unit-normalised float32 features at the five taps."""
        taps, h = [], (images - self.shift) / self.scale
        for index, layer in enumerate(self.backbone):
            h = layer(h)
            if index in LPIPS_TAPS:
                h32 = h.float()  # normalise in float32: eps 1e-10 underflows in fp16
                taps.append(h32 / (h32.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def per_sample(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        """images (targets) and reconstructions (B, 3, H, W) in [-1, 1] -> LPIPS distances (B,)."""
        with torch.no_grad():
            target_features = self.features(images)
        distances = [
            linear((features - target).pow(2)).mean(dim=(1, 2, 3))  # (B,)
            for linear, features, target in zip(self.linears, self.features(reconstructions), target_features)
        ]
        return torch.stack(distances).sum(dim=0)

    def forward(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        """Batch mean of `per_sample`: a scalar."""
        return self.per_sample(images, reconstructions).mean()


# ----------------------------------------------------------------------------- KL


def kl_loss(posterior, reduction: Literal["sum", "seed"] = "sum") -> Tensor:
    """KL(posterior || N(0, I)) reduced to a scalar; posterior has .mean, .logvar (B, L, h, w) and .kl().

    "sum": per-sample sum over (L, h, w) via posterior.kl(), then the batch mean (LDM).
    "seed": sum over latent channels L only, then the mean over batch and spatial positions.
    """
    if reduction == "sum":
        return posterior.kl().float().mean()
    if reduction == "seed":
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl_map = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar)  # (B, L, h, w)
        return kl_map.sum(dim=1).mean()
    raise ValueError(f"unknown KL reduction {reduction!r}: choose sum or seed")


def kl_weight_at(epoch: float, kl_weight: float, kl_warmup_epochs: float = 0.0) -> float:
    """min(1, epoch / kl_warmup_epochs) * kl_weight: a linear warm-up from 0; no warm-up when it is 0."""
    if kl_warmup_epochs <= 0:
        return kl_weight
    return min(1.0, max(0.0, epoch) / kl_warmup_epochs) * kl_weight


# ----------------------------------------------------------------------------- PatchGAN


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / LDM): images (B, 3, H, W) -> patch logits (B, 1, H/8 - 2, W/8 - 2)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = ndf
        for n in range(1, n_layers + 1):
            next_width = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last of these keeps the resolution
            layers += [
                nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),  # bias-free before BN
                nn.BatchNorm2d(next_width),
                nn.LeakyReLU(0.2, True),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))  # one logit per patch
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # pix2pix's init (see the module docstring)
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge loss for the discriminator (LDM): 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    """The autoencoder's adversarial loss: -mean(logits_fake)."""
    return -logits_fake.mean()


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float = 1.0) -> Tensor:
    """LDM's GAN weight: ||d nll / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped, detached.

    last_layer is the decoder's final weight (e.g. decoder.conv_out.weight), in both losses' graphs.
    Clamped to [0, 1e4] as in LDM, then multiplied by disc_weight.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads.float()) / (torch.norm(g_grads.float()) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


# ----------------------------------------------------------------------------- the whole loss


def pretrained_files(cfg: LossConfig, perceptual_backbone: nn.Module | None = None) -> list[str]:
    """Names (pretrained.REGISTRY) of the files VAELoss(cfg) will load; none when a backbone is passed in."""
    if cfg.perceptual_weight <= 0:
        return []
    names = [] if perceptual_backbone is not None else ["vgg16"]
    return names + (["lpips"] if cfg.perceptual == "lpips" else [])


class VAELoss(nn.Module):
    """The autoencoder's loss, configured by LossConfig; one code path for every recipe.

    nll = seed_scale * (reconstruction_weight * rec + perceptual_weight * perceptual)   [x C*H*W if nll_reduction "sum"]
    total = nll + kl_weight_at(epoch) * KL + adaptive_weight * g_loss (from disc_start, if disc_weight > 0)

    The pixel recipe has seed_scale 1 and mean reduction; the ldm recipe sums over pixels per sample, as
    latent-diffusion's LPIPSWithDiscriminator (rec = |x - x'| + LPIPS broadcast over the pixels, taming's LPIPS:
    torchvision's VGG16 IMAGENET1K_V1 + the v0.1 linear layers, as here); the seed recipe gives
    500 * (BCE / B + 0.1 * VGG relu3_3 MSE) + min(1, epoch / 20) * KL(channel sum, mean over the rest).
    The perceptual network is built only when perceptual_weight > 0, the discriminator only when
    disc_weight > 0 (else `.discriminator` is None).
    """

    def __init__(
        self, cfg: LossConfig, perceptual_backbone: nn.Module | None = None, weights_dir: str | Path | None = None
    ):
        super().__init__()
        self.cfg = cfg
        self.perceptual: nn.Module | None = None
        if cfg.perceptual_weight > 0:
            if cfg.perceptual == "lpips":
                self.perceptual = LPIPS(perceptual_backbone, weights_dir)
            elif cfg.perceptual == "vgg":
                self.perceptual = VGGFeatureLoss(perceptual_backbone, weights_dir)
            else:
                raise ValueError(f"unknown perceptual loss {cfg.perceptual!r}: choose lpips or vgg")
        self.discriminator = NLayerDiscriminator() if cfg.disc_weight > 0 else None

    def kl_weight_at(self, epoch: float) -> float:
        """The KL weight at a (fractional) epoch, after the linear warm-up."""
        return kl_weight_at(epoch, self.cfg.kl_weight, self.cfg.kl_warmup_epochs)

    def uses_discriminator(self, step: int) -> bool:
        """Whether the GAN terms are on at this optimiser step (disc_weight > 0 and step >= disc_start)."""
        return self.discriminator is not None and step >= self.cfg.disc_start

    def forward(
        self,
        images: Tensor,
        reconstructions: Tensor,
        posterior,
        *,
        step: int,
        epoch: float,
        last_layer: Tensor | None = None,
        split: str = "train",
        batch_size_for_scaling: int | None = None,
        device_logs: bool = False,
    ) -> tuple[Tensor, dict[str, float]]:
        """The autoencoder's (generator's) loss and its logs.

        images, reconstructions (B, 3, H, W) in [-1, 1]; posterior has .mean/.logvar (B, L, h, w) and
        .kl(); step is the optimiser step (GAN start), epoch the fractional epoch (KL warm-up);
        last_layer the decoder's last weight, needed once the GAN term is on. Returns (total, logs)
        with float logs under f"{split}/...". Without gradients (validation) the GAN weight is 0, as in LDM.
        batch_size_for_scaling: the B of the seed's "BCE / B" (default images.shape[0]); with several processes
        pass the GLOBAL batch size, so that N ranks with B/N images each train as one process with B.
        device_logs: the loss terms' logs as 0-dim float32 tensors on the device, not read on the host (train.py's
        step reads them at log steps only, so other steps need no host sync).
        """
        cfg = self.cfg
        rec_loss = reconstruction_loss(images, reconstructions, cfg.reconstruction)
        if cfg.batch_scaled_reconstruction:
            rec_loss = rec_loss / (batch_size_for_scaling or images.shape[0])  # seed: mean BCE / batch size
        perceptual_loss = (
            self.perceptual(images, reconstructions).float() if self.perceptual is not None else rec_loss.new_zeros(())
        )
        nll_loss = cfg.seed_scale * (cfg.reconstruction_weight * rec_loss + cfg.perceptual_weight * perceptual_loss)
        if cfg.nll_reduction == "sum":  # LDM: per-sample sum over (C, H, W), batch mean = the pixel mean x C*H*W
            nll_loss = nll_loss * images[0].numel()
        elif cfg.nll_reduction != "mean":
            raise ValueError(f"unknown nll_reduction {cfg.nll_reduction!r}: choose mean or sum")
        kl = kl_loss(posterior, cfg.kl_reduction)
        kl_weight = self.kl_weight_at(epoch)
        total_loss = nll_loss + kl_weight * kl

        g_loss, d_weight, disc_factor = rec_loss.new_zeros(()), rec_loss.new_zeros(()), 0.0
        if self.uses_discriminator(step):  # nothing runs before disc_start, nor without a discriminator
            disc_factor = 1.0
            g_loss = generator_loss(self.discriminator(reconstructions)).float()
            if torch.is_grad_enabled() and nll_loss.requires_grad:
                if last_layer is None:
                    raise ValueError("the GAN term is on: pass last_layer=<the decoder's last conv weight>")
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer, cfg.disc_weight)
            total_loss = total_loss + d_weight * disc_factor * g_loss

        values = [total_loss, rec_loss, perceptual_loss, nll_loss, kl, g_loss, d_weight]
        names = ["total_loss", "rec_loss", "perceptual_loss", "nll_loss", "kl_loss", "g_loss", "d_weight"]
        stacked = torch.stack([v.detach().float() for v in values])
        logs = dict(zip(names, stacked.unbind() if device_logs else stacked.tolist()))  # tolist: one device sync
        logs.update(kl_weight=kl_weight, disc_factor=disc_factor)
        return total_loss, {f"{split}/{name}": value for name, value in logs.items()}

    def discriminator_loss(
        self, images: Tensor, reconstructions: Tensor, *, step: int, split: str = "train"
    ) -> tuple[Tensor, dict[str, float]]:
        """The discriminator's hinge loss on real images vs (detached) reconstructions, and its logs.

        Before disc_start or without a discriminator it returns a zero tensor (no graph) and runs
        nothing: check `uses_discriminator(step)` before calling backward and stepping its optimiser.
        """
        if not self.uses_discriminator(step):
            zero = images.new_zeros((), dtype=torch.float32)
            return zero, {f"{split}/disc_loss": 0.0, f"{split}/logits_real": 0.0, f"{split}/logits_fake": 0.0}
        logits_real = self.discriminator(images.detach()).float()
        logits_fake = self.discriminator(reconstructions.detach()).float()
        disc_loss = hinge_d_loss(logits_real, logits_fake)
        values = torch.stack([disc_loss.detach(), logits_real.detach().mean(), logits_fake.detach().mean()]).tolist()
        return disc_loss, dict(zip([f"{split}/disc_loss", f"{split}/logits_real", f"{split}/logits_fake"], values))
