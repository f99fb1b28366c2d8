"""weights.py: diffusers folders, LDM/SD checkpoints, Hub ids and run dirs in and out, with random weights, offline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vaehelpers import AutoencoderKL, ModelConfig
from vaehelpers import weights as W
from vaehelpers.cli import main
from vaehelpers.config import model_config
from vaehelpers.rundir import CheckpointError

# three levels (so the decoder's level order matters), mid attention, a width change (conv_shortcut)
SMALL = ModelConfig(base_channels=8, channel_multipliers=(1, 2, 2), layers_per_block=1, norm_num_groups=4)


def random_model(config: ModelConfig = SMALL, seed: int = 0) -> AutoencoderKL:
    """A model whose every tensor is distinct: default init plus noise on the norms and biases."""
    torch.manual_seed(seed)
    model = AutoencoderKL(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [key for key in a if a[key].shape != b[key].shape or not torch.equal(a[key], b[key])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def diffusers_model(diffusers, seed: int = 0, **overrides):
    """diffusers' own AutoencoderKL with SMALL's shape (config spelled out here, not by weights.py)."""
    torch.manual_seed(seed)
    settings = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[8, 16, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.5,
    )
    model = diffusers.AutoencoderKL(**{**settings, **overrides}).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


# --------------------------------------------------------------------------- key mapping


@pytest.mark.parametrize("config", [SMALL, model_config("sd")], ids=["small", "sd"])
def test_ldm_names_match_diffusers_own_converter(diffusers, config):
    """Our LDM export, fed to diffusers' LDM->diffusers converter, gives back our state dict (sd: on meta)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta" if config == model_config("sd") else "cpu"):
        ours = AutoencoderKL(config).state_dict()
    ldm = W.rename_keys(ours, "ldm")
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    assert "decoder.up.0.block.0.conv1.weight" in ldm and "encoder.down.0.block.0.norm1.weight" in ldm
    back = convert_ldm_vae_checkpoint(ldm, W.diffusers_config(config))
    assert sorted(back) == sorted(ours)
    assert all(back[key].shape == ours[key].shape for key in ours)
    if config == SMALL:  # real tensors: the values land in the right places, both ways
        assert_same_tensors(back, ours)
        assert_same_tensors(W.rename_keys(ldm, "diffusers"), ours)


def test_decoder_levels_are_reversed_in_ldm():
    levels = 4
    assert (
        W.rename_key("decoder.up_blocks.0.resnets.2.conv1.weight", levels, "ldm") == "decoder.up.3.block.2.conv1.weight"
    )
    assert (
        W.rename_key("decoder.up_blocks.3.upsamplers.0.conv.bias", levels, "ldm") == "decoder.up.0.upsample.conv.bias"
    )
    assert (
        W.rename_key("encoder.mid_block.attentions.0.to_out.0.weight", levels, "ldm")
        == "encoder.mid.attn_1.proj_out.weight"
    )
    assert (
        W.rename_key("encoder.down.1.block.0.nin_shortcut.weight", levels, "diffusers")
        == "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    )


def test_diffusers_config_round_trip():
    config = ModelConfig(base_channels=32, channel_multipliers=(1, 2, 4), mid_attention=False, scaling_factor=0.3)
    assert W.model_config_from_diffusers(W.diffusers_config(config)) == config
    measured = dataclasses.replace(config, latents_mean=(0.5, -1.0, 0.0, 2.0), latents_std=(1.0, 2.0, 3.0, 4.0))
    values = W.diffusers_config(measured)
    assert values["latents_mean"] == [0.5, -1.0, 0.0, 2.0] and W.diffusers_config(config)["latents_mean"] is None
    assert W.model_config_from_diffusers(values) == measured
    with pytest.raises(ValueError, match="latents_std"):
        W.model_config_from_diffusers({**values, "latents_std": [1.0, 2.0]})
    with pytest.raises(ValueError, match="norm_eps"):
        W.diffusers_config(ModelConfig(norm_eps=1e-5))


# --------------------------------------------------------------------------- diffusers


def test_diffusers_round_trip_keeps_every_tensor(diffusers, tmp_path):
    source = diffusers_model(diffusers)
    source.save_pretrained(tmp_path / "in")
    loaded = W.load(tmp_path / "in")
    state_dict, config = loaded.state_dict, loaded.config
    assert config == dataclasses.replace(SMALL, scaling_factor=0.5)
    assert_same_tensors(state_dict, source.state_dict())

    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "out"), "--to", "diffusers"]) == 0
    assert_same_tensors(
        load_file(tmp_path / "out" / W.DIFFUSERS_WEIGHTS_NAME), load_file(tmp_path / "in" / W.DIFFUSERS_WEIGHTS_NAME)
    )
    written, original = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("out", "in"))
    for key in (
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "act_fn",
        "latent_channels",
        "norm_num_groups",
        "sample_size",
        "scaling_factor",
        "mid_block_add_attention",
    ):
        assert written[key] == original[key], key


