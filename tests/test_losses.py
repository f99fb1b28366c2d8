"""Tests for vaehelpers/losses.py: every term's minimum, gradients, LPIPS weights, KL, the seed recipe, the GAN."""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaehelpers import losses, pretrained
from vaehelpers.config import LossConfig, TrainConfig, apply_overrides, recipe_settings
from vaehelpers.losses import (
    LPIPS,
    NLayerDiscriminator,
    VAELoss,
    VGGFeatureLoss,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    kl_loss,
    kl_weight_at,
    lpips_linear_weights,
    reconstruction_loss,
)


class Posterior:
    """Stand-in for model.DiagonalGaussian: .mean, .logvar, .var (B, L, h, w) and per-sample .kl()."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean, self.logvar, self.var = mean, logvar, logvar.exp()

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean.pow(2) + self.var - 1 - self.logvar).sum(dim=(1, 2, 3))


def images_pair(seed: int = 0, shape=(2, 3, 32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two different batches of images inside (-1, 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 1.8 - 0.9, torch.rand(shape, generator=g) * 1.8 - 0.9


@pytest.fixture(scope="module")
def reference_lpips():
    """torchmetrics' own VGG LPIPS with a random backbone (pnet_rand: nothing is downloaded)."""
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    return _LPIPS(pretrained=True, net="vgg", pnet_rand=True).eval()


@pytest.fixture(scope="module")
def vgg_features(reference_lpips) -> nn.Sequential:
    """A random stand-in shaped like torchvision's vgg16().features (indices 0..29), shared with the reference."""
    net = reference_lpips.net
    modules = [module for block in (net.slice1, net.slice2, net.slice3, net.slice4, net.slice5) for module in block]
    return nn.Sequential(*modules)


# ----------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("kind", ["l1", "l2", "l1+l2"])
def test_distance_reconstruction_is_zero_for_identical_and_positive_otherwise(kind):
    images, other = images_pair()
    assert reconstruction_loss(images, images.clone(), kind).item() == 0.0
    assert reconstruction_loss(images, other, kind).item() > 0.0


def test_reconstruction_values():
    images, other = images_pair()
    assert torch.isclose(reconstruction_loss(images, other, "l1"), (images - other).abs().mean())
    assert torch.isclose(reconstruction_loss(images, other, "l2"), F.mse_loss(other, images))
    l1_l2 = reconstruction_loss(images, other, "l1+l2")
    assert torch.isclose(l1_l2, (images - other).abs().mean() + F.mse_loss(other, images))
    with pytest.raises(ValueError):
        reconstruction_loss(images, other, "huber")


def test_bce_of_identical_images_is_the_target_entropy_and_larger_otherwise():
    images, other = images_pair()
    target = (images + 1) / 2
    entropy = -(target * target.log() + (1 - target) * (1 - target).log()).mean()
    same = reconstruction_loss(images, images.clone(), "bce")
    assert torch.isclose(same, entropy, rtol=1e-5)
    assert same.item() > 0  # grey pixels: BCE's minimum is not 0
    assert reconstruction_loss(images, other, "bce").item() > entropy.item() + 1e-3
    # the same as torch's BCE on [0, 1]; and black/white targets reach 0 (up to the clamp)
    assert torch.isclose(reconstruction_loss(images, other, "bce"), F.binary_cross_entropy((other + 1) / 2, target))
    binary = torch.randint(0, 2, (2, 3, 8, 8)).float() * 2 - 1
    assert reconstruction_loss(binary, binary, "bce").item() < 1e-5


def test_bce_is_finite_for_reconstructions_outside_the_range():
    images, _ = images_pair()
    reconstructions = (images * 3).requires_grad_()
    value = reconstruction_loss(images, reconstructions, "bce")
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(reconstructions.grad).all()


# ----------------------------------------------------------------------------- perceptual


