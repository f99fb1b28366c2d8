"""Kaggle: the GPU check with faked capabilities, staging and pushing with a fake client, the installer, runs
attached from earlier sessions. Nothing here touches the network or runs pip."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch
from kagglesdk.datasets.types.dataset_api_service import ApiCreateDatasetResponse
from kagglesdk.datasets.types.dataset_enums import DatabundleVersionStatus
from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelSessionStatusResponse, ApiSaveKernelResponse
from kagglesdk.kernels.types.kernels_enums import KernelWorkerStatus

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
    # the versions this environment has (Kaggle's own), built for CUDA 12.6, which still ships sm_60
    versions = [importlib.metadata.version(name).split("+")[0] for name in ("torch", "torchvision")]
    assert calls == [
        [
            f"torch=={versions[0]}",
            f"torchvision=={versions[1]}",
            "--index-url",
            "https://download.pytorch.org/whl/cu126",
        ]
    ]


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
        assert meta["enable_internet"] is True and meta["enable_tpu"] is False
        if folder.name in ("01_data", "02_architecture"):  # no GPU work: they would spend the weekly GPU quota
            assert meta["enable_gpu"] is False and "machine_shape" not in meta
        else:  # Kaggle's "GPU T4 x2" (the kaggle client's own help says so); enable_gpu alone gives a P100
            assert meta["enable_gpu"] is True and meta["machine_shape"] == "NvidiaTeslaT4"
        assert "adityajn105/flickr8k" in meta["dataset_sources"]
        assert f"{kaggle.USER_PLACEHOLDER}/{kaggle.SOURCE_DATASET}" in meta["dataset_sources"]
    evaluation = json.loads((ROOT / "kaggle" / "05_evaluation" / "kernel-metadata.json").read_text())
    assert evaluation["kernel_sources"] == [f"{kaggle.USER_PLACEHOLDER}/vaehelpers-04-training"]


def test_stage_fills_in_the_user_and_copies_everything(tmp_path):
    dataset, kernels = kaggle.stage(ROOT, "alice", tmp_path / "stage", wheel_builder=fake_wheel)
    assert sorted(path.name for path in dataset.iterdir()) == [
        "dataset-metadata.json",
        "vaehelpers-0.1.0-py3-none-any.whl",
        kaggle.INSTALLER_NAME,
    ]
    assert json.loads((dataset / "dataset-metadata.json").read_text())["id"] == "alice/vaehelpers-src"
    assert [folder.name for folder in kernels] == NOTEBOOKS
    for folder in kernels:
        text = (folder / "kernel-metadata.json").read_text()
        meta = json.loads(text)
        assert kaggle.USER_PLACEHOLDER not in text and meta["id"].startswith("alice/")
        assert "alice/vaehelpers-src" in meta["dataset_sources"]
        assert (folder / meta["code_file"]).read_bytes() == (ROOT / "notebooks" / meta["code_file"]).read_bytes()


def http_error(code: int) -> requests.HTTPError:
    """What the real client raises for a dataset or kernel Kaggle does not have (requests' HTTPError)."""
    response = requests.Response()
    response.status_code = code
    return requests.HTTPError(f"{code} Client Error", response=response)


class FakeKaggle:
    """Kaggle's servers behind the kaggle client's own methods (kaggle 2.2's KaggleApi signatures), answering with
    the client's own response objects (kagglesdk). A dataset version is processed over `processing_polls` status
    calls (blobs_received, then ready); a pushed kernel version is queued until the test finishes it; a push
    drops sources that do not exist, listing them in invalid_*_sources, as the server does."""

    def __init__(self, datasets=(), kernels=None, processing_polls=2, never_ready=False):
        self.versions = {ref: 1 for ref in datasets}  # dataset ref -> current version number
        self.pending = {}  # dataset ref -> status calls left before its newest version is ready
        self.kernels = dict(kernels or {})  # kernel ref -> KernelWorkerStatus of its latest version
        self.processing_polls, self.never_ready = processing_polls, never_ready
        self.gone = set()  # others' datasets that no longer exist on Kaggle
        self.calls, self.pushed = [], {}  # pushed: kernel folder name -> the metadata it was pushed with

    def get_config_value(self, name):
        return "from-config" if name == "username" else None

    def dataset_status(self, dataset, format=None):
        self.calls.append(("dataset_status", dataset))
        if dataset not in self.versions:
            raise http_error(404)
        left = self.pending.get(dataset, 0)
        if left and not self.never_ready:
            self.pending[dataset] = left - 1
        status = DatabundleVersionStatus.BLOBS_RECEIVED if left else DatabundleVersionStatus.READY
        if format is None:
            return status.name.lower()
        return json.dumps({"status": status.name.lower(), "current_version_number": self.versions[dataset]})

    def _upload(self, folder):
        ref = json.loads((Path(folder) / "dataset-metadata.json").read_text())["id"]
        assert any(Path(folder).glob("vaehelpers-*.whl")) and (Path(folder) / kaggle.INSTALLER_NAME).is_file()
        self.versions[ref] = self.versions.get(ref, 0) + 1
        self.pending[ref] = self.processing_polls
        response = ApiCreateDatasetResponse()
        response.url = f"https://kaggle.test/datasets/{ref}"
        return response

    def dataset_create_new(
        self, folder, public=False, quiet=False, convert_to_csv=True, dir_mode="skip", ignore_patterns=None
    ):
        self.calls.append(("dataset_create_new", Path(folder).name, public))
        return self._upload(folder)

    def dataset_create_version(
        self,
        folder,
        version_notes,
        quiet=False,
        convert_to_csv=True,
        delete_old_versions=False,
        dir_mode="skip",
        ignore_patterns=None,
    ):
        self.calls.append(("dataset_create_version", Path(folder).name))
        return self._upload(folder)

    def kernels_status(self, kernel):
        self.calls.append(("kernels_status", kernel))
        if kernel not in self.kernels:
            raise http_error(404)
        response = ApiGetKernelSessionStatusResponse()
        response.status = self.kernels[kernel]
        return response

    def kernels_push(self, folder, timeout=None, acc=None, no_run=False):
        meta = json.loads((Path(folder) / "kernel-metadata.json").read_text())
        assert (Path(folder) / meta["code_file"]).is_file()
        self.calls.append(("kernels_push", Path(folder).name))
        self.pushed[Path(folder).name] = meta
        response = ApiSaveKernelResponse()
        for source in meta["dataset_sources"]:
            owner, slug, *version = source.split("/")
            ref = f"{owner}/{slug}"
            known = ref in self.versions or (owner != meta["id"].split("/")[0] and ref not in self.gone)
            if not known or (version and int(version[0]) > self.versions[f"{owner}/{slug}"]):
                response.invalid_dataset_sources = [*response.invalid_dataset_sources, source]
        for source in meta["kernel_sources"]:
            if source not in self.kernels:
                response.invalid_kernel_sources = [*response.invalid_kernel_sources, source]
        self.kernels[meta["id"]] = KernelWorkerStatus.QUEUED
        response.url = f"https://kaggle.test/{meta['id']}"
        response.version_number = 1
        return response


def push(client, user="bob", tmp_path=None, **kwargs):
    """kaggle.push with the fake servers, never sleeping, collecting what it says."""
    said = []
    urls = kaggle.push(
        ROOT,
        user,
        client=client,
        dest=tmp_path / "stage",
        wheel_builder=fake_wheel,
        sleep=lambda seconds: None,
        say=said.append,
        **kwargs,
    )
    return urls, said


def test_push_waits_for_the_new_dataset_then_pins_kernels_to_it(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    client = FakeKaggle(processing_polls=3)
    urls = kaggle.push(
        ROOT,
        client=client,
        dest=tmp_path / "stage",
        wheel_builder=fake_wheel,
        sleep=lambda seconds: None,
        say=lambda _: None,
    )
    ref = "from-config/vaehelpers-src"
    assert client.calls[:2] == [("dataset_status", ref), ("dataset_create_new", "vaehelpers-src", False)]
    first_push = next(i for i, call in enumerate(client.calls) if call[0] == "kernels_push")
    polls = [call for call in client.calls[2:first_push] if call == ("dataset_status", ref)]
    assert len(polls) == 4  # three while Kaggle processed it, one that saw it ready; no kernel before that
    for name, meta in client.pushed.items():
        assert f"{ref}/1" in meta["dataset_sources"] and ref not in meta["dataset_sources"], name
    assert urls[0] == f"https://kaggle.test/datasets/{ref}"


def test_push_versions_an_existing_dataset_and_waits_for_the_new_version(tmp_path):
    client = FakeKaggle(datasets={"bob/vaehelpers-src"}, processing_polls=1)
    push(client, tmp_path=tmp_path, only=["02"])
    assert ("dataset_create_version", "vaehelpers-src") in client.calls
    assert client.pushed["02_architecture"]["dataset_sources"] == ["adityajn105/flickr8k", "bob/vaehelpers-src/2"]


def test_push_gives_up_on_a_dataset_that_stays_in_processing(tmp_path):
    client = FakeKaggle(never_ready=True)
    with pytest.raises(
        TimeoutError,
        match=r"bob/vaehelpers-src is still being processed .* \(status blobs_received"
        r".*no kernel was pushed.*--no-dataset",
    ):
        push(client, tmp_path=tmp_path, wait_s=0)
    assert not client.pushed


def test_push_refuses_a_dropped_source_naming_it(tmp_path):
    client = FakeKaggle(datasets={"bob/vaehelpers-src"}, processing_polls=0)
    client.gone.add("adityajn105/flickr8k")  # taken down: a push would run without the images
    with pytest.raises(
        RuntimeError,
        match=r"pushing 01_data: Kaggle dropped the dataset source\(s\) "
        r"adityajn105/flickr8k \(invalid_dataset_sources\)",
    ):
        push(client, tmp_path=tmp_path, dataset=False)
    assert list(client.pushed) == ["01_data"]  # stopped at the first such push


def test_push_reports_kaggle_errors(tmp_path):
    client = FakeKaggle(datasets={"carol/vaehelpers-src"}, processing_polls=0)
    client.kernels_push = lambda folder, **kwargs: SimpleNamespace(error="Notebook not found", url="")
    with pytest.raises(RuntimeError, match="pushing 01_data: Notebook not found"):
        push(client, "carol", tmp_path=tmp_path, dataset=False)


def test_05_waits_for_04_to_finish_and_04_resumes_from_its_own_output(tmp_path):
    training, evaluation = "bob/vaehelpers-04-training", "bob/vaehelpers-05-evaluation"
    client = FakeKaggle(datasets={"bob/vaehelpers-src"}, processing_polls=0)
    _, said = push(client, tmp_path=tmp_path, dataset=False)  # the first push: 04 has never run
    assert [call[1] for call in client.calls if call[0] == "kernels_push"] == [
        "01_data",
        "02_architecture",
        "03_loss",
        "04_training",
    ]
    assert client.pushed["04_training"]["kernel_sources"] == []  # nothing to resume yet
    assert any(
        "05_evaluation not pushed" in line
        and f"{training}, whose latest version is queued" in line
        and "--only 05" in line
        for line in said
    )

    _, said = push(client, tmp_path=tmp_path, dataset=False, only=["04", "05"])  # 04 still running
    assert "04_training" in client.pushed and client.kernels[training] == KernelWorkerStatus.QUEUED
    assert [line for line in said if "not pushed" in line] == [
        "kernel 04_training not pushed: its latest version is queued on Kaggle (a new version would start a second "
        "run beside it); push it again when it has ended",
        f"kernel 05_evaluation not pushed: it evaluates the output of {training}, whose latest version is queued; "
        "when it has finished, run `vaehelpers kaggle push --no-dataset --only 05`",
    ]

    client.kernels[training] = KernelWorkerStatus.COMPLETE  # the session ended
    client.pushed.clear()
    push(client, tmp_path=tmp_path, dataset=False, only=["05"])
    assert client.pushed["05_evaluation"]["kernel_sources"] == [training] and evaluation in client.kernels

    push(client, tmp_path=tmp_path, dataset=False, only=["04"])  # the next session attaches the last one's output
    assert client.pushed["04_training"]["kernel_sources"] == [training]


def test_cli_kaggle_push_uses_the_client(tmp_path, monkeypatch, capsys):
    client = FakeKaggle(processing_polls=0)
    monkeypatch.setattr(kaggle, "kaggle_client", lambda: client)
    monkeypatch.setattr(kaggle, "build_wheel", fake_wheel)
    monkeypatch.setattr(kaggle, "STAGE_DIR", tmp_path / "stage")  # absolute: the repository stays untouched
    assert cli.main(["kaggle", "push", "--user", "dave", "--only", "02"]) == 0
    assert [call for call in client.calls if call[0] == "kernels_push"] == [("kernels_push", "02_architecture")]
    out = capsys.readouterr().out
    assert "kernel 02_architecture version 1: https://kaggle.test/dave/vaehelpers-02-architecture" in out
    assert (tmp_path / "stage" / "02_architecture" / "02_architecture.ipynb").is_file()
    assert cli.main(["kaggle", "push", "--user", "dave", "--only", "02", "--no-pin"]) == 0
    assert client.pushed["02_architecture"]["dataset_sources"][-1] == "dave/vaehelpers-src"


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

    def pip(command, **kwargs):  # pip's place: the network and the site-packages are not ours to change
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    installer.main(str(tmp_path), run=pip)
    (command,) = commands
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and command[-1] == str(wheel)
    assert "--no-deps" not in command  # missing light dependencies do get installed ...
    constraints = Path(command[command.index("--constraint") + 1]).read_text()
    assert f"torch=={importlib.metadata.version('torch')}" in constraints.splitlines()  # ... but never another torch
    assert "installed vaehelpers-0.1.0" in capsys.readouterr().out


def test_installer_without_a_wheel_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="kaggle push"):
        load_installer().main(str(tmp_path), run=lambda *a, **k: None)


def wheel_needing(folder: Path, dependency: str) -> Path:
    """A real, minimal wheel of a package named vaehelpers that requires `dependency`."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "vaehelpers-0.0.1-py3-none-any.whl"
    info = "vaehelpers-0.0.1.dist-info"
    files = {
        "vaehelpers_stub.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: vaehelpers\nVersion: 0.0.1\nRequires-Dist: {dependency}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@pytest.mark.timeout(180)
def test_installer_offline_names_the_missing_dependency_and_the_fix(tmp_path, monkeypatch):
    # real pip, as with the internet off: no index (PIP_NO_INDEX); --dry-run so nothing is ever installed here
    wheel_needing(tmp_path / "dataset", "vaehelpers-test-absent-dependency")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    installer = load_installer()
    with pytest.raises(installer.InstallError) as failed:
        installer.main(str(tmp_path / "dataset"), pip_args=["--dry-run"])
    message = str(failed.value)
    assert "it needs vaehelpers-test-absent-dependency, which this Kaggle image does not have" in message
    assert "Turn the internet on (Settings > Internet on" in message and "CalledProcessError" not in message


def run_install_cell(monkeypatch, kaggle_input: Path, vaehelpers_source=None):
    """Run the notebooks' install cell as on a Kaggle machine where vaehelpers is not installed yet."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "vaehelpers" else real_find_spec(name, *args)
    )
    assert '"/kaggle/input/**/vaehelpers_install.py"' in kaggle.INSTALL_CELL
    cell = kaggle.INSTALL_CELL.replace("/kaggle/input", str(kaggle_input))
    exec(compile(cell, "install cell", "exec"), {"vaehelpers_source": vaehelpers_source})


