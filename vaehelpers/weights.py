"""Weights in and out: our run directories, diffusers folders, LDM/SD checkpoints and Hugging Face Hub ids.

Our AutoencoderKL uses diffusers' parameter names, so a diffusers folder is a rename-free copy; LDM/SD
checkpoints (CompVis latent-diffusion, the original Stable Diffusion .ckpt/.safetensors) name the same
tensors differently and store the mid-block attention as 1x1 convolutions. One table of rules (KEY_RULES)
renames keys both ways; it is ours, written from the two layouts; diffusers' own converter is only a test oracle.

    load(src) -> Weights            any source -> state dict in our names + the ModelConfig it fits
    export(model, dest, to)         a model -> a diffusers folder, an LDM file or a vaehelpers run directory

This module knows file formats, not the network: AutoencoderKL.load(src) = AutoencoderKL.from_weights(load(src)),
which checks every key and shape. Pickled files (.ckpt, .pt, .pth, .bin) are read only with
torch.load(weights_only=True): a file that would run code while loading is refused, never executed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from vaehelpers.config import NETWORK_TIMEOUT_S, ModelConfig, config_diff, from_dict, to_dict
from vaehelpers.rundir import (
    CHECKPOINT,
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    RunDir,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
    save_safetensors,
    write_config,
)

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


class Model(Protocol):
    """What export needs of a model (an AutoencoderKL): its config and its state dict."""

    config: ModelConfig

    def state_dict(self) -> dict[str, Any]: ...


class HubDownloadError(OSError):
    """A Hub id that could not be fetched (offline, unknown, gated); the message says what to do instead."""


@dataclass
class Weights:
    """Weights from any source, in our (diffusers) key names, with the ModelConfig they fit (not yet checked:
    AutoencoderKL.from_weights checks every key and shape)."""

    state_dict: StateDict
    config: ModelConfig
    kind: Literal["vaehelpers", "diffusers", "ldm"]  # the source's layout
    source: str  # what was read: a path, or "hub:owner/name (path)"
    sample_size: int | None = None  # image size the source was made for (diffusers sample_size, run image_size)
    notes: list[str] = field(default_factory=list)  # what was skipped or filled in, for the user


# ---------------------------------------------------------------------------------------------
# Key names: diffusers <-> LDM, from one table
#
# Each rule pairs an LDM name with the diffusers (our) name, under encoder./decoder.; {i} and {j} are indices
# copied as they are, {up} is a decoder level (LDM numbers them from the lowest resolution up, diffusers in the
# order they run: up = levels - 1 - i, its own inverse), {mid} is a mid-block ResNet (LDM counts from 1), and
# {rest} is the tail (weight, bias, conv1.weight, ...), where LDM's nin_shortcut is diffusers' conv_shortcut.
# The first rule that matches wins; a key no rule matches keeps its name (quant_conv, conv_in, ...).
# LDM's attention projections are (C, C, 1, 1) convs, diffusers' (C, C) linears (see rename_keys).

KEY_RULES: tuple[tuple[str, str], ...] = (
    # (LDM, diffusers)
    ("norm_out.{rest}", "conv_norm_out.{rest}"),
    ("down.{i}.block.{j}.{rest}", "down_blocks.{i}.resnets.{j}.{rest}"),
    ("down.{i}.downsample.{rest}", "down_blocks.{i}.downsamplers.0.{rest}"),
    ("up.{up}.block.{j}.{rest}", "up_blocks.{up}.resnets.{j}.{rest}"),
    ("up.{up}.upsample.{rest}", "up_blocks.{up}.upsamplers.0.{rest}"),
    ("mid.block_{mid}.{rest}", "mid_block.resnets.{mid}.{rest}"),
    ("mid.attn_1.norm.{rest}", "mid_block.attentions.0.group_norm.{rest}"),
    ("mid.attn_1.q.{rest}", "mid_block.attentions.0.to_q.{rest}"),
    ("mid.attn_1.k.{rest}", "mid_block.attentions.0.to_k.{rest}"),
    ("mid.attn_1.v.{rest}", "mid_block.attentions.0.to_v.{rest}"),
    ("mid.attn_1.proj_out.{rest}", "mid_block.attentions.0.to_out.0.{rest}"),
)
TAIL_NAMES = (("nin_shortcut", "conv_shortcut"),)  # (LDM, diffusers) inside {rest}
Naming = Literal["ldm", "diffusers"]


def _pattern(template: str) -> re.Pattern[str]:
    """A rule's side as a regex: {rest} takes the tail, any other field an index."""
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile(
        "".join(
            re.escape(part) if n % 2 == 0 else (f"(?P<{part}>.+)" if part == "rest" else f"(?P<{part}>\\d+)")
            for n, part in enumerate(parts)
        )
    )


