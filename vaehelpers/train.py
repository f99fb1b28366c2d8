"""Training: the state a checkpoint holds (TrainState), the steps of the loop, then train(), which reads top to bottom."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from vaehelpers import rundir
from vaehelpers.config import TrainConfig, to_dict
from vaehelpers.config import validate as validate_settings
from vaehelpers.dataset import ImageFolderDataset, check_data_dir
from vaehelpers.distributed import Distributed, init_distributed
from vaehelpers.headroom import HeadroomGuard, agree_peaks, format_table, measure
from vaehelpers.imagecache import once_per_machine
from vaehelpers.latents import reconstruct
from vaehelpers.losses import VAELoss, pretrained_files
from vaehelpers.model import AutoencoderKL, preset_name
from vaehelpers.rundir import CHECKPOINT, RunDir, load_checkpoint, save_checkpoint
from vaehelpers.runlock import holds_run_dir
from vaehelpers.runtime import autocast, resolve_precision, seed_everything, set_tf32

# Why a run stops, least to most urgent: with several processes every rank takes the most urgent one any rank saw.
STOP_REASONS = ("finished", "time_limit", "until_step", "max_steps", "signal")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is left as it was."""


@dataclass
class TrainResult:
    """How a call to train() ended."""

    run_dir: Path
    step: int
    epoch: int
    stopped: str  # finished | max_steps | time_limit | signal | until_step
    bad_steps: int
    images_per_s: float
    skipped_files: int = 0  # bad images left out of the train and test splits
    scaler_skipped: int = 0  # fp16: steps the GradScaler skipped (inf/NaN gradients at the current scale)
    fp32_blocks: tuple[str, ...] = ()  # blocks the fp16 headroom guard moved to fp32 (headroom.py)


# ----------------------------------------------------------------------------- small helpers


class EMA:
    """Exponential moving average of the model's parameters (the model has no buffers that need one).

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (as diffusers' EMAModel and timm do):
    a fixed 0.999 would still hold 0.999**600 = 55% of the random initial weights after 600 steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone().float() for p in model.parameters()]
        self.device_updates: torch.Tensor | None = None  # fp16: updates counted on the device, not yet in `updates`

    @torch.no_grad()
    def update(self, model: nn.Module, taken: torch.Tensor | None = None) -> None:
        """One update; taken (fp16): a 0-dim bool on the device, False when the GradScaler skipped the step, which
        then leaves the shadow and the count as they were without the flag being read on the host."""
        params = [p.detach().float() for p in model.parameters()]
        if taken is None:
            decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
            torch._foreach_lerp_(self.shadow, params, 1.0 - decay)
            self.updates += 1
            return
        if self.device_updates is None:
            self.device_updates = torch.zeros((), device=taken.device)
        count = self.device_updates + self.updates
        weight = (1.0 - torch.clamp((1 + count) / (10 + count), max=self.decay)) * taken
        steps = torch._foreach_sub(params, self.shadow)
        torch._foreach_mul_(steps, weight)
        torch._foreach_add_(self.shadow, steps)
        self.device_updates += taken

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for shadow, p in zip(self.shadow, model.parameters()):
            p.copy_(shadow)

    def state_dict(self) -> dict[str, Any]:
        if self.device_updates is not None:  # fp16's device count, read at checkpoints only
            self.updates += int(self.device_updates)
            self.device_updates = None
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates, self.device_updates = state["decay"], state["updates"], None
        for shadow, saved in zip(self.shadow, state["shadow"]):
            shadow.copy_(saved)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warm-up to 1, then constant or cosine decay to 0 at total_steps."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def epoch_batches(n_images: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's shuffled global batches; the same (seed, epoch) always gives the same order.

    The last partial batch is dropped (so every step sees batch_size images) unless it is the only one.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_images, generator=generator).tolist()
    stop = n_images - n_images % batch_size if n_images >= batch_size else n_images
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def make_optimizer(
    cfg: TrainConfig, params: Iterator[nn.Parameter], lr: float, device: torch.device
) -> torch.optim.Optimizer:
    fused = device.type == "cuda"  # fused kernels exist for CUDA only
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)


class CsvLog:
    """log.csv: one row per logged step; the header grows when a new column appears (e.g. the GAN starts)."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists() and resume_step > 0:
            with open(path, newline="") as handle:
                # rows written after the checkpoint we resume from belong to steps that will be redone
                self.rows = [r for r in csv.DictReader(handle) if int(float(r["step"])) <= resume_step]
        self.columns = list(dict.fromkeys(k for row in self.rows for k in row))
        self._rewrite()

    def _rewrite(self) -> None:
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if any(key not in self.columns for key in row):
            self.columns += [key for key in row if key not in self.columns]
            self._rewrite()
            return
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow(row)


