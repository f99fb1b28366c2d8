"""Reconstruct image files of any size: pad or resize, encode, decode (tiled where it would not fit), measure."""

from __future__ import annotations

import json
import os
import re
import resource
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from vaehelpers import tiling
from vaehelpers.images import BadImageError, list_images, load_image, preprocess, select_split
from vaehelpers.latents import reconstruct_image
from vaehelpers.metrics import per_image_metrics
from vaehelpers.rundir import atomic_write


def pil_to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    return TF.to_tensor(image) * 2 - 1


class FullSizeImages:
    """The images of a folder (recursively) at their own size: items (3, H, W) in [-1, 1], H and W as in the file.

    The split is the dataset's (images.select_split: a stable hash of each path); a bad file raises BadImageError
    when read (evaluate skips it and says why). For `evaluate --full-size` and `compare --full-size`.
    """

    def __init__(self, root: str | Path, split: Literal["train", "test", "all"] = "test", test_fraction: float = 0.1):
        self.root = Path(root).expanduser()
        self.paths = select_split(list_images(self.root), self.root, split, test_fraction)
        if not self.paths:
            raise ValueError(f"{self.root}: no images in split {split!r}")
        self.bad_files: list[tuple[Path, str]] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return pil_to_tensor(load_image(self.paths[index]))


def _unique_stem(path: Path, used: set[str]) -> str:
    """The file's stem, made safe for a file name and unique among the outputs of one call."""
    stem = re.sub(r"[^\w.-]+", "_", path.stem) or "image"
    candidate, n = stem, 1
    while candidate in used:
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    return candidate


def _rss_bytes() -> int | None:
    """This process's resident set size now (Linux /proc), else None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Measure the peak memory of the block into the yielded dict's "peak_memory_mb": CUDA's peak allocation on
    a GPU; on CPU the peak RSS, sampled every 20 ms (the process's lifetime peak where /proc is missing)."""
    result: dict[str, float | None] = {"peak_memory_mb": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    if _rss_bytes() is None:
        yield result
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return
    peak, done = [_rss_bytes() or 0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _rss_bytes() or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["peak_memory_mb"] = max(peak[0], _rss_bytes() or 0) / 2**20


def reconstruct_files(
    model: nn.Module,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    mode: Literal["pad", "resize"] = "pad",
    image_size: int | None = None,
    device: torch.device | str | None = None,
    tile: int | Literal["auto", "off"] = "auto",
    report: Any = print,
) -> list[dict[str, Any]]:
    """Reconstruct each image file and save `<stem>_reconstruction.png` and `<stem>_latents.png` in out_dir.

    paths: image files of any size. mode="pad": keep the image as it is (reflect-padded to a multiple of the
    downsample factor for the model, the reconstruction cropped back); mode="resize": shorter side to
    image_size (default 128), centre crop. device: where to run (default: where the model is; the model is
    moved when given). tile: "auto" tiles an image whose untiled encode/decode would not fit the free memory
    (tiling.decide), an int forces that tile size (pixels, a multiple of 8), "off" never tiles; `report` gets
    one line per image saying which was chosen and why.
    Returns one row per path: path, width, height (of the file), mode, mae, mse, psnr, ssim (on [0, 1]),
    seconds (encode + decode), peak_memory_mb (peak RSS on CPU, peak allocation on CUDA), tile (pixels, None
    when untiled), stats_tiles (None: statistics over every tile), reconstruction_png, latents_png, error (None,
    or why the file was skipped: the metrics are then None).
    """
    from vaehelpers import viz

    if mode not in ("pad", "resize"):
        raise ValueError(f"mode must be 'pad' or 'resize', got {mode!r}")
    if isinstance(tile, int):
        tiling.Tiling(tile=tile, overlap=tiling.default_overlap(tile)).check(model.config.downsample_factor)
    if device is not None:
        model.to(device)
    run_device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, used_stems = [], set()
    try:
        for path in map(Path, paths):
            row: dict[str, Any] = {
                "path": str(path),
                "width": None,
                "height": None,
                "mode": mode,
                "mae": None,
                "mse": None,
                "psnr": None,
                "ssim": None,
                "seconds": None,
                "peak_memory_mb": None,
                "tile": None,
                "stats_tiles": None,
                "reconstruction_png": None,
                "latents_png": None,
                "error": None,
            }
            rows.append(row)
            try:
                picture = load_image(path)
            except BadImageError as error:  # unreadable, truncated, not an image: report and go on
                row["error"] = error.reason
                continue
            row["width"], row["height"] = picture.size
            if mode == "resize":  # the evaluation preprocessing: shorter side to S, centre crop
                image = preprocess(picture, image_size or 128)  # (3, S, S) in [-1, 1]
            else:
                image = pil_to_tensor(picture)  # (3, H, W) in [-1, 1]
            del picture
            factor = model.config.downsample_factor
            height, width = (-(-side // factor) * factor for side in image.shape[-2:])
            chosen, why = tiling.decide(model.config.base_channels, height, width, tile, run_device)
            report(f"{path.name}: {image.shape[-1]}x{image.shape[-2]}, {why}")
            with peak_memory(run_device) as memory:
                start = time.perf_counter()
                reconstruction, latents = reconstruct_image(model, image, mode=mode, tiled=chosen)
                row["seconds"] = time.perf_counter() - start
            row["peak_memory_mb"] = memory["peak_memory_mb"]
            if chosen is not None:
                row["tile"], row["stats_tiles"] = chosen.tile, chosen.stats_tiles
            metrics = per_image_metrics(image[None], reconstruction[None])
            row.update({name: float(metrics[name][0]) for name in ("mae", "mse", "psnr", "ssim")})
            del metrics
            stem = _unique_stem(path, used_stems)
            figure = viz.reconstruction_figure(image[None], reconstruction[None], titles=[path.name])
            row["reconstruction_png"] = str(viz.save_figure(figure, out_dir / f"{stem}_reconstruction.png"))
            figure = viz.latent_channels_figure(latents, titles=[path.name])
            row["latents_png"] = str(viz.save_figure(figure, out_dir / f"{stem}_latents.png"))
    finally:
        model.train(was_training)
    return rows


def write_rows_json(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The rows of reconstruct_files as a JSON list, written atomically; an exact copy's PSNR is "inf"."""
    from vaehelpers.metrics import _json_safe

    text = json.dumps(_json_safe(list(rows)), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of reconstruct_files as a text table, skipped files listed with their reason."""
    done = [row for row in rows if row.get("error") is None]
    skipped = [row for row in rows if row.get("error") is not None]
    name_width = max([len(Path(row["path"]).name) for row in done] + [4])
    lines = [
        f"{'file':<{name_width}}  {'size':>11}  {'MAE[0,1]':>8}  {'MSE[0,1]':>9}  {'PSNR dB':>7}  {'SSIM':>6}  "
        f"{'seconds':>7}  {'peak MB':>8}  {'tile':>5}"
    ]
    for row in done:
        size = f"{row['width']}x{row['height']}"
        peak = "" if row.get("peak_memory_mb") is None else f"{row['peak_memory_mb']:.0f}"
        lines.append(
            f"{Path(row['path']).name:<{name_width}}  {size:>11}  {row['mae']:8.4f}  {row['mse']:9.6f}  "
            f"{row['psnr']:7.2f}  {row['ssim']:6.4f}  {row['seconds']:7.1f}  {peak:>8}  {row['tile'] or '-':>5}"
        )
    lines.append(f"{len(done)} reconstructed, {len(skipped)} skipped")
    lines += [f"skipped {row['path']}: {row['error']}" for row in skipped]
    return "\n".join(lines)