_COMPILED = {
    "ldm": [(_pattern(ldm), diffusers) for ldm, diffusers in KEY_RULES],
    "diffusers": [(_pattern(diffusers), ldm) for ldm, diffusers in KEY_RULES],
}


def _index(name: str, value: int, levels: int, to: Naming) -> int:
    if name == "up":
        return levels - 1 - value
    if name == "mid":
        return value + 1 if to == "ldm" else value - 1
    return value


def rename_key(key: str, levels: int, to: Naming) -> str:
    """One key in `to`'s names (from the other naming); `levels` = the number of resolution levels.

    Keys that no rule matches pass unchanged.
    """
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key  # conv_in/out live under encoder/decoder; quant_conv and post_quant_conv keep their names
    source = "diffusers" if to == "ldm" else "ldm"
    for pattern, template in _COMPILED[source]:
        if m := pattern.fullmatch(rest):
            fields = {
                name: (value if name == "rest" else _index(name, int(value), levels, to))
                for name, value in m.groupdict().items()
            }
            for ldm_name, diffusers_name in TAIL_NAMES:
                old, new = (diffusers_name, ldm_name) if to == "ldm" else (ldm_name, diffusers_name)
                fields["rest"] = fields["rest"].replace(old, new)
            return f"{part}.{template.format(**fields)}"
    return key


def _is_attention_projection(key: str) -> bool:
    return re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", key) is not None


def rename_keys(state_dict: StateDict, to: Naming) -> StateDict:
    """An autoencoder state dict (no `first_stage_model.` prefix) in `to`'s names; unknown keys are kept.

    Attention projections become (C, C, 1, 1) convs for LDM and (C, C) linears for diffusers (an LDM file may
    store them as (C, C, 1, 1) or (C, C, 1)). Tensors are the same objects or views of them (no copy).
    """
    levels_pattern = {
        "ldm": (r"decoder\.up_blocks\.(\d+)\.", r"encoder\.down_blocks\.(\d+)\."),
        "diffusers": (r"decoder\.up\.(\d+)\.", r"encoder\.down\.(\d+)\."),
    }[to]
    levels = _levels(state_dict, levels_pattern[0]) or _levels(state_dict, levels_pattern[1])
    converted: StateDict = {}
    for key, tensor in state_dict.items():
        new_key = rename_key(key, levels, to)
        ours = key if to == "ldm" else new_key
        if _is_attention_projection(ours):
            if to == "ldm" and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # (C_out, C_in) -> (C_out, C_in, 1, 1)
            elif to == "diffusers" and tensor.ndim > 2 and all(size == 1 for size in tensor.shape[2:]):
                tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # (C_out, C_in, 1, 1) -> (C_out, C_in)
        converted[new_key] = tensor
    return converted


def _levels(keys: Any, pattern: str) -> int:
    """1 + the largest level index that `pattern` (one group) finds among the keys; 0 when none does."""
    found = [int(m.group(1)) for key in keys if (m := re.match(pattern, key))]
    return 1 + max(found) if found else 0


# diffusers before 0.14 named the attention layers differently; its loader still renames them
_LEGACY_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


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
        raise ValueError(
            f"norm_eps={model_config.norm_eps} cannot be exported: diffusers and LDM fix "
            f"GroupNorm eps at {EXPORT_NORM_EPS}"
        )
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
        # measured by `vaehelpers scale`; null when not. Pipelines that read them (SDXL-style) normalise latents as
        # (z - latents_mean) * scaling_factor / latents_std; SD 1.x/2.x pipelines use scaling_factor alone
        "latents_mean": list(model_config.latents_mean) or None,
        "latents_std": list(model_config.latents_std) or None,
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
        raise ValueError(
            f"config.json is for diffusers' {name}; only AutoencoderKL (SD-style KL autoencoders) converts"
        )
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
        latents_mean=_channel_values(values, "latents_mean"),
        latents_std=_channel_values(values, "latents_std"),
    )