class StopRequest:
    """SIGTERM / SIGINT (Kaggle's stop button, Ctrl-C) ask the loop to checkpoint and stop."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@torch.no_grad()
def validate(
    model: AutoencoderKL,
    loader: DataLoader,
    loss_fn: VAELoss,
    device: torch.device,
    precision: str,
    step: int,
    epoch: float,
) -> dict[str, float]:
    """Held-out loss and PSNR (posterior mode, pixels in [0,1]) over the test split."""
    from vaehelpers.metrics import PSNR_CAP_DB, per_image_metrics

    model.eval()
    loss_fn.eval()  # the PatchGAN's BatchNorm must not learn statistics from held-out images (resume would differ)
    totals: dict[str, float] = {}
    psnrs: list[torch.Tensor] = []
    batches = 0
    for images in loader:
        images = images.to(device)
        with autocast(device, precision):
            posterior = model.encode(images)
            reconstructions = model.decode(posterior.mode())
            _, logs = loss_fn(images, reconstructions, posterior, step=step, epoch=epoch, split="val")
        for key, value in logs.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        psnrs.append(per_image_metrics(images.float(), reconstructions.float())["psnr"].cpu())
        batches += 1
    model.train()
    loss_fn.train()
    if not batches:
        return {}
    results = {key: value / batches for key, value in totals.items()}
    results["val/psnr"] = float(torch.cat(psnrs).clamp(max=PSNR_CAP_DB).mean())
    return results


def save_figures(run: RunDir, model: AutoencoderKL, fixed_images: torch.Tensor) -> None:
    """figures/reconstructions.png on fixed held-out images, figures/loss_curve.png from log.csv."""
    from vaehelpers import viz

    viz.save_figure(
        viz.reconstruction_figure(fixed_images.cpu(), reconstruct(model, fixed_images)),
        run.figures / "reconstructions.png",
    )
    if run.log.exists() and run.log.stat().st_size > 0:
        viz.save_figure(viz.loss_curve_figure(run.log), run.figures / "loss_curve.png")


# ----------------------------------------------------------------------------- the state a checkpoint holds


@dataclass
class TrainState:
    """Everything a checkpoint holds. STATEFUL and COUNTERS list it once: state_dict() saves exactly what
    load_state_dict() restores, so a resumed run continues as an unbroken one would."""

    model: AutoencoderKL
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 only; a no-op otherwise
    sample_generator: torch.Generator  # posterior sampling noise, seeded per rank
    discriminator: nn.Module | None = None  # the PatchGAN (loss.disc_weight > 0), with its optimiser and scaler
    disc_optimizer: torch.optim.Optimizer | None = None
    disc_scaler: torch.amp.GradScaler | None = None
    ema: EMA | None = None
    guard: HeadroomGuard | None = None  # fp16 (or headroom_any_precision): headroom and fp32 blocks (headroom.py)
    step: int = 0  # optimiser steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already taken
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient
    scaler_skipped: int = 0  # fp16 steps the GradScaler skipped (inf/NaN gradients at the current scale)
    elapsed_s: float = 0.0  # training seconds of the sessions before this one

    # the checkpoint's keys are named in rundir.CHECKPOINT; each is an attribute of the same name here
    STATEFUL: ClassVar = CHECKPOINT.parts
    COUNTERS: ClassVar = CHECKPOINT.counters

    def state_dict(self, generator_states: list[torch.Tensor], session_s: float, cfg: TrainConfig) -> dict[str, Any]:
        """The checkpoint: every STATEFUL part (None where absent), the COUNTERS (elapsed_s with this session's
        session_s added), every rank's sampling generator (gathered by the caller), the CPU RNG and the settings."""
        state: dict[str, Any] = {
            name: None if getattr(self, name) is None else getattr(self, name).state_dict() for name in self.STATEFUL
        }
        state.update({name: getattr(self, name) for name in self.COUNTERS})
        state[CHECKPOINT.elapsed_s] = self.elapsed_s + session_s
        state[CHECKPOINT.sample_generator] = generator_states
        state[CHECKPOINT.cpu_rng] = torch.get_rng_state()
        state[CHECKPOINT.config] = to_dict(cfg)
        return state

    def load_state_dict(self, state: dict[str, Any], rank: int) -> None:
        """Restore a checkpoint written by state_dict (a part this run has but the checkpoint lacks stays as built)."""
        for name in self.STATEFUL:
            if getattr(self, name) is not None and state.get(name) is not None:
                getattr(self, name).load_state_dict(state[name])
        for name in self.COUNTERS:  # a counter newer than the checkpoint (scaler_skipped) keeps its fresh value
            setattr(self, name, state.get(name, getattr(self, name)))
        generator_states = state[CHECKPOINT.sample_generator]  # one per rank of the run that saved it
        self.sample_generator.set_state(
            generator_states[rank % len(generator_states)].cpu()
        )  # %: resumed on more ranks
        torch.set_rng_state(state[CHECKPOINT.cpu_rng].cpu())


