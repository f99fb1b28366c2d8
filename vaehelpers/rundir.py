"""The run directory: where each file of a run lives, atomic writes, checkpoints (weights_only) and config.json.

RUN/config.json            every setting (TrainConfig as a dict; a bare model's {"model": ...}): write_config
RUN/checkpoints/last.pt    the whole training state (train.TrainState), written atomically
RUN/model.safetensors      final weights (EMA where enabled)
RUN/log.csv  RUN/tensorboard/  RUN/figures/  RUN/evaluation.json  RUN/scale.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaehelpers.config import (
    ModelConfig,
    TrainConfig,
    apply_overrides,
    canonical_recipe,
    flag_of,
    from_dict,
    resumable_settings,
    save_json,
    saved_train_config,
    to_dict,
)
from vaehelpers.runlock import try_lock

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SCALE_NAME = "scale.json"  # beside config.json: how the stored scaling_factor was measured
# Settings that may change when a run is resumed (declared with setting(resumable=True) in config.py); any other
# difference is an error (it would not be the same run).
RESUMABLE_CHANGES = resumable_settings()
MEASURED_MODEL_SETTINGS = ("scaling_factor", "latents_mean", "latents_std")  # `vaehelpers scale` writes these


@dataclass(frozen=True)
class CheckpointKeys:
    """The keys of checkpoints/last.pt (train.TrainState.state_dict writes them; weights.py and doctor.py read them)."""

    model: str = "model"  # the autoencoder's state_dict
    optimizer: str = "optimizer"
    discriminator: str = "discriminator"  # None where the run has no PatchGAN
    disc_optimizer: str = "disc_optimizer"
    scaler: str = "scaler"  # the GradScaler (fp16); disabled otherwise
    disc_scaler: str = "disc_scaler"
    ema: str = "ema"  # None without EMA
    guard: str = "guard"  # headroom.HeadroomGuard: the blocks that run in fp32 (fp16 runs)
    step: str = "step"  # optimiser steps taken
    epoch: str = "epoch"
    batch_in_epoch: str = "batch_in_epoch"
    bad_steps: str = "bad_steps"
    scaler_skipped: str = "scaler_skipped"
    elapsed_s: str = "elapsed_s"
    sample_generator: str = "sample_generator"  # one generator state per rank
    cpu_rng: str = "cpu_rng"
    config: str = "config"  # the TrainConfig as a dict, as in config.json

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts with a state_dict (each None where the run has none)."""
        return (
            self.model,
            self.optimizer,
            self.discriminator,
            self.disc_optimizer,
            self.scaler,
            self.disc_scaler,
            self.ema,
            self.guard,
        )

    @property
    def counters(self) -> tuple[str, ...]:
        return (self.step, self.epoch, self.batch_in_epoch, self.bad_steps, self.scaler_skipped, self.elapsed_s)


CHECKPOINT = CheckpointKeys()


class RunDir:
    """The paths of one run directory (naming them creates nothing)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS_NAME

    @property
    def log(self) -> Path:
        return self.root / "log.csv"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def scale(self) -> Path:
        return self.root / SCALE_NAME

    def has_run(self) -> bool:
        """config.json with final weights or a checkpoint: a run that can be loaded or resumed."""
        return self.config.is_file() and (self.weights.is_file() or self.checkpoint.is_file())

    def has_weights(self) -> bool:
        """Final weights or a checkpoint (a run that was started)."""
        return self.checkpoint.is_file() or self.weights.is_file()

    def run_files(self) -> list[str]:
        """The run files present (names relative to the root, e.g. "model.safetensors", "checkpoints/"), sorted."""
        present = [
            path for path in (self.config, self.weights, self.log, self.evaluation, self.scale) if path.is_file()
        ]
        folders = [path for path in (self.checkpoint.parent, self.tensorboard) if path.is_dir() and any(path.iterdir())]
        return sorted([path.name for path in present] + [f"{path.name}/" for path in folders])


def refuse_to_overwrite(dest: str | Path) -> None:
    """FileExistsError unless `dest` (a folder to fill, or a file to write) is new or an empty folder."""
    dest = Path(dest)
    if dest.is_file():
        raise FileExistsError(f"{dest} already exists: choose a new destination, or delete it first")
    present = RunDir(dest).run_files() if dest.is_dir() else []
    if present:
        raise FileExistsError(
            f"{dest} already holds {', '.join(present)}: choose a new destination folder, or delete it first"
        )


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the file."""


