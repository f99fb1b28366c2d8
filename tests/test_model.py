"""Tests for vaehelpers.model: equality with diffusers' AutoencoderKL, the posterior, save/load, describe."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vaehelpers.bench import diffusers_twin
from vaehelpers.config import ModelConfig, model_config, to_dict
from vaehelpers.model import AutoencoderKL, DiagonalGaussian, Upsample2D, describe, parameter_table
from vaehelpers.weights import infer_config

diffusers = pytest.importorskip("diffusers")

SD_PARAMETERS = 83_653_863
# sd-like shapes (4 levels, 2 blocks, attention) at a quarter of the width: fast on 2 CPU cores
NARROW = ModelConfig(base_channels=32, norm_num_groups=8)


def diffusers_vae(config: ModelConfig) -> torch.nn.Module:
    """diffusers' AutoencoderKL with the same shape as `config`, in eval mode."""
    return diffusers_twin(config).eval()


def randomized(config: ModelConfig, seed: int = 0) -> AutoencoderKL:
    """Our model with every parameter random (norm scales and biases too, so a mixed-up key shows)."""
    torch.manual_seed(seed)
    model = AutoencoderKL(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def assert_matches_diffusers(ours: AutoencoderKL, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        posterior = ours.encode(x)
        reference = theirs.encode(x).latent_dist
        assert posterior.mean.shape == reference.mean.shape
        torch.testing.assert_close(posterior.mean, reference.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(posterior.logvar, reference.logvar, atol=1e-5, rtol=1e-5)
        latents = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(2))
        decoded = ours.decode(latents)
        torch.testing.assert_close(decoded, theirs.decode(latents).sample, atol=1e-5, rtol=1e-5)
        assert decoded.shape == x.shape
        assert decoded.abs().max() > 1e-3  # not a trivially zero output


@pytest.mark.parametrize("size", [(64, 64), (128, 128), (96, 160)])
def test_narrow_matches_diffusers_ours_to_theirs(size):
    ours = randomized(NARROW)
    theirs = diffusers_vae(NARROW)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_matches_diffusers(ours, theirs, images(2, *size))


def test_tiny_matches_diffusers_theirs_to_ours():
    config = model_config("tiny")
    torch.manual_seed(3)
    theirs = diffusers_vae(config)
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_matches_diffusers(ours, theirs, images(2, 96, 160))


def test_without_mid_attention_matches_diffusers_both_ways():
    config = dataclasses.replace(model_config("tiny"), mid_attention=False)
    ours = randomized(config)
    assert not any("attentions" in key for key in ours.state_dict())
    theirs = diffusers_vae(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    AutoencoderKL(config).load_state_dict(theirs.state_dict(), strict=True)
    assert_matches_diffusers(ours, theirs, images(1, 64, 64))


@pytest.mark.slow
def test_sd_preset_matches_diffusers_at_64():
    ours = randomized(model_config("sd"))
    theirs = diffusers_vae(model_config("sd"))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_matches_diffusers(ours, theirs, images(1, 64, 64))
    # sampling with the same generator gives the same reconstructions as diffusers
    x = images(1, 64, 64)
    with torch.no_grad():
        reconstructions, _ = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(5))
        reference = theirs(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
    torch.testing.assert_close(reconstructions, reference, atol=1e-5, rtol=1e-5)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    with torch.device("meta"):  # no weights allocated
        sd = AutoencoderKL.from_preset("sd")
        assert count(sd) == SD_PARAMETERS
        assert count(diffusers_vae(model_config("sd"))) == SD_PARAMETERS
        tiny, small = count(AutoencoderKL.from_preset("tiny")), count(AutoencoderKL.from_preset("small"))
    assert 100_000 < tiny < 1_000_000
    assert 4_500_000 < small < 6_000_000
    table = dict(parameter_table(sd))
    assert table["total"] == SD_PARAMETERS
    assert sum(n for part, n in parameter_table(sd) if part != "total") == SD_PARAMETERS
    assert table["quant_conv"] == 8 * 8 + 8 and table["post_quant_conv"] == 4 * 4 + 4


def test_from_preset_overrides_and_last_layer():
    model = AutoencoderKL.from_preset("tiny", latent_channels=8, mid_attention=False)
    assert model.config.latent_channels == 8 and model.config.base_channels == 16
    assert model.quant_conv.weight.shape == (16, 16, 1, 1)
    assert model.last_layer is model.decoder.conv_out.weight
    assert model.last_layer.shape == (3, 16, 3, 3)
    with pytest.raises(KeyError, match="latent_chanels"):
        AutoencoderKL.from_preset("tiny", latent_chanels=8)
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL.from_preset("tiny", norm_num_groups=7)


# ---------------------------------------------------------------------------- posterior


def test_posterior_clamps_logvar_and_splits_moments():
    moments = torch.zeros(2, 8, 3, 5)
    moments[:, :4] = 0.5
    moments[0, 4] = 100.0
    moments[1, 5] = -100.0
    posterior = DiagonalGaussian(moments)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 3, 5)
    assert torch.all(posterior.mean == 0.5)
    assert posterior.logvar.max().item() == 20.0 and posterior.logvar.min().item() == -30.0
    torch.testing.assert_close(posterior.var, posterior.logvar.exp())
    torch.testing.assert_close(posterior.std, (0.5 * posterior.logvar).exp())
    assert posterior.mode() is posterior.mean
    with pytest.raises(ValueError, match="even"):
        DiagonalGaussian(torch.zeros(1, 7, 2, 2))


def test_posterior_sample_is_reproducible_with_a_generator():
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    posterior = DiagonalGaussian(moments)
    first = posterior.sample(torch.Generator().manual_seed(7))
    second = posterior.sample(torch.Generator().manual_seed(7))
    other = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, posterior.mean + posterior.std * noise)
    assert DiagonalGaussian(moments.double()).sample().dtype == torch.float64


def test_kl_is_zero_for_standard_normal_and_positive_otherwise():
    standard = DiagonalGaussian(torch.zeros(3, 8, 4, 4))
    assert standard.kl().shape == (3,)
    assert torch.all(standard.kl() == 0)
    moments = torch.zeros(3, 8, 4, 4)
    moments[1, 0, 0, 0] = 2.0  # mean 2 at one position: KL 0.5 * 4 = 2
    moments[2, 4:] = 1.0  # logvar 1 everywhere: 0.5 * 64 * (e - 2)
    kl = DiagonalGaussian(moments).kl()
    torch.testing.assert_close(kl, torch.tensor([0.0, 2.0, 0.5 * 64 * (torch.e - 2)]))
    assert torch.all(DiagonalGaussian(torch.randn(4, 8, 2, 2)).kl() > 0)


# ---------------------------------------------------------------------------- errors, save, load, describe


def test_shape_errors_are_clear():
    model = AutoencoderKL.from_preset("tiny")
    with pytest.raises(ValueError, match=r"multiples of the downsample factor 8, got 60x64"):
        model.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(1, 1, 64, 64\)"):
        model.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\), got \(1, 3, 8, 8\)"):
        model.decode(torch.zeros(1, 3, 8, 8))