def load_data(cfg: TrainConfig, ddp: Distributed) -> tuple[ImageFolderDataset, ImageFolderDataset, int]:
    """(train split with augmentation, test split, global batch: images per optimiser step over all ranks)."""
    if cfg.batch_size % ddp.world_size:
        raise ValueError(f"batch size {cfg.batch_size} must be divisible by the number of processes ({ddp.world_size})")
    train_set, test_set = once_per_machine(  # local rank 0 builds the image cache, the other ranks then read it
        lambda: (
            ImageFolderDataset.from_config(cfg.data, split="train", augment=True, seed=cfg.seed),
            ImageFolderDataset.from_config(cfg.data, split="test", augment=False, seed=cfg.seed, allow_empty=True),
        ),
        ddp,
        cfg.data.data_dir,
    )
    global_batch = min(cfg.batch_size, len(train_set))
    if ddp.enabled and global_batch < cfg.batch_size:
        raise ValueError(
            f"the train split has {len(train_set)} images, fewer than one batch of {cfg.batch_size}: "
            "too few to share between processes"
        )
    return train_set, test_set, global_batch


def build_state(
    cfg: TrainConfig, model: AutoencoderKL, loss_fn: VAELoss, ddp: Distributed, precision: str
) -> TrainState:
    """Optimisers, scalers (on for fp16 only), EMA and the sampling generator around a model on ddp.device (fresh:
    step 0); precision is the resolved one (fp32 | bf16 | fp16)."""
    device, fp16 = ddp.device, precision == "fp16"
    state = TrainState(
        model=model,
        optimizer=make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], cfg.lr, device),
        scaler=torch.amp.GradScaler(device.type, enabled=fp16),  # bf16 needs none
        sample_generator=torch.Generator(device).manual_seed(cfg.seed * 7919 + ddp.rank),
        ema=EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
    )
    if fp16 or cfg.headroom_any_precision:  # blocks move to fp32 in fp16 only: bf16 and fp32 cannot overflow there
        state.guard = HeadroomGuard(model, every=cfg.headroom_every, threshold=cfg.headroom_threshold, fallback=fp16)
    if loss_fn.discriminator is not None:
        state.discriminator = loss_fn.discriminator
        state.disc_optimizer = make_optimizer(
            cfg, loss_fn.discriminator.parameters(), cfg.loss.disc_lr or cfg.lr, device
        )
        state.disc_scaler = torch.amp.GradScaler(device.type, enabled=fp16)  # its own: one update per step each
    return state


def build_model(cfg: TrainConfig, initial: AutoencoderKL | None, device: torch.device) -> AutoencoderKL:
    """The model to train: `initial` (weights from --init) or a fresh one, encoder frozen if asked, on device."""
    model = initial if initial is not None else AutoencoderKL(cfg.model)
    model.enable_fast_paths()  # training's own numerics and speed (model.py); the saved weights are the same
    if cfg.freeze_encoder:
        for module in (model.encoder, model.quant_conv):
            module.requires_grad_(False)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


# ----------------------------------------------------------------------------- one step of the loop


def set_lr(state: TrainState, cfg: TrainConfig, total_steps: int) -> float:
    """This step's learning rate (warm-up, schedule), set on the optimiser; returns it."""
    lr = cfg.lr * lr_factor(state.step, cfg.warmup_steps, total_steps, cfg.schedule)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    return lr


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on the device, channels_last on CUDA (faster convolutions there)."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


class ScalerSkips:
    """fp16: the steps the GradScaler skipped, counted on the device from optimizer_step's flags and read on the
    host at log and checkpoint steps only (so the steps between need no sync)."""

    def __init__(self) -> None:
        self.since_read: torch.Tensor | None = None
        self.in_a_row: torch.Tensor | None = None

    def add(self, skipped: torch.Tensor) -> None:
        if self.since_read is None:
            self.since_read, self.in_a_row = (
                torch.zeros((), device=skipped.device),
                torch.zeros((), device=skipped.device),
            )
        self.since_read += skipped
        self.in_a_row = (self.in_a_row + 1) * skipped

    def settle(self, state: TrainState, cfg: TrainConfig) -> int:
        """The skips in a row, read on the host (those since the last call are added to state.scaler_skipped); raises
        NonFiniteLossError at cfg.max_bad_steps in a row: normal while the scale calibrates, so not bad steps, but
        max_bad_steps of them in a row (the scale divided by 2**20) are real NaNs."""
        if self.since_read is None:
            return 0
        since_read, in_a_row = (int(n) for n in torch.stack([self.since_read, self.in_a_row]).tolist())
        self.since_read.zero_()
        state.scaler_skipped += since_read
        if in_a_row >= cfg.max_bad_steps:
            raise NonFiniteLossError(
                f"{in_a_row} fp16 steps in a row skipped by the GradScaler at step {state.step} (scale now "
                f"{state.scaler.get_scale():g}): the gradients are not finite at any scale. The last good checkpoint "
                f"{RunDir(cfg.run_dir).checkpoint} is intact; lower --lr, check the data, or use --precision fp32."
            )
        return in_a_row


