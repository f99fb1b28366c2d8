"""fp16 headroom: each encoder/decoder block's peak |activation| as a fraction of float16's largest value (65504),
and the per-block fp32 fallback that keeps a block that comes near it (or overflows) out of float16.

SD-family VAEs overflow float16 in the forward pass, not only in the gradients the GradScaler guards: the SDXL VAE
reaches about 3e5 inside a decoder up block (diffusers keeps `force_upcast` for it; madebyollin's sdxl-vae-fp16-fix
exists because of it). HeadroomGuard measures every block at chosen steps (forward hooks, on-device reductions, read
once per measurement) and runs the blocks it was told to in float32 (autocast off inside them, inputs cast to
float32): diffusers' force_upcast, per block. Which blocks run in float32 is training state (a checkpoint holds it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

FP16_MAX = 65504.0  # torch.finfo(torch.float16).max
DEFAULT_THRESHOLD = 0.25  # a block whose peak passes 1/4 of FP16_MAX (within 4x of overflow) moves to float32


def named_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of an AutoencoderKL in forward order: encoder conv_in, down blocks, mid block, conv_out; then
    decoder conv_in, mid block, up blocks, conv_out (quant convs are 1x1 on the latents: left out)."""
    encoder, decoder = model.encoder, model.decoder
    return [
        ("encoder.conv_in", encoder.conv_in),
        *((f"encoder.down_blocks.{i}", block) for i, block in enumerate(encoder.down_blocks)),
        ("encoder.mid_block", encoder.mid_block),
        ("encoder.conv_out", encoder.conv_out),
        ("decoder.conv_in", decoder.conv_in),
        ("decoder.mid_block", decoder.mid_block),
        *((f"decoder.up_blocks.{i}", block) for i, block in enumerate(decoder.up_blocks)),
        ("decoder.conv_out", decoder.conv_out),
    ]


