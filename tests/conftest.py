"""Shared test fixtures and helpers: the real photos in ../shared/datasets/bsds500 (skipped where absent), stand-in weights."""

import io
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vaehelpers.config import TrainConfig, build_config

ROOT = Path(__file__).resolve().parents[1]
DATASETS_ENV = "VAEHELPERS_DATASETS"  # a folder holding bsds500/, where no shared/datasets is beside the checkout


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def dataset_places() -> list[Path]:
    """Where the shared datasets folder is looked for, in order: $VAEHELPERS_DATASETS, then shared/datasets beside
    this checkout or any folder above it, beside the main checkout of a git worktree (git's common dir), and beside
    the checkout a local clone was made from (its origin)."""
    places = [Path(os.environ[DATASETS_ENV]).expanduser()] if os.environ.get(DATASETS_ENV) else []
    checkouts = [ROOT]
    if common := _git("rev-parse", "--path-format=absolute", "--git-common-dir"):
        checkouts.append(Path(common).parent)
    origin = _git("config", "--get", "remote.origin.url").removeprefix("file://")
    if origin and Path(origin).is_dir():  # a clone of a checkout on this machine
        checkouts.append(Path(origin).resolve())
    places += [folder / "shared" / "datasets" for checkout in checkouts for folder in checkout.parents]
    return list(dict.fromkeys(path.resolve() for path in places))


@pytest.fixture(scope="session")
def bsds500() -> Path:
    """The BSDS500 folder (train/ 200, val/ 100, test/ 200 JPEGs, 481x321 or 321x481), found from any clone by
    dataset_places(); where it is nowhere, the test skips with a warning naming every place looked and the fix."""
    for place in dataset_places():
        if (place / "bsds500").is_dir():
            return place / "bsds500"
    reason = (
        f"BSDS500 photos not found: looked for bsds500/ in {', '.join(map(str, dataset_places()))}. "
        f"Set {DATASETS_ENV}=DIR (the folder holding bsds500/) or put shared/datasets beside the checkout "
        "(see ../shared/README.md); the real-photo tests are skipped"
    )
    warnings.warn(reason, stacklevel=1)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def inception_dir(tmp_path_factory) -> Path:
    """A folder holding stand-in rFID weights: torch-fidelity's InceptionV3 with random weights, saved under the
    real file name (weights-inception-2015-12-05-6726825d.pth) with the real keys and shapes.

    He-normal convolutions: with PyTorch's default init the activations shrink about 3x per layer and the pool
    features of its 94 layers come out ~1e-8 and all alike, which would hide a plumbing fault.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from vaehelpers.fid import INCEPTION_WEIGHTS_NAME

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # its constructor loads weights; keep the random init instead
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    network = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.random.set_rng_state(generator_state)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(network.state_dict(), folder / INCEPTION_WEIGHTS_NAME)
    return folder


@pytest.fixture
def hub_snapshot(tmp_path, monkeypatch) -> SimpleNamespace:
    """The Hugging Face Hub faked at its network boundary, huggingface_hub.snapshot_download, serving local folders.

    Register a repo with `hub_snapshot.repos["owner/name"] = folder`. Like the real one, a call fetches only the
    files its allow_patterns / ignore_patterns select (huggingface_hub's own filter_repo_objects), into a fresh
    snapshot folder whose path it returns, so a pattern that misses a file misses it here too; an unregistered repo
    fails as offline. hub_snapshot.calls records (repo_id, allow_patterns).
    """
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.utils import filter_repo_objects

    fake = SimpleNamespace(repos={}, calls=[])

    def snapshot_download(repo_id, *, allow_patterns=None, ignore_patterns=None, **kwargs):
        fake.calls.append((repo_id, allow_patterns))
        if repo_id not in fake.repos:
            raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {repo_id}")
        root = Path(fake.repos[repo_id])
        files = sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
        snapshot = tmp_path / "hub-snapshots" / f"{repo_id.replace('/', '--')}-{len(fake.calls)}"
        snapshot.mkdir(parents=True)
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    return fake


def fp16_config(images: Path, run: Path, **overrides: Any) -> TrainConfig:
    """A tiny pixel-recipe run in fp16 on the CPU (16 px, batch 4, no cache): test_fp16 and test_headroom use it."""
    settings = {
        "device": "cpu",
        "precision": "fp16",
        "batch_size": 4,
        "lr": 1e-3,
        "data.data_dir": str(images),
        "data.image_size": 16,
        "data.cache": False,
        "run_dir": str(run),
        "checkpoint_every": 1000,
    }
    settings.update(overrides)
    return build_config("tiny", "pixel", **settings)
