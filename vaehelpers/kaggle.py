"""Kaggle: credentials and the API, where things are on a Kaggle machine, the GPU check, runs from earlier sessions.

How the code gets to Kaggle (kaggle_push.py, `vaehelpers kaggle push`): a wheel of this package is uploaded, with
kaggle/install.py, as the private dataset `<user>/vaehelpers-src`; every kernel attaches that dataset and its
first cell runs the installer, which pip-installs the wheel with a constraints file pinning the torch and
torchvision that Kaggle preinstalled (so nothing replaces them; pip fetches only what is missing). A dataset
rather than `pip install git+https://...`: it needs no public repository, works with internet off once the
light dependencies are present, and pins each kernel version to the exact code that was pushed with it.
The push pipeline lives in kaggle_push.py and the CPU-scale refusal in notebook.py; both are re-exported here.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from vaehelpers.rundir import RunDir
from vaehelpers.runtime import UnsupportedGPUError, check_cuda_arch

# Where Kaggle mounts the attached inputs (read-only) and the working folder that becomes the version's output.
# The environment variables move them (read at each call), so that tests can run a notebook as Kaggle would.
INPUT_ENV, WORKING_ENV = "VAEHELPERS_KAGGLE_INPUT", "VAEHELPERS_KAGGLE_WORKING"
USER_PLACEHOLDER = "KAGGLE_USERNAME"  # in kaggle/*/kernel-metadata.json; `kaggle push` puts the user's name there
SOURCE_DATASET = "vaehelpers-src"  # the dataset that carries the package's wheel
INSTALLER_NAME = "vaehelpers_install.py"  # kaggle/install.py as it is uploaded (the notebooks glob for this name)
TRAINING_SLUG = "vaehelpers-04-training"  # kaggle/04_training's kernel id (after the user): its output is an input
CACHE_FOLDER = "cache"  # <workspace>/cache: the image cache beside read-only images (notebook.NotebookSettings)

# PyTorch's CUDA 12.6 builds still ship sm_60 kernels (P100); its cu128 builds, Kaggle's default, do not. For a
# P100, install_legacy_torch reinstalls Kaggle's own torch and torchvision versions from this index, so the
# versions (and everything built against them) stay as they are. vaehelpers itself needs torch >= 2.1.
LEGACY_TORCH_INDEX = "https://download.pytorch.org/whl/cu126"

# The install cell every notebook opens with (after its parameters, which declare vaehelpers_source). It runs
# before vaehelpers can be imported, so it stands alone in each notebook as this text, word for word
# (tests/test_notebooks.py checks that every notebook's copy equals it). Without the dataset (a "Copy & Edit" copy keeps no inputs) it names both ways on instead of failing with an IndexError.
INSTALL_CELL = """\
# Install vaehelpers, keeping Kaggle's own torch: from the attached dataset vaehelpers-src, else (internet on)
# from vaehelpers_source, a pip requirement such as "git+https://github.com/OWNER/vaehelpers".
import glob, importlib.metadata, importlib.util, runpy, subprocess, sys
if importlib.util.find_spec("vaehelpers") is None:
    installers = glob.glob("/kaggle/input/**/vaehelpers_install.py", recursive=True)
    if installers:  # the wheel and its installer, from `vaehelpers kaggle push`
        runpy.run_path(installers[0], run_name="__main__")
    elif vaehelpers_source:
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "torchvision")]
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", vaehelpers_source, *pins], check=True)
    else:
        raise ModuleNotFoundError(
            "vaehelpers is not installed and the dataset vaehelpers-src is not attached. Either attach it (right-hand "
            "panel, Input: '+ Add Input' > 'Your Work' > 'Datasets' > vaehelpers-src, uploaded by `vaehelpers kaggle "
            "push`), or turn the internet on (Settings > Internet) and set vaehelpers_source = 'git+https://github.com/"
            "OWNER/vaehelpers' (the repository) in the parameters cell. Then run this cell again.")"""

Installer = Callable[[Sequence[str]], Any]  # pip arguments -> anything; raises on failure


class RestartRequired(RuntimeError):
    """A different PyTorch was installed: the running kernel still has the old one imported."""


def kaggle_input() -> Path:
    """Where Kaggle mounts the attached inputs: $VAEHELPERS_KAGGLE_INPUT when set, else /kaggle/input."""
    return Path(os.environ.get(INPUT_ENV) or "/kaggle/input")


def kaggle_working() -> Path:
    """The folder whose files become the version's output: $VAEHELPERS_KAGGLE_WORKING when set, else /kaggle/working."""
    return Path(os.environ.get(WORKING_ENV) or "/kaggle/working")