@pytest.mark.parametrize("cls", [VGGFeatureLoss, LPIPS])
def test_perceptual_is_zero_for_identical_and_positive_otherwise(cls, vgg_features):
    perceptual = cls(vgg_features)
    images, other = images_pair()
    assert perceptual(images, images.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert perceptual(images, other).item() > 1e-4


@pytest.mark.parametrize("cls", [VGGFeatureLoss, LPIPS])
def test_perceptual_gradients_reach_reconstructions_only(cls, vgg_features):
    perceptual = cls(vgg_features).train()  # train() must not unfreeze it
    assert not perceptual.training and not any(m.training for m in perceptual.modules())
    assert all(not p.requires_grad for p in perceptual.parameters())
    images, other = images_pair()
    images.requires_grad_()
    reconstructions = other.clone().requires_grad_()
    perceptual(images, reconstructions).backward()
    assert reconstructions.grad is not None and reconstructions.grad.abs().sum() > 0
    assert images.grad is None
    assert all(p.grad is None for p in perceptual.parameters())


def test_vgg_feature_loss_is_the_relu3_3_feature_mse(vgg_features):
    images, other = images_pair()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    trunk = vgg_features[:16]
    assert isinstance(trunk[-1], nn.ReLU) and isinstance(vgg_features[16], nn.MaxPool2d)  # relu3_3
    with torch.no_grad():
        expected = F.mse_loss(trunk(((other + 1) / 2 - mean) / std), trunk(((images + 1) / 2 - mean) / std))
    assert torch.isclose(VGGFeatureLoss(vgg_features)(images, other), expected, rtol=1e-5)


def test_lpips_linear_layers_hold_the_torchmetrics_weights(vgg_features):
    import importlib.util
    from pathlib import Path

    path = Path(importlib.util.find_spec("torchmetrics").origin).parent / "functional/image/lpips_models/vgg.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    perceptual = LPIPS(vgg_features)
    for index, linear in enumerate(perceptual.linears):
        assert torch.equal(linear.weight, state[f"lin{index}.model.1.weight"])
    assert [w.shape[1] for w in lpips_linear_weights()] == [64, 128, 256, 512, 512]


def test_lpips_matches_torchmetrics_with_the_same_backbone(vgg_features, reference_lpips):
    images, other = images_pair(1)
    ours = LPIPS(vgg_features).per_sample(images, other)
    with torch.no_grad():
        expected = reference_lpips(images, other).flatten()
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)
    assert torch.isclose(LPIPS(vgg_features)(images, other), expected.mean(), rtol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")  # lpips calls torchvision with the deprecated `pretrained`
def test_lpips_matches_the_lpips_package_with_the_same_backbone(vgg_features):
    lpips = pytest.importorskip("lpips")
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    for block in (
        reference.net.slice1,
        reference.net.slice2,
        reference.net.slice3,
        reference.net.slice4,
        reference.net.slice5,
    ):
        for name, _ in list(block.named_children()):
            setattr(block, name, vgg_features[int(name)])  # same index in vgg16().features
    images, other = images_pair(2)
    with torch.no_grad():
        expected = reference(images, other).flatten()
    torch.testing.assert_close(LPIPS(vgg_features).per_sample(images, other), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [VGGFeatureLoss, LPIPS])
def test_missing_vgg_weights_raise_a_clear_error(cls, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("VAEHELPERS_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # undo any torch.hub.set_dir elsewhere
    attempts = []

    def no_network(request, *args, **kwargs):  # what an offline machine does, without waiting on a socket
        attempts.append(request)
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    with pytest.raises(pretrained.MissingWeightsError) as error:
        cls()
    message = str(error.value)
    assert "\n" not in message and "vgg16-397923af.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    for way_out in ("vaehelpers weights download", "--weights-dir", "VAEHELPERS_WEIGHTS", "--recipe pixel"):
        assert way_out in message
    assert attempts == []  # nothing is downloaded behind the user's back


@pytest.mark.slow
def test_vgg_weights_on_disk_are_used_and_none_are_fetched(tmp_path, monkeypatch):
    # the notebooks at smoke scale: never start the 528 MB download; a file already there is used
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # undo any torch.hub.set_dir elsewhere
    monkeypatch.delenv("VAEHELPERS_WEIGHTS", raising=False)
    fetched = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, *args, **kwargs: fetched.append(url))
    from torchvision.models import vgg16

    torch.manual_seed(0)
    stand_in = vgg16().state_dict()  # the real file's name, format and keys
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(stand_in, tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth")
    features = losses.load_vgg16_features()
    torch.testing.assert_close(features[28].weight, stand_in["features.28.weight"])
    assert fetched == []


def test_no_perceptual_network_is_built_at_weight_zero(monkeypatch):
    def fail():
        raise AssertionError("load_vgg16_features called")

    monkeypatch.setattr(losses, "load_vgg16_features", fail)
    loss = VAELoss(LossConfig(perceptual_weight=0.0))
    assert loss.perceptual is None and loss.discriminator is None


# ----------------------------------------------------------------------------- KL


def test_kl_is_zero_for_a_standard_normal_posterior_and_positive_otherwise():
    zeros = torch.zeros(2, 4, 3, 3)
    standard = Posterior(zeros, zeros)
    g = torch.Generator().manual_seed(0)
    other = Posterior(torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g))
    for reduction in ("sum", "seed"):
        assert kl_loss(standard, reduction).item() == 0.0
        assert kl_loss(other, reduction).item() > 0.0
    with pytest.raises(ValueError):
        kl_loss(other, "mean")


def test_kl_reductions_on_a_hand_computed_example():
    # B=2, L=2, h=1, w=2; KL per element 0.5*(mu^2 + var - 1 - logvar)
    mean = torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]]], [[[0.0, 0.0]], [[0.0, 3.0]]]])
    logvar = torch.zeros_like(mean)
    posterior = Posterior(mean, logvar)
    # elementwise 0.5*mu^2: sample 0 -> [[0.5, 0], [2, 0]], sample 1 -> [[0, 0], [0, 4.5]]
    # seed: channel sums -> sample 0 [2.5, 0], sample 1 [0, 4.5]; mean over 4 values = 7/4
    assert kl_loss(posterior, "seed").item() == pytest.approx(1.75)
    # sum: per-sample sums 2.5 and 4.5, batch mean 3.5
    assert kl_loss(posterior, "sum").item() == pytest.approx(3.5)
    logvar = torch.full_like(mean, math.log(2.0))  # adds 0.5*(2 - 1 - ln 2) per element
    extra = 0.5 * (1 - math.log(2.0))
    assert kl_loss(Posterior(mean, logvar), "seed").item() == pytest.approx(1.75 + 2 * extra)