def test_forward_returns_reconstructions_and_posterior():
    model = randomized(model_config("tiny"))
    x = images(2, 32, 48)
    with torch.no_grad():
        reconstructions, posterior = model(x)
        sampled, _ = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(reconstructions, model.decode(posterior.mean))
    assert reconstructions.shape == (2, 3, 32, 48) and posterior.mean.shape == (2, 4, 4, 6)
    assert not torch.allclose(sampled, reconstructions)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomized(model_config("tiny")).train()
    x = images(1, 32, 32)

    def grads() -> torch.Tensor:
        model.zero_grad()
        reconstructions, posterior = model(x)
        (reconstructions.square().mean() + posterior.kl().mean()).backward()
        return model.encoder.conv_in.weight.grad.clone()

    plain = grads()
    model.enable_gradient_checkpointing()
    torch.testing.assert_close(grads(), plain)
    assert plain.abs().sum() > 0


def test_save_load_round_trip(tmp_path):
    model = randomized(model_config("tiny"))
    weights = model.save(tmp_path / "run")
    assert weights.name == "model.safetensors"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["base_channels"] == 16
    x = images(1, 32, 32)
    for source in (tmp_path / "run", weights):
        loaded = AutoencoderKL.load(source).eval()
        assert loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded(x)[0], model(x)[0])


def test_save_keeps_a_run_config_and_load_reads_both_forms(tmp_path):
    model = randomized(model_config("tiny"))
    run_config = {"preset": "tiny", "lr": 1e-4, "model": to_dict(model.config)}
    (tmp_path / "config.json").write_text(json.dumps(run_config))
    model.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(run_config))  # untouched
    assert AutoencoderKL.load(tmp_path).config == model.config
    # a bare ModelConfig dict also loads
    (tmp_path / "config.json").write_text(json.dumps(run_config["model"]))
    assert AutoencoderKL.load(tmp_path).config == model.config
    # a run config describing another model is refused rather than left inconsistent
    other = {**run_config, "model": {**run_config["model"], "latent_channels": 8}}
    (tmp_path / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="latent_channels: 8 vs 4"):
        model.save(tmp_path)


