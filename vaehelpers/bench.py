"""Speed: our AutoencoderKL against diffusers' on the same weights and inputs, and the data path.

`vaehelpers bench` times, in one process, the training step (forward with posterior sampling, the
pixel recipe's loss L1 + kl_weight * KL from vaehelpers.losses, backward, AdamW step), `encode` and
`decode` (under inference_mode), for each preset x image size x batch size asked for: ours as train.py
runs it (the resolved --precision), diffusers as shipped (fp32), and diffusers at our precision (see
build_contenders). The models run in turn, A B A B ..., on the same weights and inputs, so that a
machine whose speed drifts (shared CPUs) slows all alike; each figure is the median of the repeats
after the warm-up, and each ratio is the median of the per-pair ratios. Times come from CUDA events on a GPU and
time.perf_counter on CPU. FLOPs are counted once per call with torch.utils.flop_counter, which gives
FLOP/s and, on a GPU, the model FLOP utilisation against the GPU's dense peak (PEAK_FLOPS).

`vaehelpers bench data` (or `--data-path DIR`) times the input pipeline: images/s from the image files
(decode + resize every time) and from the uint8 cache, through a DataLoader with 0 and 2 workers,
built afresh per epoch as train.py does (so worker start-up counts).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaehelpers.config import LossConfig, ModelConfig, model_config
from vaehelpers.headroom import HeadroomGuard
from vaehelpers.losses import VAELoss
from vaehelpers.model import AutoencoderKL, Upsample2D
from vaehelpers.runtime import autocast, resolve_device, resolve_precision

OPS = ("train_step", "encode", "decode")
MIB = 2**20

# Dense (no 2:4 sparsity) peak FLOP/s per precision, from NVIDIA's datasheets; the first pattern that
# matches torch.cuda.get_device_name() wins. "fp32" is the TF32 tensor-core figure on Ampere and newer,
# because PyTorch runs fp32 convolutions (nearly all of this model's FLOPs) in TF32 there by default
# (torch.backends.cudnn.allow_tf32 is True); older GPUs have no TF32 and get their plain FP32 figure.
# Datasheets quote sparse tensor figures (e.g. H100 SXM BF16 "1,979 TFLOPS*"): halved here.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),  # H200 SXM: H100 SXM's tensor cores
    (r"H100.*(PCIe|PCIE)", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    (r"H100.*NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 417e12}),
    (r"H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),  # SXM5
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    (r"\bT4\b", {"fp16": 65e12, "fp32": 8.1e12}),  # Turing: no bf16, no TF32
    (r"V100", {"fp16": 125e12, "fp32": 15.7e12}),  # SXM2 (PCIe: 112 / 14)
    (r"P100", {"fp16": 18.7e12, "fp32": 9.3e12}),  # PCIe (SXM2: 21.2 / 10.6); no tensor cores
]


def peak_flops_for(device: torch.device, precision: str) -> float | None:
    """The dense peak FLOP/s of this GPU at `precision` (see PEAK_FLOPS); None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, name):
            return peaks.get(precision)
    return None


# ---------------------------------------------------------------------------------------------
# Measuring one call: time, FLOPs, memory


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call takes: CUDA events around it on a GPU (after a sync), perf_counter on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def time_interleaved(
    calls: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call for each named call, run in turn A B A B ...: `warmup` untimed rounds first."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call, device))
    return times


def count_flops(call: Callable[[], Any]) -> int:
    """FLOPs of one call (convolutions, matmuls, attention; forward and backward) by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def _rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc/self/statm); None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _release_free_memory() -> None:
    """gc, then glibc's malloc_trim(0), so that freed memory leaves the RSS before a baseline is taken."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def rss_peak(interval_s: float = 0.001) -> Iterator[dict[str, int | None]]:
    """Sample the RSS every `interval_s` in a thread; yields a dict whose "peak_delta" (bytes above the
    RSS at entry) is filled in on exit, or None where the RSS cannot be read."""
    result: dict[str, int | None] = {"peak_delta": None}
    base = _rss_bytes()
    if base is None:
        yield result
        return
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            value = _rss_bytes()
            if value is not None and value > peak[0]:
                peak[0] = value
            stop.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        end = _rss_bytes()
        result["peak_delta"] = max(peak[0], end or 0) - base


def peak_memory(call: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes one call needs above what was allocated before it: torch.cuda.max_memory_allocated on a GPU,
    the sampled peak RSS on CPU (approximate: the allocator may reuse memory it already holds)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _release_free_memory()
    with rss_peak() as measured:
        call()
    return measured["peak_delta"]


# ---------------------------------------------------------------------------------------------
# The contenders


def diffusers_twin(config: ModelConfig) -> nn.Module:
    """diffusers' AutoencoderKL with the shape of `config` (its state dict has our keys); ImportError without it."""
    import diffusers

    levels = len(config.channel_multipliers)
    return diffusers.AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.base_channels * m for m in config.channel_multipliers),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        scaling_factor=config.scaling_factor,
        mid_block_add_attention=config.mid_attention,
    )


