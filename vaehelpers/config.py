"""Every default in one place: the settings dataclasses, named presets and recipes, and the reference and smoke runs.

Other modules (cli.py, notebook.py, demo.py) read their defaults and choices from here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Reconstruction = Literal["l1", "l2", "bce", "l1+l2"]


def setting(
    default: Any = MISSING,
    *,
    default_factory: Callable[[], Any] | Any = MISSING,
    help: str = "",
    flag: bool | str = False,
    resumable: bool = False,
    notebook: bool = False,
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
) -> Any:
    """A config field that carries what the rest of vaehelpers needs to know about it (see `settings_of`).

    flag: True gives `train` the flag --<field-name> (underscores as dashes); a string names it (init_from: "init").
    resumable: `train --resume` may change it (anything else must match the run's config.json).
    notebook: the notebooks take it as a papermill parameter (None there: the recipe's or the scale's value).
    choices: the flag's choices (a callable: names defined further down this file); a Literal type gives its own.
    """
    metadata = {"help": help, "flag": flag, "resumable": resumable, "notebook": notebook, "choices": choices}
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class ModelConfig:
    """Shape of the KL autoencoder; defaults are Stable Diffusion's KL-f8 (diffusers AutoencoderKL)."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128  # width of the first level; SD: 128
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)  # one per level; len-1 downsamples (f = 2**(len-1))
    layers_per_block: int = 2  # ResNet blocks per encoder level (decoder has one more, as in SD)
    latent_channels: int = 4
    norm_num_groups: int = 32  # GroupNorm groups; must divide every width
    norm_eps: float = 1e-6  # SD/diffusers value
    mid_attention: bool = True  # self-attention in the mid block
    # SD's latent scale (LDM paper, sec. 4.3.2 / scale_by_std); replaced by a measured one. Measured after training
    # by `vaehelpers scale`, so a resume keeps config.json's value
    scaling_factor: float = setting(0.18215, resumable=True)
    # per-channel mean and std of the latents, measured by `vaehelpers scale` (diffusers' AutoencoderKL config fields
    # latents_mean / latents_std, as newer VAEs ship them); empty: not measured
    latents_mean: tuple[float, ...] = setting((), resumable=True)
    latents_std: tuple[float, ...] = setting((), resumable=True)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # a few hundred thousand parameters: tests and the demo
    "tiny": ModelConfig(base_channels=16, channel_multipliers=(1, 2, 2, 2), layers_per_block=1, norm_num_groups=8),
    # base width 32: about 5.2 M parameters, the CPU-scale model
    "small": ModelConfig(base_channels=32),
    # the Stable Diffusion KL-f8 autoencoder, 83,653,863 parameters
    "sd": ModelConfig(),
}


@dataclass
class DataConfig:
    """Where images come from and how they are prepared."""

    # a location, not a setting: a resume may read the same images from elsewhere
    data_dir: str = setting("", resumable=True)
    image_size: int = setting(128, help="square side in pixels, a multiple of 8", flag=True, notebook=True)
    resize: Literal["crop", "squash"] = "crop"  # crop: shorter side to S then crop; squash: straight to SxS (seed)
    test_fraction: float = 0.1  # share of files the path hash puts in `test`
    # keep a uint8 cache of decoded images under data_dir/.vaehelpers_cache (or cache_dir)
    cache: bool = setting(True, resumable=True)
    cache_dir: str = setting("", resumable=True)  # empty: beside the data
    num_workers: int = setting(
        0, help="DataLoader workers (0: load in the training process)", flag=True, resumable=True
    )
    # processes decoding images into the cache on its first build (imagecache.py); 0: every core
    cache_workers: int = setting(0, resumable=True)


