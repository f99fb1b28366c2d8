"""Pretrained files the project can use (VGG16, the LPIPS linear layers, InceptionV3): where, whether they load, download.

Every file is looked for, in this order, in
1. the folder given by `--weights-dir` (a `weights_dir` argument), else $VAEHELPERS_WEIGHTS (e.g. a Kaggle
   dataset attached to an internet-off kernel; searched with its subfolders);
2. the torch hub cache, torch.hub.get_dir()/checkpoints ($TORCH_HOME/hub/checkpoints; ~/.cache/torch/hub/checkpoints
   by default), where torchvision and torch-fidelity keep their downloads;
3. copies shipped inside installed packages (the LPIPS linear layers: torchmetrics and lpips wheels).
Nothing is downloaded behind the user's back: `download()` (`vaehelpers weights download`) fetches the files with
torch's own downloader and checks their SHA-256 prefix; `require()` raises MissingWeightsError with one line naming
the file, the folders searched and the three ways out.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import socket
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaehelpers.config import NETWORK_TIMEOUT_S

WEIGHTS_ENV = "VAEHELPERS_WEIGHTS"  # a folder of pretrained files, when --weights-dir is not given


class MissingWeightsError(RuntimeError):
    """A pretrained file is in none of the places searched (message: one line, with the ways out)."""


class BadWeightsError(RuntimeError):
    """A pretrained file was found but does not load as what it should be (message: one line)."""


@dataclass(frozen=True)
class Pretrained:
    """One pretrained file: what it is, where it comes from, and what its state dict must hold."""

    name: str  # registry key: vgg16 | lpips | inception
    file: str  # the file name looked for (torch hub style: <name>-<first 8 hex digits of its SHA-256>.pth)
    url: str
    sha256_prefix: str  # torch.hub.download_url_to_file refuses a download whose SHA-256 does not start so
    purpose: str
    source: str  # where the file (and its hash) comes from
    instead: str  # the way out that needs no file, for the error message
    expected: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (key, shape) pairs its state dict must hold
    packaged: tuple[tuple[str, str], ...] = ()  # (package, path inside it) of copies shipped in wheels


def _vgg16_expected() -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Every key and shape of torchvision's vgg16() state dict (built on the meta device: no memory, no init)."""
    from torchvision.models import vgg16

    with torch.device("meta"):
        model = vgg16()
    return tuple((key, tuple(value.shape)) for key, value in model.state_dict().items())