@torch.no_grad()
def diffusers_difference(preset: str = "sd", height: int = 96, width: int = 160, seed: int = 0) -> dict[str, float]:
    """max |ours - diffusers| / max |diffusers'| for encode (posterior mean) and decode, fp32 on the CPU under
    no_grad, with the same random weights and inputs, with our fast paths off (the default) and on.

    Keys: encode, decode (fast paths off), encode_fast, decode_fast. The README quotes these numbers.
    """
    config = model_config(preset)
    torch.manual_seed(seed)
    ours = AutoencoderKL(config).eval()
    theirs = diffusers_twin(config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(1, config.in_channels, height, width, generator=generator) * 2 - 1
    f = config.downsample_factor
    latents = torch.randn(1, config.latent_channels, height // f, width // f, generator=generator)
    their_mean, their_images = theirs.encode(images).latent_dist.mean, theirs.decode(latents).sample

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    result = {}
    for suffix, fast in (("", False), ("_fast", True)):
        ours.enable_fast_paths(fast)
        result[f"encode{suffix}"] = relative(ours.encode(images).mean, their_mean)
        result[f"decode{suffix}"] = relative(ours.decode(latents), their_images)
    return result


@dataclass
class Contender:
    """One model under test, the precision it runs at, and how to call it: encode -> posterior, decode -> images."""

    name: str
    model: nn.Module
    precision: str
    encode: Callable[[torch.Tensor], Any]
    decode: Callable[[torch.Tensor], torch.Tensor]
    channels_last: bool = False
    optimizer: torch.optim.Optimizer | None = None
    headroom: bool = False  # its train step measures every block's peak |activation| (headroom.py), read on the host


BASELINE = "diffusers fp32"  # diffusers' AutoencoderKL as shipped: fp32, eager, default memory layout


def build_contenders(
    config: ModelConfig,
    device: torch.device,
    precision: str,
    *,
    with_diffusers: bool = True,
    ablate: bool = False,
    headroom: bool = False,
    seed: int = 0,
) -> list[Contender]:
    """Every model under test, all holding the same weights.

    "ours {precision}" runs as train.py runs it (autocast at `precision`, channels_last on CUDA).
    "diffusers fp32" is the baseline: diffusers as shipped (fp32, NCHW). "diffusers {precision}" (when
    precision is not fp32) runs diffusers under our autocast and layout, which separates what precision
    buys from what the code buys. `ablate` adds "ours fp32" (when precision is not fp32) and ours with the
    upsampler never fused ("unfused-up": diffusers' two ops; see model.Upsample2D). `headroom` adds
    "ours {precision} headroom", whose train step is a headroom measurement step of train.py (the cost of tracking).
    """
    torch.manual_seed(seed)
    ours = AutoencoderKL(config).enable_fast_paths()  # as train.py runs it
    cuda = device.type == "cuda"
    models: list[tuple[str, nn.Module, str, bool]] = [(f"ours {precision}", ours, precision, cuda)]
    if ablate:
        if precision != "fp32":
            models.append(("ours fp32", copy.deepcopy(ours), "fp32", cuda))
        unfused = copy.deepcopy(ours)
        for module in unfused.modules():
            if isinstance(module, Upsample2D):
                module.fused = "never"
        models.append((f"ours {precision} unfused-up", unfused, precision, cuda))
    if headroom:
        models.append((f"ours {precision} headroom", copy.deepcopy(ours), precision, cuda))
    if with_diffusers:
        theirs = diffusers_twin(config)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        models.append((BASELINE, theirs, "fp32", False))
        if precision != "fp32":
            models.append((f"diffusers {precision}", copy.deepcopy(theirs), precision, cuda))
    contenders = []
    for name, model, model_precision, channels_last in models:
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if name.startswith("diffusers"):
            contender = Contender(
                name,
                model,
                model_precision,
                lambda x, m=model: m.encode(x).latent_dist,
                lambda z, m=model: m.decode(z).sample,
                channels_last,
            )
        else:
            contender = Contender(name, model, model_precision, model.encode, model.decode, channels_last)
            contender.headroom = name.endswith(" headroom")
        # train.py's optimiser: AdamW, fused kernels on CUDA
        contender.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if cuda else None)
        contenders.append(contender)
    return contenders


def make_calls(
    contender: Contender, images: torch.Tensor, latents: torch.Tensor, device: torch.device, seed: int = 0
) -> dict[str, Callable[[], Any]]:
    """The three timed operations of one contender, as argument-free calls."""
    loss_fn = VAELoss(LossConfig()).to(device)  # the pixel recipe: L1 + 1e-6 * KL, no perceptual, no GAN
    precision = contender.precision
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator(device)
    model, optimizer = contender.model, contender.optimizer
    assert optimizer is not None
    if contender.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
        latents = latents.contiguous(memory_format=torch.channels_last)

    def train_step() -> None:
        model.train()
        generator.manual_seed(seed)  # the same noise for every contender and every repeat
        probe = HeadroomGuard(model, every=0).probe() if contender.headroom else contextlib.nullcontext()
        with autocast(device, precision), probe:
            posterior = contender.encode(images)
            reconstructions = contender.decode(posterior.sample(generator=generator))
            loss, _ = loss_fn(images, reconstructions, posterior, step=0, epoch=0.0)
        if contender.headroom:  # read on the host, as train.py does on a measurement step
            torch.stack([probe.peaks(), probe.input_peaks()]).tolist()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def encode() -> None:
        model.eval()
        with torch.inference_mode(), autocast(device, precision):
            contender.encode(images)

    def decode() -> None:
        model.eval()
        with torch.inference_mode(), autocast(device, precision):
            contender.decode(latents)

    return {"train_step": train_step, "encode": encode, "decode": decode}


# ---------------------------------------------------------------------------------------------
# The model benchmark


def bench_model(
    preset: str,
    image_size: int,
    batch_size: int,
    *,
    device: torch.device,
    precision: str,
    repeats: int = 5,
    warmup: int = 1,
    ops: Sequence[str] = OPS,
    with_diffusers: bool = True,
    ablate: bool = False,
    headroom: bool = False,
    peak_flops: float | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda line: None,
) -> list[dict[str, Any]]:
    """Time `ops` for every contender at one (preset, image_size, batch_size); one row per (op, contender).

    Rows carry median/min/max ms, images/s, FLOPs per call, achieved FLOP/s, MFU (GPU with a known or
    given peak; else None), peak memory above the pre-call allocation (MiB), and the median per-pair time
    ratio to the baseline (diffusers fp32) and to diffusers at the row's own precision. Timings come
    first; FLOPs and memory in separate passes.
    """
    config = model_config(preset)
    f = config.downsample_factor
    if image_size % f:
        raise ValueError(f"--image-size {image_size} must be a multiple of the downsample factor {f}")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown ops {unknown}: choose from {list(OPS)}")
    contenders = build_contenders(
        config, device, precision, with_diffusers=with_diffusers, ablate=ablate, headroom=headroom, seed=seed
    )
    generator = torch.Generator().manual_seed(seed + 1)
    images = (torch.rand(batch_size, config.in_channels, image_size, image_size, generator=generator) * 2 - 1).to(
        device
    )
    latent_size = image_size // f
    latents = torch.randn(batch_size, config.latent_channels, latent_size, latent_size, generator=generator).to(device)
    calls = {c.name: make_calls(c, images, latents, device, seed) for c in contenders}
    rows = []
    for op in ops:
        log(
            f"  {preset} {image_size}px batch {batch_size}: {op} x {repeats} "
            f"({', '.join(c.name for c in contenders)}, interleaved)"
        )
        times = time_interleaved({c.name: calls[c.name][op] for c in contenders}, repeats, warmup, device)

        def ratio_to(name: str, baseline: str, times: dict = times) -> float | None:
            if baseline not in times or name == baseline:
                return None
            return statistics.median(a / b for a, b in zip(times[name], times[baseline]))  # pair by pair

        for contender in contenders:
            name = contender.name
            flops = count_flops(calls[name][op])
            memory = peak_memory(calls[name][op], device)
            median = statistics.median(times[name])
            achieved = flops / median if median > 0 else None
            peak = peak_flops or peak_flops_for(device, contender.precision)
            rows.append(
                {
                    "preset": preset,
                    "image_size": image_size,
                    "batch_size": batch_size,
                    "device": device.type,
                    "precision": contender.precision,
                    "op": op,
                    "model": name,
                    "repeats": repeats,
                    "warmup": warmup,
                    "median_ms": 1000 * median,
                    "min_ms": 1000 * min(times[name]),
                    "max_ms": 1000 * max(times[name]),
                    "times_ms": [1000 * t for t in times[name]],
                    "images_per_s": batch_size / median if median > 0 else None,
                    "gflop": flops / 1e9,
                    "tflop_per_s": achieved / 1e12 if achieved else None,
                    "mfu": achieved / peak if achieved and peak else None,
                    "peak_mem_mib": memory / MIB if memory is not None else None,
                    "ratio_vs_diffusers_fp32": ratio_to(name, BASELINE),
                    "ratio_vs_diffusers_same_precision": ratio_to(name, f"diffusers {contender.precision}"),
                }
            )
    return rows


MODEL_COLUMNS = (
    "op",
    "model",
    "median ms",
    "min ms",
    "max ms",
    "images/s",
    "GFLOP",
    "TFLOP/s",
    "MFU",
    "peak MiB",
    "vs diffusers fp32",
    "vs diffusers same prec.",
)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _table_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    """The first two cells left-aligned (names), the rest right-aligned (numbers)."""
    return "  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))


def format_model_table(rows: Sequence[dict[str, Any]]) -> str:
    """One block per (preset, size, batch), one line per (op, model).

    GFLOP is what FlopCounterMode counted for that implementation (ours does fewer in its upsamplers when
    decoding on CPU); TFLOP/s and MFU divide it by the median time; MFU is n/a without a peak (CPU, unknown GPU).
    """
    widths = (11, 30, 10, 9, 9, 9, 8, 8, 6, 9, 17, 22)
    lines: list[str] = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["preset"], row["image_size"], row["batch_size"], row["device"]), []).append(row)
    for (preset, size, batch, device), group in groups.items():
        first = group[0]
        lines.append(
            f"preset {preset}, {size}x{size}, batch {batch}, {device}: median of "
            f"{first['repeats']} interleaved runs after {first['warmup']} warm-up; "
            f"ratios are medians of per-run time ratios"
        )
        lines.append(_table_line(MODEL_COLUMNS, widths))
        for row in group:
            cells = [
                row["op"],
                row["model"],
                _fmt(row["median_ms"], ".1f"),
                _fmt(row["min_ms"], ".1f"),
                _fmt(row["max_ms"], ".1f"),
                _fmt(row["images_per_s"], ".1f"),
                _fmt(row["gflop"], ".2f"),
                _fmt(row["tflop_per_s"], ".4f"),
                _fmt(row["mfu"], ".1%"),
                _fmt(row["peak_mem_mib"], ".0f"),
                _ratio(row["ratio_vs_diffusers_fp32"]),
                _ratio(row["ratio_vs_diffusers_same_precision"]),
            ]
            lines.append(_table_line(cells, widths))
        lines.append("")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