def on_kaggle() -> bool:
    """True inside a Kaggle notebook (interactive or a batch run), or where the environment names a working folder."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.environ.get(WORKING_ENV)) or kaggle_working().is_dir()


def workspace(cwd: str | Path | None = None) -> Path:
    """Where the notebooks keep data and runs: /kaggle/working on Kaggle, else the repository root when run
    from notebooks/ (so that notebooks and the command line share data/ and runs/), else the current folder."""
    if on_kaggle():
        return kaggle_working()
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if cwd.name == "notebooks" and (cwd.parent / "pyproject.toml").is_file():
        return cwd.parent
    return cwd


# ----------------------------------------------------------------------------- credentials and /kaggle/input


def _input_root(given: str | Path | None) -> Path:
    """`given` as a Path, or kaggle_input() where None."""
    return kaggle_input() if given is None else Path(given)


def credentials() -> str | None:
    """Where the kaggle package would find credentials (a short description), or None; reads nothing secret."""
    env = os.environ
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME and KAGGLE_KEY"
    if env.get("KAGGLE_API_V1_TOKEN") and Path(env["KAGGLE_API_V1_TOKEN"]).is_file():
        return "KAGGLE_API_V1_TOKEN (inside a Kaggle notebook)"
    home = Path.home() / ".kaggle"
    if env.get("KAGGLE_CONFIG_DIR"):
        config_dirs = [Path(env["KAGGLE_CONFIG_DIR"])]
    else:  # kaggle falls back to the XDG folder when ~/.kaggle is missing
        config_dirs = [home, Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"]
    candidates = [directory / "kaggle.json" for directory in config_dirs]
    candidates += [home / "access_token", home / "access_token.txt", home / "credentials.json"]
    return next((str(path) for path in candidates if path.is_file()), None)


CREDENTIALS_HELP = (
    "Create an API token at https://www.kaggle.com/settings/api, then `export KAGGLE_API_TOKEN=<token>` or save it "
    "to ~/.kaggle/access_token; the legacy kaggle.json goes in ~/.kaggle/ (or $KAGGLE_CONFIG_DIR) with `chmod 600`, "
    "or set KAGGLE_USERNAME and KAGGLE_KEY."
)


class KaggleLoginError(RuntimeError):
    """No credentials, or Kaggle refused them; the message says what to do."""


def api() -> Any:
    """The authenticated kaggle.api; the kaggle package is imported only here (it authenticates at import)."""
    source = credentials()
    if source is None:
        raise KaggleLoginError(f"no Kaggle credentials were found. {CREDENTIALS_HELP}")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # kaggle prints a long help text when it cannot log in
            import kaggle

            client = kaggle.api
            if not getattr(client, "_authenticated", False):
                client.authenticate()
    except ImportError as error:
        # kaggle 2.2 also imports `six` without declaring it
        raise KaggleLoginError(f"cannot import the kaggle package ({error}): pip install kaggle six") from error
    except SystemExit:  # KaggleApi.authenticate() calls exit(1) on failure
        raise KaggleLoginError(f"Kaggle did not accept the credentials from {source}. {CREDENTIALS_HELP}") from None
    except Exception as error:  # token checks go over the network
        raise KaggleLoginError(f"could not log in to Kaggle with {source}: {type(error).__name__}: {error}") from error
    return client


def input_folders(
    kaggle_input: str | Path | None = None, max_depth: int = 6, skip: Sequence[str] = ()
) -> Iterator[tuple[int, Path]]:
    """(depth, folder) for the folders under an attached-inputs root (default kaggle_input()), breadth first, sorted,
    hidden ones left out.

    Bounded (max_depth levels) and never entering the folders named in `skip`, so that a large image dataset
    is never walked to the bottom.
    """
    root = _input_root(kaggle_input)
    level = [root] if root.is_dir() else []
    for depth in range(max_depth):
        below: list[Path] = []
        for folder in level:
            with contextlib.suppress(OSError), os.scandir(folder) as entries:
                below += sorted(Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir())
        for folder in below:
            yield depth, folder
        level = [folder for folder in below if folder.name not in skip]


# ----------------------------------------------------------------------------- the GPU check


def pip_install(arguments: Sequence[str]) -> None:
    """`python -m pip install ARGUMENTS` in this interpreter; raises CalledProcessError on failure."""
    subprocess.run([sys.executable, "-m", "pip", "install", *arguments], check=True)


def ensure_gpu_supported(install_legacy_torch: bool = False, *, installer: Installer | None = None) -> str:
    """Check, before any work, that this PyTorch build has kernels for every visible GPU; returns a status line.

    Kaggle's default PyTorch (cu128) has no sm_60 kernels, so on a P100 the first real operation would fail
    with "no kernel image is available" (runtime.check_cuda_arch explains). Then:
    install_legacy_torch=False: raise UnsupportedGPUError saying what to do (T4 x2 accelerator, or this option);
    install_legacy_torch=True (needs internet): pip-install the same torch and torchvision versions built for
    CUDA 12.6 (legacy_torch_requirements; they still carry sm_60) with `installer` (default: pip in this
    interpreter) and raise RestartRequired, because the running kernel keeps the old torch until restarted.
    """
    if not torch.cuda.is_available():
        return f"no CUDA GPU: running on the CPU (torch {torch.__version__})"
    errors, names = [], []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        names.append(f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})")
        try:
            check_cuda_arch(index)
        except UnsupportedGPUError as error:
            errors.append(error)
    if not errors:
        return f"{len(names)} GPU(s): {', '.join(names)}; supported by torch {torch.__version__}"
    if not install_legacy_torch:
        raise UnsupportedGPUError(
            f"{errors[0]} On Kaggle choose Settings > Accelerator > GPU T4 x2 (the P100 accelerator is retired); "
            "elsewhere notebook.setup(..., install_legacy_torch=True) with internet on installs that build, then "
            "restart the kernel."
        )
    requirements = legacy_torch_requirements()
    (installer or pip_install)([*requirements, "--index-url", LEGACY_TORCH_INDEX])
    raise RestartRequired(
        f"installed {' and '.join(requirements)} built for CUDA 12.6 (with sm_60 kernels) for {', '.join(names)}; "
        "the running kernel still has the old torch: restart it (Run > Restart & clear cell outputs) and run all "
        "cells again."
    )


def legacy_torch_requirements() -> list[str]:
    """This environment's torch and torchvision versions without their local build tag, e.g. ["torch==2.10.0",
    "torchvision==0.25.0"] for Kaggle's 2.10.0+cu128: the same versions, to be fetched from the cu126 index."""
    import importlib.metadata

    requirements = []
    for name in ("torch", "torchvision"):
        try:
            requirements.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return requirements