def _channel_values(values: dict[str, Any], key: str) -> tuple[float, ...]:
    """diffusers' latents_mean / latents_std (null or one number per latent channel) as a tuple; () when null."""
    given = values.get(key)
    if given is None:
        return ()
    channels = int(values.get("latent_channels", 4))
    if not isinstance(given, (list, tuple)) or len(given) != channels:
        raise ValueError(f"config.json {key}={given!r}: expected null or {channels} numbers, one per latent channel")
    return tuple(float(v) for v in given)


def _is_our_config(values: Any) -> bool:
    return isinstance(values, dict) and ("model" in values or "base_channels" in values)


def _is_diffusers_config(values: Any) -> bool:
    return isinstance(values, dict) and ("block_out_channels" in values or "_class_name" in values)


# ---------------------------------------------------------------------------------------------
# Reading files


def _read_pickle(path: Path) -> Any:
    """torch.load with weights_only=True only: a pickle that would run code is refused with a clear error."""
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
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            return load_file(str(path)), metadata
        except SafetensorError as error:  # truncated, or not safetensors at all: one line, not a traceback
            raise ValueError(f"{path}: not a readable .safetensors file ({error})") from error
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path}: unknown weights format; expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}"
        )
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
    for flag, name, channels in (
        ("use_quant_conv", "quant_conv", 2 * latent),
        ("use_post_quant_conv", "post_quant_conv", latent),
    ):
        if values.get(flag, True) is False and f"{name}.weight" not in state_dict:
            state_dict[f"{name}.weight"] = torch.eye(channels).reshape(channels, channels, 1, 1)
            state_dict[f"{name}.bias"] = torch.zeros(channels)
            notes.append(f"{flag}=False: {name} filled in as an identity 1x1 conv (outputs unchanged)")
    if values.get("shift_factor") is not None:
        notes.append(
            f"shift_factor={values['shift_factor']!r} is not kept: our config has scaling_factor and "
            "per-channel latents_mean/latents_std; pipelines that need it must set it again"
        )
    return state_dict


def ldm_names(keys: list[str], levels: int) -> str:
    """'key (LDM: name)' lines for a report about weights that came with LDM names."""
    return "\n    ".join(f"{key} (LDM: {rename_key(key, levels, 'ldm')})" for key in keys)


def _infer(state_dict: StateDict, like: ModelConfig | None, source: str, ldm: bool) -> ModelConfig:
    """infer_config, with a report instead of a bare KeyError when the weights lack a key it needs."""
    try:
        return infer_config(state_dict, like)
    except (KeyError, ValueError, IndexError) as error:
        needed = error.args[0] if isinstance(error, KeyError) else error
        ldm_name = f" (LDM: {rename_key(str(needed), 0, 'ldm')})" if ldm and isinstance(error, KeyError) else ""
        raise ValueError(
            f"{source}: cannot tell the model's shape: missing key {needed}{ldm_name}; "
            f"the file holds {len(state_dict)} autoencoder tensors"
        ) from error


def _from_tensors(
    values: dict[str, Any],
    metadata: dict[str, str],
    source: str,
    like: ModelConfig | None,
    config: ModelConfig | None = None,
) -> Weights:
    """Take the autoencoder out of a flat dict (bare, or under first_stage_model.), in our names, with its config."""
    tensors = _tensors_only(values)
    notes: list[str] = []
    prefix = next((p for p in LDM_PREFIXES if any(k.startswith(p) for k in tensors)), "")
    if prefix and any(key.startswith(VAE_ROOTS) for key in tensors) and prefix != "first_stage_model.":
        prefix = ""  # a bare autoencoder with an unrelated "vae." entry: the bare keys win
    wanted = (prefix,) if prefix else VAE_ROOTS
    taken = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(wanted)}
    skipped = sorted(key for key in tensors if not key.startswith(wanted))
    if skipped:
        where = f"outside {prefix!r}" if prefix else "outside encoder./decoder./quant_conv./post_quant_conv."
        notes.append(f"ignored {len(skipped)} tensors {where} (e.g. {', '.join(skipped[:3])}): not the autoencoder's")
    naming = detect_naming(taken)
    if naming is None:
        examples = ", ".join(sorted(tensors)[:5]) or "none"
        raise ValueError(f"{source}: no autoencoder weights found (first keys: {examples})")
    if naming == "ldm":
        taken = rename_keys(taken, "diffusers")
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
        notes.append(
            f"model shape inferred from the tensors; norm_num_groups={config.norm_num_groups} and "
            f"scaling_factor={config.scaling_factor} {origin}"
        )
    return Weights(taken, config, kind, source, notes=notes)


