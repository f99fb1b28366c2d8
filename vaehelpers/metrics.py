"""Evaluation: per-image reconstruction metrics (MAE, MSE, PSNR, SSIM, LPIPS), rFID, tables and files.

Every headline number is on pixels in [0, 1] (images and reconstructions are mapped from the model's
[-1, 1] and reconstructions are clamped first). MAE and MSE on [-1, 1] are reported too, labelled
`mae_pm1` / `mse_pm1`, because the original project quoted them there: they are exactly 2x and 4x the
[0, 1] values.

PSNR and a perfect reconstruction: per image, PSNR = 10 log10(1 / MSE) is +inf when MSE is 0, and the
per-image values keep that inf (in Python and in the CSV; strict JSON gets the string "inf"). The
summary's mean `psnr` caps each image at PSNR_CAP_DB (100 dB, far above any real 8-bit reconstruction:
one grey level of error everywhere is 48 dB) so that a single exact copy cannot turn the mean into inf.
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from vaehelpers import fid as fid_module
from vaehelpers.images import BadImageError
from vaehelpers.runtime import autocast, resolve_device, resolve_precision

PSNR_CAP_DB = 100.0  # cap per image in the mean PSNR; see the module docstring
SSIM_KERNEL_SIZE = 11  # Wang et al. 2004 (and torchmetrics') Gaussian window, sigma 1.5
PER_IMAGE_FIELDS = ("path", "mae", "mse", "psnr", "ssim", "lpips")

LpipsFn = Callable[[Tensor, Tensor], Tensor]  # (images, reconstructions) in [0, 1], (B,3,H,W) -> (B,)


# --------------------------------------------------------------------------- per-image metrics


def to_unit_range(images: Tensor) -> Tensor:
    """images in [-1, 1] -> [0, 1], clamped, float32."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr_from_mse(mse: Tensor | float, data_range: float = 1.0) -> Tensor:
    """10 log10(range^2 / mse) in dB; +inf where mse is 0."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return 10 * torch.log10(data_range**2 / mse)  # mse 0 -> inf, as torch.log10(inf)


def _ssim_kernel_size(height: int, width: int) -> int:
    """The standard 11-pixel window, shrunk to the largest odd size that fits images smaller than it."""
    side = min(SSIM_KERNEL_SIZE, height, width)
    return side if side % 2 == 1 else side - 1


SSIM_STRIP_ROWS = 256  # above this many rows SSIM goes strip by strip: at 12 MP in one piece it took 10 GB of RAM


def _ssim(reconstructions01: Tensor, images01: Tensor) -> Tensor:
    """torchmetrics' SSIM per image, (B,); on tall images computed in strips of rows, each with 16 rows of context
    (the Gaussian window reaches 5), from the SSIM maps' rows that each strip computes as the whole image would."""
    height, width = images01.shape[-2:]
    kernel = _ssim_kernel_size(height, width)

    def ssim_map(first: int, last: int) -> Tensor:
        return structural_similarity_index_measure(
            reconstructions01[..., first:last, :],
            images01[..., first:last, :],
            data_range=1.0,
            kernel_size=kernel,
            reduction="none",
            return_full_image=True,
        )[1]  # (B, C, last - first, W)

    context = 16
    if height <= SSIM_STRIP_ROWS + 2 * context:
        return ssim_map(0, height).flatten(1).mean(1)
    total = torch.zeros(images01.shape[0], dtype=torch.float64, device=images01.device)
    for first in range(0, height, SSIM_STRIP_ROWS):
        last = min(first + SSIM_STRIP_ROWS, height)
        start = max(first - context, 0)
        strip = ssim_map(start, min(last + context, height))[..., first - start : last - start, :]
        total += strip.double().flatten(1).sum(1)
    return (total / (images01[0].numel())).to(images01.dtype)