def test_install_cell_without_the_dataset_names_both_fixes(tmp_path, monkeypatch):
    (tmp_path / "input" / "datasets" / "adityajn105" / "flickr8k").mkdir(parents=True)  # other inputs only
    with pytest.raises(ModuleNotFoundError) as missing:
        run_install_cell(monkeypatch, tmp_path / "input")
    message = str(missing.value)
    assert "dataset vaehelpers-src is not attached" in message and "'+ Add Input' > 'Your Work' > 'Datasets'" in message
    assert "turn the internet on (Settings > Internet) and set vaehelpers_source" in message


def test_install_cell_installs_from_the_attached_dataset(tmp_path, monkeypatch):
    dataset = tmp_path / "input" / "datasets" / "bob" / "vaehelpers-src"  # Kaggle's current mount layout
    dataset.mkdir(parents=True)
    (dataset / kaggle.INSTALLER_NAME).write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write(__name__)\n")
    run_install_cell(monkeypatch, tmp_path / "input")
    assert (tmp_path / "ran").read_text() == "__main__"


def test_install_cell_installs_from_the_repository_keeping_torch(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: commands.append(command))  # pip and the network
    run_install_cell(monkeypatch, tmp_path / "input", vaehelpers_source="git+https://example.test/vaehelpers")
    (command,) = commands
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and "git+https://example.test/vaehelpers" in command
    assert f"torch=={importlib.metadata.version('torch')}" in command
    assert f"torchvision=={importlib.metadata.version('torchvision')}" in command


