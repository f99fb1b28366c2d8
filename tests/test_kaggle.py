"""Kaggle: the GPU check with faked capabilities, staging and pushing with a fake client, the installer, runs
attached from earlier sessions. Nothing here touches the network or runs pip."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vaehelpers import cli, kaggle
from vaehelpers.runtime import UnsupportedGPUError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_data", "02_architecture", "03_loss", "04_training", "05_evaluation"]


# ----------------------------------------------------------------------------- the GPU check

def fake_gpus(monkeypatch, capability, count=1, name="Tesla P100-PCIE-16GB", archs=("sm_75", "sm_80", "sm_90")):
    """Pretend torch sees `count` GPUs of this compute capability, with a build carrying `archs`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)


def test_no_gpu_is_fine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in kaggle.ensure_gpu_supported()


def test_supported_gpus_pass_without_installing(monkeypatch):
    fake_gpus(monkeypatch, (7, 5), count=2, name="Tesla T4")
    calls = []
    status = kaggle.ensure_gpu_supported(True, installer=calls.append)
    assert "2 GPU(s)" in status and "Tesla T4 (sm_75)" in status
    assert calls == []


def test_p100_stops_with_a_clear_message(monkeypatch):
    fake_gpus(monkeypatch, (6, 0))
    calls = []
    with pytest.raises(UnsupportedGPUError) as raised:
        kaggle.ensure_gpu_supported(False, installer=calls.append)
    message = str(raised.value)
    assert "P100" in message and "sm_60" in message and "install_legacy_torch=True" in message and "T4" in message
    assert calls == []  # nothing installed unless asked


def test_p100_installs_legacy_torch_then_asks_for_a_restart(monkeypatch):
    fake_gpus(monkeypatch, (6, 0))
    calls = []
    with pytest.raises(kaggle.RestartRequired, match="restart"):
        kaggle.ensure_gpu_supported(True, installer=calls.append)
    assert calls == [["torch==2.5.1", "torchvision==0.20.1", "--index-url", "https://download.pytorch.org/whl/cu121"]]


# ----------------------------------------------------------------------------- metadata and staging

def fake_wheel(root: Path, dest: Path) -> Path:
    path = dest / "vaehelpers-0.1.0-py3-none-any.whl"
    path.write_bytes(b"PK fake wheel")
    return path


def slugify(title: str) -> str:  # kaggle's rule: the kernel slug is the title lowercased with dashes
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def test_committed_kernel_metadata():
    folders = kaggle.kernel_folders(ROOT / "kaggle")
    assert [folder.name for folder in folders] == NOTEBOOKS
    for folder in folders:
        meta = json.loads((folder / "kernel-metadata.json").read_text())
        assert (ROOT / "notebooks" / meta["code_file"]).is_file()
        assert meta["id"].split("/")[1] == slugify(meta["title"])
        assert meta["language"] == "python" and meta["kernel_type"] == "notebook"
        assert meta["enable_gpu"] is True and meta["enable_internet"] is True and meta["enable_tpu"] is False
        assert meta["machine_shape"] == "NvidiaTeslaT4"  # Kaggle's "GPU T4 x2"; enable_gpu alone gives a P100
        assert "adityajn105/flickr8k" in meta["dataset_sources"]
        assert f"{kaggle.USER_PLACEHOLDER}/{kaggle.SOURCE_DATASET}" in meta["dataset_sources"]
    evaluation = json.loads((ROOT / "kaggle" / "05_evaluation" / "kernel-metadata.json").read_text())
    assert evaluation["kernel_sources"] == [f"{kaggle.USER_PLACEHOLDER}/vaehelpers-04-training"]


def test_stage_fills_in_the_user_and_copies_everything(tmp_path):
    dataset, kernels = kaggle.stage(ROOT, "alice", tmp_path / "stage", wheel_builder=fake_wheel)
    assert sorted(path.name for path in dataset.iterdir()) == [
        "dataset-metadata.json", "vaehelpers-0.1.0-py3-none-any.whl", kaggle.INSTALLER_NAME]
    assert json.loads((dataset / "dataset-metadata.json").read_text())["id"] == "alice/vaehelpers-src"
    assert [folder.name for folder in kernels] == NOTEBOOKS
    for folder in kernels:
        text = (folder / "kernel-metadata.json").read_text()
        meta = json.loads(text)
        assert kaggle.USER_PLACEHOLDER not in text and meta["id"].startswith("alice/")
        assert "alice/vaehelpers-src" in meta["dataset_sources"]
        assert (folder / meta["code_file"]).read_bytes() == (ROOT / "notebooks" / meta["code_file"]).read_bytes()


class FakeClient:
    """Records the kaggle API calls that push makes; `existing` datasets answer dataset_status."""

    def __init__(self, existing=(), error=None):
        self.existing, self.error, self.calls = set(existing), error, []

    def get_config_value(self, name):
        return "from-config" if name == "username" else None

    def dataset_status(self, ref):
        self.calls.append(("dataset_status", ref))
        if ref not in self.existing:
            raise RuntimeError("404 Not Found")
        return "ready"

    def dataset_create_new(self, folder, public=False, quiet=False, dir_mode="skip"):
        self.calls.append(("dataset_create_new", Path(folder).name, public))
        return SimpleNamespace(error=None, url="https://kaggle.test/new")

    def dataset_create_version(self, folder, version_notes, quiet=False, dir_mode="skip"):
        self.calls.append(("dataset_create_version", Path(folder).name))
        return SimpleNamespace(error=None, url="https://kaggle.test/version")

    def kernels_push(self, folder):
        meta = json.loads((Path(folder) / "kernel-metadata.json").read_text())
        assert (Path(folder) / meta["code_file"]).is_file()
        self.calls.append(("kernels_push", Path(folder).name))
        return SimpleNamespace(error=self.error, url=f"https://kaggle.test/{meta['id']}")