# ---------------------------------------------------------------------------------------------
# The data benchmark


def default_data_path() -> Path | None:
    """The shared BSDS500 photos beside this checkout (../shared/datasets/bsds500), when present."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = (base / ".." / "shared" / "datasets" / "bsds500").resolve()
        if candidate.is_dir():
            return candidate
    return None


def _epoch_images_per_s(dataset: Any, batch_size: int, workers: int, epoch: int, seed: int) -> tuple[float, int]:
    """Iterate one epoch through a fresh DataLoader (as train.py builds one per epoch): (images/s, images)."""
    from torch.utils.data import DataLoader

    dataset.set_epoch(epoch)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    usable = len(order) - len(order) % batch_size if len(order) >= batch_size else len(order)
    batches = [order[i : i + batch_size] for i in range(0, usable, batch_size)]
    started = time.perf_counter()
    seen = 0
    for images in DataLoader(dataset, batch_sampler=batches, num_workers=workers):
        seen += images.shape[0]
    elapsed = time.perf_counter() - started
    return seen / elapsed, seen


def bench_data(
    root: str | Path | None,
    image_size: int = 128,
    batch_size: int = 8,
    workers: Sequence[int] = (0, 2),
    repeats: int = 3,
    synthetic_count: int = 512,
    seed: int = 0,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """images/s of ImageFolderDataset (train split "all", augment on) from the image files and from the cache.

    root None: synthetic PNGs in a temporary folder. The cache goes to a temporary folder, never beside
    the images (they may be read-only or shared). Returns (rows, info) with the source and cache build time.
    """
    from vaehelpers.dataset import ImageFolderDataset
    from vaehelpers.sources import make_synthetic

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vaehelpers-bench-") as scratch:
        if root is None:
            root = Path(scratch) / "synthetic"
            log(f"  writing {synthetic_count} synthetic images ({image_size * 3 // 2}px) to {root}")
            make_synthetic(root, count=synthetic_count, size=image_size * 3 // 2, seed=seed)
            source = f"synthetic ({synthetic_count} PNGs, {image_size * 3 // 2}px)"
        else:
            root = Path(root)
            source = str(root)
        started = time.perf_counter()
        cached = ImageFolderDataset(
            root,
            split="all",
            image_size=image_size,
            augment=True,
            cache=True,
            cache_dir=Path(scratch) / "cache",
            seed=seed,
        )
        build_s = time.perf_counter() - started
        files = ImageFolderDataset(root, split="all", image_size=image_size, augment=True, cache=False, seed=seed)
        info = {"source": source, "n_images": len(cached), "cache_build_s": build_s}
        for mode, dataset in (("files", files), ("cache", cached)):
            for n_workers in workers:
                log(f"  data: {mode}, {n_workers} workers, {repeats} epochs of {len(dataset)} images")
                rates = [
                    _epoch_images_per_s(dataset, batch_size, n_workers, epoch, seed)[0] for epoch in range(repeats)
                ]
                rows.append(
                    {
                        "source": source,
                        "mode": mode,
                        "workers": n_workers,
                        "image_size": image_size,
                        "batch_size": batch_size,
                        "n_images": len(dataset),
                        "repeats": repeats,
                        "images_per_s": statistics.median(rates),
                        "min_images_per_s": min(rates),
                        "max_images_per_s": max(rates),
                    }
                )
    return rows, info


DATA_COLUMNS = ("source", "workers", "images/s (median)", "min", "max")


def format_data_table(rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    if not rows:
        return ""
    first = rows[0]
    lines = [
        f"data path: {info['source']}, {info['n_images']} images, {first['image_size']}px random crop + flip, "
        f"batch {first['batch_size']}, median of {first['repeats']} epochs (fresh DataLoader each); "
        f"cache built in {info['cache_build_s']:.1f} s",
        f"{'source':<12}{'workers':>8}{'images/s (median)':>20}{'min':>10}{'max':>10}",
    ]
    for row in rows:
        lines.append(
            f"{row['mode']:<12}{row['workers']:>8}{row['images_per_s']:>20.0f}"
            f"{row['min_images_per_s']:>10.0f}{row['max_images_per_s']:>10.0f}"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The whole run


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = list(os.getloadavg())
    return info


def run_bench(
    *,
    presets: Sequence[str] = ("small",),
    image_sizes: Sequence[int] = (128,),
    batch_sizes: Sequence[int] = (8,),
    repeats: int = 5,
    warmup: int = 1,
    device: str = "auto",
    precision: str = "auto",
    ops: Sequence[str] = OPS,
    with_diffusers: bool = True,
    ablate: bool = False,
    headroom: bool = False,
    peak_tflops: float | None = None,
    part: str = "model",
    data_path: str | Path | None = "auto",
    data_workers: Sequence[int] = (0, 2),
    data_repeats: int = 3,
    seed: int = 0,
    synthetic_count: int = 512,
    json_path: str | Path | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The `vaehelpers bench` run: model part and/or data part; prints the tables, writes JSON, returns it.

    part: "model", "data" or "all". data_path: a folder, "auto" (the shared BSDS500 photos when present,
    else synthetic images) or "synthetic" (synthetic_count PNGs). peak_tflops overrides the GPU peak for MFU.
    """
    if part not in ("model", "data", "all"):
        raise ValueError(f"unknown part {part!r}: choose model, data or all")
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)  # CUDA events record on the current device's stream
    resolved_precision = resolve_precision(precision, torch_device)
    peak_override = peak_tflops * 1e12 if peak_tflops else None
    peak = peak_override or peak_flops_for(torch_device, resolved_precision)
    report: dict[str, Any] = {
        "command": command
        or canonical_command(
            part=part,
            presets=presets,
            image_sizes=image_sizes,
            batch_sizes=batch_sizes,
            repeats=repeats,
            warmup=warmup,
            device=device,
            precision=precision,
            ops=ops,
            with_diffusers=with_diffusers,
            ablate=ablate,
            headroom=headroom,
            peak_tflops=peak_tflops,
            data_path=data_path,
            data_workers=data_workers,
            data_repeats=data_repeats,
            seed=seed,
            json_path=json_path,
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch_device),
        "precision": resolved_precision,
        "peak_flops": peak,
        "model": [],
        "data": [],
        "data_info": None,
    }
    header = (
        f"vaehelpers bench: {torch_device} ({report['machine']['gpu'] or report['machine']['cpu']}), "
        f"{resolved_precision}, torch {torch.__version__}, diffusers {report['machine']['diffusers']}, "
        f"{torch.get_num_threads()} threads"
    )
    if "load_average_start" in report["machine"]:
        header += ", load average " + " ".join(f"{v:.2f}" for v in report["machine"]["load_average_start"])
    log(header)
    if part in ("model", "all"):
        if with_diffusers:
            try:
                import diffusers  # noqa: F401
            except ImportError:
                log("diffusers is not installed (pip install diffusers): timing ours only")
                with_diffusers = False
        for preset in presets:
            for image_size in image_sizes:
                for batch_size in batch_sizes:
                    report["model"] += bench_model(
                        preset,
                        image_size,
                        batch_size,
                        device=torch_device,
                        precision=resolved_precision,
                        repeats=repeats,
                        warmup=warmup,
                        ops=ops,
                        with_diffusers=with_diffusers,
                        ablate=ablate,
                        headroom=headroom,
                        peak_flops=peak_override,
                        seed=seed,
                        log=log,
                    )
        log("")
        log(format_model_table(report["model"]))
        if torch_device.type == "cuda" and peak is None:
            log("MFU: n/a (unknown GPU: give --peak-tflops)")
    if part in ("data", "all"):
        root: Path | None
        if data_path in (None, "auto"):
            root = default_data_path()
        elif str(data_path) == "synthetic":
            root = None
        else:
            root = Path(data_path)
        rows, info = bench_data(
            root,
            image_size=image_sizes[0],
            batch_size=batch_sizes[0],
            workers=data_workers,
            repeats=data_repeats,
            synthetic_count=synthetic_count,
            seed=seed,
            log=log,
        )
        report["data"], report["data_info"] = rows, info
        log(format_data_table(rows, info))
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_end"] = list(os.getloadavg())
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {path}")
    return report