# ----------------------------------------------------------------------------- where things are


def make_run(folder: Path) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_restore_run_copies_an_attached_earlier_run(tmp_path):
    attached = make_run(
        tmp_path / "input" / "notebooks" / "alice" / "vaehelpers-04-training" / "runs" / "flickr8k-sd-128"
    )
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


def test_no_checkpoint_names_the_buttons_that_attach_the_last_session(tmp_path):
    message = kaggle.restore_run(tmp_path / "working" / "runs" / "flickr8k-sd-128", tmp_path / "input")
    assert message.startswith("no earlier run named 'flickr8k-sd-128' attached")
    assert '"+ Add Input", choose "Your Work", then "Notebooks", click the + beside "vaehelpers 04 training"' in message
    title = json.loads((ROOT / "kaggle" / "04_training" / "kernel-metadata.json").read_text())["title"]
    assert kaggle.TRAINING_TITLE == title  # the name the user sees in that list


def test_evaluation_without_a_trained_run_says_04_must_finish_first(tmp_path):
    run_dir = tmp_path / "working" / "runs" / "flickr8k-sd-128"
    with pytest.raises(FileNotFoundError) as missing:
        kaggle.require_run(run_dir, tmp_path / "input")
    message = str(missing.value)
    assert "evaluates the output of vaehelpers 04 training: let that notebook finish first" in message
    assert '"+ Add Input"' in message and "starts fresh" not in message
    assert not run_dir.exists()
    make_run(tmp_path / "input" / "notebooks" / "bob" / "vaehelpers-04-training" / "runs" / "flickr8k-sd-128")
    assert "copied the attached run" in kaggle.require_run(run_dir, tmp_path / "input")
    assert (run_dir / "model.safetensors").is_file()