@dataclass
class LossConfig:
    """Weights of the loss terms; see losses.py."""

    reconstruction: Reconstruction = setting("l1", help="the pixel loss", flag=True)
    reconstruction_weight: float = 1.0
    # how reconstruction + perceptual are reduced: mean over pixels, or (ldm) the per-sample sum over (C, H, W)
    # then the batch mean, as latent-diffusion's contperceptual.py does (nll_loss = sum(nll_loss) / B). It sets
    # what kl_weight means: the KL is always a per-sample sum, so 1e-6 weighs it 3*H*W times less with "sum"
    nll_reduction: Literal["mean", "sum"] = "mean"
    perceptual: Literal["lpips", "vgg"] = "lpips"  # lpips: VGG + published linear weights; vgg: seed's relu3_3 MSE
    perceptual_weight: float = setting(
        0.0,
        help="weight of the perceptual term (LPIPS; seed recipe: VGG relu3_3); 0 turns it off (no VGG16 weights needed)",
        flag=True,
        notebook=True,
    )
    kl_weight: float = setting(1e-6, help="weight of the KL term (LDM kl-f8: 1e-6)", flag=True)
    kl_reduction: Literal["sum", "seed"] = "sum"  # sum: per-sample sum, batch mean; seed: channel sum, mean over rest
    kl_warmup_epochs: float = 0.0  # linear ramp of the KL weight from 0 over this many epochs (seed: 20)
    batch_scaled_reconstruction: bool = False  # seed: divide the (mean) BCE by the batch size
    seed_scale: float = 1.0  # seed: 500 times (reconstruction + perceptual)
    disc_weight: float = 0.0  # PatchGAN weight; 0 turns it off
    disc_start: int = 50001  # optimiser step at which the GAN term starts (LDM)
    disc_lr: float = 0.0  # 0: same as the autoencoder