REGISTRY: dict[str, Pretrained] = {
    "vgg16": Pretrained(
        name="vgg16",
        file="vgg16-397923af.pth",
        # torchvision.models.VGG16_Weights.IMAGENET1K_V1.url; torchvision loads it with check_hash=True
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        sha256_prefix="397923af",
        purpose="VGG16 ImageNet: LPIPS and VGG perceptual losses (ldm, seed), the LPIPS metric (evaluate)",
        source="torchvision VGG16_Weights.IMAGENET1K_V1 (Simonyan & Zisserman 2014)",
        instead="train with --recipe pixel (no perceptual term; evaluate: --no-lpips)",
        expected=(),  # every key of torchvision's vgg16() (32 tensors): see _expected
    ),
    "lpips": Pretrained(
        name="lpips",
        file="lpips-vgg-a78928a0.pth",
        # the v0.1 VGG linear layers of richzhang/PerceptualSimilarity (lpips/weights/v0.1/vgg.pth). The copies in
        # the torchmetrics 1.9.0 and lpips 0.1.4 wheels are byte-identical (SHA-256 a78928a0...) and their MD5
        # d507d7349b931f0638a25a48a722f98a is the one taming-transformers' util.py checks for the LPIPS that
        # latent-diffusion trains with: the same layers everywhere
        url="https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
        sha256_prefix="a78928a0",
        purpose="LPIPS v0.1 linear layers on the VGG16 taps (LPIPS loss and metric)",
        source="PerceptualSimilarity v0.1 vgg.pth (Zhang et al. 2018), shipped in the torchmetrics and lpips wheels",
        instead="train with --recipe pixel (no perceptual term; evaluate: --no-lpips)",
        expected=tuple((f"lin{i}.model.1.weight", (1, c, 1, 1)) for i, c in enumerate((64, 128, 256, 512, 512))),
        packaged=(("torchmetrics", "functional/image/lpips_models/vgg.pth"), ("lpips", "weights/v0.1/vgg.pth")),
    ),
    "inception": Pretrained(
        name="inception",
        file="weights-inception-2015-12-05-6726825d.pth",
        # torch_fidelity/feature_extractor_inceptionv3.py URL_INCEPTION_V3 (torch-fidelity 0.4.0): TensorFlow's
        # 2015-12-05 InceptionV3 graph converted to PyTorch, the network FID is defined with (1008 classes)
        url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        sha256_prefix="6726825d",
        purpose="InceptionV3 (FID features), as torch-fidelity and torchmetrics' FID use it",
        source="torch-fidelity v0.2.0 release (Heusel et al. 2017's TF graph, converted)",
        instead="leave FID off",
        expected=(("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)), ("fc.weight", (1008, 2048))),
    ),
}


def entry(name: str) -> Pretrained:
    """The registry entry of `name` (vgg16, lpips, inception); unknown names raise ValueError."""
    if name not in REGISTRY:
        raise ValueError(f"unknown pretrained file {name!r}: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


# ----------------------------------------------------------------------------- where


def hub_checkpoints() -> Path:
    """torch.hub.get_dir()/checkpoints: torch's download cache ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_folder(weights_dir: str | Path | None = None) -> Path | None:
    """The user's folder of pretrained files: weights_dir, else $VAEHELPERS_WEIGHTS, else None."""
    folder = weights_dir or os.environ.get(WEIGHTS_ENV, "")
    return Path(folder).expanduser() if folder else None


def _packaged_copies(item: Pretrained) -> list[Path]:
    """Where the installed packages keep their copies (found without importing them)."""
    import importlib.util

    paths = []
    for package, inner in item.packaged:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            paths.append(Path(spec.submodule_search_locations[0]) / inner)
    return paths


def looked_in(name: str, weights_dir: str | Path | None = None) -> list[str]:
    """The places searched for `name`, in order, as shown to the user."""
    item, places = entry(name), []
    folder = weights_folder(weights_dir)
    if folder is not None:
        places.append(f"{folder}{'' if folder.is_dir() else ' (no such folder)'}")
    places.append(str(hub_checkpoints()))
    places += [str(path) for path in _packaged_copies(item)]
    return places


def find(name: str, weights_dir: str | Path | None = None) -> Path | None:
    """The first copy of `name`'s file in the places searched (see the module docstring), or None."""
    item = entry(name)
    folder = weights_folder(weights_dir)
    if folder is not None and folder.is_dir():
        if (folder / item.file).is_file():
            return folder / item.file
        nested = sorted(path for path in folder.rglob(item.file) if path.is_file())  # Kaggle datasets nest folders
        if nested:
            return nested[0]
    if (hub_checkpoints() / item.file).is_file():
        return hub_checkpoints() / item.file
    return next((path for path in _packaged_copies(item) if path.is_file()), None)


def require(name: str, weights_dir: str | Path | None = None, *, instead: str | None = None) -> Path:
    """The path of `name`'s file; MissingWeightsError (one line: file, folders searched, ways out) when absent.

    instead: the way out that needs no file, when the caller knows a better one than the registry's.
    """
    path = find(name, weights_dir)
    if path is not None:
        return path
    item = entry(name)
    raise MissingWeightsError(
        f"missing pretrained file {item.file} ({item.purpose}); looked in {', '.join(looked_in(name, weights_dir))}. "
        f"Either run `vaehelpers weights download` (needs internet), or pass --weights-dir DIR (or set "
        f"{WEIGHTS_ENV}=DIR) for a folder holding it, e.g. an attached Kaggle dataset, or {instead or item.instead}"
    )


# ----------------------------------------------------------------------------- load


def _expected(item: Pretrained) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return _vgg16_expected() if item.name == "vgg16" else item.expected


def load_state_dict(name: str, weights_dir: str | Path | None = None, *, instead: str | None = None) -> dict[str, Any]:
    """`name`'s state dict, read with torch.load(weights_only=True) on the CPU and checked against its keys and shapes.

    Raises MissingWeightsError when the file is nowhere, BadWeightsError (one line) when it does not load.
    """
    path = require(name, weights_dir, instead=instead)
    return _load(entry(name), path)


def check(name: str, weights_dir: str | Path | None = None) -> Path:
    """The path of `name`'s file once it is found and loads (memory-mapped: seconds, even for VGG16's 528 MB).

    Raises MissingWeightsError or BadWeightsError (one line naming the file and the fix): what train checks
    before the run directory is created.
    """
    path = require(name, weights_dir)
    _load(entry(name), path, mmap=True)
    return path


def sha256_matches(item: Pretrained, path: Path) -> bool:
    """Whether the file's SHA-256 starts with the registered prefix (the check torch applies when downloading)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(item.sha256_prefix)


def _load(item: Pretrained, path: Path, *, mmap: bool = False) -> dict[str, Any]:
    advice = "delete it and run `vaehelpers weights download`, or put a good copy in --weights-dir"
    try:
        # mmap reads only what is touched; torch offers it for its zip format only (not the LPIPS layers' legacy file)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:  # truncated, not a checkpoint, or a pickle that would run code: all unusable
        # torch's own message for these advises weights_only=False: wrong for a file that is corrupt or not ours
        reason = (
            "not a checkpoint of tensors: corrupt, truncated, or a pickle that would run code"
            if isinstance(error, pickle.UnpicklingError)
            else f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        )
        raise BadWeightsError(f"{path} does not load ({reason}): {advice}") from error
    if not isinstance(state, dict):
        raise BadWeightsError(f"{path} holds a {type(state).__name__}, not a state dict: {advice}")
    expected = _expected(item)
    missing = [key for key, _ in expected if key not in state]
    wrong = [
        f"{key} {tuple(state[key].shape)} (expected {shape})"
        for key, shape in expected
        if key in state and (not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != shape)
    ]
    if missing or wrong:
        detail = f"missing {len(missing)} key(s) such as {missing[0]}" if missing else f"wrong shape: {wrong[0]}"
        raise BadWeightsError(f"{path} is not {item.file} ({item.purpose}): {detail}: {advice}")
    return state


# ----------------------------------------------------------------------------- status and download


def status(weights_dir: str | Path | None = None, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per pretrained file: name, purpose, file, looked_in [places], path (or None), found, loads, problem.

    loads is True when the file reads with torch.load(weights_only=True) and has the expected keys and shapes,
    False (with `problem`) when it does not, None when it was not found. A file in the torch hub cache (where
    `download` puts them) is also checked against its registered SHA-256 prefix: one that differs (truncated,
    corrupt) is a problem that `vaehelpers weights download` fixes by replacing it.
    """
    rows = []
    for name in names or REGISTRY:
        item, path = entry(name), find(name, weights_dir)
        loads, problem = None, ""
        if path is not None:
            try:
                _load(item, path, mmap=True)
                loads = True
            except BadWeightsError as error:
                loads, problem = False, str(error)
            if path.parent == hub_checkpoints() and not sha256_matches(item, path):  # the more precise problem
                problem = (
                    f"{path} does not match its SHA-256 (expected {item.sha256_prefix}...): a corrupt or partial "
                    "copy; `vaehelpers weights download` replaces it"
                )
        rows.append(
            {
                "name": name,
                "purpose": item.purpose,
                "file": item.file,
                "looked_in": looked_in(name, weights_dir),
                "path": str(path) if path else None,
                "found": path is not None,
                "loads": loads,
                "problem": problem,
            }
        )
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """The status rows as a text table, then the places searched and any problem, one line each."""
    header = ("name", "file", "found", "loads", "where / purpose")
    table = [header] + [
        (
            row["name"],
            row["file"],
            "yes" if row["found"] else "MISSING",
            {True: "yes", False: "NO", None: "-"}[row["loads"]],
            row["path"] or row["purpose"],
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1] for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * 15)
    places = list(dict.fromkeys(place for row in rows for place in row["looked_in"]))
    lines.append("looked in: " + ", ".join(places))
    lines += [f"problem: {row['problem']}" for row in rows if row["problem"]]
    if any(not row["found"] for row in rows):
        lines.append(
            f"fetch missing files with `vaehelpers weights download [--dest DIR]`, or point --weights-dir "
            f"(or {WEIGHTS_ENV}) at a folder holding them"
        )
    return "\n".join(lines)


def download(
    dest: str | Path | None = None,
    names: Iterable[str] | None = None,
    *,
    progress: bool = True,
    say: Any = print,
    timeout_s: float | None = None,
) -> list[Path]:
    """Fetch pretrained files with torch.hub.download_url_to_file, checking each one's SHA-256 prefix.

    dest: the folder to fill (default: the torch hub cache, where the files are looked for). A good file already
    there (or, with no dest, found anywhere) is kept; one in dest whose SHA-256 differs (corrupt, truncated) is
    downloaded again and replaced. A download whose hash does not match is refused and leaves no file (torch
    writes to a .partial file and moves it only when the hash matches); the .partial files of downloads that
    were killed are removed. timeout_s (default NETWORK_TIMEOUT_S): the most seconds to wait for the connection
    and for each read. Returns the paths. Raises RuntimeError (one line, naming the URL) on the first failure.
    """
    timeout_s = timeout_s or NETWORK_TIMEOUT_S
    target = Path(dest).expanduser() if dest else hub_checkpoints()
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or REGISTRY:
        item = entry(name)
        _remove_stale_partials(target, item, timeout_s)
        path = target / item.file
        present = path if path.is_file() else (None if dest else find(name))
        if present == path and not sha256_matches(item, path):
            say(f"{name}: {path} does not match its SHA-256 (corrupt or partial): downloading it again")
            present = None
        if present is not None:
            say(f"{name}: already there: {present}")
            paths.append(present)
            continue
        say(f"{name}: downloading {item.url} -> {path}")
        try:
            with _socket_timeout(timeout_s):
                torch.hub.download_url_to_file(item.url, str(path), hash_prefix=item.sha256_prefix, progress=progress)
        except Exception as error:  # URLError offline, HTTPError, a timeout, the hash check's RuntimeError
            if isinstance(error, (TimeoutError, socket.timeout)) or "timed out" in str(error):
                error = TimeoutError(f"no answer within {timeout_s:g} s")
            kept = "the previous file is kept" if path.is_file() else f"nothing was written to {target}"
            raise RuntimeError(
                f"could not download {item.file} from {item.url} ({type(error).__name__}: {error}); {kept}"
            ) from error
        paths.append(path)
    return paths


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give the sockets opened meanwhile a connect and read timeout: torch.hub's downloader sets none of its own."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _remove_stale_partials(folder: Path, item: Pretrained, timeout_s: float) -> None:
    """Delete torch's <file>.<uuid>.partial files of killed downloads of `item` in folder. A live download writes
    at least once per timeout_s (else it times out), so one untouched for twice that long is dead."""
    for partial in folder.glob(f"{item.file}.*.partial"):
        with contextlib.suppress(OSError):
            if time.time() - partial.stat().st_mtime > 2 * timeout_s:
                partial.unlink()
