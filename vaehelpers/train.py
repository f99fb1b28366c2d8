"""The training loop: setup, data, model, loss and optimisers, resume, then one loop that reads top to bottom."""
from __future__ import annotations

import csv
import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from vaehelpers import rundir
from vaehelpers.rundir import RunDir, load_checkpoint, save_checkpoint
from vaehelpers.config import TrainConfig, to_dict
from vaehelpers.dataset import ImageFolderDataset
from vaehelpers.distributed import init_distributed
from vaehelpers.latents import reconstruct
from vaehelpers.losses import VAELoss, pretrained_files
from vaehelpers.model import AutoencoderKL, preset_name
from vaehelpers.runtime import autocast, resolve_precision, seed_everything

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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for shadow, p in zip(self.shadow, model.parameters()):
            p.copy_(shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
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
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def make_optimizer(cfg: TrainConfig, params: Iterator[nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
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

    def __enter__(self) -> "StopRequest":
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
def validate(model: AutoencoderKL, loader: DataLoader, loss_fn: VAELoss, device: torch.device, precision: str,
             step: int, epoch: float) -> dict[str, float]:
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

    viz.save_figure(viz.reconstruction_figure(fixed_images.cpu(), reconstruct(model, fixed_images)),
                    run.figures / "reconstructions.png")
    if run.log.exists() and run.log.stat().st_size > 0:
        viz.save_figure(viz.loss_curve_figure(run.log), run.figures / "loss_curve.png")


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
        pretrained.require(name, cfg.weights_dir or None)


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
    # ---- setup
    check_pretrained(cfg, perceptual_backbone)  # within seconds: before reading data, weights or building a model
    initial = AutoencoderKL.load(cfg.init_from) if cfg.init_from else None
    if initial is not None:  # the weights decide the architecture
        cfg = dataclasses.replace(cfg, model=initial.config, preset=preset_name(initial.config) or "custom")
    ddp = init_distributed(cfg.device)  # one process, or one rank of a torchrun / launch() job (distributed.py)
    device = ddp.device
    precision = resolve_precision(cfg.precision, device)
    cfg = rundir.prepare(cfg, resume, ddp.is_main)
    run_dir = Path(cfg.run_dir)
    checkpoint_path = RunDir(run_dir).checkpoint
    seed_everything(cfg.seed)
    say = print if ddp.is_main else (lambda *a, **k: None)

    # ---- data
    if cfg.batch_size % ddp.world_size:
        raise ValueError(f"batch size {cfg.batch_size} must be divisible by the number of processes ({ddp.world_size})")
    train_set = ImageFolderDataset.from_config(cfg.data, split="train", augment=True, seed=cfg.seed)
    test_set = ImageFolderDataset.from_config(cfg.data, split="test", augment=False, seed=cfg.seed, allow_empty=True)
    global_batch = min(cfg.batch_size, len(train_set))  # images per optimiser step, over all ranks
    if ddp.enabled and global_batch < cfg.batch_size:
        raise ValueError(f"the train split has {len(train_set)} images, fewer than one batch of {cfg.batch_size}: "
                         "too few to share between processes")
    batches_per_epoch = len(epoch_batches(len(train_set), cfg.batch_size, cfg.seed, 0))
    total_steps = cfg.max_steps or cfg.epochs * batches_per_epoch
    pin = device.type == "cuda"
    fixed_set = test_set if len(test_set) else train_set
    fixed_images = torch.stack([fixed_set[i] for i in range(min(4, len(fixed_set)))]).to(device)
    val_loader = DataLoader(test_set, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers, pin_memory=pin) if len(test_set) else None

    # ---- model, loss, optimisers
    model = initial if initial is not None else AutoencoderKL(cfg.model)
    model.enable_fast_paths()  # training's own numerics and speed (model.py); the saved weights are the same
    if cfg.freeze_encoder:
        for module in (model.encoder, model.quant_conv):
            module.requires_grad_(False)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loss_fn = VAELoss(cfg.loss, perceptual_backbone=perceptual_backbone, weights_dir=cfg.weights_dir or None).to(device)
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], cfg.lr, device)
    disc_optimizer = None
    if loss_fn.discriminator is not None:
        disc_optimizer = make_optimizer(cfg, loss_fn.discriminator.parameters(), cfg.loss.disc_lr or cfg.lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 only; bf16 needs none
    disc_scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # its own: one update per step each
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    sample_generator = torch.Generator(device).manual_seed(cfg.seed * 7919 + ddp.rank)  # posterior sampling noise

    # ---- resume
    step, epoch, batch_in_epoch, bad_total, elapsed_before = 0, 0, 0, 0, 0.0
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if disc_optimizer is not None and state.get("discriminator") is not None:
            loss_fn.discriminator.load_state_dict(state["discriminator"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if disc_optimizer is not None and state.get("disc_scaler") is not None:
            disc_scaler.load_state_dict(state["disc_scaler"])
        generator_states = state["sample_generator"]  # one per rank of the run that saved it
        sample_generator.set_state(generator_states[ddp.rank % len(generator_states)].cpu())  # %: resumed on more ranks
        torch.set_rng_state(state["cpu_rng"].cpu())
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        bad_total, elapsed_before = state["bad_steps"], state["elapsed_s"]
        say(f"resumed {run_dir} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    elif resume:
        say(f"no checkpoint in {run_dir}: starting a new run")
    train_model = ddp.wrap(model)  # DDP after loading: it starts by copying rank 0's weights to every rank
    if cfg.compile:  # the forward only: checkpoints keep saving `model`, whose keys carry no _orig_mod prefix
        train_model = torch.compile(train_model)

    def checkpoint() -> None:
        """Gather every piece of state (all ranks' sampling generators) and write it from rank 0."""
        states = ddp.gather(sample_generator.get_state())
        ddp.check_in_sync(model=model.state_dict(), ema=ema.shadow if ema else None,
                          discriminator=loss_fn.discriminator.state_dict() if loss_fn.discriminator else None)
        if not ddp.is_main:
            return
        save_checkpoint({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "discriminator": loss_fn.discriminator.state_dict() if loss_fn.discriminator is not None else None,
            "disc_optimizer": disc_optimizer.state_dict() if disc_optimizer is not None else None,
            "scaler": scaler.state_dict(), "disc_scaler": disc_scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "sample_generator": states, "cpu_rng": torch.get_rng_state(),
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "bad_steps": bad_total,
            "elapsed_s": elapsed_before + time.monotonic() - start, "config": to_dict(cfg),
        }, checkpoint_path)

    # ---- logging
    log = CsvLog(RunDir(run_dir).log, step) if ddp.is_main else None
    writer = None
    if ddp.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(RunDir(run_dir).tensorboard), purge_step=step or None)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (progress and ddp.is_main), desc="train", dynamic_ncols=True)

    # ---- loop
    start = time.monotonic()
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    slowest_step, checkpoint_seconds, consecutive_bad = 0.0, 0.0, 0
    stopped = "finished"
    model.train()
    with StopRequest() as stop_request:
        while epoch < cfg.epochs and stopped == "finished":
            train_set.set_epoch(epoch)
            # a distributed sampler: every rank draws the same seeded order of global batches and takes its share
            batches = [b[ddp.rank::ddp.world_size] for b in epoch_batches(len(train_set), cfg.batch_size, cfg.seed, epoch)]
            loader = DataLoader(train_set, batch_sampler=batches[batch_in_epoch:], num_workers=cfg.data.num_workers, pin_memory=pin)
            for images in loader:
                step_start = time.monotonic()
                lr = cfg.lr * lr_factor(step, cfg.warmup_steps, total_steps, cfg.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = images.to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                if on_batch is not None:
                    images = on_batch(step, images)
                epoch_float = epoch + batch_in_epoch / batches_per_epoch

                with autocast(device, precision):
                    reconstructions, posterior = train_model(images, sample_posterior=cfg.sample_posterior, generator=sample_generator)
                    loss, logs = loss_fn(images, reconstructions, posterior, step=step, epoch=epoch_float,
                                         last_layer=model.last_layer, batch_size_for_scaling=global_batch)
                # every rank must skip together, or DDP's all-reduce in backward would wait for the others forever
                skipped = not ddp.agree(bool(torch.isfinite(loss.detach())), "min")
                if not skipped:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                    # fp16: the scaler skips steps with inf grads itself (and lowers the scale)
                    skipped = not torch.isfinite(grad_norm) and precision != "fp16"
                    if not skipped:
                        scaler.step(optimizer)
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if skipped:
                    bad_total += 1
                    consecutive_bad += 1
                    say(f"step {step}: non-finite loss or gradient, step skipped ({bad_total} so far)")
                    if consecutive_bad >= cfg.max_bad_steps:
                        raise NonFiniteLossError(
                            f"{consecutive_bad} non-finite steps in a row at step {step}: stopping. The last good "
                            f"checkpoint {checkpoint_path} is intact; lower --lr or check the data.")
                else:
                    consecutive_bad = 0
                    if ema is not None:
                        ema.update(model)
                if disc_optimizer is not None and loss_fn.uses_discriminator(step):
                    disc_optimizer.zero_grad(set_to_none=True)  # drop the grads the generator term left on D
                    with autocast(device, precision):
                        disc_loss, disc_logs = loss_fn.discriminator_loss(images, reconstructions.detach(), step=step)
                    disc_scaler.scale(disc_loss).backward()
                    ddp.average_gradients(loss_fn.discriminator)  # not DDP-wrapped: see distributed.py
                    disc_scaler.step(disc_optimizer)
                    disc_scaler.update()
                    logs.update(disc_logs)

                logs = ddp.mean(logs)  # the global batch's values
                step += 1
                batch_in_epoch += 1
                step_seconds = time.monotonic() - step_start
                slowest_step = max(slowest_step, step_seconds)
                images_per_s = global_batch / max(step_seconds, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['train/total_loss']:.4g}", img_s=f"{images_per_s:.1f}", epoch=epoch)
                if ddp.is_main and (step % cfg.log_every == 0 or skipped):
                    row = {"step": step, "epoch": round(epoch_float, 4), "lr": lr, "images_per_s": round(images_per_s, 2),
                           "skipped": int(skipped), "bad_steps": bad_total,
                           **{k: float(v) for k, v in logs.items()}}
                    log.append(row)
                    if on_log is not None:
                        on_log(row)
                    for key, value in row.items():
                        if "/" in key:
                            writer.add_scalar(key, value, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/images_per_s", images_per_s, step)

                # ---- stop, or checkpoint, as needed
                if batch_in_epoch == len(batches):
                    epoch, batch_in_epoch = epoch + 1, 0
                if stop_request.signal_name:
                    stopped = "signal"
                elif cfg.max_steps and step >= cfg.max_steps:
                    stopped = "max_steps"
                elif until_step is not None and step >= until_step:
                    stopped = "until_step"
                elif time.monotonic() + 2 * slowest_step + 2 * checkpoint_seconds + 5 > deadline:
                    stopped = "time_limit"
                stopped = STOP_REASONS[int(ddp.agree(STOP_REASONS.index(stopped), "max"))]  # clocks and signals differ per rank
                # during a run of non-finite steps only a stop saves: the last scheduled checkpoint stays the last good step
                if stopped != "finished" or (step % cfg.checkpoint_every == 0 and not consecutive_bad):
                    saved_at = time.monotonic()
                    checkpoint()
                    checkpoint_seconds = time.monotonic() - saved_at
                    if ddp.is_main and stopped == "finished":
                        results = validate(model, val_loader, loss_fn, device, precision, step, epoch_float) if val_loader else {}
                        for key, value in results.items():
                            writer.add_scalar(key, value, step)
                        writer.add_images("val/reconstructions", _pairs(model, fixed_images), step)
                if stopped != "finished":
                    break
        if stopped == "finished":
            checkpoint()
    bar.close()

    # ---- final weights, figures
    elapsed = time.monotonic() - start
    images_per_s = (step * global_batch) / max(elapsed + elapsed_before, 1e-9) if step else 0.0
    if ddp.is_main:
        final = AutoencoderKL(cfg.model).enable_fast_paths()
        final.load_state_dict(model.state_dict())
        if ema is not None:
            ema.copy_to(final)
        final.save(run_dir)
        results = validate(final.to(device), val_loader, loss_fn, device, precision, step, epoch) if val_loader else {}
        for key, value in results.items():
            writer.add_scalar(key, value, step)
        writer.close()
        save_figures(RunDir(run_dir), final, fixed_images)
        messages = {
            "finished": f"finished {cfg.epochs} epochs",
            "max_steps": f"reached --max-steps {cfg.max_steps}",
            "until_step": f"paused at step {step}",
            "time_limit": f"stopped before the {cfg.max_minutes:g}-minute limit",
            "signal": f"stopped by {stop_request.signal_name or 'a signal to another process'}",
        }
        held_out = f", held-out PSNR {results['val/psnr']:.2f} dB" if "val/psnr" in results else ""
        say(f"{messages[stopped]} at step {step}; checkpoint {checkpoint_path}, weights {RunDir(run_dir).weights}"
            f"{held_out}; skipped steps: {bad_total}; skipped files: {len(train_set.bad_files) + len(test_set.bad_files)}" + ("; resume with --resume" if stopped in ("signal", "time_limit", "until_step") else ""))
    ddp.close()
    return TrainResult(run_dir, step, epoch, stopped, bad_total, images_per_s,
                       len(train_set.bad_files) + len(test_set.bad_files))


def _pairs(model: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Originals above reconstructions, in [0,1], for TensorBoard."""
    return ((torch.cat([images.float().cpu(), reconstruct(model, images)]) + 1) / 2).clamp(0, 1)