def _load_file(path: Path, like: ModelConfig | None) -> Weights:
    values, metadata = _read_tensors(path)
    config: ModelConfig | None = None
    kind, config_from, sample_size = None, "", None
    if isinstance(values.get("state_dict"), dict):  # Lightning/LDM .ckpt: {"state_dict": ..., "global_step": ...}
        values = values["state_dict"]
    elif isinstance(values.get(CHECKPOINT.model), dict):  # our training checkpoint (checkpoints/last.pt)
        run_config = values.get(CHECKPOINT.config)
        if isinstance(run_config, dict) and isinstance(run_config.get("model"), dict):
            config, kind, config_from = from_dict(ModelConfig, run_config["model"]), "vaehelpers", "the checkpoint"
            sample_size = run_config.get("data", {}).get("image_size")
        values = values[CHECKPOINT.model]
    beside = path.parent / CONFIG_NAME
    if config is None and beside.exists() and detect_naming(values) == "diffusers":
        settings = json.loads(beside.read_text())
        if _is_our_config(settings):
            config, kind, config_from = (
                from_dict(ModelConfig, settings.get("model", settings)),
                "vaehelpers",
                str(beside),
            )
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


def _load_dir(path: Path, like: ModelConfig | None) -> Weights:
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
        elif RunDir(path).checkpoint.exists():  # a run still training: its latest raw weights
            state_dict = _read_pickle(RunDir(path).checkpoint)[CHECKPOINT.model]
            notes.append(f"no {WEIGHTS_NAME} yet: used checkpoints/last.pt (the raw weights, not the EMA)")
        else:
            raise FileNotFoundError(
                f"{path}: a vaehelpers run without weights (no {WEIGHTS_NAME}, no checkpoints/last.pt)"
            )
        return Weights(state_dict, config, "vaehelpers", str(path), sample_size=image_size, notes=notes)
    if not _is_diffusers_config(settings):
        raise ValueError(f"{config_path}: neither a vaehelpers config nor a diffusers AutoencoderKL config")
    config = model_config_from_diffusers(settings)
    weights = next((path / name for name in DIFFUSERS_WEIGHTS if (path / name).exists()), None)
    if weights is None:
        raise FileNotFoundError(
            f"{path}: a diffusers config.json but no weights (looked for {', '.join(DIFFUSERS_WEIGHTS)})"
        )
    values, _ = _read_tensors(weights)
    state_dict, legacy = _rename_legacy_attention(_tensors_only(values))
    if legacy:
        notes.append(f"{legacy} attention tensors renamed from diffusers' old names (query/key/value/proj_attn)")
    state_dict = _fill_identity_convs(state_dict, settings, notes)
    if ".fp16." in weights.name:
        notes.append(f"only float16 weights ({weights.name}) were found; the model computes in float32")
    return Weights(state_dict, config, "diffusers", str(path), sample_size=settings.get("sample_size"), notes=notes)


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub

_HUB_PATTERNS = {
    "safetensors": [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ],
    "bin": ["config.json", "diffusion_pytorch_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.bin"],
}


def is_hub_id(src: str) -> bool:
    """'owner/name' that is not a weights file name: what load tries on the Hub when no such path exists."""
    return HUB_ID.fullmatch(src) is not None and not src.endswith((".safetensors", *PICKLE_SUFFIXES))