def per_image_metrics(images: Tensor, reconstructions: Tensor) -> dict[str, Tensor]:
    """Reconstruction metrics, one value per image.

    images, reconstructions: (B, 3, H, W) in [-1, 1] (reconstructions may overshoot; they are clamped).
    Returns float32 (B,) tensors on the input's device: `mae`, `mse`, `psnr` (dB, +inf for an exact
    copy), `ssim` (Gaussian window 11, sigma 1.5, data range 1), all on [0, 1]; and `mae_pm1`, `mse_pm1`
    on [-1, 1] (clamped the same way, so exactly 2x and 4x mae and mse).
    """
    if images.shape != reconstructions.shape or images.dim() != 4:
        raise ValueError(
            f"expected two (B, 3, H, W) tensors of one shape, got {tuple(images.shape)} "
            f"and {tuple(reconstructions.shape)}"
        )
    images01, reconstructions01 = to_unit_range(images), to_unit_range(reconstructions)
    error = reconstructions01 - images01
    mae = error.abs().flatten(1).mean(1)
    mse = error.square().flatten(1).mean(1)
    ssim = _ssim(reconstructions01, images01)
    return {
        "mae": mae,
        "mse": mse,
        "psnr": psnr_from_mse(mse).float(),
        "ssim": ssim.reshape(-1).float(),
        "mae_pm1": 2 * mae,  # the same error measured on [-1, 1]
        "mse_pm1": 4 * mse,
    }


def image_psnr(image: Tensor, reconstruction: Tensor) -> float:
    """PSNR in dB on [0, 1] of one image pair (3, H, W) given in [-1, 1] (inf for an exact copy), as per_image_metrics."""
    error = to_unit_range(reconstruction) - to_unit_range(image)
    return float(psnr_from_mse(error.square().mean()))


# --------------------------------------------------------------------------- LPIPS backbone (rFID: fid.py)


def build_lpips(device: torch.device | str = "cpu", weights_dir: str | Path | None = None) -> LpipsFn:
    """VGG LPIPS (v0.1, as torchmetrics' and the lpips package's) as a per-image function of images in [0, 1].

    The same module as the LPIPS loss (losses.LPIPS), with its files found by pretrained.py: torchvision's
    ImageNet VGG16 (weights_dir, $VAEHELPERS_WEIGHTS or the torch hub cache; never downloaded here) and the
    linear layers. Raises pretrained.MissingWeightsError / BadWeightsError (RuntimeErrors, one line) naming the file.
    """
    from vaehelpers import pretrained
    from vaehelpers.losses import LPIPS

    for name in ("lpips", "vgg16"):  # missing: one line with the way out that fits evaluation
        pretrained.require(name, weights_dir, instead="turn LPIPS off (evaluate --no-lpips; lpips=False)")
    module = LPIPS(weights_dir=weights_dir).to(device).eval()

    @torch.no_grad()
    def lpips(images01: Tensor, reconstructions01: Tensor) -> Tensor:
        return module.per_sample(images01 * 2 - 1, reconstructions01 * 2 - 1).reshape(-1)  # LPIPS takes [-1, 1]

    return lpips


# --------------------------------------------------------------------------- the evaluation loop


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


