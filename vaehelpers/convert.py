"""Weights in and out: our run directories, diffusers folders, LDM/SD checkpoints and Hugging Face Hub ids.

Our AutoencoderKL uses diffusers' parameter names, so a diffusers folder is a rename-free copy; LDM/SD
checkpoints (CompVis latent-diffusion, the original Stable Diffusion .ckpt/.safetensors) name the same
tensors differently and store the mid-block attention as 1x1 convolutions. The key mapping below is
ours, written from the two layouts; diffusers' own converter is used only as a test oracle.

    load_source(src) / load_weights_from(src) / load_model(src)   any source -> our names + ModelConfig
    to_diffusers / to_ldm / to_run_dir / export                   a model -> a folder or a file
    convert(src, dest, to)                                         both in one call (`vaehelpers convert`)

Pickled files (.ckpt, .pt, .pth, .bin) are read only with torch.load(weights_only=True): a file that
would run code while loading is refused, never executed.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vaehelpers.config import ModelConfig, from_dict, to_dict
from vaehelpers.model import CONFIG_NAME, WEIGHTS_NAME, AutoencoderKL, infer_config, state_dict_mismatch

StateDict = dict[str, torch.Tensor]
Target = Literal["diffusers", "ldm", "vaehelpers"]
TARGETS = ("diffusers", "ldm", "vaehelpers")

# diffusers folder layout; the plain files first (an fp16 variant is used only when it is all there is)
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
DIFFUSERS_WEIGHTS_NAME = DIFFUSERS_WEIGHTS[0]
# LDM/SD: the autoencoder's keys inside a full checkpoint start with one of these (diffusers' LDM_VAE_KEYS)
LDM_PREFIXES = ("first_stage_model.", "vae.")
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# diffusers' and LDM's Encoder/Decoder hard-code GroupNorm eps 1e-6; another value cannot be exported
EXPORT_NORM_EPS = 1e-6
METADATA_CONFIG = "vaehelpers_model"  # safetensors metadata entry holding our ModelConfig as JSON (LDM exports)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class HubDownloadError(OSError):
    """A Hub id that could not be fetched (offline, unknown, gated); the message says what to do instead."""


@dataclass
class LoadedWeights:
    """Weights from any source, in our (diffusers) key names, with the ModelConfig they fit."""

    state_dict: StateDict
    config: ModelConfig
    kind: Literal["vaehelpers", "diffusers", "ldm"]  # the source's layout
    source: str  # what was read: a path, or "hub:owner/name (path)"
    sample_size: int | None = None  # image size the source was made for (diffusers sample_size, run image_size)
    notes: list[str] = field(default_factory=list)  # what was skipped or filled in, for the user


# ---------------------------------------------------------------------------------------------
# Key names: diffusers <-> LDM
#
# LDM (ldm/modules/diffusionmodules/model.py)       diffusers / ours
#   {enc,dec}.norm_out                                {enc,dec}.conv_norm_out
#   encoder.down.{i}.block.{j}  (nin_shortcut)        encoder.down_blocks.{i}.resnets.{j}  (conv_shortcut)
#   encoder.down.{i}.downsample.conv                  encoder.down_blocks.{i}.downsamplers.0.conv
#   decoder.up.{n-1-i}.block.{j}                      decoder.up_blocks.{i}.resnets.{j}
#   decoder.up.{n-1-i}.upsample.conv                  decoder.up_blocks.{i}.upsamplers.0.conv
#   {enc,dec}.mid.block_{k}                           {enc,dec}.mid_block.resnets.{k-1}
#   {enc,dec}.mid.attn_1.{norm,q,k,v,proj_out}        {enc,dec}.mid_block.attentions.0.
#                                                       {group_norm,to_q,to_k,to_v,to_out.0}
# LDM numbers the decoder's levels from the lowest resolution up (it builds them reversed), diffusers in
# the order they run; LDM's attention projections are (C, C, 1, 1) convs, diffusers' (C, C) linears.

_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_ATTENTION_FROM_LDM = {ldm: ours for ours, ldm in _ATTENTION_TO_LDM.items()}
# diffusers before 0.14 named the attention layers differently; its loader still renames them
_LEGACY_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _levels(keys: Any, pattern: str) -> int:
    """1 + the largest level index that `pattern` (one group) finds among the keys; 0 when none does."""
    found = [int(m.group(1)) for key in keys if (m := re.match(pattern, key))]
    return 1 + max(found) if found else 0


def _shortcut(name: str, to_ldm: bool) -> str:
    return name.replace("conv_shortcut", "nin_shortcut") if to_ldm else name.replace("nin_shortcut", "conv_shortcut")


def diffusers_key_to_ldm(key: str, levels: int) -> str:
    """One diffusers (our) key in LDM's name; `levels` = the number of resolution levels. Unknown keys pass unchanged."""
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key  # conv_in/out live under encoder/decoder; quant_conv and post_quant_conv keep their names
    if m := re.fullmatch(r"conv_norm_out\.(.+)", rest):
        rest = f"norm_out.{m[1]}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        rest = f"down.{m[1]}.block.{m[2]}.{_shortcut(m[3], True)}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", rest):
        rest = f"down.{m[1]}.downsample.{m[2]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        rest = f"up.{levels - 1 - int(m[1])}.block.{m[2]}.{_shortcut(m[3], True)}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        rest = f"up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        rest = f"mid.block_{int(m[1]) + 1}.{_shortcut(m[2], True)}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", rest):
        rest = f"mid.attn_1.{_ATTENTION_TO_LDM[m[1]]}.{m[2]}"
    return f"{part}.{rest}"


