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
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from vaehelpers.rundir import RunDir
from vaehelpers.runtime import UnsupportedGPUError, check_cuda_arch

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
USER_PLACEHOLDER = "KAGGLE_USERNAME"  # in kaggle/*/kernel-metadata.json; `kaggle push` puts the user's name there
SOURCE_DATASET = "vaehelpers-src"  # the dataset that carries the package's wheel
INSTALLER_NAME = "vaehelpers_install.py"  # kaggle/install.py as it is uploaded (the notebooks glob for this name)
STAGE_DIR = Path("build") / "kaggle"  # where `kaggle push` assembles the uploads, under the repository

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


def input_folders(
    kaggle_input: str | Path = KAGGLE_INPUT, max_depth: int = 6, skip: Sequence[str] = ()
) -> Iterator[tuple[int, Path]]:
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
            f"{errors[0]} In the notebooks: set install_legacy_torch=True (internet on) "
            "to install that build, then restart the kernel."
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


def find_attached_run(name: str, kaggle_input: str | Path = KAGGLE_INPUT, max_depth: int = 6) -> Path | None:
    """A run directory called `name` (holding config.json and weights or a checkpoint) in an attached input,
    e.g. the output of an earlier 04_training version added with Add Input > Your Work; None if there is none."""
    for _, folder in input_folders(kaggle_input, max_depth, skip=("Images", "checkpoints", "tensorboard")):
        if folder.name == name and RunDir(folder).has_run():
            return folder
    return None


def restore_run(run_dir: str | Path, kaggle_input: str | Path = KAGGLE_INPUT) -> str:
    """Copy an attached earlier run into run_dir when run_dir has none yet (Kaggle inputs are read-only, and a
    resumed run must write); returns what happened, in one line (for 04: where none is found, how to attach one)."""
    run_dir = Path(run_dir)
    if RunDir(run_dir).has_weights():
        return f"{run_dir} already holds a run: using it"
    found = find_attached_run(run_dir.name, kaggle_input)
    if found is None:
        return f"no earlier run named {run_dir.name!r} attached: {run_dir} starts fresh. {attach_hint('continue it')}"
    shutil.copytree(found, run_dir, dirs_exist_ok=True)
    return f"copied the attached run {found} to {run_dir}"