# Temp files of atomic_write: ".<target name>.<random>.tmp" beside the target. Each writer holds an OS lock on its
# temp file while writing, so a temp file whose lock can be taken was left by a writer that died (kill -9, a crash).
TEMP_PATTERN = ".*.????????.tmp"  # mkstemp: 8 random characters


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files of killed atomic_write calls in `folder` (live writers' are kept); returns them."""
    removed = []
    for temp in Path(folder).glob(TEMP_PATTERN):
        try:
            fd = os.open(temp, os.O_RDWR)
        except OSError:  # gone meanwhile, or not ours to open
            continue
        try:
            if try_lock(fd):  # nobody writes it any more
                temp.unlink(missing_ok=True)
                removed.append(temp)
        finally:
            os.close(fd)
    return removed


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write `path` by calling write(temp_path) on a temp file beside it, fsync, then rename over it.

    A reader (or a run killed mid-write) sees either the old file or the new one, never a partial one; the temp
    files of writers killed earlier in this folder are removed first. A failed write (a full or read-only disk:
    OSError, torch's RuntimeError, safetensors' SafetensorError) raises CheckpointError naming the file.
    """
    from safetensors import SafetensorError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try_lock(fd)  # held until fd closes: marks the temp file as being written (remove_stale_temps)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError, SafetensorError)) and not isinstance(error, CheckpointError):
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            with contextlib.suppress(OSError):  # torch says "unexpected pos 974336 vs 974224" on a full disk
                free = shutil.disk_usage(path.parent).free
                if free < 1 << 20 and "No space left" not in reason:
                    reason = f"no space left on device ({free:,} bytes free; {reason})"
            raise CheckpointError(
                f"could not write {path}: {reason}; the previous file (if any) is untouched"
            ) from error
        raise
    finally:
        os.close(fd)
    # fsync the directory so the rename itself survives a power cut
    with contextlib.suppress(OSError):  # some filesystems refuse a directory fsync
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """safetensors.torch.save_file, atomically (our temp name, so a killed writer's temp file is recognised)."""
    from safetensors.torch import save

    return atomic_write(path, lambda tmp: tmp.write_bytes(save(tensors, metadata=metadata)))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save `state` atomically."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True: a file that would run code is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain containers "
            f"(it could run code when loaded). Only load checkpoints you trust; details: {error}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error


# ---------------------------------------------------------------------------------------------
# config.json


def write_config(run_dir: str | Path, settings: Any) -> Path:
    """Write run_dir/config.json atomically from a config dataclass or dict: the only writer of config.json."""
    path = RunDir(run_dir).config
    return atomic_write(path, lambda tmp: save_json(settings, tmp))


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """run_dir/config.json as a dict ({} when there is none)."""
    path = RunDir(run_dir).config
    return json.loads(path.read_text()) if path.exists() else {}


def image_size(run_dir: str | Path, default: int = 128) -> int:
    """The image size a run was trained at (config.json's data.image_size), else `default`."""
    return int(read_config(run_dir).get("data", {}).get("image_size", default))


def saved_recipe(run_dir: str | Path) -> str | None:
    """The recipe a run directory's config.json was started with (aliases resolved, no notice), or None."""
    try:
        recipe = read_config(run_dir).get("recipe")
    except (OSError, ValueError, AttributeError):  # unreadable: resuming it reports the problem itself
        return None
    return canonical_recipe(recipe, notice=False) if isinstance(recipe, str) else None


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The settings to resume run_dir with: its config.json (also one written by an earlier version), then
    `overrides` (dotted keys; given flags). run_dir itself wins over the saved one (the folder may have moved).

    A changed setting that may not change on resume is refused later, by prepare(), naming it.
    """
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"cannot resume {run.root}: it has no {CONFIG_NAME}")
    cfg = saved_train_config(read_config(run.root))
    overrides = {**(overrides or {}), "run_dir": str(run.root)}
    if isinstance(overrides.get("recipe"), str):
        overrides["recipe"] = canonical_recipe(overrides["recipe"])
    # preset and recipe name whole groups of settings: another one is another run, checkpoint or not
    for key in ("preset", "recipe"):
        if key in overrides and overrides[key] != getattr(cfg, key):
            raise ValueError(
                f"cannot resume {run.root}: {_named(key)}: saved {getattr(cfg, key)!r} vs now {overrides[key]!r} "
                "(start a new run in another directory)"
            )
    return apply_overrides(cfg, overrides)


def is_training_run(run_dir: str | Path) -> bool:
    """run_dir/config.json holds a training run's settings (not a bare {"model": ...} of converted weights)."""
    try:
        return "recipe" in read_config(run_dir)
    except (OSError, ValueError):
        return False


def prepare(cfg: TrainConfig, resume: bool, is_main: bool) -> TrainConfig:
    """Check the run directory may be written, create it, and check a resumed run's settings match.

    Without resume a directory holding any run file is refused (nothing is overwritten); with resume, one holding
    final weights but no checkpoint too (a new run would overwrite them). config.json is written here for a new
    run; a resumed one's changes only once its checkpoint has loaded (train calls write_config then), so a resume
    that fails leaves it as it was. Returns the config to train with: on resume, a latent scale and per-channel
    statistics measured into config.json are kept (with a note).
    """
    run = RunDir(cfg.run_dir)
    # the main process judges a new run's directory: the other ranks may look after it has written config.json
    present = run.run_files() if is_main else []
    if present and not resume:
        raise FileExistsError(
            f"{run.root} already holds a run ({', '.join(present)}): pass --resume to continue it, "
            "or choose a new --run directory"
        )
    if resume and not run.checkpoint.exists() and run.weights.exists():
        raise FileExistsError(
            f"{run.root} holds final weights ({WEIGHTS_NAME}) but no checkpoints/last.pt: there is nothing to "
            f"resume, and a new run would overwrite them. Choose a new --run (with --init {run.root} to fine-tune "
            "from these weights)"
        )
    if resume and run.checkpoint.exists():
        # the settings it was saved with: config.json, else those its checkpoint carries (checked before anything
        # is written, so that a resume with other settings cannot replace them); a setting added to vaehelpers
        # after the run was saved counts as its default (saved_train_config)
        source = run.config.name if run.config.exists() else f"checkpoint {run.checkpoint}"
        settings = read_config(run.root) if run.config.exists() else _checkpoint_settings(run.checkpoint)
        saved = _flatten(to_dict(saved_train_config(settings)))  # earlier versions' config.json too
        current = _flatten(to_dict(cfg))
        differing = sorted(
            k
            for k in saved.keys() | current.keys()
            if k not in RESUMABLE_CHANGES and _norm(saved.get(k)) != _norm(current.get(k))
        )
        if differing:
            detail = ", ".join(f"{_named(k)}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in differing)
            raise ValueError(f"cannot resume {run.root}: settings differ from its {source} ({detail})")
        measured = {name: saved[f"model.{name}"] for name in MEASURED_MODEL_SETTINGS}
        if is_main and _norm(measured["scaling_factor"]) != _norm(cfg.model.scaling_factor):
            print(
                f"note: keeping scaling_factor {measured['scaling_factor']} that `vaehelpers scale` measured on an "
                "earlier state of this run; run it again when training ends"
            )
        cfg = dataclasses.replace(cfg, model=from_dict(ModelConfig, {**to_dict(cfg.model), **measured}))
    if is_main:
        try:
            run.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            run.figures.mkdir(exist_ok=True)
            for folder in (run.root, run.checkpoint.parent):  # temp files of a writer killed mid-write
                remove_stale_temps(folder)
            if resume and run.checkpoint.exists():
                if not os.access(run.root, os.W_OK):
                    raise PermissionError(f"no permission to write in {run.root}")
            else:
                write_config(run.root, cfg)
        except (OSError, CheckpointError) as error:
            raise PermissionError(f"run directory {run.root} is not writable: {error}") from error
    return cfg


def _named(key: str) -> str:
    """A setting as the user gives it: its `train` flag ("--kl-weight"), else its dotted key (for --set)."""
    return flag_of(key) or key


def _checkpoint_settings(path: Path) -> dict[str, Any]:
    """The settings a checkpoint was saved with (train.TrainState.state_dict's "config"), memory-mapped: seconds."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {(str(error).splitlines() or [''])[0]}") from error
    settings = state.get("config") if isinstance(state, dict) else None
    if not isinstance(settings, dict):
        raise CheckpointError(f"checkpoint {path} holds no settings and its run no config.json: it cannot be resumed")
    return settings


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