def test_the_full_scale_run_is_refused_on_a_cpu_unless_asked_for(tmp_path):
    from vaehelpers.notebook import settings as notebook_settings

    reference = notebook_settings(False, run_dir=tmp_path / "run")  # what "Run all" with the accelerator off gets
    with pytest.raises(kaggle.FullScaleOnCPU) as refused:
        kaggle.check_scale_fits_device(reference, torch.device("cpu"))
    message = str(refused.value)
    assert "sd model, 600 epochs, up to 690 minutes a session" in message
    assert "Settings > Accelerator > GPU T4 x2" in message and "smoke=True" in message and "allow_cpu=True" in message
    assert "on cpu" in kaggle.check_scale_fits_device(reference, torch.device("cpu"), allow_cpu=True)
    assert "on cuda:0" in kaggle.check_scale_fits_device(reference, torch.device("cuda", 0))
    smoke = notebook_settings(True, run_dir=tmp_path / "run")
    assert "tiny" in kaggle.check_scale_fits_device(smoke, torch.device("cpu"))


# ----------------------------------------------------------------------------- api(): each way logging in ends


@pytest.fixture
def kaggle_env(tmp_path, monkeypatch):
    """No Kaggle credentials anywhere (an empty HOME, no KAGGLE_* variables) and a fresh `import kaggle`, which
    authenticates at import time; the kaggle client's HTTP is Kaggle's servers, unreachable (requests' adapter)."""
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name == "XDG_CONFIG_HOME":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delitem(sys.modules, "kaggle", raising=False)

    def unreachable(self, request, **kwargs):
        raise requests.ConnectionError(f"cannot reach {request.url}")

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", unreachable)
    return tmp_path