def _host_logs(logs: dict[str, Any]) -> dict[str, float]:
    """Log values as floats, the device tensors among them read in one transfer."""
    tensors = {key: value for key, value in logs.items() if isinstance(value, torch.Tensor)}
    values = torch.stack(list(tensors.values())).tolist() if tensors else []
    return {key: float(value) for key, value in {**logs, **dict(zip(tensors, values))}.items()}


def count_bad_step(
    state: TrainState, skipped: bool, consecutive_bad: int, cfg: TrainConfig, say: Callable[[str], Any]
) -> int:
    """Count a skipped step, a non-finite loss or gradient (bad_steps), and say so; returns the skipped steps in a
    row, raising at cfg.max_bad_steps (fp16's GradScaler skips are counted by ScalerSkips)."""
    if not skipped:
        return 0
    consecutive_bad += 1
    state.bad_steps += 1
    say(f"step {state.step}: non-finite loss or gradient, step skipped ({state.bad_steps} so far)")
    if consecutive_bad >= cfg.max_bad_steps:
        raise NonFiniteLossError(
            f"{consecutive_bad} non-finite steps in a row at step {state.step}: stopping. The last good checkpoint "
            f"{RunDir(cfg.run_dir).checkpoint} is intact; lower --lr or check the data."
        )
    return consecutive_bad


def _flag_reader(flag: torch.Tensor) -> Callable[[], bool]:
    """Start copying a 0-dim device flag to the host; the returned call waits for that copy only (an event, not a
    stream sync), so the work queued in between (the backward pass) keeps the GPU busy meanwhile."""
    if flag.device.type != "cuda":
        return lambda: bool(flag)
    host = torch.empty((), dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> bool:
        copied.synchronize()
        return bool(host)

    return read


def _blame_overflow(
    state: TrainState, model_call: Callable[[], Any], noise: torch.Tensor, ddp: Distributed, precision: str
) -> list[str]:
    """After an fp16 forward overflowed: the same forward again without gradients, each block measured (all ranks
    agree on the peaks), and the blocks to move to fp32 (headroom.HeadroomGuard.to_upcast; empty: none can help)."""
    guard = state.guard
    state.sample_generator.set_state(noise)  # the same posterior noise as the forward that overflowed
    with torch.no_grad(), autocast(ddp.device, precision), guard.probe() as probe:
        model_call()
    state.sample_generator.set_state(noise)  # and again for the redone step
    peaks, input_peaks = agree_peaks(torch.stack([probe.peaks(), probe.input_peaks()])).tolist()
    guard.record(peaks)
    return guard.to_upcast(peaks, input_peaks)


def optimizer_step(
    state: TrainState,
    train_model: nn.Module,
    loss_fn: VAELoss,
    images: torch.Tensor,
    *,
    cfg: TrainConfig,
    ddp: Distributed,
    precision: str,
    epoch: float,
    global_batch: int,
) -> tuple[dict[str, Any], bool, bool | torch.Tensor, torch.Tensor]:
    """Forward, loss, backward, clip and step of the autoencoder; returns (logs, skipped, scaler_skipped,
    reconstructions), logs as device tensors (read them at log steps).

    A non-finite loss or gradient skips the step on every rank together (DDP's all-reduce in backward would
    otherwise wait forever). In fp16 the GradScaler skips steps with inf/NaN gradients itself; scaler_skipped is
    then a 0-dim bool on the device (read at log steps: no host sync for it, nor for the scale), and the loss's
    finiteness is read once, after the backward pass is queued. A forward that overflowed fp16 moves the block
    where it started to fp32 (state.guard) and the step is redone, on every rank together; the step is skipped as
    before only when no block can be moved. With state.guard, headroom is measured at guard.due(step) steps.
    The EMA follows only the steps taken.
    """
    guard, fp16 = state.guard, state.scaler.is_enabled()
    fallback = fp16 and guard is not None and guard.fallback
    noise = state.sample_generator.get_state() if fallback else None  # a redone step draws the same noise
    measuring = guard is not None and guard.due(state.step)
    if guard is not None:
        guard.measured_now = False

    def forward() -> tuple[torch.Tensor, Any]:
        return train_model(images, sample_posterior=cfg.sample_posterior, generator=state.sample_generator)

    while True:
        moved: list[str] = []
        with autocast(ddp.device, precision), guard.probe() if measuring else contextlib.nullcontext() as probe:
            reconstructions, posterior = forward()
            loss, logs = loss_fn(
                images,
                reconstructions,
                posterior,
                step=state.step,
                epoch=epoch,
                last_layer=state.model.last_layer,
                batch_size_for_scaling=global_batch,
                device_logs=True,
            )
        if measuring:  # one host read every headroom_every steps
            peaks, input_peaks = agree_peaks(torch.stack([probe.peaks(), probe.input_peaks()])).tolist()
            guard.record(peaks)
            guard.measured_now = True
            moved = guard.set_fp32(guard.to_upcast(peaks, input_peaks))
            for name in moved:
                guard.news.append(
                    f"step {state.step}: {name} now runs in fp32 (peak |activation| {guard.worst_seen[name]:.4g}, "
                    f"over {guard.threshold:g} of 65504)"
                )
            measuring = False  # a redone step is not measured twice
        if not fp16:
            break
        finite = torch.isfinite(loss.detach()).float()
        if ddp.enabled:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        forward_ok = _flag_reader(finite.bool())
        # every rank runs backward (a rank that skipped it would leave DDP's all-reduce waiting); a non-finite loss
        # gives non-finite gradients, which are thrown away below
        state.scaler.scale(loss).backward()
        if forward_ok():
            break
        state.optimizer.zero_grad(set_to_none=True)
        if moved:  # this step's measurement already moved the block(s) where it overflowed
            state.sample_generator.set_state(noise)
        else:
            moved = guard.set_fp32(_blame_overflow(state, forward, noise, ddp, precision)) if fallback else []
        if not moved:  # fp32 blocks cannot help: skip the step, as in fp32
            return logs, True, False, reconstructions
        guard.news.append(f"step {state.step}: the fp16 forward overflowed; now in fp32: {', '.join(moved)}; redone")

    if fp16:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip or math.inf)
        # the GradScaler keeps its scale on the device (get_scale() would read it on the host): update() lowers it
        # exactly when step() found inf/NaN gradients and left the weights alone
        scale_before = state.scaler._scale.clone()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        scaler_skipped = state.scaler._scale < scale_before
        state.optimizer.zero_grad(set_to_none=True)
        if state.ema is not None:
            state.ema.update(state.model, taken=~scaler_skipped)
        return logs, False, scaler_skipped, reconstructions

    skipped = not ddp.agree(bool(torch.isfinite(loss.detach())), "min")
    if not skipped:
        state.scaler.scale(loss).backward()
        grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip or math.inf)
        skipped = not torch.isfinite(grad_norm)
        if not skipped:
            state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    if not skipped and state.ema is not None:
        state.ema.update(state.model)
    return logs, skipped, False, reconstructions


