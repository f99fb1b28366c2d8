"""The notebooks' settings (the reference run, or toy scale with smoke=True) and `make demo`, which runs them.

Each notebook opens with a papermill `parameters` cell whose None values mean "the default for the scale":
`notebook_settings(smoke, **parameters)` fills them in (REFERENCE, or SMOKE when smoke) and derives the
folders. `run_demo` executes the five notebooks in order with papermill at smoke scale on synthetic images
and the CPU, writing the executed copies and their figures under one folder.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vaehelpers.config import DEMO_MINUTES, REFERENCE_RUN, SMOKE_RUN

NOTEBOOKS = ("01_data", "02_architecture", "03_loss", "04_training", "05_evaluation")
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"  # the repository's notebooks/

REFERENCE = REFERENCE_RUN  # the values behind the notebooks' None parameters (config.py)
SMOKE = SMOKE_RUN


@dataclass
class NotebookSettings:
    """Every setting the notebooks share, resolved: no None left except where the recipe decides."""

    data_source: str  # flickr8k | folder | synthetic
    data_dir: Path  # where the images are (flickr8k: where they are downloaded to, unless attached on Kaggle)
    run_dir: Path  # the training run (config.json, checkpoints/, model.safetensors, log.csv, figures/)
    figures_dir: Path  # where the notebooks save their PNGs
    image_size: int  # square side in pixels, a multiple of 8
    preset: str  # tiny | small | sd
    recipe: str  # default | seed
    epochs: int
    device: str  # auto | cpu | cuda | cuda:N
    smoke: bool
    synthetic_count: int  # images made when data_source is synthetic
    max_minutes: float  # training stops (with a checkpoint) before this; 0: no limit
    max_steps: int  # 0: no limit
    batch_size: int | None  # None: the recipe's
    lr: float | None  # None: the recipe's
    perceptual_weight: float | None  # None: the recipe's

    def image_folder(self) -> Path:
        """The folder of images to use, made or fetched when needed (idempotent).

        synthetic: data_dir, filled with `synthetic_count` procedural PNGs when it holds no image;
        flickr8k: the attached Kaggle input, else data_dir/Images (downloaded with the kaggle API once);
        folder: data_dir as it is.
        """
        from vaehelpers import images, sources

        if self.data_source == "synthetic":
            if not self.data_dir.is_dir() or not images.list_images(self.data_dir):
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
        (an attached Kaggle input); None means beside the images."""
        from vaehelpers.kaggle import workspace

        return None if os.access(images, os.W_OK) else workspace() / "cache"

    def dataset(self, split: str = "train", augment: bool = False) -> Any:
        """The images of one split (an ImageFolderDataset at image_size), with the cache built on first use."""
        from vaehelpers.dataset import ImageFolderDataset

        images = self.image_folder()
        return ImageFolderDataset(images, split=split, image_size=self.image_size, augment=augment,
                                  cache_dir=self.cache_dir(images))

    def train_config(self, **overrides: Any) -> Any:
        """The TrainConfig of this run: preset, then recipe, then these settings, then `overrides` (dotted keys)."""
        from vaehelpers.config import build_config

        images = self.image_folder()
        cache_dir = self.cache_dir(images)
        settings: dict[str, Any] = {
            "run_dir": str(self.run_dir), "epochs": self.epochs, "device": self.device,
            "max_minutes": self.max_minutes, "max_steps": self.max_steps, "data.data_dir": str(images),
            "data.image_size": self.image_size, "data.cache_dir": str(cache_dir) if cache_dir else "",
        }
        optional = {"batch_size": self.batch_size, "lr": self.lr, "loss.perceptual_weight": self.perceptual_weight}
        settings.update({key: value for key, value in optional.items() if value is not None})
        return build_config(self.preset, self.recipe, **{**settings, **overrides})

    def __str__(self) -> str:
        width = max(len(field.name) for field in dataclasses.fields(self))
        return "\n".join(f"{field.name:<{width}}  {getattr(self, field.name)}" for field in dataclasses.fields(self))


