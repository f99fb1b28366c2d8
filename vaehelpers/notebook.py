"""The notebooks' one-call opening: `settings = notebook.setup(smoke, **parameters)`.

Each notebook opens with a papermill `parameters` cell whose None values mean "the default for the scale";
setup() fills them in from config.py's reference run (or its smoke run when smoke is True), derives the
folders, prints the settings and, for the notebooks that compute on a GPU, checks that this PyTorch can run
on it. Installing the package on Kaggle stays a cell of its own: it runs before this module can be imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaehelpers import kaggle, sources
from vaehelpers.config import TrainConfig, build_config, notebook_settings, run_settings
from vaehelpers.dataset import ImageFolderDataset, is_writable
from vaehelpers.images import list_images
from vaehelpers.kaggle import workspace
from vaehelpers.rundir import RunDir, saved_recipe
from vaehelpers.runtime import resolve_device


@dataclass
class NotebookSettings:
    """Every setting the notebooks share, resolved: no None left except where the recipe decides.

    The training settings (`training`: image_size, preset, recipe, epochs, device, max_minutes, max_steps,
    batch_size, lr, perceptual_weight, ...) are the TrainConfig fields declared with setting(notebook=True);
    read them as attributes (settings.image_size). None there: the recipe's value.
    """

    data_source: str  # flickr8k | folder | synthetic
    data_dir: Path  # where the images are (flickr8k: where they are downloaded to, unless attached on Kaggle)
    run_dir: Path  # the training run (config.json, checkpoints/, model.safetensors, log.csv, figures/)
    figures_dir: Path  # where the notebooks save their PNGs
    smoke: bool
    synthetic_count: int  # images made when data_source is synthetic
    training: dict[str, Any]  # notebook parameter name -> value (config.notebook_settings names them)

    def __getattr__(self, name: str) -> Any:
        training = self.__dict__.get("training", {})
        if name in training:
            return training[name]
        raise AttributeError(f"{type(self).__name__!r} has no setting {name!r}")

    def image_folder(self) -> Path:
        """The folder of images to use, made or fetched when needed (idempotent).

        synthetic: data_dir, filled with `synthetic_count` procedural PNGs when it holds no image;
        flickr8k: the attached Kaggle input, else data_dir/Images (downloaded with the kaggle API once);
        folder: data_dir as it is.
        """
        if self.data_source == "synthetic":
            if not self.data_dir.is_dir() or not list_images(self.data_dir):
                sources.make_synthetic(self.data_dir, count=self.synthetic_count, size=self.image_size, seed=0)
            return self.data_dir
        if self.data_source == "flickr8k":
            return sources.get_flickr8k(self.data_dir)
        if self.data_source == "folder":
            if not self.data_dir.is_dir():
                raise FileNotFoundError(f"data_source 'folder': {self.data_dir} is not a folder; set data_dir")
            return self.data_dir
        raise ValueError(f"unknown data_source {self.data_source!r}: choose flickr8k, folder or synthetic")

    def cache_dir(self, images: Path) -> Path | None:
        """Where the decoded-image cache goes: beside the images, or in the workspace when they are read-only
        (an attached Kaggle input: judged by its place too, since root sees read-only mounts as writable); None
        means beside the images."""
        attached = Path(images).resolve().is_relative_to(kaggle.kaggle_input().resolve())
        return None if is_writable(images) and not attached else workspace() / kaggle.CACHE_FOLDER

    def dataset(self, split: str = "train", augment: bool = False) -> Any:
        """The images of one split (an ImageFolderDataset at image_size), with the cache built on first use."""
        images = self.image_folder()
        return ImageFolderDataset(
            images, split=split, image_size=self.image_size, augment=augment, cache_dir=self.cache_dir(images)
        )

    def train_config(self, **overrides: Any) -> Any:
        """The TrainConfig of this run: preset, then recipe, then these settings, then `overrides` (dotted keys)."""
        images = self.image_folder()
        cache_dir = self.cache_dir(images)
        settings: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "data.data_dir": str(images),
            "data.cache_dir": str(cache_dir) if cache_dir else "",
        }
        keys = notebook_settings()
        settings.update(
            {keys[name]: value for name, value in self.training.items() if value is not None and name in keys}
        )
        preset, recipe = settings.pop("preset"), settings.pop("recipe")
        return build_config(preset, recipe, **{**settings, **overrides})

    def fetch_pretrained(self, *names: str) -> None:
        """Download the named pretrained files (pretrained.py: vgg16, lpips, inception) where missing, at full
        scale only: at smoke scale nothing is fetched (the figures and metrics then say what is missing). A failed
        download (internet off) prints its one-line reason instead of stopping the notebook."""
        from vaehelpers import pretrained

        if self.smoke:
            return
        try:
            pretrained.download(names=names, progress=False)
        except RuntimeError as error:
            print(f"not fetched: {error}")

    @property
    def torch_device(self) -> torch.device:
        """The device to compute on: `device` resolved (auto: CUDA when there is one, after the build check)."""
        return resolve_device(self.device)

    def __str__(self) -> str:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "training"}
        values.update(self.training)
        width = max(map(len, values))
        return "\n".join(f"{name:<{width}}  {value}" for name, value in values.items())


def settings(
    smoke: bool = False,
    *,
    data_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    figures_dir: str | Path | None = None,
    config_cls: type = TrainConfig,
    **given: Any,
) -> NotebookSettings:
    """The notebooks' settings from their parameters: None takes the reference run's value (config.REFERENCE_RUN;
    config.SMOKE_RUN when smoke), else the recipe's. The parameters are data_source, synthetic_count and the
    settings of config_cls declared with setting(notebook=True).

    Folders default to <workspace>/data/<data_source>, <workspace>/runs/<data_source>-<preset>-<image_size> and
    <run_dir>/figures, where the workspace is /kaggle/working on Kaggle and the repository root locally.
    Unknown names raise, so that a misspelt papermill parameter is not silently ignored.
    """
    defaults = {**dict.fromkeys(notebook_settings(config_cls)), **run_settings(smoke)}
    unknown = set(given) - set(defaults)
    if unknown:
        raise TypeError(f"unknown notebook parameter(s) {sorted(unknown)}; known: {sorted(defaults)}")
    values = {name: default if given.get(name) is None else given[name] for name, default in defaults.items()}
    root = workspace()
    data_dir = Path(data_dir) if data_dir else root / "data" / values["data_source"]
    run_dir = (
        Path(run_dir)
        if run_dir
        else root / "runs" / f"{values['data_source']}-{values['preset']}-{values['image_size']}"
    )
    if given.get("recipe") is None:  # a run already in run_dir keeps the recipe it was started with (it resumes)
        values["recipe"] = saved_recipe(run_dir) or values["recipe"]
    figures_dir = Path(figures_dir) if figures_dir else RunDir(run_dir).figures
    own = {name: values.pop(name) for name in ("data_source", "synthetic_count")}
    return NotebookSettings(
        data_dir=data_dir, run_dir=run_dir, figures_dir=figures_dir, smoke=bool(smoke), training=values, **own
    )


def setup(
    smoke: bool = False, *, check_gpu: bool = False, install_legacy_torch: bool = False, **parameters: Any
) -> NotebookSettings:
    """settings(smoke, **parameters), printed; with check_gpu, the GPU check first (kaggle.ensure_gpu_supported:
    on a GPU this PyTorch has no kernels for, it stops with what to do, or installs a build that has them when
    install_legacy_torch is True and asks for a restart). Returns the settings (settings.torch_device: where to compute).
    """
    resolved = settings(smoke, **parameters)
    print(resolved)
    if check_gpu:
        print(kaggle.ensure_gpu_supported(install_legacy_torch))
    return resolved


class FullScaleOnCPU(RuntimeError):
    """The reference run would train on a CPU (for days): refused unless asked for explicitly."""


def check_scale_fits_device(settings: Any, device: Any, allow_cpu: bool = False) -> str:
    """Refuse, before any work, to start the full-scale run (not smoke, the sd model) on a CPU unless allow_cpu.

    settings: the notebooks' NotebookSettings (smoke, preset, epochs, max_minutes); device: the torch.device the
    run would use. Returns a one-line status; raises FullScaleOnCPU saying the three ways on.
    """
    if getattr(device, "type", str(device)) != "cpu" or settings.smoke or settings.preset != "sd" or allow_cpu:
        return f"training {settings.preset} for {settings.epochs} epochs on {device}"
    raise FullScaleOnCPU(
        f"the full-scale run ({settings.preset} model, {settings.epochs} epochs, up to {settings.max_minutes:g} "
        "minutes a session) would train on the CPU, where it makes almost no progress. Turn the GPU on (Kaggle: "
        "Settings > Accelerator > GPU T4 x2, then run all again), or set smoke=True for a quick check at toy "
        "scale, or set allow_cpu=True to train on the CPU anyway."
    )


# Errors raised in a notebook speak its parameters, not the command line's flags: the package's messages name the
# flags (they are shared with the CLI), and these rewrites say the same in a notebook's words. Text in backticks
# (a command to run in a terminal) is left as it is.
FLAGS_AS_PARAMETERS = (
    (r"train with --recipe (\w+)", r'set recipe="\1"'),
    (r"--recipe (\w+)", r'recipe="\1"'),
    (r"--batch-size (\d+)", r"batch_size=\1"),
    (r"--max-steps (\d+)", r"max_steps=\1"),
    (r"--precision (\w+)", r'precision="\1" (cfg = settings.train_config(precision="\1"))'),
    (r"pass --weights-dir DIR \(or set (\w+)=DIR\)", r'set os.environ["\1"] = DIR'),
    (r"--weights-dir DIR|--weights-dir", 'os.environ["VAEHELPERS_WEIGHTS"]'),
    (r"--data DIR", "data_dir"),
    (r"evaluate: --no-lpips", "05_evaluation then reports LPIPS as unavailable"),
    (r"--(lr|epochs|device|image-size|preset|run)\b", lambda found: found.group(1).replace("-", "_")),
)


def in_parameters(message: str) -> str:
    """The message with each command-line flag outside backticks rewritten as the notebook parameter to set."""
    parts = message.split("`")
    for index in range(0, len(parts), 2):  # even parts lie outside backticks
        for flag, parameter in FLAGS_AS_PARAMETERS:
            parts[index] = re.sub(flag, parameter, parts[index])
    return "`".join(parts)


@contextlib.contextmanager
def parameter_errors() -> Iterator[None]:
    """Re-raise an error from inside the block with its message in_parameters (same type, same traceback), so
    that a notebook's error names the parameter to change; an error whose type cannot be rebuilt stays as it is."""
    try:
        yield
    except Exception as error:
        message = in_parameters(str(error))
        if message == str(error):
            raise
        try:
            translated = type(error)(message)
        except Exception:
            raise error from None
        raise translated.with_traceback(error.__traceback__) from None