def require_run(run_dir: str | Path, kaggle_input: str | Path = KAGGLE_INPUT) -> str:
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
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(dest),
            str(root),
        ],
        check=True,
    )
    wheels = sorted(dest.glob("vaehelpers-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip wheel left no vaehelpers wheel in {dest}")
    return wheels[-1]


def stage(
    root: str | Path, user: str, dest: str | Path, *, wheel_builder: Callable[[Path, Path], Path] = build_wheel
) -> tuple[Path, list[Path]]:
    """Fill build folders for upload: dest/vaehelpers-src (dataset metadata, the wheel, the installer) and one
    folder per kernel (its metadata with the user filled in, and the notebook). Returns (dataset, kernels)."""
    root, dest = Path(root), Path(dest)
    if not (root / "kaggle" / "dataset-metadata.json").is_file():
        raise FileNotFoundError(
            f"{root} holds no kaggle/dataset-metadata.json: push from a checkout of the "
            "vaehelpers repository, or pass --root REPOSITORY"
        )
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


# The sources a kernel push can drop: the kernel version is saved without them, and the client says so only in
# these fields of its response (ApiSaveKernelResponse; older clients spell them in camelCase).
DROPPABLE_SOURCES = {
    "dataset": "invalid_dataset_sources",
    "kernel": "invalid_kernel_sources",
    "competition": "invalid_competition_sources",
    "model": "invalid_model_sources",
}
TRAINING_KERNEL, EVALUATION_KERNEL = "04", "05"  # folder prefixes: 05 evaluates 04's output


def _field(response: Any, name: str) -> Any:
    """A response field by its snake_case name, or by the camelCase name older kaggle clients used."""
    camel = name.split("_")[0] + "".join(part.title() for part in name.split("_")[1:])
    value = getattr(response, name, None)
    return value if value not in (None, "", []) else getattr(response, camel, None)


def _check(response: Any, what: str) -> str:
    """The URL from a kaggle API response, or a RuntimeError with its error or the sources Kaggle dropped."""
    error = _field(response, "error")
    if error:
        raise RuntimeError(f"{what}: {error}")
    for kind, name in DROPPABLE_SOURCES.items():
        dropped = _field(response, name)
        if dropped:
            raise RuntimeError(
                f"{what}: Kaggle dropped the {kind} source(s) {', '.join(map(str, dropped))} ({name}), so the version "
                f"it saved runs without them. Check that each exists and that you can read it, then push again."
            )
    return str(_field(response, "url") or what)


def _status_name(status: Any) -> str:
    """'complete', 'running', 'ready', ...: a kaggle status enum (KernelWorkerStatus, DatabundleVersionStatus) or
    the string older clients return, lowercased."""
    return str(getattr(status, "name", status)).lower()


def _dataset_state(client: Any, ref: str) -> tuple[str, int | None]:
    """(status, current version number) of a dataset, e.g. ("ready", 3); the version is None where the kaggle
    client cannot report it (dataset_status without `format`, before kaggle 2.x)."""
    try:
        payload = json.loads(client.dataset_status(ref, format="json(status,current_version_number)"))
        return _status_name(payload["status"]), payload.get("current_version_number")
    except TypeError:
        return _status_name(client.dataset_status(ref)), None


def wait_for_dataset(
    client: Any,
    ref: str,
    *,
    newer_than: int | None = None,
    timeout_s: float = 600.0,
    poll_s: float = 10.0,
    sleep: Callable[[float], Any] = time.sleep,
    say: Callable[[str], Any] = print,
) -> int | None:
    """Wait until Kaggle has processed the dataset's new version (status "ready", version > newer_than); returns
    that version number (None if the client cannot tell). Raises RuntimeError if processing failed, TimeoutError
    after timeout_s: a kernel pushed before then would start without its files."""
    started = time.monotonic()
    while True:
        status, version = _dataset_state(client, ref)
        fresh = newer_than is None or version is None or version > newer_than
        if status == "ready" and fresh:
            return version
        if status in ("failed", "deleted") and fresh:
            raise RuntimeError(
                f"Kaggle could not process {ref} (status {status}): see https://www.kaggle.com/datasets/{ref}"
            )
        waited = time.monotonic() - started
        if waited >= timeout_s:
            raise TimeoutError(
                f"{ref} is still being processed by Kaggle after {waited:.0f} s (status {status}, version {version}); "
                f"no kernel was pushed, since it would start without the package. When "
                f"https://www.kaggle.com/datasets/{ref} shows the new version, run `vaehelpers kaggle push --no-dataset`."
            )
        say(f"waiting for Kaggle to process {ref} (status {status})")
        sleep(poll_s)


def kernel_status(client: Any, ref: str) -> tuple[str, str]:
    """(status, failure message) of a kernel's latest version: 'complete', 'running', 'queued', 'error', ... or
    'missing' when Kaggle has no such kernel (never pushed) or will not show it."""
    try:
        response = client.kernels_status(ref)
    except Exception as error:  # kaggle raises HTTPError (404) or ValueError (403) for a kernel it cannot find
        return "missing", str(error)
    return _status_name(_field(response, "status")), str(_field(response, "failure_message") or "")


def _kernel_ref(folder: Path) -> str:
    return json.loads((folder / "kernel-metadata.json").read_text())["id"]


def _edit_metadata(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "kernel-metadata.json"
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata, indent=2) + "\n")


