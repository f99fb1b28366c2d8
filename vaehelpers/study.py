"""Recipe study: train several recipes on the same budget (images seen) and evaluate each on held-out images."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# name -> (recipe, overrides). All share the preset, image size, batch size and step budget of the study.
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    # the original project's recipe; its VGG term needs ImageNet weights, so it is off where they cannot load
    "seed": ("seed", {}),
    # the seed's optimiser with our loss: isolates the effect of the loss
    "seed-opt+l1": ("pixel", {"optimizer": "adam", "lr": 1e-3, "grad_clip": 0.0}),
    # candidates for `default`
    "l1": ("pixel", {"lr": 1e-3, "grad_clip": 1.0, "warmup_steps": 50, "schedule": "cosine", "ema_decay": 0.999}),
    "l2": (
        "pixel",
        {
            "lr": 1e-3,
            "grad_clip": 1.0,
            "warmup_steps": 50,
            "schedule": "cosine",
            "ema_decay": 0.999,
            "loss.reconstruction": "l2",
        },
    ),
    "l1+l2": (
        "pixel",
        {
            "lr": 1e-3,
            "grad_clip": 1.0,
            "warmup_steps": 50,
            "schedule": "cosine",
            "ema_decay": 0.999,
            "loss.reconstruction": "l1+l2",
        },
    ),
    "l1-lr3e-4": (
        "pixel",
        {"lr": 3e-4, "grad_clip": 1.0, "warmup_steps": 50, "schedule": "cosine", "ema_decay": 0.999},
    ),
    "l1-noema": ("pixel", {"lr": 1e-3, "grad_clip": 1.0, "warmup_steps": 50, "schedule": "cosine"}),
    "l1-kl1e-4": (
        "pixel",
        {
            "lr": 1e-3,
            "grad_clip": 1.0,
            "warmup_steps": 50,
            "schedule": "cosine",
            "ema_decay": 0.999,
            "loss.kl_weight": 1e-4,
        },
    ),
    # second round, after the first showed constant Adam 1e-3 beating cosine + EMA at this budget
    "l1-const-clip": ("pixel", {"lr": 1e-3, "grad_clip": 1.0}),
    "l1-const-ema": ("pixel", {"optimizer": "adam", "lr": 1e-3, "grad_clip": 0.0, "ema_decay": 0.999}),
    "l1-lr2e-3": ("pixel", {"optimizer": "adam", "lr": 2e-3, "grad_clip": 0.0}),  # = the chosen default
    "l1+l2-const": ("pixel", {"optimizer": "adam", "lr": 1e-3, "grad_clip": 0.0, "loss.reconstruction": "l1+l2"}),
}


def stage_training_data(train_dirs: Sequence[Path], stage: Path) -> Path:
    """One folder linking every training folder (e.g. bsds500 train/ and val/) so the trainer sees them as one set."""
    stage.mkdir(parents=True, exist_ok=True)
    for folder in train_dirs:
        link = stage / Path(folder).name
        if not link.exists():
            link.symlink_to(Path(folder).resolve(), target_is_directory=True)
    return stage


def run_study(
    train_dirs: Sequence[Path],
    test_dir: Path,
    out: Path,
    names: Sequence[str],
    *,
    preset: str = "tiny",
    image_size: int = 64,
    batch_size: int = 16,
    steps: int = 600,
    device: str = "auto",
    precision: str = "auto",
    perceptual_weight: float | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Train each named candidate for `steps` steps of `batch_size` images, evaluate on all of test_dir.

    Finished candidates (out/<name>/evaluation.json) are kept, so a stopped study resumes. Writes out/study.json
    and out/study.md after each candidate.
    """
    from vaehelpers import latents, metrics, viz
    from vaehelpers.config import build_config
    from vaehelpers.dataset import ImageFolderDataset
    from vaehelpers.model import AutoencoderKL
    from vaehelpers.runtime import resolve_device, resolve_precision
    from vaehelpers.train import train

    out = Path(out)
    data_dir = stage_training_data(train_dirs, out / "train_data")
    test_set = ImageFolderDataset(test_dir, split="all", image_size=image_size, cache_dir=out / "cache")
    rows = []
    for name in names:
        recipe, overrides = CANDIDATES[name]
        run_dir, result_path = out / name, out / name / "evaluation.json"
        if not result_path.exists():
            settings = {
                **overrides,
                "run_dir": str(run_dir),
                "device": device,
                "precision": precision,
                "batch_size": batch_size,
                "seed": seed,
                "max_steps": steps,
                "epochs": 10**6,
                "checkpoint_every": max(steps // 4, 1),
                "data.data_dir": str(data_dir),
                "data.image_size": image_size,
                "data.test_fraction": 0.0,
            }
            if perceptual_weight is not None:
                settings["loss.perceptual_weight"] = perceptual_weight
            cfg = build_config(preset, recipe, **settings)
            started = time.monotonic()
            train(cfg, resume=True, progress=False)
            model = AutoencoderKL.load(run_dir).eval()
            summary = metrics.evaluate(model, test_set, batch_size=32, progress=False)
            summary.update(
                candidate=name,
                recipe=recipe,
                settings=overrides,
                train_seconds=time.monotonic() - started,
                train_precision=resolve_precision(precision, resolve_device(device)),
                images_seen=steps * batch_size,
                preset=preset,
            )
            metrics.write_json(summary, result_path)
            images = torch.stack([test_set[i] for i in range(4)])
            reconstructions = latents.reconstruct(model, images)
            viz.save_figure(viz.reconstruction_figure(images, reconstructions), out / f"{name}_reconstructions.png")
        rows.append(json.loads(result_path.read_text()))
        write_table(rows, out)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: candidate, recipe, settings, PSNR, SSIM, MAE, MSE (pixels in [0,1]), LPIPS."""
    lines = [
        "| candidate | recipe | settings | PSNR dB | SSIM | MAE | MSE | LPIPS | train min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "-"
        lpips = f"{row['lpips']:.4f}" if isinstance(row.get("lpips"), float) else "n/a"
        lines.append(
            f"| {row['candidate']} | {row['recipe']} | {settings} | {row['psnr']:.2f} | {row['ssim']:.4f} | "
            f"{row['mae']:.4f} | {row['mse']:.5f} | {lpips} | {row['train_seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def write_table(rows: Sequence[dict[str, Any]], out: Path) -> None:
    (out / "study.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "per_image"} for r in rows], indent=2)
    )
    (out / "study.md").write_text(format_table(rows) + "\n")
