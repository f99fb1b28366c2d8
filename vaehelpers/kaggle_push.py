"""`vaehelpers kaggle push`: the package as the dataset <user>/vaehelpers-src, then the notebooks as kernels: a
chain of 04_training sessions that never starts over while an earlier version holds a checkpoint.

Order of one push: build the wheel (in a fresh folder), upload it and wait until Kaggle has processed it; decide
for each kernel what it attaches (04: the newest version of itself whose output holds a checkpoint; 05: the same
version, evaluated before 04's next session starts); save every kernel without running it ("Quick Save"), so a
source Kaggle drops (the pinned package version, flickr8k, an earlier output) stops the push before any GPU time
is spent; then run them: 01, 02, 03, 05, 04.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vaehelpers.kaggle import INSTALLER_NAME, SOURCE_DATASET, USER_PLACEHOLDER, KaggleLoginError, api
from vaehelpers.rundir import RunDir

STAGE_DIR = Path("build") / "kaggle"  # where `kaggle push` assembles the uploads, under the repository
WHEEL_SOURCES = ("pyproject.toml", "README.md", "vaehelpers")  # all a wheel of the package is built from
CHECKPOINT_FILE = RunDir("").checkpoint.as_posix()  # "checkpoints/last.pt", as it appears in an output listing
LOOKBACK_VERSIONS = 10  # how many of 04's latest versions are searched for a checkpoint


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
    """A wheel of the package at root, built offline (no isolation: setuptools is already installed) from a fresh
    copy of its sources in a temporary folder: setuptools builds through build/lib, where a module deleted since an
    earlier build would still lie and be shipped."""
    root, dest = Path(root), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vaehelpers-wheel-") as folder:
        source = Path(folder) / "source"
        source.mkdir()
        for name in WHEEL_SOURCES:
            if (root / name).is_dir():
                shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(root / name, source / name)
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
                str(source),
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


KAGGLE_FLOOR = (2, 2, 5)  # kernels_list_files of a numbered version and kernels_push(no_run=True) are new in 2.2.5


def kaggle_client() -> Any:
    """The authenticated kaggle API object for `kaggle push`; an older kaggle package is refused, naming the fix
    (before 2.2.5 kernels_list_files ignores the version asked for, and the push would misjudge 04's outputs)."""
    import importlib.metadata

    found = importlib.metadata.version("kaggle")
    if tuple(int(part) for part in found.split(".")[:3] if part.isdigit()) < KAGGLE_FLOOR:
        raise RuntimeError(f"kaggle push needs kaggle >= 2.2.5, found {found}: pip install -U kaggle")
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
            pinned = [source for source in map(str, dropped) if source.count("/") == 2]
            fix = " Check that each exists and that you can read it, then push again."
            if pinned and kind == "dataset":
                fix = f" Kaggle did not take the pinned version(s) {', '.join(pinned)}: push with --no-pin to attach the latest."
            elif pinned and kind == "kernel":
                fix = (
                    f" Kaggle did not take the version(s) {', '.join(pinned)}: attach it in the editor instead (Input: "
                    "'+ Add Input' > 'Your Work' > 'Notebooks' > the notebook, that version), then Save Version > "
                    "Save & Run All."
                )
            raise RuntimeError(
                f"{what}: Kaggle dropped the {kind} source(s) {', '.join(map(str, dropped))} ({name}), so the version "
                f"it saved would run without them; no kernel was run.{fix}"
            )
    return str(_field(response, "url") or what)


def _status_name(status: Any) -> str:
    """'complete', 'running', 'ready', ...: a kaggle status enum (KernelWorkerStatus, DatabundleVersionStatus) or
    the string older clients return, lowercased."""
    return str(getattr(status, "name", status)).lower()


def _dataset_state(client: Any, ref: str) -> tuple[str, int]:
    """(status, current version number) of a dataset, e.g. ("ready", 3). Needs kaggle >= 2.1.1, whose dataset_status
    takes `format` (kaggle-api commit a8e3758); pyproject.toml's floor."""
    payload = json.loads(client.dataset_status(ref, format="json(status,current_version_number)"))
    return _status_name(payload["status"]), int(payload["current_version_number"])


def wait_for_dataset(
    client: Any,
    ref: str,
    *,
    newer_than: int | None = None,
    timeout_s: float = 600.0,
    poll_s: float = 10.0,
    sleep: Callable[[float], Any] = time.sleep,
    say: Callable[[str], Any] = print,
) -> int:
    """Wait until Kaggle has processed the dataset's new version (status "ready", version > newer_than); returns
    that version number. Raises RuntimeError if processing failed, TimeoutError
    after timeout_s: a kernel pushed before then would start without its files."""
    started = time.monotonic()
    while True:
        status, version = _dataset_state(client, ref)
        fresh = newer_than is None or version > newer_than
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
    from requests import HTTPError

    try:
        response = client.kernels_status(ref)
    except (HTTPError, ValueError) as error:  # kaggle raises HTTPError (404) or ValueError (403) for one it cannot find
        if isinstance(error, HTTPError) and getattr(error.response, "status_code", None) != 404:
            raise  # a server or network failure is not "never pushed": that would start the run over
        return "missing", str(error)
    return _status_name(_field(response, "status")), str(_field(response, "failure_message") or "")


def _kernel_ref(folder: Path) -> str:
    return json.loads((folder / "kernel-metadata.json").read_text())["id"]


def _edit_metadata(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "kernel-metadata.json"
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata, indent=2) + "\n")


