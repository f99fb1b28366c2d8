"""The `vaehelpers` command (also `python -m vaehelpers`): data, info, train, evaluate, reconstruct, convert, weights, ..."""

# How this file is laid out (read this before adding a flag):
#
# - One section per verb: `add_<verb>_parser(verbs)` declares the verb's flags and sits right above
#   `cmd_<verb>(args)`, its handler. build_parser() only calls the add_*_parser functions listed in VERBS.
# - To add a flag to a verb: add one `parser.add_argument(...)` in its add_<verb>_parser and read it in
#   cmd_<verb>. Leave its default None when the function the handler calls owns the default, and pass it on
#   with given(...) (only values the user gave), so that no default is written twice; the help text then says
#   what happens without the flag where that is not obvious.
# - A `train` flag is not written here: declare the TrainConfig field in config.py with
#   setting(default, help=..., flag=True, resumable=..., notebook=...) and add_setting_flags() makes the flag
#   (name, type, choices and help from the field). cmd_train maps the given flags to dotted keys, so a new
#   field needs no edit in this file.
# - Expected failures raise ValueError/KeyError/OSError/RuntimeError; main() prints them in one line.

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from vaehelpers.config import (
    DEFAULT_PRESET,
    DEFAULT_RECIPE,
    INFO_PRESET,
    PRECISIONS,
    PRESETS,
    Setting,
    TrainConfig,
    flag_settings,
)
from vaehelpers.runlock import lock_run_of

# Exit status 3: the command completed, but bad input files were skipped (each reported with path and reason).
EXIT_SKIPPED_FILES = 3


def _exit_status(skipped_files: int) -> int:
    return EXIT_SKIPPED_FILES if skipped_files else 0


def given(**values: Any) -> dict[str, Any]:
    """The keyword arguments the user gave (flags left at None are dropped: the called function's default holds)."""
    return {name: value for name, value in values.items() if value is not None}


def _add_fid_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fid",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rFID (torch-fidelity's InceptionV3): on by default where its weights load, else null "
        "with the reason; --fid requires it, --no-fid turns it off",
    )
    parser.add_argument(
        "--weights-dir",
        type=Path,
        help="folder holding pretrained files: VGG16 for LPIPS, "
        "InceptionV3 for rFID (else $VAEHELPERS_WEIGHTS, then the torch hub cache)",
    )


def _fid_setting(value: bool | None) -> bool | str:
    """--fid: required (an error without the Inception weights); --no-fid: off; neither: where the weights load."""
    return "auto" if value is None else value


def _load_model(run: Path, device: str | None) -> tuple[Any, Any]:
    from vaehelpers.model import AutoencoderKL
    from vaehelpers.runtime import resolve_device

    torch_device = resolve_device(**given(name=device))
    return AutoencoderKL.load(run).to(torch_device).eval(), torch_device


# ----------------------------------------------------------------------------------------------------------- data