class Evaluator:
    """Accumulates per-image rows over batches and reduces them to a summary (see `evaluate`).

    Usable on its own, e.g. for validation inside training: `update(images, reconstructions, paths)` per
    batch, then `summary()`.
    """

    def __init__(self, *, lpips: LpipsFn | None = None, fid: fid_module.ReconstructionFID | None = None):
        self.lpips = lpips
        self.fid = fid
        self.rfid_reason: str | None = None if fid is not None else "rFID turned off (fid=False / --no-fid)"
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.notes: list[str] = []
        self.image_size: int | list[int] | None = None
        self._pm1 = {"mae_pm1": [], "mse_pm1": []}

    @torch.no_grad()
    def update(self, images: Tensor, reconstructions: Tensor, paths: Iterable[str] | None = None) -> None:
        """images, reconstructions: (B, 3, H, W) in [-1, 1]; paths: one name per image (default: its index)."""
        metrics = per_image_metrics(images, reconstructions)
        if self.lpips is not None or self.fid is not None:
            images01, reconstructions01 = to_unit_range(images), to_unit_range(reconstructions)
        lpips = self.lpips(images01, reconstructions01).reshape(-1).float() if self.lpips is not None else None
        if self.fid is not None:
            self.fid.update(images01, reconstructions01)
        height, width = images.shape[-2:]
        if self.image_size is None:
            self.image_size = int(height) if height == width else [int(height), int(width)]
        paths = list(paths) if paths is not None else [str(len(self.rows) + i) for i in range(len(images))]
        values = {name: tensor.double().cpu().tolist() for name, tensor in metrics.items()}
        lpips_values = lpips.double().cpu().tolist() if lpips is not None else [None] * len(images)
        for i, path in enumerate(paths):
            self.rows.append(
                {
                    "path": str(path),
                    "mae": values["mae"][i],
                    "mse": values["mse"][i],
                    "psnr": values["psnr"][i],
                    "ssim": values["ssim"][i],
                    "lpips": lpips_values[i],
                }
            )
            for name in self._pm1:
                self._pm1[name].append(values[name][i])

    def skip(self, path: str, reason: str) -> None:
        """Record a file that could not be evaluated."""
        self.skipped.append({"path": str(path), "reason": str(reason)})

    def summary(self) -> dict[str, Any]:
        """The evaluate() dictionary (keys documented there)."""
        n = len(self.rows)
        mse = _mean([row["mse"] for row in self.rows])
        rfid = None
        if self.fid is not None and self.fid.n_images >= 2:  # a covariance needs two images
            rfid = self.fid.compute()
        elif self.fid is not None:
            self.rfid_reason = f"rFID needs at least 2 images, got {self.fid.n_images}"
        return {
            "n_images": n,
            "image_size": self.image_size,
            "pixel_range": "[0,1]",
            "mae": _mean([row["mae"] for row in self.rows]),
            "mse": mse,
            "psnr": _mean([min(row["psnr"], PSNR_CAP_DB) for row in self.rows]),
            "psnr_from_mean_mse": None if mse is None else min(float(psnr_from_mse(mse)), PSNR_CAP_DB),
            "psnr_cap_db": PSNR_CAP_DB,
            "ssim": _mean([row["ssim"] for row in self.rows]),
            "lpips": _mean([row["lpips"] for row in self.rows]) if self.lpips is not None else None,
            "lpips_net": "vgg",
            "rfid": rfid,
            **fid_module.rfid_details(
                self.fid.n_images if self.fid is not None else 0,
                None if rfid is not None else self.rfid_reason or "not computed",
            ),
            "pm1_range": "[-1,1]",
            "mae_pm1": _mean(self._pm1["mae_pm1"]),
            "mse_pm1": _mean(self._pm1["mse_pm1"]),
            "n_skipped": len(self.skipped),
            "skipped": list(self.skipped),
            "notes": list(self.notes),
            "per_image": list(self.rows),
        }


def _resolve_lpips(
    lpips: bool | str | LpipsFn | None, device: torch.device, notes: list[str], weights_dir: str | Path | None = None
) -> LpipsFn | None:
    """lpips="auto": try, and on failure warn once and go on; True: must work; False/None: off; callable: use it."""
    if callable(lpips):
        return lpips
    if lpips in (False, None):
        return None
    if lpips not in (True, "auto"):
        raise ValueError(f"lpips must be 'auto', True, False or a callable, got {lpips!r}")
    return _optional("LPIPS", lambda: build_lpips(device, weights_dir), lpips is True, notes)[0]


def _resolve_fid(
    fid: bool | str | nn.Module | fid_module.FeatureFn | None,
    device: torch.device,
    weights_dir: str | Path | None,
    notes: list[str],
) -> tuple[fid_module.ReconstructionFID | None, str | None]:
    """(the rFID accumulator or None, why it is None). fid="auto": Inception rFID, or null with a warning when its
    weights are missing; True: must load; False/None: off; a module or callable: its features (tests)."""
    if fid is False or fid is None:
        return None, "rFID turned off (fid=False / --no-fid)"
    if fid not in (True, "auto") and not callable(fid):
        raise ValueError(f"fid must be 'auto', True, False or a feature module, got {fid!r}")
    return _optional(
        "rFID",
        lambda: fid_module.build_rfid(True if fid == "auto" else fid, weights_dir=weights_dir, device=device),
        fid is True,
        notes,
    )


def _optional(what: str, build: Callable[[], Any], required: bool, notes: list[str]) -> tuple[Any, str | None]:
    """(build(), None), or where it raises RuntimeError (e.g. missing weights): re-raise when required, else warn
    once, add the reason to notes and give (None, reason): the metric is reported as null."""
    try:
        return build(), None
    except RuntimeError as error:
        if required:
            raise
        message = f"{what} not computed (reported as null): {error}"
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        notes.append(message)
        return None, str(error)