@dataclass
class TrainConfig:
    """One training run; everything here is saved with every checkpoint.

    TrainConfig() is the `sd` preset with the `pixel` recipe (its `model` is ModelConfig(), SD's shape);
    build_config(preset, recipe) gives any other combination.
    """

    run_dir: str = setting("runs/default", resumable=True)  # a location: the folder may move between sessions
    # names `model` (build_config keeps them in step); "custom" for weights of another shape
    preset: str = setting(
        "sd", help="model size (default of a new run: tiny)", flag=True, notebook=True, choices=lambda: PRESETS
    )
    # the recipe these settings started from (RECIPES); the field defaults are `pixel`
    recipe: str = setting(
        "pixel",
        help="ldm (default): latent-diffusion's kl-f8 loss, needs VGG16 weights; pixel: L1 + KL, no "
        "pretrained files; seed: the original project's; default: old name of pixel. --resume keeps the run's own",
        flag=True,
        notebook=True,
        choices=lambda: RECIPE_CHOICES,
    )
    epochs: int = setting(600, help="passes over the train split", flag=True, resumable=True, notebook=True)
    max_steps: int = setting(
        0, help="stop after this many optimiser steps (0: no limit)", flag=True, resumable=True, notebook=True
    )
    max_minutes: float = setting(
        0.0,
        help="checkpoint and stop before this many minutes of training (0: no limit)",
        flag=True,
        resumable=True,
        notebook=True,
    )
    batch_size: int = setting(16, help="images per optimiser step, over all processes", flag=True, notebook=True)
    # pixel recipe: chosen by the CPU study on `tiny` (results/quality.md); sd: 2e-4, see below
    lr: float = setting(2e-3, help="learning rate (default: the recipe's)", flag=True, notebook=True)
    # > 0: lr = lr_per_image x batch_size (the global batch), LDM's --scale_lr; an lr given explicitly wins
    lr_per_image: float = 0.0
    optimizer: Literal["adam", "adamw"] = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear learning-rate warm-up
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 0.0  # max grad norm; 0 off (clipping at 1.0 did not pay in the study)
    ema_decay: float = setting(0.0, help="decay of an EMA of the weights (0: off; e.g. 0.999)", flag=True)
    checkpoint_every: int = setting(500, help="optimiser steps between checkpoints", flag=True, resumable=True)
    log_every: int = setting(1, resumable=True)  # steps between log.csv rows
    max_bad_steps: int = setting(20, resumable=True)  # non-finite losses in a row before the run stops
    # fp16 headroom (headroom.py): optimiser steps between measurements of each block's peak |activation| (0: never;
    # an fp16 forward that overflows is caught, its block moved to fp32 and the step redone either way)
    headroom_every: int = setting(100, resumable=True)  # when headroom is measured, not what the run is
    # the fraction of fp16's 65504 at which a block moves to fp32: 0.25 = within 4x of overflow
    headroom_threshold: float = setting(0.25, resumable=True)
    # measure headroom in bf16 and fp32 runs too (e.g. a bf16-trained model bound for a T4); blocks move to fp32
    # in fp16 runs only
    headroom_any_precision: bool = setting(False, resumable=True)
    seed: int = setting(0, help="seeds the weights, the data order and the posterior samples", flag=True)
    # start from these weights (run dir, diffusers folder, LDM/SD file, Hub id); see weights.py
    init_from: str = setting(
        "", help="fine-tune from weights: a run dir, diffusers folder, LDM/SD file or Hub id", flag="init"
    )
    # train only the decoder (as SD's ft-MSE VAE did)
    freeze_encoder: bool = setting(False, help="train only the decoder", flag=True)
    # decode a posterior sample, as LDM/SD trained; False: the posterior mean (deterministic: e.g. to check that
    # N processes train exactly like one, since each rank draws its own sampling noise)
    sample_posterior: bool = True
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N", flag=True, resumable=True, notebook=True)
    precision: Precision = setting(
        "auto",
        help="auto: bf16 on GPUs of compute capability 8.0+ (A100, L4, H100), fp16 below (T4, V100, P100), bf16 on "
        "CPUs with native bf16, else fp32",
        flag=True,
        resumable=True,
    )
    # TF32 tensor cores for fp32 matmuls/convolutions on CUDA sm_80+ (off for exactness checks)
    tf32: bool = setting(True, resumable=True)
    # torch.compile the training forward: a GPU option (on a CPU, compiling takes minutes)
    compile: bool = setting(
        False,
        help="torch.compile the training forward (a GPU option; it compiles for minutes first)",
        flag=True,
        resumable=True,
    )
    # a folder holding pretrained files (VGG16 for LPIPS, ...), searched before the torch hub cache; see pretrained.py.
    # Empty: $VAEHELPERS_WEIGHTS if set. A location, not a setting: it may change when a run is resumed
    weights_dir: str = setting(
        "",
        help="folder holding pretrained files (else $VAEHELPERS_WEIGHTS, then the torch hub cache); see "
        "`vaehelpers weights status`",
        flag=True,
        resumable=True,
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)


