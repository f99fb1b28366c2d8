"""Tiled vs untiled, ours and diffusers' enable_tiling, on BSDS500 photos: the numbers of results/tiling.md.

python results/tiling/measure.py --run RUN --photos P.jpg ... --tile 256 --out results/tiling/NAME.json [--figure F.png]
Each photo is resized (bicubic) to 768x512 (landscape) or 512x768; encode and decode run in fp32 on the CPU.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vaehelpers import tiling
from vaehelpers.bench import diffusers_twin
from vaehelpers.metrics import psnr_from_mse
from vaehelpers.model import AutoencoderKL
from vaehelpers.reconstruct import pil_to_tensor


def load(path: Path) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    size = (768, 512) if image.width >= image.height else (512, 768)
    return pil_to_tensor(image.resize(size, Image.BICUBIC))[None]  # (1, 3, H, W) in [-1, 1]


def bands(length: int, windows: list[tuple[int, int]]) -> torch.Tensor:
    """True on the pixels of an axis where two windows overlap (where tiles are blended)."""
    inside = torch.zeros(length, dtype=torch.int64)
    for start, end in windows:
        inside[start:end] += 1
    return inside > 1


def ours_windows(length: int, plan: tiling.Tiling) -> list[tuple[int, int]]:
    return [(s * 8, e * 8) for s, e, _, _ in tiling._windows(length // 8, plan.tile // 8, plan.overlap // 8)]


def diffusers_windows(length: int, tile: int, overlap_factor: float = 0.25) -> list[tuple[int, int]]:
    """diffusers' tiled_decode: tiles every tile*(1-f) pixels, each blended over its first tile*f pixels."""
    step, blend = int(tile * (1 - overlap_factor)), int(tile * overlap_factor)
    return [(max(start - blend, 0), min(start + step, length)) for start in range(0, length, step)]


def compare(reference: torch.Tensor, other: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> dict:
    """mean/max |diff| on [0, 1], PSNR of other vs reference, and mean |diff| on the blend bands vs elsewhere."""
    diff = ((other.clamp(-1, 1) - reference.clamp(-1, 1)).abs() / 2)[0].mean(0)  # (H, W) on [0, 1]
    border = rows[:, None] | cols[None, :]
    mse = (((other.clamp(-1, 1) - reference.clamp(-1, 1)) / 2) ** 2).mean()
    return {
        "mean_abs": diff.mean().item(),
        "max_abs": diff.max().item(),
        "psnr_vs_untiled": float(psnr_from_mse(mse)),
        "seam_mean_abs": diff[border].mean().item(),
        "inside_mean_abs": diff[~border].mean().item(),
    }


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> float:
    return float(psnr_from_mse((((reconstructions.clamp(-1, 1) - images) / 2) ** 2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--photos", nargs="+", type=Path, required=True)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--variants", nargs="*", default=[], help="extra ours: tile-attention, sample2")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoencoderKL.load(args.run).eval()
    theirs = diffusers_twin(model.config).eval()
    theirs.load_state_dict(model.state_dict(), strict=True)
    theirs.enable_tiling()
    theirs.tile_sample_min_size = args.tile  # diffusers' overlap is tile * tile_overlap_factor (0.25)
    theirs.tile_latent_min_size = args.tile // 8
    assert args.overlap == int(args.tile * theirs.tile_overlap_factor), "use overlap = tile / 4 to match diffusers"
    plan = tiling.Tiling(tile=args.tile, overlap=args.overlap)
    variants = {"ours": {}}
    variants.update({"ours, attention per tile": {"attention": "tile"}} if "tile-attention" in args.variants else {})
    variants.update({"ours, statistics from 2 tiles": {"stats_tiles": 2}} if "sample2" in args.variants else {})
    results = []
    for path in args.photos:
        images = load(path)
        height, width = images.shape[-2:]
        row = {"photo": path.name, "size": f"{width}x{height}", "methods": {}}
        with torch.no_grad():
            start = time.perf_counter()
            untiled = model.decode(model.encode(images).mode())
            row["untiled"] = {"seconds": time.perf_counter() - start, "psnr_vs_original": psnr(images, untiled)}
            outputs = {}
            for name, settings in variants.items():
                start = time.perf_counter()
                with model.tiled(args.tile, args.overlap, **settings):
                    outputs[name] = model.decode(model.encode(images).mode())
                seconds = time.perf_counter() - start
                found = compare(
                    untiled,
                    outputs[name],
                    bands(height, ours_windows(height, plan)),
                    bands(width, ours_windows(width, plan)),
                )
                row["methods"][name] = {**found, "seconds": seconds, "psnr_vs_original": psnr(images, outputs[name])}
                print(path.name, name, row["methods"][name], flush=True)
            start = time.perf_counter()
            outputs["diffusers"] = theirs.decode(theirs.encode(images).latent_dist.mode()).sample
            seconds = time.perf_counter() - start
            found = compare(
                untiled,
                outputs["diffusers"],
                bands(height, diffusers_windows(height, args.tile)),
                bands(width, diffusers_windows(width, args.tile)),
            )
            row["methods"]["diffusers enable_tiling"] = {
                **found,
                "seconds": seconds,
                "psnr_vs_original": psnr(images, outputs["diffusers"]),
            }
            print(path.name, "diffusers", row["methods"]["diffusers enable_tiling"], flush=True)
        results.append(row)
        if args.figure and path == args.photos[0]:
            save_figure(images, untiled, outputs["ours"], outputs["diffusers"], args.figure, path.name, args.tile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"run": args.run, "tile": args.tile, "overlap": args.overlap, "photos": results}, indent=2) + "\n"
    )


def save_figure(images, untiled, ours, theirs, path: Path, name: str, tile: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def picture(t):
        return ((t.clamp(-1, 1)[0].permute(1, 2, 0) + 1) / 2).numpy()

    def error(t):
        return ((t.clamp(-1, 1) - untiled.clamp(-1, 1)).abs()[0].mean(0) / 2).numpy()

    vmax = float(np.percentile(error(theirs), 99.5)) or 1e-3
    figure, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    axes[0].imshow(picture(images))
    axes[0].set_title(f"{name} (input)")
    axes[1].imshow(picture(untiled))
    axes[1].set_title("untiled reconstruction")
    for axis, (label, t) in zip(axes[2:], [("ours, tiled", ours), ("diffusers enable_tiling", theirs)]):
        shown = axis.imshow(error(t), cmap="magma", vmin=0, vmax=vmax)
        axis.set_title(f"|{label} - untiled|, mean {error(t).mean():.2e}")
    figure.colorbar(shown, ax=axes[2:], fraction=0.03, label=f"|difference| on [0,1] (tile {tile})")
    for axis in axes:
        axis.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80, bbox_inches="tight")


if __name__ == "__main__":
    main()