def test_load_mismatch_lists_keys_and_config_fields(tmp_path):
    AutoencoderKL.from_preset("tiny").save(tmp_path)
    config = model_config("tiny")
    config.mid_attention = False
    config.latent_channels = 8
    with pytest.raises(ValueError) as error:
        AutoencoderKL.load(tmp_path / "model.safetensors", config=config)
    message = str(error.value)
    assert "unexpected keys (20)" in message  # 2 attention blocks x 5 modules x (weight, bias)
    assert "decoder.mid_block.attentions.0.group_norm.bias" in message and "... and 8 more" in message
    assert "shape mismatches" in message and "quant_conv.weight: model (16, 16, 1, 1), weights (8, 8, 1, 1)" in message
    assert "latent_channels: 8 vs 4" in message and "mid_attention: False vs True" in message


def test_infer_config_recovers_shapes():
    config = ModelConfig(
        base_channels=8,
        channel_multipliers=(1, 2, 3),
        layers_per_block=3,
        latent_channels=6,
        norm_num_groups=4,
        mid_attention=False,
    )
    with torch.device("meta"):
        state_dict = AutoencoderKL(config).state_dict()
    assert infer_config(state_dict, like=config) == config
    assert infer_config(state_dict).base_channels == 8


def test_describe_sd_at_128():
    text = describe(model_config("sd"), 128)
    assert "preset sd" in text
    assert "83,653,863" in text
    assert "(1, 4, 16, 16)" in text and "(1, 3, 128, 128)" in text
    assert "encoder.down_blocks.2" in text and "(1, 512, 16, 16)" in text
    assert "48x" in text
    assert "custom" in describe(ModelConfig(base_channels=8, norm_num_groups=8), (64, 96))
    with pytest.raises(ValueError, match="multiple of the downsample factor 8"):
        describe(model_config("sd"), 100)


def test_fused_upsampler_is_nearest_then_conv():
    torch.manual_seed(0)
    upsampler = Upsample2D(8)
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    results = []
    for fused in ("always", "never"):
        upsampler.fused = fused
        upsampled = upsampler(x)
        grads = torch.autograd.grad(upsampled.square().sum(), [x, upsampler.conv.weight, upsampler.conv.bias])
        results.append((upsampled, grads))
    (fused_out, fused_grads), (plain_out, plain_grads) = results
    assert fused_out.shape == (2, 8, 10, 14)
    torch.testing.assert_close(fused_out, plain_out, atol=1e-5, rtol=1e-5)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused_grad, plain_grad, atol=1e-4, rtol=1e-5)


def test_upsampler_fuses_without_gradients_and_in_bf16_training_only():
    upsampler, x = Upsample2D(8), torch.randn(1, 8, 4, 4)
    assert upsampler.fused == "auto"
    with torch.no_grad():  # fast paths off (the default): diffusers' two ops
        assert not upsampler._use_fused(x)
    upsampler.fast_paths = True
    assert not upsampler._use_fused(x)  # fp32 training: diffusers' ops, so fp32 runs compare at 1e-5
    with torch.no_grad():
        assert upsampler._use_fused(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert upsampler._use_fused(x)
    upsampler.fused = "never"
    with torch.no_grad():
        assert not upsampler._use_fused(x)
    upsampler.fused = "always"
    assert upsampler._use_fused(x)


def test_layout_follows_diffusers_without_gradients_and_outputs_stay_nchw():
    torch.manual_seed(0)
    ours = AutoencoderKL.from_preset("tiny").eval()  # fast paths off: every layer runs diffusers' kernel and layout
    theirs = diffusers_vae(ours.config).eval()
    theirs.load_state_dict(ours.state_dict())
    latents = torch.randn(2, 4, 4, 6)
    with torch.no_grad():
        decoded = ours.decode(latents)
        torch.testing.assert_close(decoded, theirs.decode(latents).sample, atol=1e-6, rtol=0)
        assert decoded.is_contiguous() and ours.encode(torch.rand(2, 3, 32, 48)).moments.is_contiguous()
    reconstructions, posterior = ours(torch.rand(2, 3, 32, 48))  # with gradients: NCHW throughout
    assert reconstructions.is_contiguous() and posterior.moments.is_contiguous()


def test_fast_paths_are_opt_in_and_change_decode_by_rounding_only():
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny").eval()
    switches = [module for module in model.modules() if hasattr(module, "fast_paths")]
    assert switches and not any(module.fast_paths for module in switches)  # off: diffusers' operations
    latents = torch.randn(1, 4, 6, 10)
    with torch.no_grad():
        plain = model.decode(latents)
        fast = model.enable_fast_paths().decode(latents)
    assert all(module.fast_paths for module in switches)
    assert not torch.equal(fast, plain)  # the fused upsampler rounds differently...
    assert float((fast - plain).abs().max() / plain.abs().max()) < 1e-5  # ...by float rounding only
    model.disable_fast_paths()
    assert not any(module.fast_paths for module in switches)