def discriminator_step(
    state: TrainState,
    loss_fn: VAELoss,
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    ddp: Distributed,
    precision: str,
) -> dict[str, Any]:
    """One PatchGAN step on real images and detached reconstructions; returns its logs."""
    state.disc_optimizer.zero_grad(set_to_none=True)  # drop the grads the generator term left on D
    with autocast(ddp.device, precision):
        disc_loss, disc_logs = loss_fn.discriminator_loss(images, reconstructions.detach(), step=state.step)
    state.disc_scaler.scale(disc_loss).backward()
    ddp.average_gradients(state.discriminator)  # not DDP-wrapped: see distributed.py
    state.disc_scaler.step(state.disc_optimizer)
    state.disc_scaler.update()
    return disc_logs


class RunLog:
    """log.csv, TensorBoard and the on_log callback; written by the main process only (a no-op elsewhere)."""

    def __init__(self, run: RunDir, step: int, enabled: bool, on_log: Callable[[dict[str, Any]], None] | None) -> None:
        self.enabled, self.on_log = enabled, on_log
        self.csv = CsvLog(run.log, step) if enabled else None
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.tensorboard), purge_step=step or None)

    def row(self, row: dict[str, Any]) -> None:
        """One log.csv row; its "a/b" values, lr, images_per_s (and fp16's scale) also go to TensorBoard."""
        if not self.enabled:
            return
        self.csv.append(row)
        if self.on_log is not None:
            self.on_log(row)
        self.scalars({key: value for key, value in row.items() if "/" in key}, row["step"])
        self.scalars({"train/lr": row["lr"], "train/images_per_s": row["images_per_s"]}, row["step"])
        if "scale" in row:  # fp16
            self.scalars(
                {"train/scaler_skipped": row["scaler_skipped_total"], "train/scale": row["scale"]}, row["step"]
            )

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items() if self.enabled else ():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


def stop_reason(
    state: TrainState,
    cfg: TrainConfig,
    *,
    signalled: bool,
    until_step: int | None,
    deadline: float,
    reserve_s: float,
    ddp: Distributed,
) -> str:
    """Why to stop now ("finished": not yet); every rank takes the most urgent reason any rank saw (clocks and
    signals differ per rank). reserve_s: the time a step and a checkpoint take, kept before the deadline."""
    stopped = "finished"
    if signalled:
        stopped = "signal"
    elif cfg.max_steps and state.step >= cfg.max_steps:
        stopped = "max_steps"
    elif until_step is not None and state.step >= until_step:
        stopped = "until_step"
    elif time.monotonic() + reserve_s > deadline:
        stopped = "time_limit"
    return STOP_REASONS[int(ddp.agree(STOP_REASONS.index(stopped), "max"))]