def canonical_command(
    *,
    part: str,
    presets: Sequence[str],
    image_sizes: Sequence[int],
    batch_sizes: Sequence[int],
    repeats: int,
    warmup: int,
    device: str,
    precision: str,
    ops: Sequence[str],
    with_diffusers: bool,
    ablate: bool,
    headroom: bool,
    peak_tflops: float | None,
    data_path: str | Path | None,
    data_workers: Sequence[int],
    data_repeats: int,
    seed: int,
    json_path: str | Path | None,
) -> str:
    """The `vaehelpers bench` command line that reproduces these settings, every value that matters spelled out.

    Called by run_bench with all of its settings (run_bench's signature holds the defaults, once)."""
    words = ["vaehelpers", "bench", part]
    if part in ("model", "all"):
        words += ["--preset", *presets]
    words += ["--image-size", *map(str, image_sizes), "--batch-size", *map(str, batch_sizes)]
    if part in ("model", "all"):
        words += [
            "--repeats",
            str(repeats),
            "--warmup",
            str(warmup),
            "--device",
            device,
            "--precision",
            precision,
            "--ops",
            *ops,
        ]
        if not with_diffusers:
            words.append("--no-diffusers")
        if ablate:
            words.append("--ablate")
        if headroom:
            words.append("--headroom")
        if peak_tflops:
            words += ["--peak-tflops", f"{peak_tflops:g}"]
    words += ["--seed", str(seed)]
    if part in ("data", "all"):
        words += [
            "--data-path",
            str(data_path or "auto"),
            "--workers",
            *map(str, data_workers),
            "--data-repeats",
            str(data_repeats),
        ]
    if json_path:
        words += ["--json", str(json_path)]
    return " ".join(words)