def latest_version(client: Any, ref: str) -> int | None:
    """The number of a kernel's latest version (its metadata's current_version_number), None for no such kernel."""
    from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelRequest
    from requests import HTTPError

    request = ApiGetKernelRequest()
    request.user_name, request.kernel_slug = ref.split("/")[:2]
    try:
        with client.build_kaggle_client() as kaggle:
            return kaggle.kernels.kernels_api_client.get_kernel(request).metadata.current_version_number or None
    except HTTPError as error:
        if error.response is not None and error.response.status_code == 404:
            return None
        raise


def output_files(client: Any, ref: str) -> list[str]:
    """The names of the files in a kernel version's output (ref: owner/slug/version), every page of them."""
    names, token = [], None
    while True:
        page = client.kernels_list_files(ref, page_token=token, page_size=100)
        names += [item.name for item in page.files or []]
        token = page.next_page_token
        if not token:
            return names


def newest_checkpoint_version(client: Any, ref: str, latest: int) -> int | None:
    """The newest of the kernel's last LOOKBACK_VERSIONS versions whose output holds a run's checkpoint, or None."""
    for version in range(latest, max(0, latest - LOOKBACK_VERSIONS), -1):
        if any(name.endswith(CHECKPOINT_FILE) for name in output_files(client, f"{ref}/{version}")):
            return version
    return None