def test_kl_sum_agrees_with_the_model_posterior():
    from vaehelpers.model import DiagonalGaussian

    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    posterior = DiagonalGaussian(moments)
    stand_in = Posterior(posterior.mean, posterior.logvar)
    assert torch.isclose(kl_loss(posterior, "sum"), kl_loss(stand_in, "sum"))
    assert torch.isclose(kl_loss(posterior, "seed"), kl_loss(stand_in, "seed"))


def test_kl_warm_up():
    assert kl_weight_at(0, 2.0, 20) == 0.0
    assert kl_weight_at(10, 2.0, 20) == pytest.approx(1.0)
    assert kl_weight_at(40, 2.0, 20) == 2.0
    assert kl_weight_at(0, 2.0, 0) == 2.0  # no warm-up
    loss = VAELoss(LossConfig(kl_weight=0.3, kl_warmup_epochs=20))
    assert (loss.kl_weight_at(0), loss.kl_weight_at(10), loss.kl_weight_at(40)) == (0.0, pytest.approx(0.15), 0.3)


# ----------------------------------------------------------------------------- whole loss


def test_default_loss_is_l1_plus_weighted_kl_and_logs():
    cfg = LossConfig()
    loss = VAELoss(cfg)
    images, reconstructions = images_pair()
    posterior = Posterior(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4))
    total, logs = loss(images, reconstructions, posterior, step=0, epoch=0.0, split="val")
    expected = (reconstructions - images).abs().mean() + cfg.kl_weight * posterior.kl().mean()
    assert torch.isclose(total, expected)
    for key in ("rec_loss", "perceptual_loss", "kl_loss", "kl_weight", "g_loss", "disc_factor", "total_loss"):
        assert isinstance(logs[f"val/{key}"], float)
    assert logs["val/total_loss"] == pytest.approx(total.item())
    assert logs["val/g_loss"] == 0.0 and logs["val/perceptual_loss"] == 0.0