def push(
    root: str | Path,
    user: str | None = None,
    *,
    client: Any = None,
    only: Sequence[str] = (),
    dataset: bool = True,
    pin: bool = True,
    wait_s: float = 600.0,
    poll_s: float = 10.0,
    sleep: Callable[[float], Any] = time.sleep,
    dest: str | Path | None = None,
    wheel_builder: Callable[[Path, Path], Path] | None = None,
    say: Callable[[str], Any] = print,
) -> list[str]:
    """Upload the package dataset, wait until Kaggle has processed it, then push the kernels (all, or those whose
    folder name starts with one of `only`, e.g. "04"); returns the URLs.

    Kernels attach the dataset version just made (pin: "<user>/vaehelpers-src/<version>"). 04 attaches its own
    output when its latest version finished, so the run resumes; it is not pushed while a version of it runs.
    05 is pushed only when 04's latest version finished (it evaluates 04's output); otherwise it is skipped,
    saying so. A push whose response names dropped sources raises, naming them.
    client: the kaggle API object (default: the real, authenticated one); dest: the staging folder (default
    root/build/kaggle); wheel_builder: default build_wheel; wait_s, poll_s, sleep: waiting for the dataset.
    """
    root = Path(root)
    client = kaggle_client() if client is None else client
    user = user or os.environ.get("KAGGLE_USERNAME") or client.get_config_value("username")
    if not user:
        raise RuntimeError("cannot tell your Kaggle user name: pass --user NAME")
    dataset_dir, kernels = stage(root, user, dest or root / STAGE_DIR, wheel_builder=wheel_builder or build_wheel)
    kernels = [folder for folder in kernels if not only or any(folder.name.startswith(prefix) for prefix in only)]
    urls, ref = [], f"{user}/{SOURCE_DATASET}"
    if dataset:
        try:
            _, before = _dataset_state(client, ref)
            exists = True
        except Exception:  # kaggle raises an HTTP error for a dataset that does not exist yet
            exists, before = False, None
        if exists:
            response = client.dataset_create_version(
                str(dataset_dir), version_notes="vaehelpers kaggle push", quiet=True, dir_mode="skip"
            )
        else:
            response = client.dataset_create_new(str(dataset_dir), public=False, quiet=True, dir_mode="skip")
        urls.append(_check(response, f"uploading {ref}"))
        say(f"dataset {ref}: {urls[-1]}")
        if kernels:
            version = wait_for_dataset(
                client,
                ref,
                newer_than=before if exists else None,
                timeout_s=wait_s,
                poll_s=poll_s,
                sleep=sleep,
                say=say,
            )
    elif kernels:
        version = wait_for_dataset(client, ref, timeout_s=wait_s, poll_s=poll_s, sleep=sleep, say=say)
    if kernels and pin and version is not None:
        say(f"kernels attach {ref} version {version}")
        for folder in kernels:
            _edit_metadata(
                folder,
                lambda meta: meta.update(
                    dataset_sources=[
                        f"{source}/{version}" if source == ref else source for source in meta["dataset_sources"]
                    ]
                ),
            )

    for folder in kernels:
        kernel = _kernel_ref(folder)
        if folder.name.startswith(TRAINING_KERNEL):
            status, _ = kernel_status(client, kernel)
            if status in ("queued", "running"):
                say(
                    f"kernel {folder.name} not pushed: its latest version is {status} on Kaggle (a new version would "
                    "start a second run beside it); push it again when it has ended"
                )
                continue
            if status == "complete":  # resume: this version reads the last one's run directory (restore_run)
                _edit_metadata(
                    folder, lambda meta, kernel=kernel: meta.update(kernel_sources=[*meta["kernel_sources"], kernel])
                )
                say(f"kernel {folder.name} attaches the output of its finished version, and resumes that run")
            else:
                say(f"kernel {folder.name} starts a new run (no finished version of it yet: {status})")
        if folder.name.startswith(EVALUATION_KERNEL):
            training = next(_kernel_ref(f) for f in kernel_folders(folder.parent) if f.name.startswith(TRAINING_KERNEL))
            status, failure = kernel_status(client, training)
            if status != "complete":
                say(
                    f"kernel {folder.name} not pushed: it evaluates the output of {training}, whose latest version is "
                    f"{status}{': ' + failure if failure else ''}; when it has finished, run "
                    f"`vaehelpers kaggle push --no-dataset --only {EVALUATION_KERNEL}`"
                )
                continue
        response = client.kernels_push(str(folder))
        urls.append(_check(response, f"pushing {folder.name}"))
        version_number = _field(response, "version_number")
        say(f"kernel {folder.name}{f' version {version_number}' if version_number else ''}: {urls[-1]}")
    return urls