RECIPES: dict[str, dict[str, Any]] = {
    # latent-diffusion's kl-f8 autoencoder (the SD VAE), CompVis/latent-diffusion @a506df5:
    # - configs/autoencoder/autoencoder_kl_32x32x4.yaml: base_learning_rate 4.5e-6; lossconfig
    #   LPIPSWithDiscriminator with disc_start 50001, kl_weight 0.000001, disc_weight 0.5.
    # - main.py (--scale_lr, on by default): lr = accumulate_grad_batches * ngpu * batch_size * base_lr, i.e.
    #   4.5e-6 x the global batch (the YAML's 12 per GPU x accumulate 2 x GPUs). Here: x batch_size, global.
    # - ldm/modules/losses/contperceptual.py LPIPSWithDiscriminator defaults: pixelloss_weight 1.0,
    #   perceptual_weight 1.0 (LPIPS, taming's VGG16 + v0.1 linear layers), disc_factor 1.0, disc_num_layers 3,
    #   disc_loss "hinge"; rec = |x - x'| + 1.0 * LPIPS, nll = sum(rec) / B and KL = sum(kl) / B; the GAN
    #   term d_weight * g_loss with the adaptive d_weight from global_step >= disc_start (adopt_weight).
    #   Its learnable logvar (init 0) is in no optimiser (models/autoencoder.py configure_optimizers lists
    #   encoder, decoder, quant_conv, post_quant_conv), so it stays 0 and nll = rec: left out here.
    # - ldm/models/autoencoder.py configure_optimizers: Adam, betas (0.5, 0.9), the same lr for the
    #   discriminator; no weight decay, no schedule, no clipping, no EMA; training decodes a posterior sample.
    "ldm": {
        "optimizer": "adam",
        "betas": (0.5, 0.9),
        "weight_decay": 0.0,
        "lr_per_image": 4.5e-6,
        "schedule": "constant",
        "warmup_steps": 0,
        "grad_clip": 0.0,
        "ema_decay": 0.0,
        "sample_posterior": True,
        "loss.reconstruction": "l1",
        "loss.reconstruction_weight": 1.0,
        "loss.nll_reduction": "sum",
        "loss.perceptual": "lpips",
        "loss.perceptual_weight": 1.0,
        "loss.kl_weight": 1e-6,
        "loss.kl_reduction": "sum",
        "loss.kl_warmup_epochs": 0.0,
        "loss.disc_weight": 0.5,
        "loss.disc_start": 50001,
        "loss.disc_lr": 0.0,
    },
    # = the TrainConfig defaults: AdamW (no weight decay) lr 2e-3 constant, L1 + 1e-6 KL, no EMA, no pretrained
    # file needed; it beat the seed recipe by 2.9 dB PSNR (mean of 2 seeds) at equal images seen on held-out
    # BSDS500 photos (results/quality.md; measured with the tiny preset at 64 px on CPU, as `default`)
    "pixel": {},
    # The original project's loss and optimiser (DESIGN.md): 500*(BCE/B + 0.1*VGG relu3_3 MSE)
    # + min(1, epoch/20) * KL (channel sum, mean over the rest), Adam lr 1e-3, batch 16, squash resize.
    "seed": {
        "optimizer": "adam",
        "lr": 1e-3,
        "batch_size": 16,
        "grad_clip": 0.0,
        "ema_decay": 0.0,
        "warmup_steps": 0,
        "schedule": "constant",
        "data.resize": "squash",
        "loss.reconstruction": "bce",
        "loss.batch_scaled_reconstruction": True,
        "loss.seed_scale": 500.0,
        "loss.perceptual": "vgg",
        "loss.perceptual_weight": 0.1,
        "loss.kl_weight": 1.0,
        "loss.kl_reduction": "seed",
        "loss.kl_warmup_epochs": 20.0,
        "loss.disc_weight": 0.0,
    },
}
# A recipe's settings that depend on the model's size. The pixel recipe's lr of 2e-3 was chosen on `tiny`; on `sd`
# it blew the KL term up to 2e7 in the third step and ended 2.2 dB behind 2e-4, the best of 2e-3, 5e-4, 2e-4 and
# 5e-5 (80 steps of 4 images at 64 px on CPU; results/quality.md, "The learning rate at sd scale").
PRESET_RECIPE_SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
    ("sd", "pixel"): {"lr": 2e-4},
}
DEFAULT_RECIPE = "ldm"  # of `vaehelpers train` and build_config (the reference run's is REFERENCE_RUN["recipe"])
RECIPE_ALIASES = {"default": "pixel"}  # deprecated names -> today's (old commands and run directories still work)


def canonical_recipe(name: str, *, notice: bool = True) -> str:
    """A recipe name with deprecated aliases resolved; prints a one-line notice (to stderr) for an alias."""
    if name in RECIPE_ALIASES:
        if notice:
            print(
                f"note: recipe {name!r} is deprecated, it is now called {RECIPE_ALIASES[name]!r} (same settings)",
                file=sys.stderr,
            )
        return RECIPE_ALIASES[name]
    return name


