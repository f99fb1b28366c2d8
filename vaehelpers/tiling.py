"""Tiled encode and decode for images of any size, with GroupNorm statistics over the whole image.

Why not plain tiles: every GroupNorm normalises with the mean and variance of its whole input. A tile on its
own measures its own statistics, so neighbouring tiles come out in different tones (diffusers' enable_tiling
blends the seams but keeps the per-tile statistics). Here each GroupNorm normalises every tile with the
statistics of the whole image, summed in float64 over each tile's own (non-overlapping) core region.

How, in bounded memory. GroupNorm k's input depends on the statistics of every earlier GroupNorm, so the
statistics must be known layer by layer. The tiles run as threads that take turns on the CPU/GPU (one computes
at a time); at each GroupNorm every tile adds its core's sums, waits until all tiles have, and goes on with the
whole-image statistics (a barrier per GroupNorm). This is the untiled computation, layer for layer, and holds
every tile's activations at once. Where that does not fit, the statistics come from an evenly spread sample of
`stats_tiles` tiles run this way (pass 1), and then every tile runs alone with those statistics frozen (pass 2):
memory of `stats_tiles` tiles, not of the image; the statistics are then an estimate (results/tiling.md measures
what it costs).

Convolutions see zeros beyond a tile's window, so a tile's outputs near its window edge are off; adjacent windows
overlap by at least `overlap` pixels and are blended with linear ramps across the middle half of the overlap; the
outputs in the outer quarter on each side get no weight (so tiles are exact where that quarter covers the
convolutions' context). The mid block's attention is global (every tile's queries attend to the keys and values of every tile's
core, gathered at a barrier) when all tiles run together, else per tile (over the tile's own window).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger("vaehelpers.tiling")

# Untiled activation memory, bytes per image pixel per unit of base width (fp32): a full-resolution ResNet holds
# several maps of base_channels floats at once. Measured on CPU with /usr/bin/time -v (results/tiling.md): sd (base
# 128) at 512x512 peaks about 1.0 GB above the weights in encode and 1.2 GB in decode, 36 bytes per pixel per channel.
BYTES_PER_PIXEL_PER_CHANNEL = 40


@dataclass(frozen=True)
class Tiling:
    """How to tile. Sizes are in image pixels, multiples of the downsample factor (8).

    tile: the window side (a window never exceeds the image: a smaller image is one tile along that axis).
    overlap: pixels shared by adjacent windows, blended with linear ramps; it should cover the convolutions'
        context near a window edge (64 is enough for sd to stay within 0.01 mean |diff|, results/tiling.md).
    stats_tiles: how many tiles measure the GroupNorm statistics together; None: every tile (the untiled
        statistics, memory of the whole image); k: an evenly spread sample of k tiles, then a second pass.
    attention: "auto" (global when all tiles run together, else per tile), "global" or "tile".
    """

    tile: int = 512
    overlap: int = 64
    stats_tiles: int | None = None
    attention: Literal["auto", "global", "tile"] = "auto"

    def check(self, factor: int = 8) -> None:
        """Raise a ValueError naming the setting when it cannot tile."""
        if self.tile <= 0 or self.tile % factor:
            raise ValueError(f"tile must be a positive multiple of {factor} pixels, got {self.tile}")
        if self.overlap < 0 or self.overlap % factor or self.overlap >= self.tile:
            raise ValueError(
                f"overlap must be a multiple of {factor} pixels, at least 0 and below the tile ({self.tile}), "
                f"got {self.overlap}"
            )
        if self.stats_tiles is not None and self.stats_tiles < 1:
            raise ValueError(f"stats_tiles must be at least 1 (or None: all tiles), got {self.stats_tiles}")
        if self.attention not in ("auto", "global", "tile"):
            raise ValueError(f"attention must be auto, global or tile, got {self.attention!r}")


@dataclass(frozen=True)
class Tile:
    """One window in latent units: rows [top, bottom), columns [left, right); its core (the pixels it owns for
    the statistics) and its blend weights along each axis (latent resolution; upsampled for images)."""

    top: int
    bottom: int
    left: int
    right: int
    core: tuple[int, int, int, int]  # (top, bottom, left, right) relative to the window
    weight_rows: Tensor  # (bottom - top,)
    weight_cols: Tensor  # (right - left,)


def _windows(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Windows along one axis of `length` latent pixels: (start, end, core_start, core_end), evenly spread.

    n = ceil((length - overlap) / (tile - overlap)) windows of `tile` (or one window of `length`); adjacent
    windows overlap by at least `overlap`; core boundaries sit in the middle of each overlap.
    """
    if length <= tile:
        return [(0, length, 0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    tile = min(tile, math.ceil((length - overlap) / n) + overlap)  # n windows just covering: the least overlap
    starts = [round(i * (length - tile) / (n - 1)) for i in range(n)]
    bounds = [0] + [(starts[i] + starts[i - 1] + tile) // 2 for i in range(1, n)] + [length]
    return [(s, s + tile, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def _ramps(windows: list[tuple[int, int, int, int]], overlap: int) -> list[Tensor]:
    """Blend weights per window (float64), summing to 1 everywhere.

    Each window's profile is 0 within overlap/4 of an edge it shares with a neighbour (context only: there its
    convolutions saw zeros), then rises linearly over overlap/2, then is 1; the profiles are divided by their sum.
    """
    length = windows[-1][1]
    margin = overlap // 4
    ramp = (torch.arange(overlap - 2 * margin, dtype=torch.float64) + 0.5) / max(overlap - 2 * margin, 1)
    rise = torch.cat([torch.zeros(margin, dtype=torch.float64), ramp])
    profiles = []
    for start, end, _, _ in windows:
        profile = torch.zeros(length, dtype=torch.float64)
        profile[start:end] = 1
        if start > 0:
            profile[start : start + len(rise)] *= rise
        if end < length:
            profile[end - len(rise) : end] *= rise.flip(0)
        profiles.append(profile)
    total = torch.stack(profiles).sum(0)
    return [(profile / total)[start:end] for profile, (start, end, _, _) in zip(profiles, windows, strict=True)]


def plan_tiles(height: int, width: int, tiling: Tiling, factor: int = 8) -> list[Tile]:
    """The tiles of a latent grid height x width (image pixels / factor), row by row."""
    tile, overlap = tiling.tile // factor, tiling.overlap // factor
    rows, cols = _windows(height, tile, overlap), _windows(width, tile, overlap)
    row_weights, col_weights = _ramps(rows, overlap), _ramps(cols, overlap)
    return [
        Tile(top, bottom, left, right, (ct - top, cb - top, cl - left, cr - left), row_weight, col_weight)
        for (top, bottom, ct, cb), row_weight in zip(rows, row_weights, strict=True)
        for (left, right, cl, cr), col_weight in zip(cols, col_weights, strict=True)
    ]


def sample_tiles(n: int, k: int) -> list[int]:
    """k of n tile indices, evenly spread over the row-major order from the middle of each k-th (all when k >= n).

    Not from the ends: the first and last tiles are corners, whose zero-padded edges bias the statistics.
    """
    if k >= n:
        return list(range(n))
    return [int((i + 0.5) * n / k) for i in range(k)]


# ---------------------------------------------------------------------------- the tile threads and their barriers


class _Aborted(RuntimeError):
    """Another tile failed; this one stops."""


class _Barriers:
    """Where the tile threads meet: at each GroupNorm (sums) and attention (keys and values).

    One Condition is both the baton (a thread holds its lock while it computes, so one tile runs at a time and
    torch keeps every core) and the meeting place (wait() hands the baton on).
    """

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.cv = threading.Condition()
        self.parts: dict[Any, list[Any]] = {}
        self.results: dict[Any, Any] = {}
        self.error: BaseException | None = None

    def meet(self, key: Any, part: Any, combine: Callable[[list[Any]], Any], index: int) -> Any:
        """Deposit `part` under `key`, wait for every party, return combine(parts in tile order). Holds cv."""
        parts = self.parts.setdefault(key, [None] * self.parties)
        parts[index] = part
        if all(p is not None for p in parts):
            self.results[key] = combine(parts)
            del self.parts[key]
            self.cv.notify_all()
        while key not in self.results:
            if self.error is not None:
                raise _Aborted("another tile failed")
            self.cv.wait()
        return self.results[key]

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.cv.notify_all()


@dataclass
class _TileState:
    """What a patched GroupNorm or attention needs to know about the tile its thread runs."""

    core: tuple[int, int, int, int]  # at the tile input's resolution
    size: tuple[int, int]  # the tile input's (H, W)
    index: int  # within the tiles running together
    barriers: _Barriers | None  # None: frozen statistics, per-tile attention


def _is_attention(module: nn.Module) -> bool:
    """model.Attention, known by its layers (model.py imports this module, so this one does not import it back)."""
    return all(hasattr(module, name) for name in ("group_norm", "to_q", "to_k", "to_v", "to_out"))


class _Patched:
    """GroupNorm and attention forwards replaced (instance attributes) for the duration of a tiled call."""

    def __init__(self, root: nn.Module, global_attention: bool) -> None:
        self.local = threading.local()
        self.stats: dict[int, Tensor] = {}  # id(norm) -> (B, G, 2) float64 mean and variance
        self.norms = [m for m in root.modules() if isinstance(m, nn.GroupNorm)]
        self.attentions = [m for m in root.modules() if _is_attention(m)] if global_attention else []

    @contextmanager
    def active(self) -> Iterator[_Patched]:
        for norm in self.norms:
            norm.forward = self._norm_forward(norm)
        for attention in self.attentions:
            attention.forward = self._attention_forward(attention)
        try:
            yield self
        finally:
            for module in self.norms + self.attentions:
                del module.forward

    def _core(self, x: Tensor) -> Tensor:
        """The tile's core region of x (B, C, h, w), at x's resolution."""
        state: _TileState = self.local.state
        (top, bottom, left, right), (height, width) = state.core, state.size
        h, w = x.shape[-2:]
        return x[..., top * h // height : bottom * h // height, left * w // width : right * w // width]

    def _norm_forward(self, norm: nn.GroupNorm) -> Callable[[Tensor], Tensor]:
        key = id(norm)

        def forward(x: Tensor) -> Tensor:
            b, c = x.shape[:2]
            groups = norm.num_groups
            if key not in self.stats:
                state: _TileState = self.local.state
                core = self._core(x)  # (B, C, h_core, w_core), a view
                width = c // groups
                part = torch.zeros(3, b, groups, dtype=torch.float64, device=x.device)  # sum, sum of squares, count
                for group in range(groups):  # one group at a time in float64: a copy of 1/G of the core
                    values = core[:, group * width : (group + 1) * width].double()
                    part[0, :, group] = values.sum((1, 2, 3))
                    part[1, :, group] = values.pow(2).sum((1, 2, 3))
                part[2] = values[0].numel()
                summed = state.barriers.meet(key, part, lambda parts: torch.stack(parts).sum(0), state.index)
                mean = summed[0] / summed[2]
                var = (summed[1] / summed[2] - mean.pow(2)).clamp_min(0)
                stats = torch.stack([mean, var], dim=-1)  # (B, G, 2)
                if state.index == 0:
                    self.stats[key] = stats  # what a second pass will use (every thread computed the same)
            else:
                stats = self.stats[key]
            mean, var = stats[..., 0], stats[..., 1]
            rstd = (var + norm.eps).rsqrt()
            grouped = x.reshape(b, groups, -1)  # (B, G, C/G * h * w)
            normed = (grouped - mean.to(x.dtype)[..., None]).mul_(rstd.to(x.dtype)[..., None])  # one new map
            normed = normed.reshape(x.shape)
            if norm.affine:
                normed = normed.mul_(norm.weight.view(1, c, 1, 1)).add_(norm.bias.view(1, c, 1, 1))
            return normed

        return forward

    def _attention_forward(self, attention: nn.Module) -> Callable[[Tensor], Tensor]:
        key = ("attention", id(attention))

        def forward(x: Tensor) -> Tensor:
            state: _TileState = self.local.state
            b, c, h, w = x.shape
            normed = attention.group_norm(x)
            tokens = normed.flatten(2).transpose(1, 2)  # (B, h*w, C)
            core_tokens = self._core(normed).flatten(2).transpose(1, 2)  # (B, core h*w, C)
            part = (attention.to_k(core_tokens), attention.to_v(core_tokens))
            keys, values = state.barriers.meet(
                key, part, lambda parts: tuple(torch.cat(t, dim=1) for t in zip(*parts, strict=True)), state.index
            )
            q = attention.to_q(tokens).unsqueeze(1)  # (B, 1, h*w, C)
            attended = F.scaled_dot_product_attention(q, keys.unsqueeze(1), values.unsqueeze(1)).squeeze(1)
            attended = attention.to_out[0](attended).transpose(1, 2).reshape(b, c, h, w)
            return attended + x

        return forward


def _run_together(
    patched: _Patched, fn: Callable[[Tensor], Tensor], inputs: list[Tensor], tiles: list[Tile], factor_in: int
) -> list[Tensor]:
    """Run fn on every input in its own thread, meeting at each GroupNorm (and attention); outputs in order."""
    barriers = _Barriers(len(inputs))
    outputs: list[Tensor | None] = [None] * len(inputs)
    # grad mode and autocast are per thread: the tile threads take the caller's
    grad, device_type = torch.is_grad_enabled(), inputs[0].device.type
    autocast = torch.is_autocast_enabled(device_type)
    autocast_dtype = torch.get_autocast_dtype(device_type) if autocast else None

    def work(index: int) -> None:
        tile = tiles[index]
        size = (inputs[index].shape[-2], inputs[index].shape[-1])
        core = tuple(v * factor_in for v in tile.core)
        with barriers.cv:
            try:
                patched.local.state = _TileState(core, size, index, barriers)
                with torch.set_grad_enabled(grad), torch.autocast(device_type, autocast_dtype, enabled=autocast):
                    outputs[index] = fn(inputs[index])
            except _Aborted:
                pass
            except BaseException as error:  # noqa: BLE001 - handed to the caller below
                barriers.fail(error)

    threads = [threading.Thread(target=work, args=(i,), name=f"tile-{i}") for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if barriers.error is not None:
        raise barriers.error
    return outputs  # type: ignore[return-value]


def _run_frozen(patched: _Patched, fn: Callable[[Tensor], Tensor], tile_input: Tensor, tile: Tile, factor_in: int):
    """Run fn on one tile with every GroupNorm's statistics frozen (no threads)."""
    core = tuple(v * factor_in for v in tile.core)
    patched.local.state = _TileState(core, tuple(tile_input.shape[-2:]), 0, None)
    return fn(tile_input)


def run_tiled(
    fn: Callable[[Tensor], Tensor],
    root: nn.Module,
    inputs: Tensor,
    tiling: Tiling,
    *,
    factor_in: int,
    factor_out: int,
) -> Tensor:
    """Apply fn (a network made of `root`'s modules) to `inputs` (B, C, H, W) tile by tile, GroupNorm statistics
    over the whole input, outputs blended. factor_in, factor_out: input and output pixels per latent pixel
    (encoder: 8 and 1; decoder: 1 and 8). Returns (B, C_out, h * factor_out, w * factor_out), h = H / factor_in.
    """
    height, width = inputs.shape[-2] // factor_in, inputs.shape[-1] // factor_in
    tiles = plan_tiles(height, width, tiling, factor=max(factor_in, factor_out))  # tile sizes are in image pixels

    def crop(tile: Tile) -> Tensor:
        return inputs[
            ..., tile.top * factor_in : tile.bottom * factor_in, tile.left * factor_in : tile.right * factor_in
        ]

    chosen = sample_tiles(len(tiles), tiling.stats_tiles or len(tiles))
    together = len(chosen) == len(tiles)
    global_attention = tiling.attention == "global" or (tiling.attention == "auto" and together)
    if global_attention and not together:
        raise ValueError("global attention needs every tile to run together (stats_tiles=None)")
    patched = _Patched(root, global_attention)
    output: Tensor | None = None
    weight_sum: Tensor | None = None

    def blend(tile: Tile, result: Tensor) -> None:
        nonlocal output, weight_sum
        if output is None:
            shape = (*result.shape[:2], height * factor_out, width * factor_out)
            output = torch.zeros(shape, dtype=result.dtype, device=result.device)
        rows = tile.weight_rows.repeat_interleave(factor_out).to(result.device)
        cols = tile.weight_cols.repeat_interleave(factor_out).to(result.device)
        weight = (rows[:, None] * cols[None, :]).to(result.dtype)  # (h_tile, w_tile)
        region = output[
            ..., tile.top * factor_out : tile.bottom * factor_out, tile.left * factor_out : tile.right * factor_out
        ]
        region.add_(result * weight)

    logger.info(
        "%d tiles of up to %dx%d pixels; GroupNorm statistics over %s",
        len(tiles),
        (tiles[0].bottom - tiles[0].top) * max(factor_in, factor_out),
        (tiles[0].right - tiles[0].left) * max(factor_in, factor_out),
        "all of them together" if together else f"a sample of {len(chosen)} (pass 1), then each tile alone (pass 2)",
    )
    with patched.active():
        results = _run_together(patched, fn, [crop(tiles[i]) for i in chosen], [tiles[i] for i in chosen], factor_in)
        if together:
            for tile, result in zip(tiles, results, strict=True):
                blend(tile, result)
        else:
            del results  # pass 1 only measured the statistics
            for number, tile in enumerate(tiles, 1):
                blend(tile, _run_frozen(patched, fn, crop(tile), tile, factor_in))
                logger.info("tile %d/%d done", number, len(tiles))
    return output


# ---------------------------------------------------------------------------- memory: when to tile, and how


def untiled_bytes(base_channels: int, height: int, width: int) -> int:
    """Activation memory of an untiled encode or decode of one height x width image (an estimate, see the constant)."""
    return BYTES_PER_PIXEL_PER_CHANNEL * base_channels * height * width


def available_bytes(device: torch.device | str) -> int | None:
    """Memory free for activations: free GPU memory on CUDA, else available RAM (psutil, /proc/meminfo); None: unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


DEFAULT_OVERLAP = 64  # pixels; see Tiling.overlap and results/tiling.md


def default_overlap(tile: int) -> int:
    """DEFAULT_OVERLAP, or a quarter of a small tile (a multiple of 8), so that any tile of 8 or more pixels works."""
    return min(DEFAULT_OVERLAP, tile // 4 // 8 * 8)


def choose_tiling(
    base_channels: int, height: int, width: int, budget: int | None, *, tile: int | None = None
) -> Tiling | None:
    """None when the untiled height x width image fits `budget` bytes and no tile is forced, else a Tiling.

    Without `tile`, the tile is the largest multiple of 64 pixels whose untiled memory fits a quarter of the
    budget (so that at least four tiles measure the statistics together). stats_tiles: as many tiles as fit the
    budget (None, the exact statistics, when all do or the budget is unknown).
    """
    if tile is None:
        if budget is None or untiled_bytes(base_channels, height, width) <= budget:
            return None
        side = math.isqrt(max(budget // 4 // (BYTES_PER_PIXEL_PER_CHANNEL * base_channels), 1))
        tile = max(side // 64 * 64, 256)
    chosen = Tiling(tile=tile, overlap=default_overlap(tile))
    chosen.check()
    tiles = len(plan_tiles(height // 8, width // 8, chosen))
    per_tile = untiled_bytes(base_channels, min(tile, height), min(tile, width))
    fitting = tiles if budget is None else max(1, budget // max(per_tile, 1))
    return dataclasses.replace(chosen, stats_tiles=None if fitting >= tiles else int(fitting))


def decide(
    base_channels: int,
    height: int,
    width: int,
    tile: int | Literal["auto", "off"],
    device: torch.device | str,
    *,
    memory_fraction: float = 0.4,
) -> tuple[Tiling | None, str]:
    """How to run one height x width image: (None for untiled, or a Tiling) and one line saying why.

    tile: "off" never tiles; an int forces that tile size (a tile as large as the image means untiled); "auto"
    tiles when the untiled image's estimated activations exceed `memory_fraction` of the free memory (free GPU
    memory on CUDA, available RAM on CPU).
    """
    if tile == "off":
        return None, "untiled (--no-tile)"
    free = available_bytes(device)
    budget = None if free is None else int(free * memory_fraction)
    if tile == "auto":
        chosen = choose_tiling(base_channels, height, width, budget)
        need = untiled_bytes(base_channels, height, width) / 2**30
        if chosen is None:
            where = "memory unknown" if budget is None else f"budget {budget / 2**30:.1f} GiB"
            return None, f"untiled: needs about {need:.1f} GiB ({where})"
        why = f"tiled: untiled needs about {need:.1f} GiB, over the budget of {budget / 2**30:.1f} GiB"
    else:
        chosen = choose_tiling(base_channels, height, width, budget, tile=tile)
        if max(height, width) <= tile:
            return None, f"untiled: the image fits one {tile}-pixel tile"
        why = f"tiled (--tile {tile})"
    stats = "all tiles" if chosen.stats_tiles is None else f"a sample of {chosen.stats_tiles} tiles"
    return chosen, f"{why}; {chosen.tile} px tiles, overlap {chosen.overlap}, GroupNorm statistics over {stats}"