def test_api_without_credentials_names_every_way_to_give_them(kaggle_env, capsys):
    with pytest.raises(kaggle.KaggleLoginError, match="no Kaggle credentials were found. Create an API token"):
        kaggle.api()
    assert "kaggle" not in sys.modules  # nothing imported, nothing printed
    assert capsys.readouterr().out == ""


def test_api_with_a_legacy_key_logs_in_without_the_network(kaggle_env, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    client = kaggle.api()
    assert type(client).__name__ == "KaggleApi" and client._authenticated
    assert kaggle.api() is client  # authenticated once


def test_api_with_credentials_kaggle_refuses_is_one_line_without_kaggles_help_text(kaggle_env, monkeypatch, capsys):
    config = kaggle_env / "config"
    config.mkdir()
    (config / "kaggle.json").write_text("{}")  # a kaggle.json without username and key
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    with pytest.raises(kaggle.KaggleLoginError) as error:
        kaggle.api()
    assert str(error.value).startswith(f"Kaggle did not accept the credentials from {config / 'kaggle.json'}. ")
    assert capsys.readouterr().out == ""  # kaggle's own help text (printed before its exit(1)) is held back


def test_api_with_a_token_and_kaggle_unreachable_says_so(kaggle_env, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "a-token")
    with pytest.raises(
        kaggle.KaggleLoginError, match="could not log in to Kaggle with KAGGLE_API_TOKEN: .*cannot reach"
    ):
        kaggle.api()


def test_api_without_the_kaggle_package_says_what_to_install(kaggle_env, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "a-token")
    monkeypatch.setitem(sys.modules, "kaggle", None)  # as if it were not installed
    with pytest.raises(kaggle.KaggleLoginError, match=r"cannot import the kaggle package .*: pip install kaggle six"):
        kaggle.api()