def _reconstruct_full_size(model: nn.Module, image: Tensor, tile: int | str, device: torch.device) -> Tensor:
    """One whole image (3, H, W) in [-1, 1] -> its reconstruction (3, H, W) on the CPU, tiled where needed."""
    from vaehelpers import tiling
    from vaehelpers.latents import reconstruct_image

    factor = model.config.downsample_factor
    height, width = (-(-side // factor) * factor for side in image.shape[-2:])
    chosen, _ = tiling.decide(model.config.base_channels, height, width, tile, device)
    return reconstruct_image(model, image, tiled=chosen)[0]


def _item_image(item: Any) -> Tensor:
    """A dataset item is an image tensor, or a tuple/list/dict whose first (or "image") entry is one."""
    if isinstance(item, Tensor):
        return item
    if isinstance(item, dict):
        return item["image"]
    return item[0]


def _item_path(dataset: Any, index: int) -> str:
    if hasattr(dataset, "get_path"):
        return str(dataset.get_path(index))
    if hasattr(dataset, "paths"):
        return str(dataset.paths[index])
    return str(index)


def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    sample_posterior: bool = False,
    generator: torch.Generator | None = None,
    lpips: bool | str | LpipsFn | None = "auto",
    fid: bool | str | nn.Module = "auto",
    weights_dir: str | Path | None = None,
    precision: str = "fp32",
    progress: bool = True,
    full_size: bool = False,
    tile: int | str = "auto",
) -> dict[str, Any]:
    """Reconstruct every image of `dataset` with `model` and measure how close the reconstructions are.

    model: an AutoencoderKL (anything with encode(images) -> posterior and decode(latents)).
    dataset: items are (3, S, S) tensors in [-1, 1] (or tuples starting with one), e.g. ImageFolderDataset;
        its `bad_files` [(path, reason)] are reported as skipped, and so is an item that raises BadImageError.
    device: where to run: None (default) is where the model's parameters are; given, the model is moved there.
    sample_posterior: decode a sample of the posterior (with `generator`) instead of its mode (the default,
        deterministic).
    lpips: "auto" (VGG LPIPS; without its weights warn once and report None), True (fail without them), False,
        or a callable (images, reconstructions) in [0, 1] -> (B,) scores.
    fid: rFID of the reconstructions against the originals (fid.py: torch-fidelity's InceptionV3 pool3): "auto"
        (default: where its weights are found; else None with a warning and the reason in rfid_reason), True (fail
        without them), False, or an nn.Module feature extractor ((B,3,H,W) in [0, 1] -> (B, F)).
    weights_dir: a folder holding the pretrained files (else $VAEHELPERS_WEIGHTS, then the torch hub cache).
    precision: "fp32" (default; the VAE is sensitive to fp16), "bf16", "fp16" or "auto" (runtime.resolve_precision):
        autocast for the model only; metrics are always computed in float32.
    full_size: items are whole images of any size (reconstruct.FullSizeImages): each runs alone, padded to a
        multiple of the downsample factor and cropped back, tiled where it would not fit (`tile`: "auto", a tile
        size in pixels, or "off"; see tiling.decide); image_size is then "full". Posterior mode, fp32.

    Returns a dict: n_images, image_size, pixel_range "[0,1]", mae, mse, psnr (mean over images, each capped
    at psnr_cap_db), psnr_from_mean_mse, psnr_cap_db, ssim, lpips, lpips_net, rfid, rfid_n_images, rfid_min_images,
    rfid_warning (bias below rfid_min_images images, or None), rfid_reason (why rfid is None), pm1_range "[-1,1]",
    mae_pm1, mse_pm1, n_skipped, skipped [{path, reason}], notes [str], per_image [{path, mae, mse, psnr,
    ssim, lpips}], sample_posterior, precision, device, seconds. Metric means are None with no images.
    """
    from tqdm.auto import tqdm

    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    else:
        device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        model.to(device)
    precision = resolve_precision(precision, device)
    notes: list[str] = []
    rfid, rfid_reason = _resolve_fid(fid, device, weights_dir, notes)
    evaluator = Evaluator(lpips=_resolve_lpips(lpips, device, notes, weights_dir), fid=rfid)
    evaluator.rfid_reason = rfid_reason
    evaluator.notes.extend(notes)
    for path, reason in getattr(dataset, "bad_files", []):
        evaluator.skip(path, reason)

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    batch_starts = range(0, len(dataset), batch_size)
    try:
        for first in tqdm(batch_starts, desc="evaluate", unit="batch", disable=not progress):
            images, paths = [], []
            for index in range(first, min(first + batch_size, len(dataset))):
                try:
                    images.append(_item_image(dataset[index]))
                    paths.append(_item_path(dataset, index))
                except BadImageError as error:  # a file that broke after indexing: skip it, say so
                    evaluator.skip(_item_path(dataset, index), error.reason)
            if not images:
                continue
            if full_size:  # each image at its own size, alone (reconstruct_image pads, tiles and crops)
                for image, path in zip(images, paths, strict=True):
                    reconstruction = _reconstruct_full_size(model, image, tile, device)
                    evaluator.update(image[None].to(device).float(), reconstruction[None].to(device).float(), [path])
                continue
            images = torch.stack(images).to(device)  # (B, 3, S, S) in [-1, 1]
            with torch.no_grad(), autocast(device, precision):
                posterior = model.encode(images)
                latents = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
                reconstructions = model.decode(latents)
            evaluator.update(images.float(), reconstructions.float(), paths)
    finally:
        model.train(was_training)

    summary = evaluator.summary()
    if full_size:
        summary["image_size"] = "full"
    summary.update(
        sample_posterior=sample_posterior,
        precision=precision,
        device=str(device),
        seconds=round(time.perf_counter() - start, 3),
    )
    return summary


# --------------------------------------------------------------------------- printing and files


def _format_value(value: Any, spec: str = ".5g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a two-column text table (metric, value), naming the pixel range of each number."""
    pixel, pm1 = summary.get("pixel_range", "[0,1]"), summary.get("pm1_range", "[-1,1]")
    lpips = summary.get("lpips")
    rows = [
        ("images", summary.get("n_images")),
        ("image size", summary.get("image_size")),
        (f"MAE  on {pixel}", summary.get("mae")),
        (f"MSE  on {pixel}", summary.get("mse")),
        (f"PSNR on {pixel} (dB, mean over images)", _format_value(summary.get("psnr"), ".2f")),
        (f"PSNR on {pixel} (dB, of the mean MSE)", _format_value(summary.get("psnr_from_mean_mse"), ".2f")),
        (f"SSIM on {pixel}", summary.get("ssim")),
        (
            f"LPIPS ({summary.get('lpips_net', 'vgg')})",
            lpips if lpips is not None else "n/a (weights unavailable or turned off)",
        ),
        (
            f"rFID (Inception pool3, {summary.get('rfid_n_images')} image pairs)"
            if summary.get("rfid") is not None
            else "rFID",
            summary.get("rfid")
            if summary.get("rfid") is not None
            else "n/a (weights unavailable or turned off: see rfid_reason)",
        ),
        (f"MAE  on {pm1} (seed's range)", summary.get("mae_pm1")),
        (f"MSE  on {pm1} (seed's range)", summary.get("mse_pm1")),
        ("skipped files", summary.get("n_skipped", 0)),
    ]
    cells = [(name, _format_value(value)) for name, value in rows]
    width = max(len(name) for name, _ in cells)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{name:<{width}}  {value}" for name, value in cells]
    if summary.get("rfid_warning"):
        lines.append(f"warning: {summary['rfid_warning']}")
    for skipped in summary.get("skipped", []):
        lines.append(f"skipped: {skipped['path']}: {skipped['reason']}")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """Non-finite floats become the strings "inf", "-inf", "nan" so that the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(summary: dict[str, Any], path: str | Path) -> Path:
    """Write the summary (with per_image rows) as strict JSON; an exact copy's PSNR is written as "inf"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
    return path


def write_per_image_csv(summary: dict[str, Any], path: str | Path) -> Path:
    """Write the per_image rows as CSV: path, mae, mse, psnr, ssim, lpips (empty where None; psnr may be inf)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=PER_IMAGE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in summary["per_image"]:
            writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in PER_IMAGE_FIELDS})
    return path
