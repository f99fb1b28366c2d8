"""Kaggle: credentials and the API, where things are on a Kaggle machine, the GPU check, `vaehelpers kaggle push`.

How the code gets to Kaggle: `vaehelpers kaggle push` builds a wheel of this package and uploads it, with
kaggle/install.py, as the private dataset `<user>/vaehelpers-src`; every kernel attaches that dataset and
its first cell runs the installer, which pip-installs the wheel with a constraints file pinning the torch and
torchvision that Kaggle preinstalled (so nothing replaces them; pip fetches only what is missing). A dataset
rather than `pip install git+https://...`: it needs no public repository, works with internet off once the
light dependencies are present, and pins each kernel version to the exact code that was pushed with it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from vaehelpers.rundir import RunDir
from vaehelpers.runtime import UnsupportedGPUError, check_cuda_arch

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
USER_PLACEHOLDER = "KAGGLE_USERNAME"  # in kaggle/*/kernel-metadata.json; `kaggle push` puts the user's name there
SOURCE_DATASET = "vaehelpers-src"  # the dataset that carries the package's wheel
INSTALLER_NAME = "vaehelpers_install.py"  # kaggle/install.py as it is uploaded (the notebooks glob for this name)
STAGE_DIR = Path("build") / "kaggle"  # where `kaggle push` assembles the uploads, under the repository

# The last PyPI-index PyTorch pair whose CUDA build still ships sm_60 kernels (P100): the cu121 wheels of 2.5.1.
LEGACY_TORCH = ("torch==2.5.1", "torchvision==0.20.1")
LEGACY_TORCH_INDEX = "https://download.pytorch.org/whl/cu121"

Installer = Callable[[Sequence[str]], Any]  # pip arguments -> anything; raises on failure


class RestartRequired(RuntimeError):
    """A different PyTorch was installed: the running kernel still has the old one imported."""


def on_kaggle() -> bool:
    """True inside a Kaggle notebook (interactive or a batch run)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or KAGGLE_WORKING.is_dir()


def workspace(cwd: str | Path | None = None) -> Path:
    """Where the notebooks keep data and runs: /kaggle/working on Kaggle, else the repository root when run
    from notebooks/ (so that notebooks and the command line share data/ and runs/), else the current folder."""
    if on_kaggle():
        return KAGGLE_WORKING
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if cwd.name == "notebooks" and (cwd.parent / "pyproject.toml").is_file():
        return cwd.parent
    return cwd


# ----------------------------------------------------------------------------- credentials and /kaggle/input

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


def input_folders(kaggle_input: str | Path = KAGGLE_INPUT, max_depth: int = 6,
                  skip: Sequence[str] = ()) -> Iterator[tuple[int, Path]]:
    """(depth, folder) for the folders under an attached-inputs root, breadth first, sorted, hidden ones left out.

    Bounded (max_depth levels) and never entering the folders named in `skip`, so that a large image dataset
    is never walked to the bottom.
    """
    level = [Path(kaggle_input)] if Path(kaggle_input).is_dir() else []
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
    install_legacy_torch=False: raise UnsupportedGPUError saying what to do (T4 accelerator, or this option);
    install_legacy_torch=True (needs internet): pip-install torch 2.5.1 + torchvision 0.20.1 (cu121, which
    still carry sm_60) with `installer` (default: pip in this interpreter) and raise RestartRequired, because
    the running kernel keeps the old torch until it is restarted.
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
        raise UnsupportedGPUError(f"{errors[0]} In the notebooks: set install_legacy_torch=True (internet on) "
                                  "to install that build, then restart the kernel.")
    (installer or pip_install)([*LEGACY_TORCH, "--index-url", LEGACY_TORCH_INDEX])
    raise RestartRequired(
        f"installed {' and '.join(LEGACY_TORCH)} (with sm_60 kernels) for {', '.join(names)}; the running kernel "
        "still has the old torch: restart it (Run > Restart & clear cell outputs) and run all cells again.")


# ----------------------------------------------------------------------------- runs from earlier sessions

def find_attached_run(name: str, kaggle_input: str | Path = KAGGLE_INPUT, max_depth: int = 6) -> Path | None:
    """A run directory called `name` (holding config.json and weights or a checkpoint) in an attached input,
    e.g. the output of an earlier 04_training version added with Add Input > Your Work; None if there is none."""
    for _, folder in input_folders(kaggle_input, max_depth, skip=("Images", "checkpoints", "tensorboard")):
        if folder.name == name and RunDir(folder).has_run():
            return folder
    return None


def restore_run(run_dir: str | Path, kaggle_input: str | Path = KAGGLE_INPUT) -> str:
    """Copy an attached earlier run into run_dir when run_dir has none yet (Kaggle inputs are read-only, and a
    resumed run must write); returns what happened, in one line."""
    run_dir = Path(run_dir)
    if RunDir(run_dir).has_weights():
        return f"{run_dir} already holds a run: using it"
    found = find_attached_run(run_dir.name, kaggle_input)
    if found is None:
        return f"no earlier run named {run_dir.name!r} attached: {run_dir} starts fresh"
    shutil.copytree(found, run_dir, dirs_exist_ok=True)
    return f"copied the attached run {found} to {run_dir}"