def notebook_settings(smoke: bool = False, *, data_dir: str | Path | None = None, run_dir: str | Path | None = None,
                      figures_dir: str | Path | None = None, **given: Any) -> NotebookSettings:
    """The notebooks' settings from their parameters: None takes the REFERENCE value (SMOKE when smoke).

    Folders default to <workspace>/data/<data_source>, <workspace>/runs/<data_source>-<preset>-<image_size> and
    <run_dir>/figures, where the workspace is /kaggle/working on Kaggle and the repository root locally.
    Unknown names raise, so that a misspelt papermill parameter is not silently ignored.
    """
    from vaehelpers.kaggle import workspace

    unknown = set(given) - set(REFERENCE)
    if unknown:
        raise TypeError(f"unknown notebook parameter(s) {sorted(unknown)}; known: {sorted(REFERENCE)}")
    defaults = SMOKE if smoke else REFERENCE
    values = {name: defaults[name] if given.get(name) is None else given[name] for name in REFERENCE}
    root = workspace()
    data_dir = Path(data_dir) if data_dir else root / "data" / values["data_source"]
    run_dir = Path(run_dir) if run_dir else root / "runs" / f"{values['data_source']}-{values['preset']}-{values['image_size']}"
    figures_dir = Path(figures_dir) if figures_dir else run_dir / "figures"
    return NotebookSettings(data_dir=data_dir, run_dir=run_dir, figures_dir=figures_dir, smoke=bool(smoke), **values)


# ----------------------------------------------------------------------------- running the notebooks

def notebook_kernel() -> str:
    """A Jupyter kernel that runs this interpreter (so the notebooks see this environment's vaehelpers).

    "python3" when it resolves here: jupyter_client runs a kernelspec whose command is plain `python` with
    the current interpreter, and the venv's own spec says just that. Else (a user-level python3 spec pointing
    at another Python shadows it) a spec named "vaehelpers" is installed into this environment's prefix, once.
    """
    import sys

    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()

    def runs_here(name: str) -> bool:
        try:
            command = manager.get_kernel_spec(name).argv[0]
        except NoSuchKernel:
            return False
        plain = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
        return command in plain or os.path.realpath(command) == os.path.realpath(sys.executable)

    if runs_here("python3"):
        return "python3"
    if not runs_here("vaehelpers"):
        from ipykernel.kernelspec import install

        install(kernel_name="vaehelpers", display_name="Python (vaehelpers)", prefix=sys.prefix)
    return "vaehelpers"


def run_demo(out: str | Path, minutes: float = DEMO_MINUTES, *, image_size: int = SMOKE_RUN["image_size"],
             synthetic_count: int = SMOKE_RUN["synthetic_count"],
             max_steps: int = 0, notebooks: Sequence[str] = NOTEBOOKS, fresh: bool = True,
             log_output: bool = False) -> dict[str, Any]:
    """Run the notebooks in order with papermill at smoke scale (synthetic images, tiny model, CPU).

    Writes under out/: data/ (the synthetic images), run/ (the training run), figures/ (sample grid,
    reconstructions, latent channels, ...) and notebooks/ (the executed copies). minutes: the training
    budget; max_steps > 0 stops training sooner (the tests use a few steps). fresh: start the run again
    (the images are kept). A failing cell raises papermill's PapermillExecutionError naming it.
    Returns {"notebooks": [...], "figures": [...], "seconds": {name: s}}.
    """
    import shutil

    import papermill

    out = Path(out).resolve()
    if fresh:
        for folder in ("run", "figures", "notebooks"):
            shutil.rmtree(out / folder, ignore_errors=True)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    parameters = {
        "smoke": True, "interactive": False, "data_dir": str(out / "data"), "run_dir": str(out / "run"),
        "figures_dir": str(out / "figures"), "image_size": image_size, "synthetic_count": synthetic_count,
        "max_minutes": float(minutes), "max_steps": int(max_steps), "plot_every": 25,
    }
    kernel = notebook_kernel()
    executed, seconds = [], {}
    for name in notebooks:
        source = NOTEBOOK_DIR / f"{name}.ipynb"
        declared = papermill.inspect_notebook(str(source))  # pass each notebook only what it declares
        started = time.perf_counter()
        papermill.execute_notebook(
            str(source), str(out / "notebooks" / f"{name}.ipynb"), kernel_name=kernel, cwd=str(NOTEBOOK_DIR),
            parameters={key: value for key, value in parameters.items() if key in declared},
            progress_bar=False, log_output=log_output)
        seconds[name] = round(time.perf_counter() - started, 1)
        executed.append(out / "notebooks" / f"{name}.ipynb")
        print(f"ran {name} in {seconds[name]:.1f} s -> {executed[-1]}", flush=True)
    figures = sorted((out / "figures").glob("*.png"))
    print(f"figures: {', '.join(str(path) for path in figures)}")
    return {"notebooks": executed, "figures": figures, "seconds": seconds}