def _abs_max(tensor: Any) -> torch.Tensor | None:
    """max |x| as a float32 0-dim tensor on x's device (NaN if any NaN); None for a non-tensor. No host sync."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    return torch.linalg.vector_norm(tensor.detach(), ord=float("inf")).float()


class Probe:
    """Forward hooks that record, per block, the peak |x| of its input and of every module output inside it
    (convolutions, norms, attention, ResNet sums, the block's output) during the forwards run inside `with`.

    peaks() / input_peaks(): float32 (n_blocks,) on the device (0 for a block that did not run); no host sync.
    """

    def __init__(self, blocks: list[tuple[str, nn.Module]]) -> None:
        self.blocks = blocks
        self.outputs: list[list[torch.Tensor]] = [[] for _ in blocks]
        self.inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
        self._handles: list[Any] = []

    def __enter__(self) -> Probe:
        for index, (_, block) in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._input_hook(index)))
            for module in block.modules():
                self._handles.append(module.register_forward_hook(self._output_hook(index)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _input_hook(self, index: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if (peak := _abs_max(args[0] if args else None)) is not None:
                self.inputs[index].append(peak)

        return hook

    def _output_hook(self, index: int):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if (peak := _abs_max(output)) is not None:
                self.outputs[index].append(peak)

        return hook

    @staticmethod
    def _stack(per_block: list[list[torch.Tensor]]) -> torch.Tensor:
        device = next((v[0].device for v in per_block if v), torch.device("cpu"))
        zero = torch.zeros((), device=device)
        return torch.stack([torch.stack(values).max() if values else zero for values in per_block])

    def peaks(self) -> torch.Tensor:
        return self._stack(self.outputs)

    def input_peaks(self) -> torch.Tensor:
        return self._stack(self.inputs)


def _severity(peak: float) -> float:
    """A peak for comparisons: NaN (an overflow's usual result) counts as inf."""
    return float("inf") if math.isnan(peak) else peak


@dataclass
class BlockHeadroom:
    """One block's row: its peak |activation|, that as a fraction of FP16_MAX, and whether it runs in float32."""

    name: str
    peak: float  # inf/nan: it overflowed
    fp32: bool

    @property
    def fraction(self) -> float:
        return self.peak / FP16_MAX


def format_table(rows: list[BlockHeadroom], precision: str, threshold: float = DEFAULT_THRESHOLD) -> str:
    """A per-block table: block, what it runs in (`precision`, or fp32 for a block moved there), peak |activation|,
    that as a fraction of 65504, and a mark at the threshold."""
    width = max((len(row.name) for row in rows), default=5)
    lines = [f"  {'block':<{width}}  runs in  {'peak |act|':>11}  {'of 65504':>9}"]
    for row in rows:
        if not row.peak < float("inf"):
            mark = " OVERFLOW"
        elif row.peak >= FP16_MAX:
            mark = " above fp16's range"
        else:
            mark = " near" if row.fraction >= threshold else ""
        lines.append(
            f"  {row.name:<{width}}  {'fp32' if row.fp32 else precision:<7}  {row.peak:>11.4g}  {row.fraction:>9.2e}{mark}"
        )
    return "\n".join(lines)


class HeadroomGuard:
    """Headroom measurement and per-block float32 fallback for one AutoencoderKL.

    every: measure at the steps divisible by it (0: never); threshold: the fraction of FP16_MAX at which a block
    moves to float32; fallback: move blocks at all (fp16 training) or only measure (bf16/fp32: headroom on request).
    state_dict() holds the float32 blocks and the peaks seen, so a resumed run continues as an unbroken one.
    """

    def __init__(
        self, model: nn.Module, *, every: int = 100, threshold: float = DEFAULT_THRESHOLD, fallback: bool = True
    ) -> None:
        self.blocks = named_blocks(model)
        self.every, self.threshold, self.fallback = every, threshold, fallback
        self.fp32: list[str] = []  # in the order they were moved
        self.last: list[BlockHeadroom] = []  # the latest measurement
        self.worst_seen: dict[str, float] = {}  # per block, the largest peak of any measurement of this run
        self.news: list[str] = []  # what changed (blocks moved to fp32), for the trainer to print and clear
        self.measured_now = False  # the trainer's step measured headroom
        self._handles: dict[str, tuple[Any, Any]] = {}
        self._autocast_exits: list[contextlib.ExitStack] = []

    # ---- which blocks run in float32

    def _enter_fp32(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        stack = contextlib.ExitStack()
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        stack.enter_context(torch.autocast(device_type, enabled=False))
        self._autocast_exits.append(stack)
        return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    def _exit_fp32(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._autocast_exits.pop().close()

    def set_fp32(self, names: list[str]) -> list[str]:
        """Run these blocks in float32 from now on; returns the ones that were not already."""
        modules = dict(self.blocks)
        unknown = [name for name in names if name not in modules]
        if unknown:
            raise ValueError(f"unknown block(s) {unknown}: choose from {list(modules)}")
        added = [name for name in names if name not in self.fp32]
        for name in added:
            module = modules[name]
            self._handles[name] = (
                module.register_forward_pre_hook(self._enter_fp32),
                module.register_forward_hook(self._exit_fp32, always_call=True),  # also when the forward raises
            )
            self.fp32.append(name)
        return added

    # ---- measuring

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def probe(self) -> Probe:
        return Probe(self.blocks)

    def record(self, peaks: list[float]) -> list[BlockHeadroom]:
        """Keep a measurement (host floats, one per block) as the latest and in the worst seen; returns its rows."""
        self.last = [BlockHeadroom(name, peak, name in self.fp32) for (name, _), peak in zip(self.blocks, peaks)]
        for row in self.last:
            self.worst_seen[row.name] = max(self.worst_seen.get(row.name, 0.0), row.peak, key=_severity)
        return self.last

    def worst(self) -> BlockHeadroom | None:
        """The latest measurement's block with the largest peak (an overflow first)."""
        if not self.last:
            return None
        return max(self.last, key=lambda row: _severity(row.peak))

    def to_upcast(self, peaks: list[float], input_peaks: list[float]) -> list[str]:
        """The blocks to move to float32 after a measurement: every block at or over the threshold and, when a
        forward overflowed, the first block whose input was finite but whose activations were not (the blocks
        after it only received its inf/NaN). Blocks already in float32 are not named again; empty when fp32 blocks
        cannot help (e.g. the images themselves were not finite)."""
        if not self.fallback:
            return []
        names: list[str] = []
        for (name, _), peak, given in zip(self.blocks, peaks, input_peaks):
            finite_in = given < float("inf")  # False for inf and NaN
            if not peak < float("inf") and finite_in:  # the overflow starts here
                names.append(name)
                break
            if not finite_in:
                break
            if peak >= self.threshold * FP16_MAX:
                names.append(name)
        return [name for name in names if name not in self.fp32]

    # ---- checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {
            "fp32": list(self.fp32),
            "last": [(row.name, row.peak) for row in self.last],
            "worst_seen": dict(self.worst_seen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_fp32(state["fp32"])
        self.last = [BlockHeadroom(name, peak, name in self.fp32) for name, peak in state["last"]]
        self.worst_seen = dict(state["worst_seen"])


def agree_peaks(peaks: torch.Tensor) -> torch.Tensor:
    """The per-block maximum over all ranks (NaN counted as inf), so every rank moves the same blocks; one
    all_reduce when torch.distributed is running, else the peaks (NaN as inf)."""
    peaks = torch.nan_to_num(peaks, nan=float("inf"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    return peaks


@torch.no_grad()
def measure(
    model: nn.Module,
    images: torch.Tensor,
    precision: str,
    guard: HeadroomGuard | None = None,
) -> list[BlockHeadroom]:
    """One forward (encode, posterior mode, decode) of images (B, 3, H, W) in [-1, 1] at `precision`, with each
    block's peak |activation| recorded; guard: its float32 blocks apply and the rows are recorded in it."""
    from vaehelpers.runtime import autocast

    guard = guard or HeadroomGuard(model, every=0)
    was_training = model.training
    model.eval()
    with autocast(images.device, precision), guard.probe() as probe:
        model(images)
    model.train(was_training)
    return guard.record(probe.peaks().tolist())


def iter_rows_as_facts(rows: list[BlockHeadroom]) -> Iterator[dict[str, Any]]:
    """The rows as JSON-able dicts (doctor --json, gpu-report)."""
    for row in rows:
        yield {"block": row.name, "peak": row.peak, "fraction": row.fraction, "fp32": row.fp32}