def test_push_creates_the_dataset_then_pushes_every_kernel(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    client = FakeClient()
    urls = kaggle.push(ROOT, client=client, dest=tmp_path / "stage", wheel_builder=fake_wheel, say=lambda _: None)
    assert client.calls[:2] == [("dataset_status", "from-config/vaehelpers-src"),
                                ("dataset_create_new", "vaehelpers-src", False)]
    assert client.calls[2:] == [("kernels_push", name) for name in NOTEBOOKS]
    assert urls[-1] == "https://kaggle.test/from-config/vaehelpers-05-evaluation"


def test_push_versions_an_existing_dataset_and_filters_kernels(tmp_path):
    client = FakeClient(existing={"bob/vaehelpers-src"})
    kaggle.push(ROOT, "bob", client=client, only=["04", "05"], dest=tmp_path / "stage", wheel_builder=fake_wheel,
                say=lambda _: None)
    assert ("dataset_create_version", "vaehelpers-src") in client.calls
    assert [call[1] for call in client.calls if call[0] == "kernels_push"] == ["04_training", "05_evaluation"]


def test_push_reports_kaggle_errors(tmp_path):
    client = FakeClient(error="Notebook not found")
    with pytest.raises(RuntimeError, match="pushing 01_data: Notebook not found"):
        kaggle.push(ROOT, "carol", client=client, dataset=False, dest=tmp_path / "stage", wheel_builder=fake_wheel,
                    say=lambda _: None)


def test_cli_kaggle_push_uses_the_client(tmp_path, monkeypatch, capsys):
    client = FakeClient()
    monkeypatch.setattr(kaggle, "kaggle_client", lambda: client)
    monkeypatch.setattr(kaggle, "build_wheel", fake_wheel)
    monkeypatch.setattr(kaggle, "STAGE_DIR", tmp_path / "stage")  # absolute: the repository stays untouched
    assert cli.main(["kaggle", "push", "--user", "dave", "--only", "02"]) == 0
    assert [call for call in client.calls if call[0] == "kernels_push"] == [("kernels_push", "02_architecture")]
    assert "kernel 02_architecture: https://kaggle.test/dave/vaehelpers-02-architecture" in capsys.readouterr().out
    assert (tmp_path / "stage" / "02_architecture" / "02_architecture.ipynb").is_file()


def test_importing_never_imports_the_kaggle_package():
    # kaggle 2.x logs in at import time: it must be imported only when an upload or download runs
    code = "import sys, vaehelpers.cli, vaehelpers.kaggle, vaehelpers.demo; assert 'kaggle' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_build_wheel_offline(tmp_path):
    wheel = kaggle.build_wheel(ROOT, tmp_path)
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "vaehelpers/kaggle.py" in names and "vaehelpers/demo.py" in names


# ----------------------------------------------------------------------------- the installer on Kaggle

def load_installer():
    spec = importlib.util.spec_from_file_location("vaehelpers_install", ROOT / "kaggle" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installer_pins_the_installed_torch(tmp_path, capsys):
    installer = load_installer()
    wheel = fake_wheel(ROOT, tmp_path)
    commands = []
    installer.main(str(tmp_path), run=lambda command, check: commands.append(command))
    (command,) = commands
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and command[-1] == str(wheel)
    assert "--no-deps" not in command  # missing light dependencies do get installed ...
    constraints = Path(command[command.index("--constraint") + 1]).read_text()
    assert f"torch=={importlib.metadata.version('torch')}" in constraints.splitlines()  # ... but never another torch
    assert "installed vaehelpers-0.1.0" in capsys.readouterr().out


def test_installer_without_a_wheel_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="kaggle push"):
        load_installer().main(str(tmp_path), run=lambda *a, **k: None)


# ----------------------------------------------------------------------------- where things are

def make_run(folder: Path) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_restore_run_copies_an_attached_earlier_run(tmp_path):
    attached = make_run(tmp_path / "input" / "notebooks" / "alice" / "vaehelpers-04-training" / "runs" / "flickr8k-sd-128")
    (tmp_path / "input" / "flickr8k" / "Images").mkdir(parents=True)  # never searched
    run_dir = tmp_path / "working" / "runs" / "flickr8k-sd-128"
    assert kaggle.find_attached_run("flickr8k-sd-128", tmp_path / "input") == attached
    assert "copied" in kaggle.restore_run(run_dir, tmp_path / "input")
    assert (run_dir / "model.safetensors").read_bytes() == b"weights"
    assert "already holds" in kaggle.restore_run(run_dir, tmp_path / "input")
    assert "starts fresh" in kaggle.restore_run(tmp_path / "working" / "runs" / "other", tmp_path / "input")
    assert "starts fresh" in kaggle.restore_run(tmp_path / "elsewhere", tmp_path / "no-such-input")


def test_workspace(tmp_path, monkeypatch):
    monkeypatch.setattr(kaggle, "on_kaggle", lambda: False)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    assert kaggle.workspace(tmp_path / "notebooks") == tmp_path  # notebooks share data/ and runs/ with the CLI
    assert kaggle.workspace(tmp_path) == tmp_path
    monkeypatch.setattr(kaggle, "on_kaggle", lambda: True)
    assert kaggle.workspace(tmp_path) == Path("/kaggle/working")