def _finish(
    cfg: TrainConfig,
    state: TrainState,
    loss_fn: VAELoss,
    log: RunLog,
    val_loader: DataLoader | None,
    fixed_images: torch.Tensor,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """The final weights (EMA where enabled) as model.safetensors, a last validation and the figures; returns it."""
    run = RunDir(cfg.run_dir)
    final = AutoencoderKL(cfg.model).enable_fast_paths()
    final.load_state_dict(state.model.state_dict())
    if state.guard is not None:  # validated at the run's precision: the blocks it moved to fp32 stay there
        HeadroomGuard(final, every=0).set_fp32(state.guard.fp32)
    if state.ema is not None:
        state.ema.copy_to(final)
    final.save(run.root)
    results = (
        validate(final.to(device), val_loader, loss_fn, device, precision, state.step, state.epoch)
        if val_loader
        else {}
    )
    log.scalars(results, state.step)
    log.close()
    save_figures(run, final, fixed_images)
    return results


# ----------------------------------------------------------------------------- the loop


def check_pretrained(cfg: TrainConfig, perceptual_backbone: nn.Module | None = None, *, download: bool = False) -> None:
    """Stop before any work when a pretrained file the run needs is missing (pretrained.MissingWeightsError).

    download=True (a notebook with internet, e.g. Kaggle's) first fetches the missing ones into the torch hub cache
    with pretrained.download; when that fails too, the one-line MissingWeightsError says what was tried.
    """
    from vaehelpers import pretrained

    for name in pretrained_files(cfg.loss, perceptual_backbone):
        if download and pretrained.find(name, cfg.weights_dir or None) is None:
            try:
                pretrained.download(names=[name])
            except RuntimeError as error:
                pretrained.require(name, cfg.weights_dir or None, instead=f"train with --recipe pixel ({error})")
        pretrained.check(name, cfg.weights_dir or None)  # found and loads: a corrupt file is named here


def checks_pretrained(function: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """Decorate train(cfg, ...): the settings and the data folder validated, then check_pretrained, within seconds,
    before the run directory is even locked (and so created), the data read or a model built."""

    @functools.wraps(function)
    def wrapper(cfg: TrainConfig, *args: Any, **kwargs: Any) -> TrainResult:
        validate_settings(cfg)
        check_data_dir(cfg.data)
        check_pretrained(cfg, kwargs.get("perceptual_backbone"))
        return function(cfg, *args, **kwargs)

    return wrapper


@checks_pretrained
@holds_run_dir  # one training per run directory: a second one is refused, naming the holder (runlock.py)
def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    until_step: int | None = None,
    progress: bool = True,
    perceptual_backbone: nn.Module | None = None,
    on_batch: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train an autoencoder as `cfg` says, writing everything into cfg.run_dir.

    resume: continue from checkpoints/last.pt when it exists (exactly: same weights as an unbroken run).
    until_step: checkpoint and return after this optimiser step (for chunked runs and tests).
    on_batch: test hook, (step, images) -> images, e.g. to inject a non-finite batch.
    on_log: called on the main process with each log.csv row (e.g. a notebook's live loss plot).
    """
    # ---- setup: the weights decide the architecture when training starts from them
    initial = AutoencoderKL.load(cfg.init_from) if cfg.init_from else None
    if initial is not None:
        cfg = dataclasses.replace(cfg, model=initial.config, preset=preset_name(initial.config) or "custom")
    ddp = init_distributed(cfg.device)  # one process, or one rank of a torchrun / launch() job (distributed.py)
    device, precision = ddp.device, resolve_precision(cfg.precision, ddp.device)
    set_tf32(device, cfg.tf32)
    cfg = rundir.prepare(cfg, resume, ddp.is_main)
    run = RunDir(cfg.run_dir)
    seed_everything(cfg.seed)
    say = print if ddp.is_main else (lambda *a, **k: None)

    # ---- data
    train_set, test_set, global_batch = load_data(cfg, ddp)
    batches_per_epoch = len(epoch_batches(len(train_set), cfg.batch_size, cfg.seed, 0))
    total_steps = cfg.max_steps or cfg.epochs * batches_per_epoch
    pin = device.type == "cuda"
    fixed_set = test_set if len(test_set) else train_set
    fixed_images = torch.stack([fixed_set[i] for i in range(min(4, len(fixed_set)))]).to(device)
    val_loader = (
        DataLoader(test_set, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers, pin_memory=pin)
        if len(test_set)
        else None
    )

    # ---- model, loss, optimisers, then resume
    model = build_model(cfg, initial, device)
    loss_fn = VAELoss(cfg.loss, perceptual_backbone=perceptual_backbone, weights_dir=cfg.weights_dir or None).to(device)
    state = build_state(cfg, model, loss_fn, ddp, precision)
    if resume and run.checkpoint.exists():
        state.load_state_dict(load_checkpoint(run.checkpoint, map_location=device), ddp.rank)
        if ddp.is_main:  # only now that the checkpoint has loaded (rundir.prepare): a failed resume leaves it as it was
            rundir.write_config(run.root, cfg)
        say(f"resumed {run.root} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    elif resume:
        say(f"no checkpoint in {run.root}: starting a new run")
    train_model = ddp.wrap(model)  # DDP after loading: it starts by copying rank 0's weights to every rank
    if cfg.compile:  # the forward only: checkpoints keep saving `model`, whose keys carry no _orig_mod prefix
        train_model = torch.compile(train_model)
    log = RunLog(run, state.step, ddp.is_main, on_log)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps, initial=state.step, disable=not (progress and ddp.is_main), desc="train", dynamic_ncols=True
    )
    start = time.monotonic()
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else math.inf

    scaler_skips = ScalerSkips()

    def checkpoint() -> None:
        """Every rank's generator gathered and the weights checked in sync; rank 0 writes the checkpoint."""
        scaler_skips.settle(state, cfg)
        generator_states = ddp.gather(state.sample_generator.get_state())
        ddp.check_in_sync(
            model=model.state_dict(),
            ema=state.ema.shadow if state.ema else None,
            discriminator=state.discriminator.state_dict() if state.discriminator else None,
        )
        if ddp.is_main:
            save_checkpoint(state.state_dict(generator_states, time.monotonic() - start, cfg), run.checkpoint)

    # ---- the loop
    slowest_step, checkpoint_seconds, consecutive_bad, stopped = 0.0, 0.0, 0, "finished"
    last_row_at, steps_since_row, scaler_in_a_row, skipped_at_row = time.monotonic(), 0, 0, state.scaler_skipped
    model.train()
    with StopRequest() as stop_request:
        while state.epoch < cfg.epochs and stopped == "finished":
            train_set.set_epoch(state.epoch)
            # a distributed sampler: every rank draws the same seeded order of global batches and takes its share
            batches = [
                b[ddp.rank :: ddp.world_size]
                for b in epoch_batches(len(train_set), cfg.batch_size, cfg.seed, state.epoch)
            ]
            loader = DataLoader(
                train_set,
                batch_sampler=batches[state.batch_in_epoch :],
                num_workers=cfg.data.num_workers,
                pin_memory=pin,
            )
            for images in loader:
                step_start = time.monotonic()
                lr = set_lr(state, cfg, total_steps)
                images = (
                    to_device(images, device) if on_batch is None else on_batch(state.step, to_device(images, device))
                )
                epoch_float = state.epoch + state.batch_in_epoch / batches_per_epoch
                logs, skipped, scaler_skipped, reconstructions = optimizer_step(
                    state,
                    train_model,
                    loss_fn,
                    images,
                    cfg=cfg,
                    ddp=ddp,
                    precision=precision,
                    epoch=epoch_float,
                    global_batch=global_batch,
                )
                if isinstance(scaler_skipped, torch.Tensor):  # fp16: counted on the device, read at log steps
                    scaler_skips.add(scaler_skipped)
                consecutive_bad = count_bad_step(state, skipped, consecutive_bad, cfg, say)
                if state.disc_optimizer is not None and loss_fn.uses_discriminator(state.step):
                    logs.update(discriminator_step(state, loss_fn, images, reconstructions, ddp, precision))
                guard = state.guard
                for news in guard.news if guard is not None else ():
                    say(news)
                if guard is not None:
                    guard.news.clear()
                state.step += 1
                state.batch_in_epoch += 1
                steps_since_row += 1
                step_seconds = time.monotonic() - step_start
                slowest_step = max(slowest_step, step_seconds)
                bar.update(1)
                measured = guard is not None and guard.measured_now
                # only log and checkpoint steps read device values on the host (the steps between need no sync)
                row_due = state.step % cfg.log_every == 0 or skipped or measured
                if row_due or state.step % cfg.checkpoint_every == 0:
                    scaler_in_a_row = scaler_skips.settle(state, cfg)
                if row_due:
                    logs = ddp.mean(_host_logs(logs))  # the global batch's values
                    # over the steps since the last row: with asynchronous steps, one step's own time says little
                    images_per_s = global_batch * steps_since_row / max(time.monotonic() - last_row_at, 1e-9)
                    last_row_at, steps_since_row = time.monotonic(), 0
                    bar.set_postfix(
                        loss=f"{logs['train/total_loss']:.4g}", img_s=f"{images_per_s:.1f}", epoch=state.epoch
                    )
                    fp16 = (
                        {
                            "scaler_skipped": state.scaler_skipped - skipped_at_row,
                            "scaler_skipped_total": state.scaler_skipped,
                            "scale": state.scaler.get_scale(),
                        }
                        if state.scaler.is_enabled()
                        else {}
                    )
                    headroom = {"fp32_blocks": len(guard.fp32)} if guard is not None and guard.fallback else {}
                    if measured:
                        headroom.update(headroom_block=guard.worst().name, **{"headroom/worst": guard.worst().fraction})
                    skipped_at_row = state.scaler_skipped
                    log.row(
                        {
                            "step": state.step,
                            "epoch": round(epoch_float, 4),
                            "lr": lr,
                            "images_per_s": round(images_per_s, 2),
                            "skipped": int(skipped),
                            "bad_steps": state.bad_steps,
                            **fp16,
                            **headroom,
                            **logs,
                        }
                    )
                    if measured:
                        log.scalars({f"headroom/{row.name}": row.fraction for row in guard.last}, state.step)
                if state.batch_in_epoch == len(batches):
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                stopped = stop_reason(
                    state,
                    cfg,
                    signalled=bool(stop_request.signal_name),
                    until_step=until_step,
                    deadline=deadline,
                    reserve_s=2 * slowest_step + 2 * checkpoint_seconds + 5,
                    ddp=ddp,
                )
                # during a run of non-finite steps only a stop saves: the last scheduled checkpoint stays the last good step
                if stopped != "finished" or (
                    state.step % cfg.checkpoint_every == 0 and not (consecutive_bad or scaler_in_a_row)
                ):
                    saved_at = time.monotonic()
                    checkpoint()
                    checkpoint_seconds = time.monotonic() - saved_at
                    if ddp.is_main and stopped == "finished":
                        log.scalars(
                            validate(model, val_loader, loss_fn, device, precision, state.step, epoch_float)
                            if val_loader
                            else {},
                            state.step,
                        )
                        log.writer.add_images("val/reconstructions", _pairs(model, fixed_images), state.step)
                if stopped != "finished":
                    break
        if stopped == "finished":
            checkpoint()
    bar.close()

    # ---- final weights, figures, and how it ended
    elapsed = time.monotonic() - start
    images_per_s = (state.step * global_batch) / max(elapsed + state.elapsed_s, 1e-9) if state.step else 0.0
    skipped_files = len(train_set.bad_files) + len(test_set.bad_files)
    if ddp.is_main:
        results = _finish(cfg, state, loss_fn, log, val_loader, fixed_images, device, precision)
        say(_ending(cfg, state, stopped, stop_request.signal_name, results, run, skipped_files))
        if state.guard is not None:  # the trained weights at the run's precision, its fp32 blocks applied
            rows = measure(state.model, fixed_images, precision, state.guard)
            say(
                f"headroom at {precision} (peak |activation| per block on {len(fixed_images)} held-out images, "
                f"step {state.step}; fp32 blocks: {', '.join(state.guard.fp32) or 'none'}):\n"
                + format_table(rows, precision, state.guard.threshold)
            )
    ddp.close()
    return TrainResult(
        run.root,
        state.step,
        state.epoch,
        stopped,
        state.bad_steps,
        images_per_s,
        skipped_files,
        state.scaler_skipped,
        tuple(state.guard.fp32) if state.guard is not None else (),
    )


def _ending(
    cfg: TrainConfig,
    state: TrainState,
    stopped: str,
    signal_name: str | None,
    results: dict[str, float],
    run: RunDir,
    skipped_files: int,
) -> str:
    """The line train() prints when it returns."""
    messages = {
        "finished": f"finished {cfg.epochs} epochs",
        "max_steps": f"reached --max-steps {cfg.max_steps}",
        "until_step": f"paused at step {state.step}",
        "time_limit": f"stopped before the {cfg.max_minutes:g}-minute limit",
        "signal": f"stopped by {signal_name or 'a signal to another process'}",
    }
    held_out = f", held-out PSNR {results['val/psnr']:.2f} dB" if "val/psnr" in results else ""
    resume = "; resume with --resume" if stopped in ("signal", "time_limit", "until_step") else ""
    scaler = f" (+{state.scaler_skipped} by the fp16 GradScaler)" if state.scaler_skipped else ""
    return (
        f"{messages[stopped]} at step {state.step}; checkpoint {run.checkpoint}, weights {run.weights}{held_out}; "
        f"skipped steps: {state.bad_steps}{scaler}; skipped files: {skipped_files}{resume}"
    )


def _pairs(model: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Originals above reconstructions, in [0,1], for TensorBoard."""
    return ((torch.cat([images.float().cpu(), reconstruct(model, images)]) + 1) / 2).clamp(0, 1)