# ----------------------------------------------------------------------------- runs from earlier sessions


def find_attached_run(name: str, kaggle_input: str | Path | None = None, max_depth: int = 6) -> Path | None:
    """A run directory called `name` (holding config.json and weights or a checkpoint) in an attached input,
    e.g. the output of an earlier 04_training version added with Add Input > Your Work; None if there is none."""
    for _, folder in input_folders(kaggle_input, max_depth, skip=("Images", "checkpoints", "tensorboard")):
        if folder.name == name and RunDir(folder).has_run():
            return folder
    return None


def attached_training_outputs(kaggle_input: str | Path | None = None) -> list[Path]:
    """The attached outputs of 04_training (folders named vaehelpers-04-training: Kaggle mounts a notebook's output
    at <input>/notebooks/<owner>/<slug>, formerly <input>/<slug>)."""
    return [folder for _, folder in input_folders(kaggle_input, max_depth=3) if folder.name == TRAINING_SLUG]


class AttachedRunMissing(FileNotFoundError):
    """04's own output is attached but holds no checkpoint of this run: starting over would discard the chain."""


def restore_run(run_dir: str | Path, kaggle_input: str | Path | None = None, start_fresh: bool = False) -> str:
    """Copy an attached earlier run into run_dir when run_dir has none yet (Kaggle inputs are read-only, and a
    resumed run must write), with the image cache its session built (<output>/cache -> <workspace>/cache, so
    no session decodes the images twice); returns what happened, in one line.

    Where 04_training's own output is attached but holds no run named like run_dir (none, or another run's), it
    raises AttachedRunMissing naming what it found, instead of starting over, unless start_fresh is True.
    Where nothing is attached, the run starts fresh and the line says how to attach an earlier session.
    """
    run_dir = Path(run_dir)
    if RunDir(run_dir).has_weights():
        return f"{run_dir} already holds a run: using it"
    found = find_attached_run(run_dir.name, kaggle_input)
    if found is None:
        outputs = attached_training_outputs(kaggle_input)
        if outputs and not start_fresh:
            runs = sorted({run.name for output in outputs for run in output.glob("runs/*") if RunDir(run).has_run()})
            held = f"it holds the run(s) {', '.join(runs)}" if runs else "it holds no run"
            raise AttachedRunMissing(
                f"the attached output {outputs[0]} of {TRAINING_TITLE} holds no run named {run_dir.name!r} ({held}), "
                "so this session would start the run over. Attach the version whose output holds the checkpoint "
                "(`vaehelpers kaggle push` picks it), or set run_dir (or preset, image_size, data_source) to the run "
                "it holds, or set start_fresh=True to start a new run anyway."
            )
        if outputs:
            return f"start_fresh=True: {run_dir} starts a new run although {outputs[0]} is attached"
        return f"no earlier run named {run_dir.name!r} attached: {run_dir} starts fresh. {attach_hint('continue it')}"
    shutil.copytree(found, run_dir, dirs_exist_ok=True)
    message = f"copied the attached run {found} to {run_dir}"
    cache, target = found.parent.parent / CACHE_FOLDER, workspace() / CACHE_FOLDER
    if cache.is_dir() and not target.exists():  # built by an earlier session: copying beats decoding again
        shutil.copytree(cache, target)
        message += f", and its image cache to {target}"
    return message