def test_seed_recipe_total_matches_the_hand_computed_formula(vgg_features):
    cfg = apply_overrides(TrainConfig(), recipe_settings("seed")).loss
    loss = VAELoss(cfg, perceptual_backbone=vgg_features)
    assert isinstance(loss.perceptual, VGGFeatureLoss) and loss.discriminator is None
    images, reconstructions = images_pair(4, shape=(3, 3, 16, 16))
    g = torch.Generator().manual_seed(5)
    posterior = Posterior(torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g))
    epoch = 5.0
    total, logs = loss(images, reconstructions, posterior, step=100, epoch=epoch)

    batch = images.shape[0]
    bce = F.binary_cross_entropy((reconstructions + 1) / 2, (images + 1) / 2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        trunk = vgg_features[:16]

        def features(x):
            return trunk(((x + 1) / 2 - mean) / std)

        feature_mse = F.mse_loss(features(reconstructions), features(images))
    kl_map = 0.5 * (posterior.mean**2 + posterior.logvar.exp() - 1 - posterior.logvar)
    kl_seed = kl_map.sum(dim=1).mean()
    expected = 500 * (bce / batch + 0.1 * feature_mse) + min(1.0, epoch / 20) * kl_seed
    assert torch.isclose(total, expected, rtol=1e-5)
    assert logs["train/kl_weight"] == 0.25


# ----------------------------------------------------------------------------- PatchGAN


class Forbidden(nn.Module):
    def forward(self, images):
        raise AssertionError("the discriminator ran")


def tiny_decoder_output(seed: int = 0):
    """A one-conv stand-in decoder: reconstructions (2, 3, 32, 32) with their last layer's weight."""
    torch.manual_seed(seed)
    conv_out = nn.Conv2d(4, 3, 3, padding=1)
    latents = torch.randn(2, 4, 32, 32)
    return torch.tanh(conv_out(latents)), conv_out.weight


def test_discriminator_shape_and_init():
    discriminator = NLayerDiscriminator()
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in discriminator.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1] and len(norms) == 3
    assert abs(convs[3].weight.std().item() - 0.02) < 0.002
    assert discriminator(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_gan_losses_minimum_and_on_a_random_discriminator():
    torch.manual_seed(0)
    high, low = torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -2.0)
    assert hinge_d_loss(high, low).item() == 0.0  # its minimum: real >= 1, fake <= -1
    assert hinge_d_loss(low, high).item() == pytest.approx(3.0)
    images, other = images_pair()
    logits = NLayerDiscriminator()(images)
    # the same images as real and fake: relu(1 - l) + relu(1 + l) >= 2, so the loss is >= 1
    assert hinge_d_loss(logits, logits).item() >= 1.0
    assert generator_loss(logits).item() == pytest.approx(-logits.mean().item())