# ----------------------------------------------------------------------------- `vaehelpers kaggle push`

def kernel_folders(kaggle_dir: str | Path) -> list[Path]:
    """The kernel folders under kaggle/ (each holds a kernel-metadata.json), in notebook order."""
    return sorted(path.parent for path in Path(kaggle_dir).glob("*/kernel-metadata.json"))


def _fill_user(value: Any, user: str) -> Any:
    """The metadata with every KAGGLE_USERNAME placeholder replaced by `user`."""
    if isinstance(value, str):
        return value.replace(USER_PLACEHOLDER, user)
    if isinstance(value, list):
        return [_fill_user(item, user) for item in value]
    if isinstance(value, dict):
        return {key: _fill_user(item, user) for key, item in value.items()}
    return value


def build_wheel(root: str | Path, dest: str | Path) -> Path:
    """A wheel of the package at root, built offline (no isolation: setuptools is already installed)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(dest), str(root)], check=True)
    wheels = sorted(dest.glob("vaehelpers-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip wheel left no vaehelpers wheel in {dest}")
    return wheels[-1]


def stage(root: str | Path, user: str, dest: str | Path, *,
          wheel_builder: Callable[[Path, Path], Path] = build_wheel) -> tuple[Path, list[Path]]:
    """Fill build folders for upload: dest/vaehelpers-src (dataset metadata, the wheel, the installer) and one
    folder per kernel (its metadata with the user filled in, and the notebook). Returns (dataset, kernels)."""
    root, dest = Path(root), Path(dest)
    if not (root / "kaggle" / "dataset-metadata.json").is_file():
        raise FileNotFoundError(f"{root} holds no kaggle/dataset-metadata.json: push from a checkout of the "
                                "vaehelpers repository, or pass --root REPOSITORY")
    if dest.exists():
        shutil.rmtree(dest)
    dataset = dest / SOURCE_DATASET
    dataset.mkdir(parents=True)
    metadata = _fill_user(json.loads((root / "kaggle" / "dataset-metadata.json").read_text()), user)
    (dataset / "dataset-metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    shutil.copy(root / "kaggle" / "install.py", dataset / INSTALLER_NAME)
    wheel_builder(root, dataset)
    kernels = []
    for source in kernel_folders(root / "kaggle"):
        metadata = _fill_user(json.loads((source / "kernel-metadata.json").read_text()), user)
        folder = dest / source.name
        folder.mkdir()
        (folder / "kernel-metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        shutil.copy(root / "notebooks" / metadata["code_file"], folder / metadata["code_file"])
        kernels.append(folder)
    return dataset, kernels


def kaggle_client() -> Any:
    """The authenticated kaggle API object for `kaggle push`."""
    try:
        return api()
    except KaggleLoginError as error:  # say it is the push that failed
        raise RuntimeError(f"kaggle push: {error}") from None


def _check(response: Any, what: str) -> str:
    """The URL from a kaggle API response, or a RuntimeError with its error."""
    error = getattr(response, "error", None)
    if error:
        raise RuntimeError(f"{what}: {error}")
    return str(getattr(response, "url", "") or what)


def push(root: str | Path, user: str | None = None, *, client: Any = None, only: Sequence[str] = (),
         dataset: bool = True, dest: str | Path | None = None,
         wheel_builder: Callable[[Path, Path], Path] | None = None, say: Callable[[str], Any] = print) -> list[str]:
    """Upload the package dataset, then push each kernel (all, or those whose folder name starts with one of
    `only`, e.g. "04"); returns the URLs. client: the kaggle API object (default: the real, authenticated one);
    dest: the staging folder (default root/build/kaggle); wheel_builder: default build_wheel."""
    root = Path(root)
    client = kaggle_client() if client is None else client
    user = user or os.environ.get("KAGGLE_USERNAME") or client.get_config_value("username")
    if not user:
        raise RuntimeError("cannot tell your Kaggle user name: pass --user NAME")
    dataset_dir, kernels = stage(root, user, dest or root / STAGE_DIR, wheel_builder=wheel_builder or build_wheel)
    urls = []
    if dataset:
        ref = f"{user}/{SOURCE_DATASET}"
        try:
            client.dataset_status(ref)
            exists = True
        except Exception:  # kaggle raises an HTTP error for a dataset that does not exist yet
            exists = False
        if exists:
            response = client.dataset_create_version(str(dataset_dir), version_notes="vaehelpers kaggle push",
                                                     quiet=True, dir_mode="skip")
        else:
            response = client.dataset_create_new(str(dataset_dir), public=False, quiet=True, dir_mode="skip")
        urls.append(_check(response, f"uploading {ref}"))
        say(f"dataset {ref}: {urls[-1]}")
    for folder in kernels:
        if only and not any(folder.name.startswith(prefix) for prefix in only):
            continue
        urls.append(_check(client.kernels_push(str(folder)), f"pushing {folder.name}"))
        say(f"kernel {folder.name}: {urls[-1]}")
    return urls