def download_from_hub(repo_id: str, *, timeout_s: float | None = None) -> Path:
    """Download a diffusers AutoencoderKL (or a pipeline's vae/) with huggingface_hub; returns the local folder.

    timeout_s (default NETWORK_TIMEOUT_S): the most seconds each request waits to connect and for each read; a
    stalled connection raises HubDownloadError instead of hanging.
    """
    advice = (
        f"Without network access (e.g. Kaggle with the internet off), download it where you have network, "
        f"e.g. `hf download {repo_id} --local-dir DIR` (add --include 'vae/*' for a pipeline), or attach it "
        "as a Kaggle dataset, then pass that folder's path instead of the Hub id"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise HubDownloadError(
            f"{repo_id!r} looks like a Hugging Face Hub id, but huggingface_hub is not installed "
            f"(pip install huggingface_hub). {advice}"
        ) from error
    try:
        for patterns in _HUB_PATTERNS.values():  # safetensors first; the .bin only where there is none
            with _hub_timeouts(timeout_s or NETWORK_TIMEOUT_S):
                folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
            if any((folder / sub / name).exists() for sub in ("", "vae") for name in DIFFUSERS_WEIGHTS):
                return folder
    except Exception as error:  # offline, unknown or gated repo, ...: whatever huggingface_hub raises, say what to do
        reason = (str(error).strip().splitlines() or [""])[0]
        raise HubDownloadError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: {reason}). {advice}"
        ) from error
    raise HubDownloadError(
        f"{repo_id!r} on the Hub has no diffusers AutoencoderKL weights (config.json + "
        f"{DIFFUSERS_WEIGHTS_NAME}, at the top or in vae/)"
    )


@contextlib.contextmanager
def _hub_timeouts(seconds: float) -> Iterator[None]:
    """Give every huggingface_hub request made meanwhile a connect and read timeout of `seconds`.

    huggingface_hub's shared httpx client has none, and its repo_info call (the first of snapshot_download) passes
    timeout=None, which would override a client default: so a request hook sets each request's own timeout.
    """
    import huggingface_hub
    from huggingface_hub.utils import _http

    previous = _http._GLOBAL_CLIENT_FACTORY  # the user's own factory where one was set; restored below

    def limit(request: Any) -> None:
        request.extensions["timeout"] = {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}

    def factory() -> Any:
        client = previous()
        client.event_hooks["request"] = [*client.event_hooks["request"], limit]
        return client

    huggingface_hub.set_client_factory(factory)
    try:
        yield
    finally:
        huggingface_hub.set_client_factory(previous)


# ---------------------------------------------------------------------------------------------
# Loading, public