def add_data_parser(verbs: Any) -> None:
    data = verbs.add_parser("data", help="make or download image folders")
    data_sources = data.add_subparsers(dest="source", required=True)
    synthetic = data_sources.add_parser("synthetic", help="procedural PNG images: the embedded default (no download)")
    synthetic.add_argument("dest", type=Path)
    synthetic.add_argument("--count", type=int, help="images to make")
    synthetic.add_argument("--size", type=int, help="side in pixels")
    synthetic.add_argument("--seed", type=int)
    flickr = data_sources.add_parser("flickr8k", help="flickr8k: the attached Kaggle input, else the kaggle API")
    flickr.add_argument("dest", type=Path)
    data.set_defaults(func=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    from vaehelpers import sources

    if args.source == "synthetic":
        paths = sources.make_synthetic(args.dest, **given(count=args.count, size=args.size, seed=args.seed))
        print(f"wrote {len(paths)} synthetic images to {args.dest}")
    else:
        folder = sources.get_flickr8k(args.dest)
        print(f"flickr8k images: {folder}")
    return 0


# ----------------------------------------------------------------------------------------------------------- info


def add_info_parser(verbs: Any) -> None:
    info = verbs.add_parser("info", help="parameters per part and tensor shapes of a preset")
    info.add_argument("--preset", default=INFO_PRESET, choices=PRESETS)
    info.add_argument("--image-size", type=int)
    info.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from vaehelpers.config import model_config
    from vaehelpers.model import describe

    print(describe(model_config(args.preset), **given(image_size=args.image_size)))
    return 0


# ---------------------------------------------------------------------------------------------------------- train


def _flag_type(setting: Setting) -> Callable[[str], Any]:
    """The argparse type of a setting's flag: its field's type (a Literal's: its values' type)."""
    kind = setting.type
    if get_origin(kind) is Literal:
        kind = type(get_args(kind)[0])
    if kind not in (int, float, str):
        raise TypeError(f"setting {setting.key!r}: a {kind} field cannot be a flag (use --set)")
    return kind


def add_setting_flags(parser: argparse.ArgumentParser, config_cls: type = TrainConfig) -> None:
    """One flag per config field declared with setting(flag=...): --name VALUE (a bool: --name / --no-name).

    Every default is None: a flag not given leaves the recipe's value (a new run) or the run's own (--resume).
    """
    for setting in flag_settings(config_cls):
        options: dict[str, Any] = {"dest": setting.dest, "default": None, "help": setting.help or None}
        if setting.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _flag_type(setting)
            if setting.choices:
                options["choices"] = setting.choices
        parser.add_argument(setting.flag, **options)


def add_train_parser(verbs: Any) -> None:
    train = verbs.add_parser(
        "train",
        help="train an autoencoder into a run directory",
        description="Train an autoencoder into a run directory. A new run: --preset, then --recipe, then the "
        "flags given, then --set (later wins). --resume: every setting not given is the run's own (its "
        "config.json), so `vaehelpers train --run R --resume` alone continues R; a given flag that differs "
        "from the run's is refused unless a resume may change it (--epochs, --max-steps, --device, ...).",
    )
    train.add_argument(
        "--data",
        type=Path,
        help="image folder (searched recursively), or tar shards 'DIR/{000..099}.tar'; with --resume: default the "
        "run's own",
    )
    train.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        type=Path,
        required=True,
        help="run directory (--run-dir under torchrun, whose parser mistakes --run for --run-path)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from checkpoints/last.pt when present, with the run's own settings for every flag not given",
    )
    add_setting_flags(train)
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting, e.g. --set loss.disc_weight=0.5 --set schedule=cosine",
    )
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=cmd_train)


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """--set key=value pairs; values are JSON (numbers, true/false, lists) or plain strings."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set loss.disc_weight=0.5")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The settings to train with.

    A new run: preset, then recipe (default: DEFAULT_RECIPE), then the flags given, then --set: later wins.
    --resume of a run directory with a config.json: that config.json, then the flags given, then --set; a
    changed setting that a resume may not change is refused by rundir.prepare, naming the flag.
    """
    from vaehelpers import rundir
    from vaehelpers.config import build_config

    settings = {s.key: getattr(args, s.dest) for s in flag_settings() if getattr(args, s.dest) is not None}
    settings["run_dir"] = str(args.run)
    if args.data is not None:
        settings["data.data_dir"] = str(args.data)
    settings.update(_parse_set(args.set))
    if args.resume and rundir.is_training_run(args.run):
        return rundir.resume_config(args.run, settings)
    if args.data is None:
        raise ValueError(f"--data is required: {args.run} holds no run to resume (a new run needs an image folder)")
    preset, recipe = settings.pop("preset", DEFAULT_PRESET), settings.pop("recipe", DEFAULT_RECIPE)
    return build_config(preset, recipe, **settings)


def cmd_train(args: argparse.Namespace) -> int:
    from vaehelpers.train import train

    cfg = train_config_from_args(args)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    return _exit_status(result.skipped_files)


# ------------------------------------------------------------------------------------------------------- evaluate


