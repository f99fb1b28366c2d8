"""Kaggle: the GPU check with faked capabilities, staging, the installer, runs attached from earlier sessions (the
push itself: test_kaggle_push.py). Nothing here touches the network or runs pip."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

from vaehelpers import kaggle
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


def test_importing_never_imports_the_kaggle_package():
    # kaggle 2.x logs in at import time: it must be imported only when an upload or download runs
    code = "import sys, vaehelpers.cli, vaehelpers.kaggle, vaehelpers.kaggle_push, vaehelpers.demo; assert 'kaggle' not in sys.modules"
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
    assert "starts fresh" in kaggle.restore_run(tmp_path / "elsewhere", tmp_path / "no-such-input")


def test_an_attached_output_without_this_run_stops_instead_of_starting_over(tmp_path, monkeypatch):
    output = tmp_path / "input" / "notebooks" / "alice" / "vaehelpers-04-training"
    make_run(output / "runs" / "flickr8k-sd-128")
    other = tmp_path / "working" / "runs" / "synthetic-tiny-64"  # the settings changed: another run's name
    with pytest.raises(kaggle.AttachedRunMissing) as stopped:
        kaggle.restore_run(other, tmp_path / "input")
    message = str(stopped.value)
    assert f"the attached output {output} of vaehelpers 04 training holds no run named 'synthetic-tiny-64'" in message
    assert "(it holds the run(s) flickr8k-sd-128)" in message and "start_fresh=True" in message
    assert "--" not in message  # a notebook's error names its parameters, not command-line flags
    assert not other.exists()
    assert "start_fresh=True" in kaggle.restore_run(other, tmp_path / "input", start_fresh=True)
    shutil.rmtree(output / "runs")  # a version that kept no run at all
    with pytest.raises(kaggle.AttachedRunMissing, match=r"\(it holds no run\)"):
        kaggle.restore_run(other, tmp_path / "input")


def test_restore_run_brings_the_image_cache_along(tmp_path, monkeypatch):
    monkeypatch.setenv(kaggle.WORKING_ENV, str(tmp_path / "working"))
    monkeypatch.setenv(kaggle.INPUT_ENV, str(tmp_path / "input"))
    output = tmp_path / "input" / "notebooks" / "alice" / "vaehelpers-04-training"
    make_run(output / "runs" / "flickr8k-sd-128")
    (output / "cache").mkdir()
    (output / "cache" / "train-128.npy").write_bytes(b"decoded images")
    message = kaggle.restore_run(tmp_path / "working" / "runs" / "flickr8k-sd-128")  # the input from the env
    assert message.endswith(f"and its image cache to {tmp_path / 'working' / 'cache'}")
    assert (tmp_path / "working" / "cache" / "train-128.npy").read_bytes() == b"decoded images"


def test_kaggle_paths_come_from_the_environment_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv(kaggle.INPUT_ENV, raising=False)
    monkeypatch.delenv(kaggle.WORKING_ENV, raising=False)
    assert kaggle.kaggle_input() == Path("/kaggle/input") and kaggle.kaggle_working() == Path("/kaggle/working")
    monkeypatch.setenv(kaggle.INPUT_ENV, str(tmp_path / "in"))
    monkeypatch.setenv(kaggle.WORKING_ENV, str(tmp_path / "out"))
    assert kaggle.kaggle_input() == tmp_path / "in" and kaggle.workspace() == tmp_path / "out"


def test_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv(kaggle.WORKING_ENV, raising=False)
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