def plan_training(client: Any, ref: str) -> tuple[str, int | None]:
    """What 04's next session does: ("busy", None) while a version is queued or running (a new one would train
    beside it); ("fresh", None) when no version of it holds a checkpoint (first push, or nothing kept yet);
    ("resume", N) where version N is the newest whose output holds one. Raises RuntimeError, saying which version
    to attach and how, where older versions than the ones searched might hold one."""
    status, _ = kernel_status(client, ref)
    if status in ("queued", "running", "cancel_requested"):
        return "busy", None
    latest = latest_version(client, ref) if status != "missing" else None
    if latest is None:
        return "fresh", None
    version = newest_checkpoint_version(client, ref, latest)
    if version is not None:
        return "resume", version
    if latest > LOOKBACK_VERSIONS:
        raise RuntimeError(
            f"none of the last {LOOKBACK_VERSIONS} versions of {ref} (up to version {latest}) holds a checkpoint in "
            "its output, and starting over would discard the run: open the notebook on Kaggle, attach the version "
            "that holds one (Input: '+ Add Input' > 'Your Work' > 'Notebooks' > vaehelpers 04 training, then that "
            "version) and Save Version > Save & Run All; or set start_fresh=True there to start over"
        )
    return "fresh", None


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

    Kernels attach the dataset version just made (pin: "<user>/vaehelpers-src/<version>"). 04 attaches the newest
    version of itself whose output holds a checkpoint (plan_training), pinned by number, so an errored or
    cancelled last session never restarts the run; it is not pushed while a version of it runs. 05 is pushed on
    that same version, before 04's next session; without one it is skipped, saying so. Every kernel is first saved
    without running, and a response naming dropped sources raises, naming them, before any kernel runs.
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
    version = None
    if dataset:
        try:
            _, before = _dataset_state(client, ref)
        except Exception:  # kaggle raises an HTTP error for a dataset that does not exist yet
            before = None
        if before is not None:
            response = client.dataset_create_version(
                str(dataset_dir), version_notes="vaehelpers kaggle push", quiet=True, dir_mode="skip"
            )
        else:
            response = client.dataset_create_new(str(dataset_dir), public=False, quiet=True, dir_mode="skip")
        urls.append(_check(response, f"uploading {ref}"))
        say(f"dataset {ref}: {urls[-1]}")
        if kernels:
            version = wait_for_dataset(
                client, ref, newer_than=before, timeout_s=wait_s, poll_s=poll_s, sleep=sleep, say=say
            )
    elif kernels:
        version = wait_for_dataset(client, ref, timeout_s=wait_s, poll_s=poll_s, sleep=sleep, say=say)
    if kernels and pin:
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

    # what 04 and 05 attach: the newest version of 04 whose output holds a checkpoint, pinned by its number
    training = next(_kernel_ref(f) for f in kernel_folders(dataset_dir.parent) if f.name.startswith(TRAINING_KERNEL))
    plan: tuple[str, int | None] = ("fresh", None)
    if any(f.name.startswith((TRAINING_KERNEL, EVALUATION_KERNEL)) for f in kernels):
        plan = plan_training(client, training)
    runs = []
    for folder in kernels:
        if folder.name.startswith(TRAINING_KERNEL):
            if plan[0] == "busy":
                say(
                    f"kernel {folder.name} not pushed: its latest version is running or queued on Kaggle (a new "
                    "version would start a second run beside it); push it again when it has ended"
                )
                continue
            if plan[0] == "resume":
                _attach(folder, f"{training}/{plan[1]}")
                say(f"kernel {folder.name} attaches the output of its version {plan[1]} and resumes that run")
            else:
                say(f"kernel {folder.name} starts a new run (no version of it holds a checkpoint yet)")
        if folder.name.startswith(EVALUATION_KERNEL):
            if plan[0] != "resume":
                state = "runs or is queued" if plan[0] == "busy" else "has no output with a checkpoint yet"
                say(
                    f"kernel {folder.name} not pushed: it evaluates the output of {training}, which {state}; when a "
                    f"version of it has ended, run `vaehelpers kaggle push --no-dataset --only {EVALUATION_KERNEL}`"
                )
                continue
            _edit_metadata(folder, lambda meta: meta.update(kernel_sources=[f"{training}/{plan[1]}"]))
            say(f"kernel {folder.name} evaluates version {plan[1]} of {training}")
        runs.append(folder)
    # 05 on the finished output first, then 04's next session (which would otherwise keep 05 waiting a session)
    runs.sort(key=lambda folder: folder.name.startswith(TRAINING_KERNEL))

    for folder in runs:  # saved without running first: Kaggle checks every source before any GPU time is spent
        _check(client.kernels_push(str(folder), no_run=True), f"saving {folder.name} without running it")
    if runs:
        say(f"Kaggle accepted every source of {', '.join(folder.name for folder in runs)}")
    for folder in runs:
        response = client.kernels_push(str(folder))
        urls.append(_check(response, f"pushing {folder.name}"))
        version_number = _field(response, "version_number")
        say(f"kernel {folder.name}{f' version {version_number}' if version_number else ''}: {urls[-1]}")
    return urls


def _attach(folder: Path, source: str) -> None:
    """Add a kernel source (owner/slug/version) to a staged kernel's metadata."""
    _edit_metadata(folder, lambda meta: meta.update(kernel_sources=[*meta["kernel_sources"], source]))
