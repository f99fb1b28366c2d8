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
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vaehelpers.config import RECIPE_ALIASES, ModelConfig, TrainConfig, canonical_recipe, from_dict, save_json, to_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SCALE_NAME = "scale.json"  # beside config.json: how the stored scaling_factor was measured
# Settings that may change when a run is resumed; any other difference is an error (it would not be the same run).
RESUMABLE_CHANGES = {
    "epochs",
    "max_steps",
    "max_minutes",
    "device",
    "precision",
    "tf32",
    "compile",
    "checkpoint_every",
    "log_every",
    "image_every",
    "run_dir",
    "max_bad_steps",
    "headroom_every",  # when headroom is measured, not what the run is (like log_every)
    "headroom_threshold",
    "headroom_any_precision",
    "data.data_dir",
    "data.num_workers",
    "data.cache",
    "data.cache_dir",
    "model.scaling_factor",  # measured after training by `vaehelpers scale`; kept from config.json on resume
    "weights_dir",  # where the pretrained files are: a location, not a setting
    "model.latents_mean",
    "model.latents_std",  # the same, per latent channel
}
MEASURED_MODEL_SETTINGS = ("scaling_factor", "latents_mean", "latents_std")  # `vaehelpers scale` writes these


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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the file."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write `path` by calling write(temp_path) on a temp file beside it, fsync, then rename over it.

    A reader (or a run killed mid-write) sees either the old file or the new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointError(
                f"could not write {path}: {error}; the previous file (if any) is untouched"
            ) from error
        raise
    # fsync the directory so the rename itself survives a power cut
    with contextlib.suppress(OSError):  # some filesystems refuse a directory fsync
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


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


def prepare(cfg: TrainConfig, resume: bool, is_main: bool) -> TrainConfig:
    """Create the run directory, check it is writable, and check a resumed run's settings match.

    Returns the config to train with: on resume, a latent scale and per-channel statistics measured into
    config.json are kept.
    """
    run = RunDir(cfg.run_dir)
    if run.checkpoint.exists() and not resume:
        raise FileExistsError(
            f"{run.root} already holds a checkpoint: pass --resume to continue it, or choose a new --run"
        )
    if resume and run.checkpoint.exists() and run.config.exists():
        # a setting added to vaehelpers after the run was saved counts as its default
        saved = {**_flatten(to_dict(TrainConfig())), **_flatten(read_config(run.root))}
        saved["recipe"] = RECIPE_ALIASES.get(saved["recipe"], saved["recipe"])  # a run saved as "default" is `pixel`
        current = _flatten(to_dict(cfg))
        differing = sorted(
            k
            for k in saved.keys() | current.keys()
            if k not in RESUMABLE_CHANGES and _norm(saved.get(k)) != _norm(current.get(k))
        )
        if differing:
            detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in differing)
            raise ValueError(f"cannot resume {run.root}: settings differ from its config.json ({detail})")
        measured = {name: saved[f"model.{name}"] for name in MEASURED_MODEL_SETTINGS}
        cfg = dataclasses.replace(cfg, model=from_dict(ModelConfig, {**to_dict(cfg.model), **measured}))
    if is_main:
        for stale in run.checkpoint.parent.glob(".*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
        try:
            run.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            run.figures.mkdir(exist_ok=True)
            write_config(run.root, cfg)
        except (OSError, CheckpointError) as error:
            raise PermissionError(f"run directory {run.root} is not writable: {error}") from error
    return cfg


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