def recipe_settings(name: str) -> dict[str, Any]:
    """Overrides that a named recipe applies to TrainConfig (nested keys as "loss.kl_weight")."""
    name = canonical_recipe(name, notice=False)
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose {', '.join(RECIPES)}")
    return dict(RECIPES[name])


# ---------------------------------------------------------------------------------------------
# Choices and the runs everybody shares (the CLI's flags, the notebooks' parameters, `make demo`)

PRESETS = tuple(MODEL_PRESETS)  # tiny, small, sd
PRECISIONS = get_args(Precision)  # auto, fp32, bf16, fp16
RECONSTRUCTIONS = get_args(Reconstruction)
RECIPE_CHOICES = (*RECIPES, *RECIPE_ALIASES)  # the CLI's --recipe: today's names, then the deprecated ones
DEFAULT_PRESET = "tiny"  # `vaehelpers train` without --preset: minutes on a CPU
INFO_PRESET = "sd"  # `vaehelpers info` without --preset

# The reference run: flickr8k, the Stable Diffusion KL-f8 model at 128 px, 600 epochs, stopping (with a
# checkpoint) before Kaggle's 12-hour session limit. The notebooks' values (notebook.settings); a notebook setting
# of TrainConfig that is not named here (batch_size, lr, perceptual_weight, ...) is the recipe's.
REFERENCE_RUN: dict[str, Any] = {
    "data_source": "flickr8k",
    "image_size": 128,
    "preset": "sd",
    "recipe": "ldm",
    "epochs": 600,
    "device": "auto",
    "synthetic_count": 256,
    "max_minutes": 690.0,
    "max_steps": 0,
}
# Toy scale (`make demo`, the tests): seconds per notebook on a laptop CPU, nothing to download. The tiny
# model learns faster with a larger step; the `pixel` recipe and no perceptual term: no pretrained file needed.
SMOKE_RUN: dict[str, Any] = {
    "data_source": "synthetic",
    "image_size": 64,
    "preset": "tiny",
    "recipe": "pixel",
    "epochs": 50,
    "device": "cpu",
    "synthetic_count": 128,
    "max_minutes": 2.0,
    "max_steps": 0,
    "batch_size": 8,
    "lr": 1e-3,
    "perceptual_weight": 0.0,
}
# Seconds a network step (pretrained files, Hub snapshots) waits to connect, and then for each read, before it fails
NETWORK_TIMEOUT_S = 60.0
DEMO_MINUTES = 3.0  # `make demo` / `vaehelpers demo`: the training budget of the smoke run's notebook 04
# What `vaehelpers doctor`'s live check trains when not told: on a GPU the reference run's model, size and batch;
# on a CPU the tiny preset at 64 px, which keeps the whole check near a minute on 2 cores.
DOCTOR_GPU_RUN: dict[str, Any] = {"preset": "sd", "image_size": 128, "batch_size": 16}
DOCTOR_CPU_RUN: dict[str, Any] = {"preset": "tiny", "image_size": 64, "batch_size": 8}


def run_settings(smoke: bool = False) -> dict[str, Any]:
    """A copy of the smoke run's settings (smoke=True) or the reference run's."""
    return dict(SMOKE_RUN if smoke else REFERENCE_RUN)


T = TypeVar("T")


class SettingTypeError(TypeError, ValueError):
    """A setting given a value of the wrong type (e.g. --set loss.kl_weight=abc): bad input, so also a ValueError."""