def ldm_key_to_diffusers(key: str, levels: int) -> str:
    """One LDM key in diffusers' (our) name; the inverse of diffusers_key_to_ldm. Unknown keys pass unchanged."""
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key
    if m := re.fullmatch(r"norm_out\.(.+)", rest):
        rest = f"conv_norm_out.{m[1]}"
    elif m := re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(.+)", rest):
        rest = f"down_blocks.{m[1]}.resnets.{m[2]}.{_shortcut(m[3], False)}"
    elif m := re.fullmatch(r"down\.(\d+)\.downsample\.(.+)", rest):
        rest = f"down_blocks.{m[1]}.downsamplers.0.{m[2]}"
    elif m := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(.+)", rest):
        rest = f"up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_shortcut(m[3], False)}"
    elif m := re.fullmatch(r"up\.(\d+)\.upsample\.(.+)", rest):
        rest = f"up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.{m[2]}"
    elif m := re.fullmatch(r"mid\.block_(\d+)\.(.+)", rest):
        rest = f"mid_block.resnets.{int(m[1]) - 1}.{_shortcut(m[2], False)}"
    elif m := re.fullmatch(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(.+)", rest):
        rest = f"mid_block.attentions.0.{_ATTENTION_FROM_LDM[m[1]]}.{m[2]}"
    return f"{part}.{rest}"


def _is_attention_projection(key: str) -> bool:
    return re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", key) is not None


def diffusers_to_ldm_keys(state_dict: StateDict) -> StateDict:
    """A diffusers-named (our) state dict in LDM names; attention projections (C, C) become (C, C, 1, 1) convs.

    Tensors are the same objects or views of them (no copy); unknown keys are kept as they are.
    """
    levels = _levels(state_dict, r"decoder\.up_blocks\.(\d+)\.") or _levels(state_dict, r"encoder\.down_blocks\.(\d+)\.")
    converted: StateDict = {}
    for key, tensor in state_dict.items():
        if _is_attention_projection(key) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # (C_out, C_in) -> (C_out, C_in, 1, 1)
        converted[diffusers_key_to_ldm(key, levels)] = tensor
    return converted


def ldm_to_diffusers_keys(state_dict: StateDict) -> StateDict:
    """An LDM-named autoencoder state dict (no `first_stage_model.` prefix) in diffusers' (our) names.

    Attention projections stored as 1x1 convs, (C, C, 1, 1) (or (C, C, 1) conv1d), become (C, C) linears;
    unknown keys are kept as they are, so that a strict check names them.
    """
    levels = _levels(state_dict, r"decoder\.up\.(\d+)\.") or _levels(state_dict, r"encoder\.down\.(\d+)\.")
    converted: StateDict = {}
    for key, tensor in state_dict.items():
        new_key = ldm_key_to_diffusers(key, levels)
        if _is_attention_projection(new_key) and tensor.ndim > 2 and all(size == 1 for size in tensor.shape[2:]):
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # (C_out, C_in, 1, 1) -> (C_out, C_in)
        converted[new_key] = tensor
    return converted


def _rename_legacy_attention(state_dict: StateDict) -> tuple[StateDict, int]:
    """diffusers < 0.14 attention names (query, key, value, proj_attn) in today's names; returns (dict, count renamed)."""
    renamed, count = {}, 0
    for key, tensor in state_dict.items():
        m = re.fullmatch(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)", key)
        if m:
            key, count = f"{m[1]}{_LEGACY_DIFFUSERS_ATTENTION[m[2]]}.{m[3]}", count + 1
        renamed[key] = tensor
    return renamed, count


def detect_naming(keys: Any) -> Literal["diffusers", "ldm"] | None:
    """'diffusers' (also ours), 'ldm', or None for an autoencoder state dict's keys (prefix already removed)."""
    keys = list(keys)
    if any(re.match(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.", key) for key in keys):
        return "diffusers"
    if any(re.match(r"(encoder|decoder)\.(down|up|mid|norm_out)\.", key) for key in keys):
        return "ldm"
    return None


# ---------------------------------------------------------------------------------------------
# Configs: ours <-> diffusers' config.json


def diffusers_config(model_config: ModelConfig, sample_size: int = 128) -> dict[str, Any]:
    """The config.json of diffusers' AutoencoderKL for a ModelConfig (sample_size: the training image size)."""
    if model_config.norm_eps != EXPORT_NORM_EPS:
        raise ValueError(f"norm_eps={model_config.norm_eps} cannot be exported: diffusers and LDM fix "
                         f"GroupNorm eps at {EXPORT_NORM_EPS}")
    from importlib.metadata import PackageNotFoundError, version

    levels = len(model_config.channel_multipliers)
    try:
        diffusers_version = version("diffusers")
    except PackageNotFoundError:  # not installed here: any recent version will do, diffusers only reports it
        diffusers_version = "0.30.0"
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": diffusers_version,
        "act_fn": "silu",
        "block_out_channels": [model_config.base_channels * m for m in model_config.channel_multipliers],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": True,  # SD's VAE overflows in float16; pipelines then decode in float32
        "in_channels": model_config.in_channels,
        "latent_channels": model_config.latent_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": model_config.layers_per_block,
        "mid_block_add_attention": model_config.mid_attention,
        "norm_num_groups": model_config.norm_num_groups,
        "out_channels": model_config.out_channels,
        "sample_size": int(sample_size),
        "scaling_factor": model_config.scaling_factor,
        "shift_factor": None,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_post_quant_conv": True,
        "use_quant_conv": True,
    }


def model_config_from_diffusers(values: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for diffusers' AutoencoderKL config.json values; raises on what our model cannot build."""
    name = values.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ValueError(f"config.json is for diffusers' {name}; only AutoencoderKL (SD-style KL autoencoders) converts")
    if values.get("act_fn", "silu") != "silu":
        raise ValueError(f"act_fn={values['act_fn']!r} is not supported: SD's autoencoder (and ours) uses silu")
    widths = list(values.get("block_out_channels", (64,)))
    for key, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(values.get(key, (expected,)))
        if any(t != expected for t in types) or len(types) != len(widths):
            raise ValueError(f"{key}={types}: only {len(widths)} x {expected} is supported")
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels={widths}: every width must be a multiple of the first")
    return ModelConfig(
        in_channels=int(values.get("in_channels", 3)),
        out_channels=int(values.get("out_channels", 3)),
        base_channels=base,
        channel_multipliers=tuple(w // base for w in widths),
        layers_per_block=int(values.get("layers_per_block", 1)),
        latent_channels=int(values.get("latent_channels", 4)),
        norm_num_groups=int(values.get("norm_num_groups", 32)),
        norm_eps=EXPORT_NORM_EPS,
        mid_attention=bool(values.get("mid_block_add_attention", True)),
        scaling_factor=float(values.get("scaling_factor", ModelConfig.scaling_factor)),
    )


def _is_our_config(values: Any) -> bool:
    return isinstance(values, dict) and ("model" in values or "base_channels" in values)


def _is_diffusers_config(values: Any) -> bool:
    return isinstance(values, dict) and ("block_out_channels" in values or "_class_name" in values)


# ---------------------------------------------------------------------------------------------
# Reading files


def _read_pickle(path: Path) -> Any:
    """torch.load with weights_only=True only: a pickle that would run code is refused with a clear error."""
    from vaehelpers.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(
            f"{error}. If the file comes from a source you trust, load the .safetensors release instead, "
            "or re-save just its tensors as .safetensors where you trust it"
        ) from error


def _read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(everything the file holds at top level or under 'state_dict', safetensors metadata) for one file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: unknown weights format; expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")
    values = _read_pickle(path)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: holds a {type(values).__name__}, not a dict of tensors")
    return values, {}


def _tensors_only(values: dict[str, Any]) -> StateDict:
    return {key: value for key, value in values.items() if isinstance(value, torch.Tensor)}


def _scalar(value: Any) -> float | None:
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else None


def _fill_identity_convs(state_dict: StateDict, values: dict[str, Any], notes: list[str]) -> StateDict:
    """diffusers configs may leave out quant_conv/post_quant_conv (use_quant_conv=False); ours always has
    them, so the missing ones become exact identities (weight I, bias 0): the outputs are unchanged."""
    state_dict = dict(state_dict)
    latent = int(values.get("latent_channels", 4))
    for flag, name, channels in (("use_quant_conv", "quant_conv", 2 * latent),
                                 ("use_post_quant_conv", "post_quant_conv", latent)):
        if values.get(flag, True) is False and f"{name}.weight" not in state_dict:
            state_dict[f"{name}.weight"] = torch.eye(channels).reshape(channels, channels, 1, 1)
            state_dict[f"{name}.bias"] = torch.zeros(channels)
            notes.append(f"{flag}=False: {name} filled in as an identity 1x1 conv (outputs unchanged)")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if values.get(key) is not None:
            notes.append(f"{key}={values[key]!r} is not kept: our config has only scaling_factor; "
                         "pipelines that need it must set it again")
    return state_dict


def check_weights(state_dict: StateDict, config: ModelConfig, source: str = "weights", ldm: bool = False) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped key unless `state_dict` fits `config` exactly.

    The check builds the model on the meta device: no memory, no initialisation. ldm=True adds the missing
    keys' LDM names to the report.
    """
    try:
        with torch.device("meta"):
            expected = AutoencoderKL(config).state_dict()
    except ValueError as error:
        raise ValueError(
            f"{source}: no model can be built for these weights ({error}); norm_num_groups cannot be read from "
            "weights: pass like=ModelConfig(norm_num_groups=...)"
        ) from error
    problems = state_dict_mismatch(expected, state_dict)
    missing = sorted(set(expected) - set(state_dict))
    if problems and ldm and missing:
        levels = len(config.channel_multipliers)
        problems += "\n  missing keys with their LDM names:\n    " + "\n    ".join(
            f"{key} (LDM: {diffusers_key_to_ldm(key, levels)})" for key in missing[:12])
    if problems:
        raise ValueError(f"{source}: {problems}")


def _infer(state_dict: StateDict, like: ModelConfig | None, source: str, ldm: bool) -> ModelConfig:
    """infer_config, with a report instead of a bare KeyError when the weights lack a key it needs."""
    try:
        return infer_config(state_dict, like)
    except (KeyError, ValueError, IndexError) as error:
        needed = error.args[0] if isinstance(error, KeyError) else error
        ldm_name = f" (LDM: {diffusers_key_to_ldm(str(needed), 0)})" if ldm and isinstance(error, KeyError) else ""
        raise ValueError(
            f"{source}: cannot tell the model's shape: missing key {needed}{ldm_name}; "
            f"the file holds {len(state_dict)} autoencoder tensors"
        ) from error


def _from_tensors(values: dict[str, Any], metadata: dict[str, str], source: str, like: ModelConfig | None,
                  config: ModelConfig | None = None) -> LoadedWeights:
    """Take the autoencoder out of a flat dict (bare, or under first_stage_model.), in our names, with its config."""
    tensors = _tensors_only(values)
    notes: list[str] = []
    prefix = next((p for p in LDM_PREFIXES if any(k.startswith(p) for k in tensors)), "")
    if prefix and any(key.startswith(VAE_ROOTS) for key in tensors) and prefix != "first_stage_model.":
        prefix = ""  # a bare autoencoder with an unrelated "vae." entry: the bare keys win
    wanted = (prefix,) if prefix else VAE_ROOTS
    taken = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(wanted)}
    skipped = sorted(key for key in tensors if not key.startswith(wanted))
    if skipped:
        where = f"outside {prefix!r}" if prefix else "outside encoder./decoder./quant_conv./post_quant_conv."
        notes.append(f"ignored {len(skipped)} tensors {where} (e.g. {', '.join(skipped[:3])}): not the autoencoder's")
    naming = detect_naming(taken)
    if naming is None:
        examples = ", ".join(sorted(tensors)[:5]) or "none"
        raise ValueError(f"{source}: no autoencoder weights found (first keys: {examples})")
    if naming == "ldm":
        taken = ldm_to_diffusers_keys(taken)
        notes.append(f"LDM key names{f' under {prefix!r}' if prefix else ''} converted to diffusers names")
    else:
        taken, legacy = _rename_legacy_attention(taken)
        if legacy:
            notes.append(f"{legacy} attention tensors renamed from diffusers' old names (query/key/value/proj_attn)")
    kind: Literal["vaehelpers", "diffusers", "ldm"] = "ldm" if naming == "ldm" else "diffusers"
    if config is None and metadata.get(METADATA_CONFIG):
        config = from_dict(ModelConfig, json.loads(metadata[METADATA_CONFIG]))  # written by to_ldm
        notes.append("model settings read from the file's vaehelpers metadata")
    if config is None:
        config = _infer(taken, like, source, ldm=naming == "ldm")
        scale = _scalar(values.get("scale_factor"))  # LDM's LatentDiffusion stores it when scale_by_std was on
        if scale is not None:
            config = dataclasses.replace(config, scaling_factor=scale)
        origin = "from the checkpoint" if scale is not None else "assumed"
        notes.append(f"model shape inferred from the tensors; norm_num_groups={config.norm_num_groups} and "
                     f"scaling_factor={config.scaling_factor} {origin}")
    check_weights(taken, config, source, ldm=naming == "ldm")
    return LoadedWeights(taken, config, kind, source, notes=notes)


def _load_file(path: Path, like: ModelConfig | None) -> LoadedWeights:
    values, metadata = _read_tensors(path)
    config: ModelConfig | None = None
    kind, config_from, sample_size = None, "", None
    if isinstance(values.get("state_dict"), dict):  # Lightning/LDM .ckpt: {"state_dict": ..., "global_step": ...}
        values = values["state_dict"]
    elif isinstance(values.get("model"), dict):  # our training checkpoint (checkpoints/last.pt)
        run_config = values.get("config")
        if isinstance(run_config, dict) and isinstance(run_config.get("model"), dict):
            config, kind, config_from = from_dict(ModelConfig, run_config["model"]), "vaehelpers", "the checkpoint"
            sample_size = run_config.get("data", {}).get("image_size")
        values = values["model"]
    beside = path.parent / CONFIG_NAME
    if config is None and beside.exists() and detect_naming(values) == "diffusers":
        settings = json.loads(beside.read_text())
        if _is_our_config(settings):
            config, kind, config_from = from_dict(ModelConfig, settings.get("model", settings)), "vaehelpers", str(beside)
            sample_size = settings.get("data", {}).get("image_size") if "model" in settings else None
        elif _is_diffusers_config(settings):
            config, kind, config_from = model_config_from_diffusers(settings), "diffusers", str(beside)
            sample_size = settings.get("sample_size")
    loaded = _from_tensors(values, metadata, str(path), like, config)
    if kind is not None:
        loaded.kind = kind
        loaded.notes.append(f"model settings from {config_from}")
    loaded.sample_size = sample_size
    return loaded


def _load_dir(path: Path, like: ModelConfig | None) -> LoadedWeights:
    config_path = path / CONFIG_NAME
    if not config_path.exists():
        if (path / "vae" / CONFIG_NAME).exists():  # a diffusers pipeline folder: its autoencoder is in vae/
            loaded = _load_dir(path / "vae", like)
            loaded.notes.append(f"{path} is a pipeline folder: its vae/ was used")
            return loaded
        raise FileNotFoundError(
            f"{path}: no {CONFIG_NAME}; expected a vaehelpers run directory (config.json + {WEIGHTS_NAME}), a diffusers "
            f"AutoencoderKL folder (config.json + {DIFFUSERS_WEIGHTS_NAME}) or a pipeline folder with vae/"
        )
    settings = json.loads(config_path.read_text())
    notes: list[str] = []
    if _is_our_config(settings):
        config = from_dict(ModelConfig, settings.get("model", settings))
        image_size = settings.get("data", {}).get("image_size") if "model" in settings else None
        weights = path / WEIGHTS_NAME
        if weights.exists():
            from safetensors.torch import load_file

            state_dict = load_file(str(weights))
        elif (path / "checkpoints" / "last.pt").exists():  # a run still training: its latest raw weights
            state_dict = _read_pickle(path / "checkpoints" / "last.pt")["model"]
            notes.append(f"no {WEIGHTS_NAME} yet: used checkpoints/last.pt (the raw weights, not the EMA)")
        else:
            raise FileNotFoundError(f"{path}: a vaehelpers run without weights "
                                    f"(no {WEIGHTS_NAME}, no checkpoints/last.pt)")
        check_weights(state_dict, config, str(path))
        return LoadedWeights(state_dict, config, "vaehelpers", str(path), sample_size=image_size, notes=notes)
    if not _is_diffusers_config(settings):
        raise ValueError(f"{config_path}: neither a vaehelpers config nor a diffusers AutoencoderKL config")
    config = model_config_from_diffusers(settings)
    weights = next((path / name for name in DIFFUSERS_WEIGHTS if (path / name).exists()), None)
    if weights is None:
        raise FileNotFoundError(f"{path}: a diffusers config.json but no weights "
                                f"(looked for {', '.join(DIFFUSERS_WEIGHTS)})")
    values, _ = _read_tensors(weights)
    state_dict, legacy = _rename_legacy_attention(_tensors_only(values))
    if legacy:
        notes.append(f"{legacy} attention tensors renamed from diffusers' old names (query/key/value/proj_attn)")
    state_dict = _fill_identity_convs(state_dict, settings, notes)
    if ".fp16." in weights.name:
        notes.append(f"only float16 weights ({weights.name}) were found; the model computes in float32")
    check_weights(state_dict, config, str(weights))
    return LoadedWeights(state_dict, config, "diffusers", str(path), sample_size=settings.get("sample_size"), notes=notes)


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub

_HUB_PATTERNS = {
    "safetensors": ["config.json", "diffusion_pytorch_model.safetensors", "vae/config.json",
                    "vae/diffusion_pytorch_model.safetensors"],
    "bin": ["config.json", "diffusion_pytorch_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.bin"],
}


def is_hub_id(src: str) -> bool:
    """'owner/name' that is not a weights file name: what load_source tries on the Hub when no such path exists."""
    return HUB_ID.fullmatch(src) is not None and not src.endswith((".safetensors", *PICKLE_SUFFIXES))


def download_from_hub(repo_id: str) -> Path:
    """Download a diffusers AutoencoderKL (or a pipeline's vae/) with huggingface_hub; returns the local folder."""
    advice = (f"Without network access (e.g. Kaggle with the internet off), download it where you have network, "
              f"e.g. `hf download {repo_id} --local-dir DIR` (add --include 'vae/*' for a pipeline), or attach it "
              "as a Kaggle dataset, then pass that folder's path instead of the Hub id")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise HubDownloadError(f"{repo_id!r} looks like a Hugging Face Hub id, but huggingface_hub is not installed "
                               f"(pip install huggingface_hub). {advice}") from error
    try:
        for patterns in _HUB_PATTERNS.values():  # safetensors first; the .bin only where there is none
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
            if any((folder / sub / name).exists() for sub in ("", "vae") for name in DIFFUSERS_WEIGHTS):
                return folder
    except Exception as error:  # offline, unknown or gated repo, ...: whatever huggingface_hub raises, say what to do
        reason = (str(error).strip().splitlines() or [""])[0]
        raise HubDownloadError(f"could not download {repo_id!r} from the Hugging Face Hub "
                               f"({type(error).__name__}: {reason}). {advice}") from error
    raise HubDownloadError(f"{repo_id!r} on the Hub has no diffusers AutoencoderKL weights (config.json + "
                           f"{DIFFUSERS_WEIGHTS_NAME}, at the top or in vae/)")


# ---------------------------------------------------------------------------------------------
# Loading, public


def load_source(src: str | Path, like: ModelConfig | None = None) -> LoadedWeights:
    """Read autoencoder weights from any supported source, detecting which it is:

    - a vaehelpers run directory (config.json {"model": ...} + model.safetensors, else checkpoints/last.pt)
    - a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors or .bin), or a
      pipeline folder with vae/
    - an LDM/SD file (.ckpt/.safetensors): a full SD checkpoint (keys under first_stage_model.; the UNet and
      text encoder are skipped) or an autoencoder alone with LDM keys (encoder.down.0.block.0.norm1.weight)
    - a .safetensors file with our (diffusers) key names, with its config.json beside it or none
    - a Hugging Face Hub id such as stabilityai/sd-vae-ft-mse (downloaded with huggingface_hub)

    like: the settings that weights cannot show (norm_num_groups, norm_eps, scaling_factor) for files
    without a config; default ModelConfig() (SD's values). The result's keys and shapes are checked
    strictly against its config; a mismatch raises a ValueError naming every missing or unexpected key.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return _load_dir(path, like)
    if path.is_file():
        return _load_file(path, like)
    if is_hub_id(str(src)):
        try:
            folder = download_from_hub(str(src))
        except HubDownloadError as error:  # it may have been meant as a local path: say that none exists
            raise HubDownloadError(f"{src}: no such local file or folder; as a Hub id: {error}") from error
        loaded = _load_dir(folder, like)
        loaded.source = f"hub:{src} ({folder})"
        return loaded
    raise FileNotFoundError(f"{src}: no such file or folder (nor a Hugging Face Hub id like stabilityai/sd-vae-ft-mse)")


def load_weights_from(src: str | Path, like: ModelConfig | None = None) -> tuple[StateDict, ModelConfig]:
    """(state dict in our key names, the ModelConfig it fits) for any source load_source reads.

    Use: model = AutoencoderKL(config); model.load_weights(state_dict).
    """
    loaded = load_source(src, like)
    return loaded.state_dict, loaded.config


def model_from(loaded: LoadedWeights) -> AutoencoderKL:
    """An AutoencoderKL (float32, CPU, eval mode) holding the loaded weights; built without a random init."""
    with torch.device("meta"):
        model = AutoencoderKL(loaded.config)
    model.load_state_dict(loaded.state_dict, strict=True, assign=True)  # keys were checked by load_source
    return model.float().eval()


def load_model(src: str | Path, like: ModelConfig | None = None) -> AutoencoderKL:
    """An AutoencoderKL from any source load_source reads, e.g. load_model("stabilityai/sd-vae-ft-mse")."""
    return model_from(load_source(src, like))


# ---------------------------------------------------------------------------------------------
# Writing


def _cpu_tensors(state_dict: StateDict) -> StateDict:
    return {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}


def to_diffusers(model: AutoencoderKL, dest: str | Path, *, sample_size: int | None = None) -> Path:
    """Write a folder that diffusers.AutoencoderKL.from_pretrained(dest) loads: config.json (with the model's
    scaling_factor) + diffusion_pytorch_model.safetensors. sample_size: the image size it was trained at
    (default 128; diffusers uses it as the tile size when tiling is on). Returns dest."""
    from safetensors.torch import save_file

    dest = Path(dest)
    settings = diffusers_config(model.config, sample_size or 128)  # raises before anything is written
    dest.mkdir(parents=True, exist_ok=True)
    save_file(_cpu_tensors(model.state_dict()), str(dest / DIFFUSERS_WEIGHTS_NAME), metadata={"format": "pt"})
    (dest / CONFIG_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return dest


def to_ldm(model: AutoencoderKL, dest: str | Path, *, prefix: str = "") -> Path:
    """Write the autoencoder with LDM key names (attention as 1x1 convs) to dest (.safetensors, or .ckpt as
    {"state_dict": ...}). prefix="first_stage_model." gives the names a full SD checkpoint uses. The
    .safetensors metadata keeps our ModelConfig, so that norm_num_groups and scaling_factor come back."""
    dest = Path(dest)
    if dest.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"{dest}: give a file name ending in .safetensors (or .ckpt)")
    if model.config.norm_eps != EXPORT_NORM_EPS:
        raise ValueError(f"norm_eps={model.config.norm_eps} cannot be exported: LDM fixes GroupNorm eps "
                         f"at {EXPORT_NORM_EPS}")
    tensors = {prefix + key: value for key, value in diffusers_to_ldm_keys(_cpu_tensors(model.state_dict())).items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(dest), metadata={"format": "pt", METADATA_CONFIG: json.dumps(to_dict(model.config))})
    else:
        from vaehelpers.checkpoint import save_checkpoint

        save_checkpoint({"state_dict": tensors}, dest)
    return dest


def to_run_dir(model: AutoencoderKL, dest: str | Path) -> Path:
    """Write a vaehelpers run-style directory (config.json {"model": ...} + model.safetensors) that
    AutoencoderKL.load(dest) reads. An existing config.json must hold the same model settings. Returns dest."""
    model.save(dest)
    return Path(dest)


def export(model: AutoencoderKL, dest: str | Path, to: Target, *, sample_size: int | None = None) -> Path:
    """to_diffusers, to_ldm or to_run_dir by name."""
    if to == "diffusers":
        return to_diffusers(model, dest, sample_size=sample_size)
    if to == "ldm":
        return to_ldm(model, dest)
    if to == "vaehelpers":
        return to_run_dir(model, dest)
    raise ValueError(f"unknown target {to!r}: choose one of {', '.join(TARGETS)}")


def convert(src: str | Path, dest: str | Path, to: Target, *, like: ModelConfig | None = None,
            sample_size: int | None = None) -> Path:
    """Read any source (see load_source) and write it as `to` (diffusers, ldm or vaehelpers) at dest.

    sample_size (diffusers only) defaults to the source's (its sample_size, or a run's image size).
    """
    loaded = load_source(src, like)
    return export(model_from(loaded), dest, to, sample_size=sample_size or loaded.sample_size)