def require_run(run_dir: str | Path, kaggle_input: str | Path | None = None) -> str:
    """For 05_evaluation: restore_run, but a missing run is an error that says what to do (FileNotFoundError),
    not a fresh start: 05 evaluates the trained weights of 04_training."""
    run_dir = Path(run_dir)
    if not RunDir(run_dir).has_weights() and find_attached_run(run_dir.name, kaggle_input) is None:
        raise FileNotFoundError(
            f"no trained run named {run_dir.name!r}: {run_dir} holds none and no attached input has one. This "
            f"notebook evaluates the output of {TRAINING_TITLE}: let that notebook finish first (locally: run it "
            f"with the same settings), or {attach_hint('evaluate it')}"
        )
    return restore_run(run_dir, kaggle_input)


TRAINING_TITLE = "vaehelpers 04 training"  # kaggle/04_training/kernel-metadata.json's title


def attach_hint(purpose: str) -> str:
    """The buttons that attach 04_training's output of an earlier session to the notebook open in Kaggle's editor."""
    return (
        f"On Kaggle, to {purpose} from an earlier session's output: in the editor's right-hand panel, under "
        f'Input, click "+ Add Input", choose "Your Work", then "Notebooks", click the + beside '
        f'"{TRAINING_TITLE}" (its latest finished version), and run all cells again.'
    )


# Moved by concern; still importable from here (`kaggle.push`, `kaggle.check_scale_fits_device`, ...). Resolved
# lazily (PEP 562): notebook.py imports this module, and kaggle_push.py imports it too.
_MOVED = {
    **dict.fromkeys(
        (
            "push",
            "stage",
            "build_wheel",
            "kernel_folders",
            "kaggle_client",
            "kernel_status",
            "wait_for_dataset",
            "DROPPABLE_SOURCES",
            "STAGE_DIR",
            "TRAINING_KERNEL",
            "EVALUATION_KERNEL",
        ),
        "vaehelpers.kaggle_push",
    ),
    **dict.fromkeys(("check_scale_fits_device", "FullScaleOnCPU"), "vaehelpers.notebook"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