def test_no_discriminator_work_before_disc_start(monkeypatch):
    loss = VAELoss(LossConfig(disc_weight=0.5, disc_start=10))
    loss.discriminator = Forbidden()
    monkeypatch.setattr(losses, "adaptive_weight", lambda *a, **k: pytest.fail("adaptive weight computed"))
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: pytest.fail("gradient norm computed"))
    reconstructions, last_layer = tiny_decoder_output()
    images, _ = images_pair()
    posterior = Posterior(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    assert not loss.uses_discriminator(9) and loss.uses_discriminator(10)
    total, logs = loss(images, reconstructions, posterior, step=9, epoch=0.0, last_layer=last_layer)
    assert logs["train/g_loss"] == 0.0 and logs["train/disc_factor"] == 0.0
    disc_loss, disc_logs = loss.discriminator_loss(images, reconstructions, step=9)
    assert disc_loss.item() == 0.0 and disc_logs["train/disc_loss"] == 0.0
    with pytest.raises(AssertionError, match="discriminator ran"):
        loss(images, reconstructions, posterior, step=10, epoch=0.0, last_layer=last_layer)


def test_no_discriminator_at_weight_zero(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("discriminator constructed")

    monkeypatch.setattr(losses, "NLayerDiscriminator", fail)
    monkeypatch.setattr(losses, "adaptive_weight", lambda *a, **k: pytest.fail("adaptive weight computed"))
    loss = VAELoss(LossConfig(disc_weight=0.0, disc_start=0))
    assert loss.discriminator is None and not loss.uses_discriminator(10**9)
    reconstructions, last_layer = tiny_decoder_output()
    images, _ = images_pair()
    posterior = Posterior(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    total, logs = loss(images, reconstructions, posterior, step=10**9, epoch=0.0, last_layer=last_layer)
    assert logs["train/g_loss"] == 0.0
    assert loss.discriminator_loss(images, reconstructions, step=10**9)[0].item() == 0.0


def test_gan_term_after_disc_start_uses_a_finite_positive_adaptive_weight():
    cfg = LossConfig(disc_weight=0.5, disc_start=5)
    loss = VAELoss(cfg)
    reconstructions, last_layer = tiny_decoder_output()
    images, _ = images_pair()
    posterior = Posterior(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    total, logs = loss(images, reconstructions, posterior, step=5, epoch=0.0, last_layer=last_layer)
    d_weight = logs["train/d_weight"]
    assert math.isfinite(d_weight) and 0 < d_weight <= 0.5 * 1e4
    assert logs["train/disc_factor"] == 1.0
    expected = (
        logs["train/nll_loss"] + logs["train/kl_weight"] * logs["train/kl_loss"] + d_weight * logs["train/g_loss"]
    )
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert last_layer.grad is not None and torch.isfinite(last_layer.grad).all()

    # the adaptive weight itself: ratio of gradient norms at the last layer, times disc_weight
    reconstructions, last_layer = tiny_decoder_output(1)
    nll = (reconstructions - images).abs().mean()
    g_loss = -reconstructions.mean()
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = adaptive_weight(nll, g_loss, last_layer, disc_weight=0.5)
    assert not weight.requires_grad
    assert weight.item() == pytest.approx(0.5 * (nll_grad.norm() / (g_grad.norm() + 1e-4)).item(), rel=1e-5)

    # the discriminator's own loss runs now and trains only the discriminator
    disc_loss, disc_logs = loss.discriminator_loss(images, reconstructions, step=5)
    disc_loss.backward()
    assert disc_loss.item() > 0 and set(disc_logs) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_gan_term_needs_last_layer_and_is_unweighted_without_gradients():
    loss = VAELoss(LossConfig(disc_weight=0.5, disc_start=0))
    reconstructions, _ = tiny_decoder_output()
    images, _ = images_pair()
    posterior = Posterior(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="last_layer"):
        loss(images, reconstructions, posterior, step=0, epoch=0.0)
    with torch.no_grad():  # validation: logs the GAN loss, weight 0 (as LDM)
        total, logs = loss(images, reconstructions, posterior, step=0, epoch=0.0, split="val")
    assert logs["val/d_weight"] == 0.0 and logs["val/disc_factor"] == 1.0 and logs["val/g_loss"] != 0.0