def test_diffusers_bin_weights_load_safely(diffusers, tmp_path):
    source = diffusers_model(diffusers)
    source.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").exists()
    assert_same_tensors(W.load(tmp_path / "bin").state_dict, source.state_dict())


def test_exported_diffusers_folder_matches_our_outputs(diffusers, tmp_path):
    model = random_model(dataclasses.replace(SMALL, scaling_factor=0.77))
    W.export(model, tmp_path / "vae", "diffusers", sample_size=32)
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert theirs.config.scaling_factor == 0.77 and theirs.config.sample_size == 32
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, their_posterior = model.encode(images), theirs.encode(images).latent_dist
        torch.testing.assert_close(their_posterior.mean, ours.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(their_posterior.logvar, ours.logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.decode(latents).sample, model.decode(latents), atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs(images).sample, model(images)[0], atol=1e-5, rtol=0)


def test_diffusers_without_quant_convs_and_with_old_attention_names(diffusers, tmp_path):
    source = diffusers_model(diffusers, use_quant_conv=False, use_post_quant_conv=False)
    source.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / W.DIFFUSERS_WEIGHTS_NAME
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = load_file(weights)
    for new, old in old_names.items():  # as diffusers < 0.14 saved them
        tensors = {key.replace(f".{new}.", f".{old}."): value for key, value in tensors.items()}
    save_file(tensors, str(weights))
    loaded = W.load(tmp_path / "vae")
    assert any("identity" in note for note in loaded.notes) and any("old names" in note for note in loaded.notes)
    model = AutoencoderKL.from_weights(loaded)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(source(images).sample, model(images)[0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- LDM / SD


def test_ldm_round_trip_keeps_every_tensor(tmp_path):
    model = random_model()
    W.export(model, tmp_path / "vae.safetensors", "ldm")
    ldm = load_file(tmp_path / "vae.safetensors")
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    assert torch.equal(
        ldm["decoder.up.2.block.0.conv1.weight"], model.state_dict()["decoder.up_blocks.0.resnets.0.conv1.weight"]
    )
    assert "quant_conv.weight" in ldm and "encoder.norm_out.weight" in ldm

    loaded = W.load(tmp_path / "vae.safetensors")
    assert loaded.kind == "ldm" and loaded.config == SMALL
    assert_same_tensors(loaded.state_dict, model.state_dict())
    assert main(["convert", str(tmp_path / "vae.safetensors"), str(tmp_path / "again.safetensors"), "--to", "ldm"]) == 0
    assert_same_tensors(load_file(tmp_path / "again.safetensors"), ldm)
    assert (
        main(["convert", str(tmp_path / "vae.safetensors"), str(tmp_path / "vae.ckpt"), "--to", "ldm"]) == 0
    )  # the pickle form, read back safely
    assert_same_tensors(W.load(tmp_path / "vae.ckpt", like=SMALL).state_dict, model.state_dict())


def test_ldm_file_without_config_needs_the_group_count(tmp_path):
    model = random_model()
    save_file(W.rename_keys(model.state_dict(), "ldm"), str(tmp_path / "bare.safetensors"))  # no metadata
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL.load(tmp_path / "bare.safetensors")
    loaded = W.load(tmp_path / "bare.safetensors", like=ModelConfig(norm_num_groups=4))
    state_dict, config = loaded.state_dict, loaded.config
    assert config == SMALL
    assert_same_tensors(state_dict, model.state_dict())


def test_full_sd_checkpoint_takes_only_the_vae(tmp_path):
    model = random_model()
    vae = {f"first_stage_model.{key}": value for key, value in W.rename_keys(model.state_dict(), "ldm").items()}
    unrelated = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(10, 8),
        "model_ema.decay": torch.tensor(0.999),
        "scale_factor": torch.tensor(0.25),
    }
    torch.save({"state_dict": {**vae, **unrelated}, "global_step": 470000}, tmp_path / "sd.ckpt")
    loaded = W.load(tmp_path / "sd.ckpt", like=ModelConfig(norm_num_groups=4))
    assert loaded.kind == "ldm"
    assert loaded.config == dataclasses.replace(SMALL, scaling_factor=0.25)  # LDM's scale_factor buffer
    assert_same_tensors(loaded.state_dict, model.state_dict())
    assert any("ignored 4 tensors" in note for note in loaded.notes)


def test_sd_preset_full_checkpoint_round_trip(tmp_path):
    """The one test with the real SD shape: a first_stage_model.* .safetensors (no config) -> ours -> diffusers."""
    model = AutoencoderKL.from_preset("sd")
    ldm = {f"first_stage_model.{k}": v.contiguous() for k, v in W.rename_keys(model.state_dict(), "ldm").items()}
    save_file({**ldm, "model.diffusion_model.out.2.bias": torch.zeros(4)}, str(tmp_path / "sd.safetensors"))
    del ldm
    assert main(["convert", str(tmp_path / "sd.safetensors"), str(tmp_path / "diffusers"), "--to", "diffusers"]) == 0
    loaded = W.load(tmp_path / "diffusers")
    state_dict, config = loaded.state_dict, loaded.config
    assert config == model_config("sd")
    assert len(state_dict) == 248
    assert_same_tensors(state_dict, model.state_dict())


def test_missing_and_unexpected_keys_are_named(tmp_path):
    ldm = W.rename_keys(random_model().state_dict(), "ldm")
    del ldm["decoder.up.0.block.1.conv2.bias"]
    ldm["encoder.down.0.attn.0.q.weight"] = torch.zeros(8, 8, 1, 1)
    save_file(ldm, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError) as caught:
        AutoencoderKL.load(tmp_path / "broken.safetensors", like=SMALL)
    message = str(caught.value)
    assert "missing keys (1)" in message and "decoder.up_blocks.2.resnets.1.conv2.bias" in message
    assert "LDM: decoder.up.0.block.1.conv2.bias" in message
    assert "unexpected keys (1)" in message and "encoder.down.0.attn.0.q.weight" in message
    assert str(tmp_path / "broken.safetensors") in message

    # the same for a diffusers folder, and through the command line: one clear line, exit status 1
    W.export(random_model(), tmp_path / "folder", "diffusers")
    weights = tmp_path / "folder" / W.DIFFUSERS_WEIGHTS_NAME
    tensors = load_file(weights)
    del tensors["encoder.conv_norm_out.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \(1\):\s+encoder.conv_norm_out.weight"):
        AutoencoderKL.load(tmp_path / "folder")


class Payload:
    """Unpickling this would create `marker` (a stand-in for running any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1), "payload": Payload(marker)}}, ckpt)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.ckpt.* other than tensors"):
        W.load(ckpt)
    assert not marker.exists()
    assert main(["convert", str(ckpt), str(tmp_path / "out"), "--to", "diffusers"]) == 1
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
    # the payload is real: an unrestricted load runs it (done here only to show the test is not vacuous)
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------------------- Hub ids and run dirs


def test_hub_id_offline_gives_clear_advice(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(
        W.HubDownloadError, match="hf download stabilityai/sd-vae-ft-mse --local-dir DIR.*pass that folder's path"
    ):
        W.load("stabilityai/sd-vae-ft-mse")
    with pytest.raises(FileNotFoundError, match="no such file"):
        W.load(tmp_path / "missing" / "vae.safetensors")


def test_hub_id_loads_a_pipeline_vae(diffusers, tmp_path, hub_snapshot):
    source = diffusers_model(diffusers)
    repo = tmp_path / "repo"
    source.save_pretrained(repo / "vae")  # a pipeline repo: the autoencoder in vae/
    (repo / "unet").mkdir()
    (repo / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"gigabytes of UNet")
    hub_snapshot.repos["someone/some-pipeline"] = repo
    loaded = W.load("someone/some-pipeline")
    assert [repo_id for repo_id, _ in hub_snapshot.calls] == ["someone/some-pipeline"]  # safetensors found first
    assert loaded.kind == "diffusers" and loaded.source.startswith("hub:someone/some-pipeline")
    assert_same_tensors(loaded.state_dict, source.state_dict())
    folder = Path(loaded.source.split("(", 1)[1].rstrip(")"))
    assert not (folder / "unet").exists()  # only the autoencoder's files were fetched


def test_hub_id_with_bin_weights_only_takes_the_second_patterns(diffusers, tmp_path, hub_snapshot):
    source = diffusers_model(diffusers)
    source.save_pretrained(tmp_path / "repo", safe_serialization=False)  # diffusion_pytorch_model.bin
    hub_snapshot.repos["someone/old-vae"] = tmp_path / "repo"
    loaded = W.load("someone/old-vae")
    assert len(hub_snapshot.calls) == 2  # the safetensors patterns fetched nothing usable, the .bin ones did
    assert "diffusion_pytorch_model.bin" in hub_snapshot.calls[1][1]
    assert_same_tensors(loaded.state_dict, source.state_dict())


def test_cli_convert_chain_back_to_a_run(tmp_path, capsys):
    model = random_model()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": dataclasses.asdict(SMALL), "data": {"image_size": 48}}))
    model.save(run)
    assert main(["convert", str(run), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["sample_size"] == 48  # the run's image size
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "vae.safetensors"), "--to", "ldm"]) == 0
    assert main(["convert", str(tmp_path / "vae.safetensors"), str(tmp_path / "back"), "--to", "vaehelpers"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "(ldm," in out
    assert_same_tensors(AutoencoderKL.load(tmp_path / "back").state_dict(), model.state_dict())
    assert AutoencoderKL.load(tmp_path / "back").config == SMALL
    # train --init reads any of these; a run still training (no model.safetensors yet) gives its checkpoint
    (run / "model.safetensors").unlink()
    (run / "checkpoints").mkdir()
    torch.save({"model": model.state_dict(), "step": 3}, run / "checkpoints" / "last.pt")
    assert_same_tensors(W.load(run).state_dict, model.state_dict())