def add_evaluate_parser(verbs: Any) -> None:
    evaluate = verbs.add_parser("evaluate", help="metrics on held-out images (pixel range [0,1])")
    evaluate.add_argument(
        "--model",
        "--run",
        dest="model",
        required=True,
        metavar="SRC",
        help="a run dir, diffusers folder, LDM/SD .ckpt/.safetensors, or Hub id (--run: the old name)",
    )
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--split", choices=["test", "all", "train"], default="test")
    evaluate.add_argument("--image-size", type=int)
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--json", type=Path)
    evaluate.add_argument("--csv", type=Path, help="per-image rows")
    evaluate.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--no-lpips", action="store_true", help="skip LPIPS (it needs torchvision's VGG16 weights)")
    evaluate.add_argument("--full-size", action="store_true", help="whole images, no crop (tiled where needed)")
    evaluate.add_argument("--tile", type=int, help="with --full-size: tile size in pixels (default: only if needed)")
    _add_fid_flags(evaluate)
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    with lock_run_of(args.json, "`vaehelpers evaluate`") if args.json else contextlib.nullcontext():
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from vaehelpers import metrics
    from vaehelpers.compare import DEFAULT_IMAGE_SIZE, open_model
    from vaehelpers.dataset import ImageFolderDataset
    from vaehelpers.runtime import resolve_device

    if args.tile and not args.full_size:
        raise ValueError("--tile needs --full-size (cropped images are never tiled)")
    device = resolve_device(**given(name=args.device))
    model, source = open_model(args.model, device)
    for note in source.notes:
        print(f"note: {note}")
    image_size = args.image_size or source.sample_size or DEFAULT_IMAGE_SIZE  # else the model's own size
    if args.full_size:
        from vaehelpers.reconstruct import FullSizeImages

        dataset = FullSizeImages(args.data, split=args.split)
    else:
        dataset = ImageFolderDataset(args.data, split=args.split, image_size=image_size, resize="crop", augment=False)
    summary = metrics.evaluate(
        model,
        dataset,
        device=device,
        progress=not args.no_progress,
        lpips=False if args.no_lpips else "auto",
        fid=_fid_setting(args.fid),
        weights_dir=args.weights_dir,
        full_size=args.full_size,
        tile=args.tile or "auto",
        **given(batch_size=args.batch_size),
    )
    summary.update(model=str(args.model), model_kind=source.kind)
    print(f"model: {source.source} ({source.kind})")
    print(metrics.format_table(summary))
    if args.json:
        metrics.write_json(summary, args.json)
        print(f"wrote {args.json}")
    if args.csv:
        metrics.write_per_image_csv(summary, args.csv)
        print(f"wrote {args.csv}")
    return _exit_status(summary["n_skipped"])


# -------------------------------------------------------------------------------------------------------- compare


def add_compare_parser(verbs: Any) -> None:
    compare = verbs.add_parser("compare", help="several models on the same held-out images: table, JSON, figure")
    compare.add_argument(
        "models",
        nargs="+",
        metavar="SRC",
        help="run dirs, diffusers folders, LDM/SD .ckpt/.safetensors files or Hub ids",
    )
    compare.add_argument("--data", type=Path, required=True)
    compare.add_argument("--split", choices=["test", "all"])
    compare.add_argument("--image-size", type=int, help="default: the first model's own size, else 128")
    compare.add_argument("--out", type=Path, required=True, help="writes compare.md, compare.json, reconstructions.png")
    compare.add_argument("--batch-size", type=int)
    compare.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    compare.add_argument("--no-lpips", action="store_true", help="skip LPIPS (it needs torchvision's VGG16 weights)")
    compare.add_argument("--full-size", action="store_true", help="metrics on whole images, no crop (tiled if needed)")
    compare.add_argument("--tile", type=int, help="with --full-size: tile size in pixels (default: only if needed)")
    _add_fid_flags(compare)
    compare.add_argument("--no-progress", action="store_true")
    compare.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from vaehelpers.compare import compare, format_report

    result = compare(
        args.models,
        args.data,
        args.out,
        image_size=args.image_size,
        lpips=False if args.no_lpips else "auto",
        fid_on=_fid_setting(args.fid),
        weights_dir=args.weights_dir,
        progress=not args.no_progress,
        full_size=args.full_size,
        tile=args.tile or "auto",
        **given(split=args.split, batch_size=args.batch_size, device=args.device),
    )
    print(format_report(result))
    for path in result["files"].values():
        print(f"wrote {path}")
    return _exit_status(len(result["failed"]) + result["n_skipped_files"])


# ---------------------------------------------------------------------------------------------------- reconstruct


def add_reconstruct_parser(verbs: Any) -> None:
    reconstruct = verbs.add_parser("reconstruct", help="reconstruct any images; figures and per-image errors")
    reconstruct.add_argument("--run", type=Path, required=True)
    reconstruct.add_argument("images", nargs="+", type=Path)
    reconstruct.add_argument("--out", type=Path, required=True)
    reconstruct.add_argument(
        "--mode",
        choices=["pad", "resize"],
        help="pad to a multiple of 8 (default) or resize to --image-size",
    )
    reconstruct.add_argument("--image-size", type=int)
    reconstruct.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    tile_choice = reconstruct.add_mutually_exclusive_group()
    tile_choice.add_argument("--tile", type=int, help="tile size in pixels (default: tile only what would not fit)")
    tile_choice.add_argument("--no-tile", action="store_true", help="never tile, even where memory looks short")
    reconstruct.add_argument("--json", type=Path, help="per image: PSNR, SSIM, seconds, peak memory, tile size")
    reconstruct.set_defaults(func=cmd_reconstruct)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from vaehelpers.reconstruct import format_rows, reconstruct_files, write_rows_json

    tile = "off" if args.no_tile else args.tile or "auto"
    model, device = _load_model(args.run, args.device)
    rows = reconstruct_files(
        model, args.images, args.out, image_size=args.image_size, device=device, tile=tile, **given(mode=args.mode)
    )
    print(format_rows(rows))
    if args.json:
        print(f"wrote {write_rows_json(rows, args.json)}")
    return _exit_status(sum(1 for row in rows if row["error"]))


# -------------------------------------------------------------------------------------------------------- convert


def add_convert_parser(verbs: Any) -> None:
    convert = verbs.add_parser(
        "convert",
        help="convert the autoencoder's weights between vaehelpers, diffusers and "
        "LDM/SD layouts (pretrained helper files: see `weights`)",
    )
    convert.add_argument("src", help="a run dir, diffusers folder, LDM/SD .ckpt/.safetensors, or Hub id (owner/name)")
    convert.add_argument("dest", type=Path, help="a folder (diffusers, vaehelpers) or a .safetensors file (ldm)")
    convert.add_argument("--to", choices=["diffusers", "ldm", "vaehelpers"], required=True)
    convert.add_argument("--sample-size", type=int, help="diffusers sample_size (default: the source's, else 128)")
    convert.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from vaehelpers import weights
    from vaehelpers.model import AutoencoderKL
    from vaehelpers.rundir import refuse_to_overwrite

    refuse_to_overwrite(args.dest)  # before reading a large source: checked again under the lock
    loaded = weights.load(args.src)
    for note in loaded.notes:
        print(f"note: {note}")
    model = AutoencoderKL.from_weights(loaded)
    with lock_run_of(args.dest, "`vaehelpers convert`"):
        refuse_to_overwrite(args.dest)
        dest = weights.export(model, args.dest, args.to, sample_size=args.sample_size or loaded.sample_size)
    config = loaded.config
    widths = [config.base_channels * m for m in config.channel_multipliers]
    print(
        f"read {loaded.source} ({loaded.kind}, {len(loaded.state_dict)} tensors, widths {widths}, "
        f"{config.latent_channels} latent channels, scaling_factor {config.scaling_factor})"
    )
    print(f"wrote {dest} ({args.to})")
    return 0


# ---------------------------------------------------------------------------------------------------------- scale


def add_scale_parser(verbs: Any) -> None:
    scale = verbs.add_parser("scale", help="measure 1/std of the latents and store it as the run's scaling_factor")
    scale.add_argument("--run", type=Path, required=True)
    scale.add_argument("--data", type=Path, required=True)
    scale.add_argument("--split", choices=["train", "test", "all"], default="train")
    scale.add_argument("--max-images", type=int, default=1000, help="images to measure on (0: all)")
    scale.add_argument(
        "--latents",
        choices=["sample", "mode"],
        default="sample",
        help="posterior samples (LDM's scale_by_std, default) or posterior means",
    )
    scale.add_argument("--image-size", type=int, help="default: the run's training size, else 128")
    scale.add_argument("--batch-size", type=int)
    scale.add_argument("--seed", type=int, default=0, help="seeds the posterior samples")
    scale.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    scale.set_defaults(func=cmd_scale)


def cmd_scale(args: argparse.Namespace) -> int:
    with lock_run_of(args.run, "`vaehelpers scale`"):  # a training there refuses it (and it refuses a training)
        return _scale(args)


def _scale(args: argparse.Namespace) -> int:
    import dataclasses

    from vaehelpers import rundir
    from vaehelpers.dataset import ImageFolderDataset
    from vaehelpers.latents import latent_statistics, store_scale

    model, device = _load_model(args.run, args.device)
    image_size = args.image_size or rundir.image_size(args.run)  # else the run's training size, else 128
    dataset = ImageFolderDataset(args.data, split=args.split, image_size=image_size, resize="crop", augment=False)
    stats = latent_statistics(
        model,
        dataset,
        max_images=args.max_images or None,
        device=device,
        sample_posterior=args.latents == "sample",
        seed=args.seed,
        **given(batch_size=args.batch_size),
    )
    details = {
        **dataclasses.asdict(stats),
        "data": str(args.data),
        "split": args.split,
        "image_size": image_size,
        "seed": args.seed,
        "previous_scaling_factor": model.config.scaling_factor,
    }
    config_path = store_scale(
        args.run, stats.scaling_factor, details, latents_mean=stats.channel_mean, latents_std=stats.channel_std
    )
    print(
        f"latent std {stats.std:.6g} (mean {stats.mean:.4g}) over {stats.n_values:,} values of {stats.latents} "
        f"from {stats.n_images} images"
    )
    for channel, (mean, std) in enumerate(zip(stats.channel_mean, stats.channel_std)):
        print(f"  channel {channel}: mean {mean:.4g}, std {std:.4g}")
    print(
        f"scaling_factor {stats.scaling_factor:.6g} and per-channel latents_mean/latents_std stored in "
        f"{config_path} (scaling_factor was {model.config.scaling_factor})"
    )
    return 0


# ---------------------------------------------------------------------------------------------------------- study


def add_study_parser(verbs: Any) -> None:
    study = verbs.add_parser("study", help="train recipes on the same budget, evaluate each on held-out images")
    study.add_argument("--train-data", type=Path, nargs="+", required=True, help="training folders (all images used)")
    study.add_argument("--test-data", type=Path, required=True, help="held-out folder (all images evaluated)")
    study.add_argument("--out", type=Path, required=True)
    study.add_argument("--candidates", nargs="+", help="names from vaehelpers/study.py (default: all)")
    study.add_argument("--preset", choices=PRESETS)
    study.add_argument("--image-size", type=int)
    study.add_argument("--batch-size", type=int)
    study.add_argument("--steps", type=int, help="the budget: steps of --batch-size images")
    study.add_argument("--perceptual-weight", type=float, help="override every candidate's (0: no VGG weights here)")
    study.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    study.add_argument("--precision", choices=PRECISIONS, help="training precision (evaluation is always fp32)")
    study.add_argument("--seed", type=int)
    study.set_defaults(func=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    from vaehelpers.study import CANDIDATES, format_table, run_study

    names = args.candidates or list(CANDIDATES)
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        raise ValueError(f"unknown candidates {unknown}; known: {sorted(CANDIDATES)}")
    rows = run_study(
        args.train_data,
        args.test_data,
        args.out,
        names,
        perceptual_weight=args.perceptual_weight,
        **given(
            preset=args.preset,
            image_size=args.image_size,
            batch_size=args.batch_size,
            steps=args.steps,
            device=args.device,
            precision=args.precision,
            seed=args.seed,
        ),
    )
    print(format_table(rows))
    return 0


# -------------------------------------------------------------------------------------------------------- weights


def add_weights_parser(verbs: Any) -> None:
    # `weights` manages the pretrained files of the helper networks (VGG16, LPIPS, InceptionV3: pretrained.py);
    # `convert` (weights.py) reads and writes the autoencoder's own weights. Different files, different verbs.
    weights = verbs.add_parser(
        "weights",
        help="pretrained helper-network files (VGG16 and LPIPS layers for the perceptual loss and metric, "
        "InceptionV3 for FID): status, download. Not the autoencoder's weights: see `convert`",
        description="Pretrained files of the helper networks the losses and metrics use (VGG16, the LPIPS linear "
        "layers, InceptionV3): where each is looked for, whether it loads, and downloading them. The "
        "autoencoder's own weights (run dirs, diffusers, LDM/SD files) are `vaehelpers convert`'s.",
    )
    weights_actions = weights.add_subparsers(dest="action", required=True)
    weights_status = weights_actions.add_parser("status", help="each file: where it is looked for, found, loads")
    weights_status.add_argument("--weights-dir", type=Path, help="also look here (else $VAEHELPERS_WEIGHTS)")
    weights_status.add_argument("--only", nargs="+", choices=["vgg16", "lpips", "inception"], help="default: all")
    weights_download = weights_actions.add_parser("download", help="fetch them with torch's downloader, hash-checked")
    weights_download.add_argument(
        "--dest", type=Path, help="folder to fill (default: the torch hub cache, torch.hub.get_dir()/checkpoints)"
    )
    weights_download.add_argument("--only", nargs="+", choices=["vgg16", "lpips", "inception"], help="default: all")
    weights.set_defaults(func=cmd_weights)


def cmd_weights(args: argparse.Namespace) -> int:
    from vaehelpers import pretrained

    if args.action == "status":
        print(pretrained.format_status(pretrained.status(args.weights_dir, args.only)))
    else:
        pretrained.download(args.dest, args.only)
    return 0


# ----------------------------------------------------------------------------------------------------------- demo


def add_demo_parser(verbs: Any) -> None:
    demo = verbs.add_parser(
        "demo", help="the offline quick start: the five notebooks at smoke scale on synthetic images (CPU)"
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--minutes", type=float, help="training budget")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from vaehelpers.demo import run_demo

    run_demo(args.out, **given(minutes=args.minutes))
    return 0


# --------------------------------------------------------------------------------------------------------- kaggle


def add_kaggle_parser(verbs: Any) -> None:
    kaggle = verbs.add_parser("kaggle", help="push the notebooks to Kaggle (kernels + the package as a dataset)")
    kaggle_actions = kaggle.add_subparsers(dest="action", required=True)
    push = kaggle_actions.add_parser("push", help="upload <user>/vaehelpers-src, then push the kernels in kaggle/")
    push.add_argument("--user", help="Kaggle user name (default: $KAGGLE_USERNAME, else your kaggle credentials')")
    push.add_argument("--only", nargs="+", metavar="PREFIX", help="only these kernels, e.g. --only 04 05")
    push.add_argument("--no-dataset", action="store_true", help="push the kernels without uploading the package again")
    push.add_argument(
        "--no-pin", action="store_true", help="attach the latest vaehelpers-src instead of the version just uploaded"
    )
    push.add_argument(
        "--wait-minutes",
        type=float,
        help="how long to wait for Kaggle to process the uploaded package before giving up",
    )
    push.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="the repository (holds kaggle/ and notebooks/)",
    )
    kaggle.set_defaults(func=cmd_kaggle)


def cmd_kaggle(args: argparse.Namespace) -> int:
    from vaehelpers import kaggle

    kaggle.push(
        args.root,
        args.user,
        dataset=not args.no_dataset,
        pin=not args.no_pin,
        **given(only=args.only, wait_s=args.wait_minutes and args.wait_minutes * 60),
    )
    return 0


# ---------------------------------------------------------------------------------------------------------- bench


def add_bench_parser(verbs: Any) -> None:
    bench = verbs.add_parser("bench", help="time ours against diffusers (train step, encode, decode) and the data path")
    bench.add_argument(
        "part",
        nargs="?",
        choices=["model", "data", "all"],
        help="what to time (default: model; data when --data-path is given)",
    )
    bench.add_argument("--preset", nargs="+", choices=PRESETS)
    bench.add_argument("--image-size", nargs="+", type=int)
    bench.add_argument("--batch-size", nargs="+", type=int)
    bench.add_argument("--repeats", type=int, help="timed runs per model and op (median reported)")
    bench.add_argument("--warmup", type=int, help="untimed runs per model and op, first")
    bench.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    bench.add_argument("--precision", choices=PRECISIONS)
    bench.add_argument("--ops", nargs="+", choices=["train_step", "encode", "decode"])
    bench.add_argument(
        "--peak-tflops",
        type=float,
        help="the GPU's dense peak in TFLOP/s for MFU (default: the datasheet figure of known GPUs)",
    )
    bench.add_argument("--no-diffusers", action="store_true", help="time ours only")
    bench.add_argument(
        "--ablate", action="store_true", help="also time ours in fp32 and ours without the fused upsampler"
    )
    bench.add_argument(
        "--headroom",
        action="store_true",
        help="also time ours with fp16 headroom tracking on (every train step a measurement step)",
    )
    bench.add_argument(
        "--data-path",
        help="image folder for the data part; 'auto': ../shared/datasets/bsds500 "
        "when present, else synthetic; 'synthetic'",
    )
    bench.add_argument("--workers", nargs="+", type=int, help="DataLoader workers to try")
    bench.add_argument("--data-repeats", type=int, help="epochs per data-path setting")
    bench.add_argument("--seed", type=int)
    bench.add_argument("--json", type=Path, help="write every figure here")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from vaehelpers.bench import run_bench

    run_bench(  # the report's command line is rebuilt from the settings, defaults spelled out
        part=args.part or ("data" if args.data_path else "model"),
        with_diffusers=not args.no_diffusers,
        ablate=args.ablate,
        headroom=args.headroom,
        json_path=args.json,
        **given(
            presets=args.preset,
            image_sizes=args.image_size,
            batch_sizes=args.batch_size,
            repeats=args.repeats,
            warmup=args.warmup,
            device=args.device,
            precision=args.precision,
            ops=args.ops,
            peak_tflops=args.peak_tflops,
            data_path=args.data_path,
            data_workers=args.workers,
            data_repeats=args.data_repeats,
            seed=args.seed,
        ),
    )
    return 0


# --------------------------------------------------------------------------------------------------------- doctor


def add_doctor_parser(verbs: Any) -> None:
    doctor = verbs.add_parser(
        "doctor",
        help="check this machine before a long run: versions, GPU, precision, a short "
        "live training check (exit 1 with the fix when something is wrong)",
    )
    doctor.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    doctor.add_argument("--preset", choices=PRESETS, help="default: sd on a GPU, tiny on CPU")
    doctor.add_argument("--image-size", type=int, help="default: 128 on a GPU, 64 on CPU")
    doctor.add_argument("--batch-size", type=int, help="default: 16 on a GPU, 8 on CPU")
    doctor.add_argument("--precision", choices=PRECISIONS)
    doctor.add_argument("--steps", type=int, help="training steps of the live check (then one resumed)")
    doctor.add_argument("--json", type=Path, help="write every figure here")
    doctor.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from vaehelpers import doctor

    report = doctor.run(
        preset=args.preset,
        image_size=args.image_size,
        batch_size=args.batch_size,
        json_path=args.json,
        **given(device=args.device, precision=args.precision, steps=args.steps),
    )
    if not report.ok:
        print(f"vaehelpers doctor: error: {report.reason}", file=sys.stderr)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------------------- main

# the verbs in the order `vaehelpers --help` lists them
VERBS: tuple[Callable[[Any], None], ...] = (
    add_data_parser,
    add_info_parser,
    add_train_parser,
    add_evaluate_parser,
    add_compare_parser,
    add_reconstruct_parser,
    add_convert_parser,
    add_scale_parser,
    add_study_parser,
    add_weights_parser,
    add_demo_parser,
    add_kaggle_parser,
    add_bench_parser,
    add_doctor_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The `vaehelpers` parser: one subparser per verb, each made by its add_<verb>_parser (see VERBS)."""
    parser = argparse.ArgumentParser(prog="vaehelpers", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    for add_parser in VERBS:
        add_parser(verbs)
    return parser


# Where an unexpected error (a bug) is reported: the project's issue tracker.
BUG_REPORT = (
    "this is a bug in vaehelpers, please report it: open an issue in the vaehelpers repository you installed it "
    "from, with the command, the traceback above and the output of `vaehelpers doctor`"
)


def expected_errors() -> tuple[type[BaseException], ...]:
    """The failures that are bad input or a broken environment (a missing or corrupt file, a full or read-only disk,
    no network): one line, exit 1. torch reports a failed write as a RuntimeError, safetensors as a SafetensorError."""
    from safetensors import SafetensorError

    return (ValueError, KeyError, OSError, RuntimeError, SafetensorError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the data scan's reports and progress notes
    try:
        return args.func(args)
    except expected_errors() as error:
        # expected failures (bad input, missing weights, ...) get one clear line; VAEHELPERS_DEBUG=1 shows the traceback
        if os.environ.get("VAEHELPERS_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"vaehelpers {args.verb}: error: {message}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print(f"vaehelpers {args.verb}: unexpected error: {BUG_REPORT}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