def load(src: str | Path, like: ModelConfig | None = None) -> Weights:
    """Read autoencoder weights from any supported source, detecting which it is:

    - a vaehelpers run directory (config.json {"model": ...} + model.safetensors, else checkpoints/last.pt)
    - a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors or .bin), or a
      pipeline folder with vae/
    - an LDM/SD file (.ckpt/.safetensors): a full SD checkpoint (keys under first_stage_model.; the UNet and
      text encoder are skipped) or an autoencoder alone with LDM keys (encoder.down.0.block.0.norm1.weight)
    - a .safetensors file with our (diffusers) key names, with its config.json beside it or none
    - a Hugging Face Hub id such as stabilityai/sd-vae-ft-mse (downloaded with huggingface_hub)

    like: the settings that weights cannot show (norm_num_groups, norm_eps, scaling_factor) for files
    without a config; default ModelConfig() (SD's values). AutoencoderKL.from_weights(result) checks the keys
    and shapes strictly; a mismatch raises a ValueError naming every missing or unexpected key.
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


# ---------------------------------------------------------------------------------------------
# Writing


def _cpu_tensors(state_dict: StateDict) -> StateDict:
    return {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}


def _write_diffusers(model: Model, dest: Path, sample_size: int | None) -> Path:
    """A folder that diffusers.AutoencoderKL.from_pretrained(dest) loads: config.json (with the model's
    scaling_factor, and latents_mean/latents_std where measured) + diffusion_pytorch_model.safetensors.
    sample_size: the image size it was trained at (default 128; diffusers uses it as the tile size when tiling is on)."""
    settings = diffusers_config(model.config, sample_size or 128)  # raises before anything is written
    dest.mkdir(parents=True, exist_ok=True)
    save_safetensors(_cpu_tensors(model.state_dict()), dest / DIFFUSERS_WEIGHTS_NAME, metadata={"format": "pt"})
    # diffusers' own config.json (not a vaehelpers run's): diffusers writes it with sorted keys
    text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    atomic_write(dest / CONFIG_NAME, lambda tmp: tmp.write_text(text))
    return dest


def _write_ldm(model: Model, dest: Path, prefix: str = "") -> Path:
    """The autoencoder with LDM key names (attention as 1x1 convs) in dest (.safetensors, or .ckpt as
    {"state_dict": ...}). prefix="first_stage_model." gives the names a full SD checkpoint uses. The
    .safetensors metadata keeps our ModelConfig, so that norm_num_groups and scaling_factor come back."""
    if dest.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"{dest}: give a file name ending in .safetensors (or .ckpt)")
    if model.config.norm_eps != EXPORT_NORM_EPS:
        raise ValueError(
            f"norm_eps={model.config.norm_eps} cannot be exported: LDM fixes GroupNorm eps at {EXPORT_NORM_EPS}"
        )
    tensors = {prefix + key: value for key, value in rename_keys(_cpu_tensors(model.state_dict()), "ldm").items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.suffix == ".safetensors":
        save_safetensors(tensors, dest, metadata={"format": "pt", METADATA_CONFIG: json.dumps(to_dict(model.config))})
    else:
        save_checkpoint({"state_dict": tensors}, dest)
    return dest


def _write_run_dir(model: Model, dest: Path) -> None:
    """dest/model.safetensors and, if missing, dest/config.json as {"model": ModelConfig}.

    An existing config.json with a "model" key (a training run's config) is left as it is; its model settings
    must equal this model's, else a ValueError is raised before anything is written (a later load would
    otherwise build the wrong model). An existing bare ModelConfig dict is rewritten in the {"model": ...} form.
    """
    run = RunDir(dest)
    existing = json.loads(run.config.read_text()) if run.config.exists() else None
    keep_config = isinstance(existing, dict) and "model" in existing
    if keep_config:
        saved = from_dict(ModelConfig, existing["model"])
        if saved != model.config:
            raise ValueError(
                f"{run.config} holds different model settings ({config_diff(saved, model.config)}); "
                "update its 'model' entry before saving"
            )
    elif existing is not None:
        from_dict(ModelConfig, existing)  # raises unless it is a bare model config
    run.root.mkdir(parents=True, exist_ok=True)
    save_safetensors(_cpu_tensors(model.state_dict()), run.weights, metadata={"format": "pt"})
    if not keep_config:
        write_config(run.root, {"model": to_dict(model.config)})


def export(model: Model, dest: str | Path, to: Target, *, sample_size: int | None = None) -> Path:
    """Write `model` (an AutoencoderKL) as `to` at dest; returns what was written.

    diffusers: a folder for diffusers.AutoencoderKL.from_pretrained (sample_size: the training image size,
    default 128); ldm: a .safetensors (or .ckpt) file with LDM key names; vaehelpers: a run-style directory
    (config.json {"model": ...} + model.safetensors) that AutoencoderKL.load reads.
    """
    dest = Path(dest)
    if to == "diffusers":
        return _write_diffusers(model, dest, sample_size)
    if to == "ldm":
        return _write_ldm(model, dest)
    if to == "vaehelpers":
        _write_run_dir(model, dest)
        return dest
    raise ValueError(f"unknown target {to!r}: choose one of {', '.join(TARGETS)}")


# ---------------------------------------------------------------------------------------------
# Shapes from tensors


def infer_config(state_dict: StateDict, like: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig whose shapes a diffusers-named state dict has; fields the weights cannot show
    (norm_num_groups, norm_eps, scaling_factor) are taken from `like` (default: ModelConfig())."""
    like = ModelConfig() if like is None else like
    conv_in = state_dict["encoder.conv_in.weight"]  # (base, C_in, 3, 3)
    base = conv_in.shape[0]
    levels = 1 + max(int(key.split(".")[2]) for key in state_dict if key.startswith("encoder.down_blocks."))
    multipliers = tuple(
        state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] // base for i in range(levels)
    )
    layers = 1 + max(int(key.split(".")[4]) for key in state_dict if key.startswith("encoder.down_blocks.0.resnets."))
    return dataclasses.replace(
        like,
        in_channels=conv_in.shape[1],
        out_channels=state_dict["decoder.conv_out.weight"].shape[0],
        base_channels=base,
        channel_multipliers=multipliers,
        layers_per_block=layers,
        latent_channels=state_dict["post_quant_conv.weight"].shape[0],
        mid_attention=any(".mid_block.attentions." in key for key in state_dict),
    )
