"""`vaehelpers compare`: several autoencoders (any source weights.load reads) on the same held-out images, side by side.

One table (PSNR, SSIM, LPIPS, rFID, MAE, MSE, latent channels with per-channel mean/std, encode+decode images/s
on this machine, parameters), printed and written as compare.md + compare.json, and reconstructions.png: the same
held-out images reconstructed by each model, per-image PSNR in the labels. The metrics come from
metrics.evaluate (one loop for every number), latent statistics from latents.latent_statistics. A model that
cannot be loaded or fails on the images is reported by name with the reason and the others still run.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaehelpers import fid, metrics, viz, weights
from vaehelpers.config import DataConfig
from vaehelpers.latents import reconstruct
from vaehelpers.model import AutoencoderKL

DEFAULT_IMAGE_SIZE = DataConfig.image_size  # when neither --image-size nor the model says (evaluate's default too)
FIGURE_IMAGES = 4  # held-out images in reconstructions.png
SPEED_REPEATS = 3  # timed encode+decode passes per model (after one warm-up); the median counts


def open_model(src: str | Path, device: torch.device | str = "cpu") -> tuple[AutoencoderKL, weights.Weights]:
    """(model, what the source said about itself) for anything weights.load reads: a run directory, a diffusers
    folder, an LDM/SD .ckpt/.safetensors, or a Hub id (with internet). The model is in eval mode on device; the
    Weights keep source, kind, sample_size (the image size it was made for, if known) and notes, not the tensors."""
    loaded = weights.load(src)
    model = AutoencoderKL.from_weights(loaded).to(device).eval()
    return model, dataclasses.replace(loaded, state_dict={})


def _label(src: str) -> str:
    """A short name for a source: its last path part (a Hub id, owner/name, stays whole)."""
    path = Path(src)
    hub_id = not path.exists() and src.count("/") == 1 and not src.startswith((".", "/", "~"))
    return src if hub_id else (path.name or src)


@torch.no_grad()
def encode_decode_speed(model: nn.Module, images: torch.Tensor, repeats: int = SPEED_REPEATS) -> float:
    """Images per second of encode (posterior mode) + decode on images (B, 3, S, S) in [-1, 1], on the model's
    device, fp32 (latents.reconstruct, so the copy back to the CPU counts): the median of `repeats` timed passes
    after one warm-up. A wall-clock figure for this machine."""
    device = next(model.parameters()).device
    images = images.to(device)

    def one_pass() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        reconstruct(model, images)  # ends with .cpu(), which waits for the device
        return time.perf_counter() - start

    one_pass()  # warm-up: allocations, kernel selection
    return len(images) / statistics.median(one_pass() for _ in range(repeats))


def _channel_list(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.3g}" for v in values) if values else "n/a"


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The models' rows as a Markdown table (pixels in [0, 1]; rFID with its image count in the JSON)."""
    lines = [
        "| model | kind | parameters | latent ch | PSNR dB | SSIM | LPIPS | rFID | MAE | MSE | "
        "latent mean per ch | latent std per ch | enc+dec img/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['kind']} | {row['parameters']:,} | {row['latent_channels']} | "
            f"{_number(row['psnr'], '.2f')} | {_number(row['ssim'], '.4f')} | {_number(row['lpips'], '.4f')} | "
            f"{_number(row['rfid'], '.2f')} | {_number(row['mae'], '.4f')} | {_number(row['mse'], '.5f')} | "
            f"{_channel_list(row['latents_mean'])} | {_channel_list(row['latents_std'])} | "
            f"{_number(row['images_per_second'], '.1f')} |"
        )
    return "\n".join(lines)


def _shared_backbones(
    lpips: bool | str, fid_on: bool | str, weights_dir: str | Path | None, device: torch.device, notes: list[str]
) -> tuple[Any, Any, str | None]:
    """LPIPS and Inception built once for every model: (lpips fn or False, Inception features or False, rfid reason).
    "auto" turns a missing backbone into a note; True makes it an error."""
    lpips_fn: Any = False
    if lpips:
        try:
            lpips_fn = metrics.build_lpips(device)
        except RuntimeError as error:
            if lpips is True:
                raise
            notes.append(f"LPIPS not computed (n/a): {error}")
    inception: Any = False
    reason = "rFID turned off (--no-fid)"
    if fid_on:
        try:
            inception, reason = fid.load_inception(weights_dir, device), None
        except RuntimeError as error:
            if fid_on is True:
                raise
            reason = str(error)
            notes.append(f"rFID not computed (n/a): {error}")
    return lpips_fn, inception, reason