def _coerce(value: Any, like: Any, name: str) -> Any:
    """Check value against the type of the default `like` (ints widen to floats); raise naming the key."""
    if isinstance(like, tuple) and isinstance(value, (list, tuple)):
        return tuple(_coerce(v, like[0], name) for v in value) if like else tuple(value)
    if isinstance(like, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is type(like):
        return value
    raise SettingTypeError(f"setting {name!r}: expected {type(like).__name__}, got {value!r}")


def apply_overrides(cfg: T, overrides: dict[str, Any], _prefix: str = "") -> T:
    """Return a copy of a config dataclass with dotted-key overrides applied; unknown keys raise.

    Errors name the whole dotted key (_prefix: the part above cfg, for nested dataclasses)."""
    cfg = dataclasses.replace(cfg)
    for key, value in overrides.items():
        target, *rest = key.split(".", 1)
        names = {f.name for f in fields(cfg)}
        if target not in names:
            raise KeyError(f"unknown setting {_prefix + key!r} for {type(cfg).__name__}; known: {sorted(names)}")
        current = getattr(cfg, target)
        if rest:
            setattr(cfg, target, apply_overrides(current, {rest[0]: value}, f"{_prefix}{target}."))
        elif dataclasses.is_dataclass(current):
            setattr(cfg, target, from_dict(type(current), value))
        else:
            setattr(cfg, target, _coerce(value, current, _prefix + key))
    return cfg


def config_diff(a: Any, b: Any) -> str:
    """'field: a vs b' for each field in which two configs of one dataclass differ ("none" when equal)."""
    diffs = [
        f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
        for f in fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    ]
    return ", ".join(diffs) or "none"


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build a config dataclass from a (possibly nested) dict, type-checked; unknown keys raise."""
    return apply_overrides(cls(), values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a plain (nested) dict; a dict is returned as it is."""
    return cfg if isinstance(cfg, dict) else asdict(cfg)


def save_json(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass (or its dict) as indented JSON: the one format of every config.json.

    rundir.write_config calls this inside an atomic write; call that for a run directory.
    """
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))


def model_config(preset: str) -> ModelConfig:
    """A copy of a named model preset."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[preset])


def build_config(preset: str = DEFAULT_PRESET, recipe: str = DEFAULT_RECIPE, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a model preset, then a recipe (with its PRESET_RECIPE_SETTINGS for this preset), then
    explicit overrides (dotted keys allowed).

    A recipe with lr_per_image > 0 (ldm) sets lr = lr_per_image x batch_size after the overrides, so that
    --batch-size scales it; an "lr" among the overrides wins (and lr_per_image is set to 0, as config.json says).
    """
    recipe = canonical_recipe(recipe)
    cfg = TrainConfig(preset=preset, recipe=recipe, model=model_config(preset))
    cfg = apply_overrides(cfg, recipe_settings(recipe))
    cfg = apply_overrides(cfg, PRESET_RECIPE_SETTINGS.get((preset, recipe), {}))
    cfg = apply_overrides(cfg, overrides)
    if "lr" in overrides:
        cfg.lr_per_image = 0.0
    elif cfg.lr_per_image > 0:
        cfg.lr = cfg.lr_per_image * cfg.batch_size
    return cfg


# ---------------------------------------------------------------------------------------------
# The settings as a table: what cli.py (train's flags), rundir.py (what a resume may change) and notebook.py
# (the papermill parameters) derive from the fields' setting(...) metadata. A new field declared with
# setting(..., flag=True, resumable=True, notebook=True) appears in all three with no other edit.


@dataclass(frozen=True)
class Setting:
    """One leaf field of a config dataclass, with its setting(...) metadata (plain fields: no flag, not resumable)."""

    key: str  # dotted, as in config.json and build_config's overrides: "loss.kl_weight"
    name: str  # the leaf name: "kl_weight" (the notebook parameter's name)
    type: Any  # the resolved annotation: int, float, str, bool, Literal[...], tuple[...]
    help: str
    flag: str | None  # "--kl-weight", or None when `train` has no flag for it
    resumable: bool
    notebook: bool
    choices: tuple[Any, ...] | None  # from setting(choices=...), else the Literal's values, else None

    @property
    def dest(self) -> str:
        """The argparse attribute of the flag: "--kl-weight" -> "kl_weight"."""
        return (self.flag or "").removeprefix("--").replace("-", "_")


def settings_of(cls: type = TrainConfig, prefix: str = "") -> list[Setting]:
    """Every leaf setting of a config dataclass (nested configs walked, keys dotted), in declaration order."""
    hints = get_type_hints(cls)
    table: list[Setting] = []
    for f in fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            table += settings_of(kind, f"{prefix}{f.name}.")
            continue
        meta = f.metadata
        flag = meta.get("flag", False)
        choices = meta.get("choices")
        choices = choices() if callable(choices) else choices
        if choices is None and get_origin(kind) is Literal:
            choices = get_args(kind)
        table.append(
            Setting(
                key=prefix + f.name,
                name=f.name,
                type=kind,
                help=meta.get("help", ""),
                flag=("--" + (flag if isinstance(flag, str) else f.name).replace("_", "-")) if flag else None,
                resumable=meta.get("resumable", False),
                notebook=meta.get("notebook", False),
                choices=tuple(choices) if choices is not None else None,
            )
        )
    return table


def resumable_settings(cls: type = TrainConfig) -> frozenset[str]:
    """Dotted keys that `train --resume` may change (any other difference from config.json is refused)."""
    return frozenset(s.key for s in settings_of(cls) if s.resumable)


def notebook_settings(cls: type = TrainConfig) -> dict[str, str]:
    """Notebook parameter name -> dotted key, for the settings the notebooks expose."""
    return {s.name: s.key for s in settings_of(cls) if s.notebook}


def flag_settings(cls: type = TrainConfig) -> list[Setting]:
    """The settings that are `train` flags, in declaration order."""
    return [s for s in settings_of(cls) if s.flag]


def flag_of(key: str, cls: type = TrainConfig) -> str | None:
    """The `train` flag of a dotted key ("loss.kl_weight" -> "--kl-weight"), or None."""
    return next((s.flag for s in settings_of(cls) if s.key == key), None)


# Fields that earlier versions wrote into config.json and nothing reads any more: dropped when an old run is read.
RETIRED_SETTINGS = ("image_every",)


def saved_train_config(values: dict[str, Any]) -> TrainConfig:
    """A run's config.json (as a dict) as a TrainConfig, written by this or an earlier version.

    Earlier versions: retired fields dropped, a deprecated recipe name resolved (no notice), a field added
    since then takes its default.
    """
    values = {key: value for key, value in values.items() if key not in RETIRED_SETTINGS}
    if isinstance(values.get("recipe"), str):
        values["recipe"] = canonical_recipe(values["recipe"], notice=False)
    return from_dict(TrainConfig, values)


# ---------------------------------------------------------------------------------------------
# Validation: every setting checked before a run creates anything


def _flag(key: str) -> str:
    """How a user sets `key` on the command line: its `train` flag (--image-size), else --set."""
    flag = flag_of(key)
    return f"{flag} (setting {key})" if flag else f"--set {key}"


def _literal_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """{field name: allowed values} of a config dataclass's Literal-typed fields."""
    hints = get_type_hints(cls)
    return {name: get_args(hint) for name, hint in hints.items() if get_origin(hint) is Literal}


def validate(cfg: TrainConfig) -> None:
    """Check every setting's type and range; raise ValueError naming the flag (or --set key) and the rule.

    Called before a run creates anything (train, launch): a bad value stops it with one line and no run directory.
    """
    problems: list[str] = []

    def check(key: str, ok: bool, rule: str) -> None:
        if not ok and not problems:  # the first problem is the one line reported
            section, _, name = key.rpartition(".")
            value = getattr(getattr(cfg, section) if section else cfg, name)
            problems.append(f"{_flag(key)} = {value!r}: {rule}")

    for section, obj in (("", cfg), ("model.", cfg.model), ("data.", cfg.data), ("loss.", cfg.loss)):
        for f in fields(obj):
            key, value = section + f.name, getattr(obj, f.name)
            like = getattr(type(obj)(), f.name) if not dataclasses.is_dataclass(value) else None
            if like is not None and not isinstance(like, tuple):
                try:
                    _coerce(value, like, key)
                except SettingTypeError:
                    check(key, False, f"must be {type(like).__name__}")
            if isinstance(value, float):
                check(key, math.isfinite(value), "must be a finite number")
        for name, choices in _literal_choices(type(obj)).items():
            check(section + name, getattr(obj, name) in choices, f"must be one of {', '.join(map(str, choices))}")
    if problems:
        raise ValueError(problems[0])
    factor = cfg.model.downsample_factor
    size = cfg.data.image_size
    check("data.image_size", size >= factor and size % factor == 0, f"must be a positive multiple of {factor}")
    check("batch_size", cfg.batch_size >= 1, "must be at least 1")
    check("lr", cfg.lr > 0, "must be positive")
    check("lr_per_image", cfg.lr_per_image >= 0, "must be 0 (off) or positive")
    check("epochs", cfg.epochs >= 1, "must be at least 1")
    check("max_steps", cfg.max_steps >= 0, "must be 0 (no step limit) or positive")
    check("max_minutes", cfg.max_minutes >= 0, "must be 0 (no time limit) or positive")
    for key in ("checkpoint_every", "log_every", "max_bad_steps"):
        check(key, getattr(cfg, key) >= 1, "must be at least 1")
    for key in ("warmup_steps", "weight_decay", "grad_clip"):
        check(key, getattr(cfg, key) >= 0, "must be 0 (off) or positive")
    check("ema_decay", 0 <= cfg.ema_decay < 1, "must be 0 (off) or in (0, 1), e.g. 0.999")
    check("betas", len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), "must be two numbers in [0, 1)")
    check("preset", cfg.preset in (*MODEL_PRESETS, "custom"), f"must be one of {', '.join(MODEL_PRESETS)}")
    check("recipe", canonical_recipe(cfg.recipe, notice=False) in RECIPES, f"must be one of {', '.join(RECIPES)}")
    check("data.data_dir", bool(cfg.data.data_dir), "must name the image folder (--data)")
    check("data.test_fraction", 0 <= cfg.data.test_fraction < 1, "must be in [0, 1)")
    check("data.num_workers", cfg.data.num_workers >= 0, "must be 0 or more")
    check("data.cache_workers", cfg.data.cache_workers >= 0, "must be 0 (every core) or more")
    for key in (
        "reconstruction_weight",
        "perceptual_weight",
        "kl_weight",
        "kl_warmup_epochs",
        "disc_weight",
        "disc_lr",
    ):
        check(f"loss.{key}", getattr(cfg.loss, key) >= 0, "must be 0 (off) or positive")
    check("loss.disc_start", cfg.loss.disc_start >= 0, "must be 0 or more")
    check("loss.seed_scale", cfg.loss.seed_scale > 0, "must be positive")
    model = cfg.model
    check("model.channel_multipliers", len(model.channel_multipliers) >= 1 and min(model.channel_multipliers) >= 1,
          "must be one or more positive integers")  # fmt: skip
    for key in ("base_channels", "layers_per_block", "latent_channels", "norm_num_groups", "in_channels"):
        check(f"model.{key}", getattr(model, key) >= 1, "must be at least 1")
    if not problems and model.channel_multipliers:
        widths = [model.base_channels * m for m in model.channel_multipliers]
        check("model.norm_num_groups", all(w % model.norm_num_groups == 0 for w in widths),
              f"must divide every width {widths}")  # fmt: skip
    check("model.scaling_factor", model.scaling_factor > 0, "must be positive")
    if problems:
        raise ValueError(problems[0])