def compare(
    sources: Sequence[str],
    data: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    image_size: int | None = None,
    batch_size: int = 16,
    device: torch.device | str = "auto",
    lpips: bool | str = "auto",
    fid_on: bool | str = "auto",
    weights_dir: str | Path | None = None,
    figure_images: int = FIGURE_IMAGES,
    latent_images: int = 1000,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    full_size: bool = False,
    tile: int | str = "auto",
) -> dict[str, Any]:
    """Evaluate every source on the same images of `data` and write out/compare.md, compare.json, reconstructions.png.

    image_size: every model sees the same SxS crops: the given size, else the first loadable model's own size,
    else 128. lpips, fid_on: "auto" (where the weights load, else n/a with a note), True (required) or False.
    latent_images: images (at most) for the per-channel latent statistics (posterior samples, seed 0, as
    `vaehelpers scale` measures them). cache_dir: where the images' uint8 cache goes (default: dataset.py's choice).
    full_size: the metrics on whole images of any size (metrics.evaluate's full_size, tiled where needed, `tile`);
    the latent statistics, the speed and the figure stay on the SxS crops.
    Returns the compare.json dictionary: n_images, image_size, data, split,
    models [rows], failed [{name, source, reason}], notes, rfid_warning, files.
    """
    from vaehelpers.dataset import ImageFolderDataset
    from vaehelpers.latents import latent_statistics
    from vaehelpers.reconstruct import FullSizeImages
    from vaehelpers.runtime import resolve_device

    out = Path(out)
    if out.exists() and not out.is_dir():  # before any work: the results could not be written
        raise NotADirectoryError(f"--out {out} is a file, not a folder: choose a folder for compare's results")
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    failed: list[dict[str, str]] = []
    notes: list[str] = []
    opened: list[tuple[str, AutoencoderKL, weights.Weights]] = []
    for src in sources:
        try:
            opened.append((str(src), *open_model(src, device)))
        except Exception as error:  # any reason a model cannot be read: name it and go on with the others
            failed.append({"name": _label(str(src)), "source": str(src), "reason": f"cannot load: {_one_line(error)}"})
    if not opened:
        raise NothingMeasuredError(f"no model could be measured: {_failures(failed)}")
    size = image_size or next((int(w.sample_size) for _, _, w in opened if w.sample_size), None) or DEFAULT_IMAGE_SIZE
    dataset = ImageFolderDataset(data, split=split, image_size=size, resize="crop", augment=False, cache_dir=cache_dir)
    measured = FullSizeImages(data, split) if full_size else dataset
    lpips_fn, inception, rfid_reason = _shared_backbones(lpips, fid_on, weights_dir, device, notes)

    shown = torch.stack([dataset[i] for i in range(min(figure_images, len(dataset)))])  # (k, 3, S, S) in [-1, 1]
    shown_paths = [str(dataset.paths[i]) for i in range(len(shown))]
    rows: list[dict[str, Any]] = []
    figure_columns: list[tuple[str, torch.Tensor, list[float]]] = []
    summary: dict[str, Any] = {}
    labels = [_label(src) for src, _, _ in opened]
    for index, (src, model, source) in enumerate(opened):
        name = labels[index]
        if labels.count(name) > 1:  # runs/a and other/a: keep the table unambiguous
            name = f"{name} ({index + 1})"
        try:
            summary = metrics.evaluate(
                model,
                measured,
                batch_size=batch_size,
                device=device,
                lpips=lpips_fn,
                fid=inception,
                progress=progress,
                full_size=full_size,
                tile=tile,
            )
            stats = latent_statistics(model, dataset, max_images=latent_images, batch_size=batch_size)
            speed = encode_decode_speed(model, shown if len(shown) else dataset[0][None])
            reconstructions = reconstruct(model, shown)
        except Exception as error:  # out of memory, a size the model cannot take, ...: this model only
            failed.append({"name": name, "source": src, "reason": f"failed on the images: {_one_line(error)}"})
            continue
        psnr_by_path = {row["path"]: row["psnr"] for row in summary["per_image"]}
        figure_columns.append((name, reconstructions, [psnr_by_path.get(path, math.nan) for path in shown_paths]))
        rows.append(
            {
                "name": name,
                "source": source.source,
                "kind": source.kind,
                "parameters": sum(p.numel() for p in model.parameters()),
                "latent_channels": model.config.latent_channels,
                **{
                    key: summary[key]
                    for key in (
                        "n_images",
                        "psnr",
                        "ssim",
                        "lpips",
                        "rfid",
                        "mae",
                        "mse",
                        "mae_pm1",
                        "mse_pm1",
                        "n_skipped",
                    )
                },
                "rfid_reason": rfid_reason if inception is False else summary["rfid_reason"],
                "latents_mean": list(stats.channel_mean),
                "latents_std": list(stats.channel_std),
                "latents_measured_on": f"{stats.latents} of {stats.n_images} images",
                "stored_latents_mean": list(model.config.latents_mean),
                "stored_latents_std": list(model.config.latents_std),
                "scaling_factor": model.config.scaling_factor,
                "images_per_second": speed,
                "speed_batch": len(shown) or 1,
                "device": str(device),
                "notes": source.notes,
            }
        )

    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": str(out / "compare.md"), "json": str(out / "compare.json")}
    if figure_columns:
        viz.save_figure(reconstructions_figure(shown, figure_columns), out / "reconstructions.png")
        files["figure"] = str(out / "reconstructions.png")
    result = {
        "n_images": len(measured),
        "image_size": "full" if full_size else size,
        "pixel_range": "[0,1]",
        "data": str(data),
        "split": split,
        "models": rows,
        "failed": failed,
        "notes": notes,
        "rfid_warning": fid.bias_warning(len(dataset)) if any(r["rfid"] is not None for r in rows) else None,
        "n_skipped_files": len(dataset.bad_files),
        "files": files,
    }
    metrics.write_json(result, out / "compare.json")
    (out / "compare.md").write_text(format_report(result) + "\n")
    if not rows:
        raise NothingMeasuredError(f"no model could be measured: {_failures(failed)} (written to {out / 'compare.md'})")
    return result


class NothingMeasuredError(RuntimeError):
    """Every model given to compare failed (to load, or on the images): there is no result; the message says why."""


def _failures(failed: list[dict[str, str]]) -> str:
    return "; ".join(f"{failure['source']}: {failure['reason']}" for failure in failed)


def _one_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text}" if not isinstance(error, (ValueError, OSError, RuntimeError)) else text


def format_report(result: dict[str, Any]) -> str:
    """compare.md: what was compared on which images, the table, then notes and failures."""
    lines = [
        f"{len(result['models'])} models on {result['n_images']} images of {result['data']} "
        f"(split {result['split']}, {result['image_size']}x{result['image_size']} centre crops, pixels in [0,1], "
        "posterior mode; latent statistics from posterior samples; speed: encode+decode fp32 on "
        f"{result['models'][0]['device'] if result['models'] else 'n/a'}, median of {SPEED_REPEATS})",
        "",
        format_table(result["models"]),
    ]
    if result.get("rfid_warning"):
        lines += ["", f"Warning: {result['rfid_warning']}."]
    for note in result["notes"]:
        lines += ["", f"Note: {note}"]
    for failure in result["failed"]:
        lines += ["", f"Not compared: {failure['name']} ({failure['source']}): {failure['reason']}"]
    return "\n".join(lines)


def reconstructions_figure(images: torch.Tensor, columns: Sequence[tuple[str, torch.Tensor, Sequence[float]]]):
    """One row per held-out image: original | each model's reconstruction, with that image's PSNR in the label.

    images (k, 3, S, S) in [-1, 1]; columns: (model name, reconstructions (k, 3, S, S), per-image PSNR dB)."""
    panels, titles = [], []
    for i, image in enumerate(images):
        panels.append(image)
        titles.append("original")
        for name, reconstructions, psnr in columns:
            panels.append(reconstructions[i])
            titles.append(f"{name}\nPSNR {psnr[i]:.2f} dB")
    return viz.image_grid(panels, nrow=1 + len(columns), titles=titles)


def compare_in_notebook(
    compare_with: str | Path | None,
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    image_size: int,
    device: torch.device | str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Notebook 05's "Compare with another VAE" step: this run and `compare_with` (e.g. the released sd-vae-ft-mse
    attached on Kaggle) on the run's held-out images at its image size; prints the table and returns the compare
    dictionary (its files["figure"] is the side-by-side PNG). compare_with=None: says so in a sentence, returns None.
    """
    if compare_with is None:
        print(
            "No second model given (compare_with=None): comparison skipped. Set compare_with to a diffusers folder, "
            "an LDM/SD .safetensors or a Hub id, e.g. /kaggle/input/sd-vae-ft-mse, to compare it with this run."
        )
        return None
    result = compare(
        [str(run_dir), str(compare_with)],
        data,
        out,
        split="test",
        image_size=image_size,
        device=device,
        cache_dir=cache_dir,
        progress=progress,
    )
    print(format_report(result))
    return result
