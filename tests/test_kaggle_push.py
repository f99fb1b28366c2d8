"""`vaehelpers kaggle push` against the real kaggle client (kaggle 2.2's KaggleApi and kagglesdk), with only the HTTP
transport replaced: requests.Session.send answers as Kaggle's servers would, in kagglesdk's own wire format."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import requests
from kagglesdk.blobs.types.blob_api_service import ApiStartBlobUploadResponse
from kagglesdk.datasets.types.dataset_api_service import (
    ApiCreateDatasetResponse,
    ApiDataset,
    ApiGetDatasetStatusResponse,
)
from kagglesdk.datasets.types.dataset_enums import DatabundleVersionStatus
from kagglesdk.kernels.types.kernels_api_service import (
    ApiGetKernelResponse,
    ApiGetKernelSessionStatusResponse,
    ApiKernelMetadata,
    ApiListKernelFilesItem,
    ApiListKernelFilesResponse,
    ApiSaveKernelRequest,
    ApiSaveKernelResponse,
)
from kagglesdk.kernels.types.kernels_enums import KernelExecutionType, KernelWorkerStatus

from vaehelpers import cli, kaggle, kaggle_push

ROOT = Path(__file__).resolve().parents[1]
TRAINING, EVALUATION = "bob/vaehelpers-04-training", "bob/vaehelpers-05-evaluation"
CHECKPOINT = "runs/flickr8k-sd-128/checkpoints/last.pt"


def fake_wheel(root: Path, dest: Path) -> Path:
    path = dest / "vaehelpers-0.1.0-py3-none-any.whl"
    path.write_bytes(b"PK fake wheel")
    return path


class KaggleServer:
    """Kaggle's API as the kaggle client sees it over HTTP: POST <endpoint>/v1/<service>/<method> with a JSON body,
    answered with JSON (or {"code": 404} for what does not exist), and PUTs of uploaded files to the URL
    StartBlobUpload handed out. A dataset version is processed over `processing_polls` status calls; a kernel
    version that runs is queued until the test ends it (end_session); a save whose sources Kaggle does not know
    lists them in invalid_*_sources, as the real server does."""

    def __init__(self, datasets=(), processing_polls=1, pins_honoured=True, kernel_pins_honoured=True):
        self.datasets = {ref: {"version": 1, "pending": 0} for ref in datasets}
        self.kernels: dict[str, list[dict]] = {}  # ref -> its versions, oldest first
        self.processing_polls, self.pins_honoured = processing_polls, pins_honoured
        self.kernel_pins_honoured = kernel_pins_honoured
        self.gone: set[str] = set()  # other people's datasets that no longer exist
        self.calls: list[str] = []
        self.saves: list[tuple[str, bool, dict]] = []  # (kernel slug, ran, its request as sent)
        self.uploads: list[str] = []

    # -- the test's side
    def end_session(self, ref, status, files=()):
        self.kernels[ref][-1].update(status=status, files=list(files))

    def ran(self):
        return [slug for slug, ran, _ in self.saves if ran]

    def sent(self, slug):
        return next(request for name, ran, request in reversed(self.saves) if name == slug and ran)

    # -- the wire
    def send(self, session, prepared, **kwargs):
        if prepared.method == "PUT":
            self.uploads.append(prepared.url)
            return self._answer(200, {})
        service, method = prepared.url.split("/v1/")[1].split("/")
        self.calls.append(method)
        body = json.loads(prepared.body or b"{}")
        handler = getattr(self, method, None)
        assert handler is not None, f"the fake server does not know {service}/{method}"
        answer = handler(body)
        if answer is None:
            return self._answer(404, {"code": 404, "message": "Not found"})
        return self._answer(200, json.loads(type(answer).to_json(answer)))

    @staticmethod
    def _answer(code, payload):
        response = requests.Response()
        response.status_code = code
        response.headers["Content-Type"] = "application/json"
        response._content = json.dumps(payload).encode()
        response.url = "https://api.kaggle.test"
        return response

    def GetDatasetStatus(self, body):
        dataset = self.datasets.get(f"{body['ownerSlug']}/{body['datasetSlug']}")
        if dataset is None:
            return None
        response = ApiGetDatasetStatusResponse()
        response.status = (
            DatabundleVersionStatus.BLOBS_RECEIVED if dataset["pending"] else DatabundleVersionStatus.READY
        )
        dataset["pending"] = max(0, dataset["pending"] - 1)
        return response

    def GetDataset(self, body):
        dataset = self.datasets.get(f"{body['ownerSlug']}/{body['datasetSlug']}")
        if dataset is None:
            return None
        response = ApiDataset()
        response.current_version_number = dataset["version"]
        return response

    def StartBlobUpload(self, body):
        response = ApiStartBlobUploadResponse()
        response.token, response.create_url = f"token-{body['name']}", f"https://upload.kaggle.test/{body['name']}"
        return response

    def _new_version(self, ref):
        dataset = self.datasets.setdefault(ref, {"version": 0, "pending": 0})
        dataset.update(version=dataset["version"] + 1, pending=self.processing_polls)
        response = ApiCreateDatasetResponse()
        response.url = f"https://www.kaggle.test/datasets/{ref}"
        return response

    def CreateDataset(self, body):
        return self._new_version(f"{body['ownerSlug']}/{body['slug']}")

    def CreateDatasetVersion(self, body):
        return self._new_version(f"{body['ownerSlug']}/{body['datasetSlug']}")

    def _version(self, body):
        versions = self.kernels.get(f"{body['userName']}/{body['kernelSlug']}")
        label = body.get("versionLabel")
        if not versions or (label and not 1 <= int(label.lstrip("v")) <= len(versions)):
            return None
        return versions[int(label.lstrip("v")) - 1] if label else versions[-1]

    def GetKernelSessionStatus(self, body):
        version = self._version(body)
        if version is None:
            return None
        response = ApiGetKernelSessionStatusResponse()
        response.status = version["status"]
        return response

    def GetKernel(self, body):
        versions = self.kernels.get(f"{body['userName']}/{body['kernelSlug']}")
        if not versions:
            return None
        response, metadata = ApiGetKernelResponse(), ApiKernelMetadata()
        metadata.current_version_number = len(versions)
        response.metadata = metadata
        return response

    def ListKernelFiles(self, body):
        version = self._version(body)
        if version is None:
            return None
        response = ApiListKernelFilesResponse()
        for name in version["files"]:
            item = ApiListKernelFilesItem()
            item.name = name
            response.files = [*response.files, item]
        return response

    def _known_dataset(self, source, owner):
        ref, _, pinned = source.rpartition("/") if source.count("/") == 2 else (source, "", "")
        if ref in self.datasets:
            return not pinned or (self.pins_honoured and int(pinned) <= self.datasets[ref]["version"])
        return ref.split("/")[0] != owner and ref not in self.gone and not pinned

    def _known_kernel(self, source):
        ref, _, pinned = source.rpartition("/") if source.count("/") == 2 else (source, "", "")
        return ref in self.kernels and (
            not pinned or (self.kernel_pins_honoured and int(pinned) <= len(self.kernels[ref]))
        )

    def SaveKernel(self, body):
        request = ApiSaveKernelRequest.from_dict(body)
        ran = request.kernel_execution_type != KernelExecutionType.QUICK_SAVE
        self.saves.append((request.slug.split("/")[1], ran, body))
        owner = request.slug.split("/")[0]
        response = ApiSaveKernelResponse()
        response.invalid_dataset_sources = [
            s for s in request.dataset_data_sources if not self._known_dataset(s, owner)
        ]
        response.invalid_kernel_sources = [s for s in request.kernel_data_sources if not self._known_kernel(s)]
        versions = self.kernels.setdefault(request.slug, [])
        status = KernelWorkerStatus.QUEUED if ran else KernelWorkerStatus.NEW_SCRIPT  # a quick save runs nothing
        versions.append({"status": status, "files": []})
        response.url, response.version_number = f"https://www.kaggle.test/code/{request.slug}", len(versions)
        return response


@pytest.fixture
def server(monkeypatch, tmp_path):
    """The fake servers behind requests; credentials for the real client from the environment, as a user sets them."""
    monkeypatch.setenv("KAGGLE_USERNAME", "bob")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    servers = {}

    def send(session, prepared, **kwargs):
        return servers["now"].send(session, prepared, **kwargs)

    monkeypatch.setattr(requests.Session, "send", send)

    def make(**kwargs):
        servers["now"] = KaggleServer(**kwargs)
        return servers["now"]

    return make


def real_client():
    from kaggle.api.kaggle_api_extended import KaggleApi

    client = KaggleApi()
    client.authenticate()
    return client


def push(tmp_path, **kwargs):
    said = []
    urls = kaggle_push.push(
        ROOT,
        client=real_client(),
        dest=tmp_path / "stage",
        wheel_builder=fake_wheel,
        sleep=lambda seconds: None,
        say=said.append,
        **kwargs,
    )
    return urls, said


def test_first_push_uploads_the_package_verifies_every_source_then_runs(server, tmp_path):
    kaggle_server = server(processing_polls=2)
    urls, said = push(tmp_path)
    assert urls[0] == "https://www.kaggle.test/datasets/bob/vaehelpers-src"
    uploaded = sorted(url.rsplit("/", 1)[1] for url in kaggle_server.uploads)
    assert uploaded == sorted(["vaehelpers-0.1.0-py3-none-any.whl", kaggle.INSTALLER_NAME])
    # no kernel before the package was processed: two polls while processing, one that saw it ready
    first_save = kaggle_server.calls.index("SaveKernel")
    assert kaggle_server.calls[:first_save].count("GetDatasetStatus") >= 3
    # every kernel saved without running first, then run: 05 has nothing to evaluate yet
    quick = [slug for slug, ran, _ in kaggle_server.saves if not ran]
    assert quick == ["vaehelpers-01-data", "vaehelpers-02-architecture", "vaehelpers-03-loss", "vaehelpers-04-training"]
    assert kaggle_server.ran() == quick
    assert all(index < len(quick) for index, (_, ran, _) in enumerate(kaggle_server.saves) if not ran)
    for slug in quick:
        assert "bob/vaehelpers-src/1" in kaggle_server.sent(slug)["datasetDataSources"]
    assert "kernelDataSources" not in kaggle_server.sent("vaehelpers-04-training")  # a new run
    assert any("05_evaluation not pushed" in line and "no output with a checkpoint" in line for line in said)


def test_after_a_complete_session_05_runs_on_it_then_04_resumes_it(server, tmp_path):
    kaggle_server = server(datasets={"bob/vaehelpers-src"})
    push(tmp_path, dataset=False, only=["04"])
    kaggle_server.end_session(TRAINING, KernelWorkerStatus.COMPLETE, [CHECKPOINT, "runs/flickr8k-sd-128/log.csv"])
    _, said = push(tmp_path, dataset=False)
    assert kaggle_server.ran()[-2:] == ["vaehelpers-05-evaluation", "vaehelpers-04-training"]  # 05 first
    session = len(kaggle_server.kernels[TRAINING]) - 2  # the version that ended (a quick save and a run since)
    assert session == 2  # version 1 was the quick save of the first push, version 2 its run
    assert kaggle_server.sent("vaehelpers-05-evaluation")["kernelDataSources"] == [f"{TRAINING}/2"]
    assert kaggle_server.sent("vaehelpers-04-training")["kernelDataSources"] == [f"{TRAINING}/2"]
    assert "kernel 04_training attaches the output of its version 2 and resumes that run" in said


def test_after_an_errored_session_04_resumes_from_the_newest_checkpoint_never_from_scratch(server, tmp_path):
    kaggle_server = server(datasets={"bob/vaehelpers-src"})
    push(tmp_path, dataset=False, only=["04"])
    kaggle_server.end_session(TRAINING, KernelWorkerStatus.COMPLETE, [CHECKPOINT])  # version 2
    push(tmp_path, dataset=False, only=["04"])
    kaggle_server.end_session(TRAINING, KernelWorkerStatus.ERROR, [])  # version 4: out of memory, no output kept
    _, said = push(tmp_path, dataset=False, only=["04", "05"])
    assert kaggle_server.sent("vaehelpers-04-training")["kernelDataSources"] == [f"{TRAINING}/2"]
    assert kaggle_server.sent("vaehelpers-05-evaluation")["kernelDataSources"] == [f"{TRAINING}/2"]
    assert not any("starts a new run" in line for line in said)


def test_a_running_session_is_never_doubled(server, tmp_path):
    kaggle_server = server(datasets={"bob/vaehelpers-src"})
    push(tmp_path, dataset=False, only=["04"])  # queued on Kaggle
    _, said = push(tmp_path, dataset=False, only=["04", "05"])
    assert kaggle_server.ran() == ["vaehelpers-04-training"]
    assert any(
        line.startswith("kernel 04_training not pushed: its latest version is running or queued") for line in said
    )
    assert any("05_evaluation not pushed" in line and "runs or is queued" in line for line in said)


def test_a_dropped_pin_stops_the_push_before_any_kernel_runs(server, tmp_path):
    kaggle_server = server(pins_honoured=False)  # the server ignores <owner>/<slug>/<version>
    with pytest.raises(RuntimeError) as dropped:
        push(tmp_path)
    message = str(dropped.value)
    assert "saving 01_data without running it: Kaggle dropped the dataset source(s) bob/vaehelpers-src/1" in message
    assert "no kernel was run" in message and "--no-pin" in message
    assert kaggle_server.ran() == []


def test_a_dropped_output_version_stops_the_push_saying_how_to_attach_it_by_hand(server, tmp_path):
    kaggle_server = server(datasets={"bob/vaehelpers-src"})
    push(tmp_path, dataset=False, only=["04"])
    kaggle_server.end_session(TRAINING, KernelWorkerStatus.COMPLETE, [CHECKPOINT])
    kaggle_server.kernel_pins_honoured = False  # the server takes <owner>/<slug>, not <owner>/<slug>/<version>
    ran = len(kaggle_server.ran())
    with pytest.raises(RuntimeError) as dropped:
        push(tmp_path, dataset=False, only=["04", "05"])
    message = str(dropped.value)
    assert f"saving 05_evaluation without running it: Kaggle dropped the kernel source(s) {TRAINING}/2" in message
    assert "attach it in the editor instead" in message and "--no-pin" not in message
    assert len(kaggle_server.ran()) == ran  # nothing more ran


def test_a_dropped_dataset_stops_the_push_before_any_kernel_runs(server, tmp_path):
    kaggle_server = server(datasets={"bob/vaehelpers-src"})
    kaggle_server.gone.add("adityajn105/flickr8k")  # taken down: a kernel would run without the images
    with pytest.raises(RuntimeError, match=r"Kaggle dropped the dataset source\(s\) adityajn105/flickr8k") as dropped:
        push(tmp_path, dataset=False)
    assert "--no-pin" not in str(dropped.value)
    assert kaggle_server.ran() == []


def test_push_gives_up_on_a_dataset_that_stays_in_processing(server, tmp_path):
    kaggle_server = server(processing_polls=10**6)
    with pytest.raises(TimeoutError, match=r"still being processed .*no kernel was pushed.*--no-dataset"):
        push(tmp_path, wait_s=0)
    assert kaggle_server.saves == []


def test_cli_kaggle_push_goes_through_the_real_client(server, tmp_path, monkeypatch, capsys):
    kaggle_server = server(datasets={"dave/vaehelpers-src"})
    monkeypatch.setattr(kaggle_push, "build_wheel", fake_wheel)
    monkeypatch.setattr(kaggle_push, "STAGE_DIR", tmp_path / "stage")  # absolute: the repository stays untouched
    monkeypatch.setattr(kaggle_push, "kaggle_client", real_client)
    assert cli.main(["kaggle", "push", "--user", "dave", "--only", "02", "--no-dataset", "--no-pin"]) == 0
    assert kaggle_server.ran() == ["vaehelpers-02-architecture"]
    assert kaggle_server.sent("vaehelpers-02-architecture")["datasetDataSources"][-1] == "dave/vaehelpers-src"
    assert "kernel 02_architecture version 2: https://www.kaggle.test/code/dave/vaehelpers-02-architecture" in (
        capsys.readouterr().out
    )


def test_moved_names_are_still_reachable_from_kaggle():
    assert kaggle.push is kaggle_push.push and kaggle.stage is kaggle_push.stage
    from vaehelpers import notebook

    assert kaggle.check_scale_fits_device is notebook.check_scale_fits_device
    assert kaggle.FullScaleOnCPU is notebook.FullScaleOnCPU
    with pytest.raises(AttributeError):
        kaggle.no_such_name  # noqa: B018


@pytest.mark.slow
def test_a_stale_build_lib_never_ships(tmp_path):
    """A module deleted from the sources but left in build/lib by an earlier build must not be in the wheel."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in kaggle_push.WHEEL_SOURCES:
        source = ROOT / name
        if source.is_dir():
            import shutil

            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).write_bytes(source.read_bytes())
    stale = root / "build" / "lib" / "vaehelpers" / "removed_module.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("raise ImportError('this module was deleted')\n")
    wheel = kaggle_push.build_wheel(root, tmp_path / "wheels")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vaehelpers/kaggle_push.py" in names and "vaehelpers/demo.py" in names
    assert "vaehelpers/removed_module.py" not in names
    assert stale.is_file() and not (root / "vaehelpers" / "removed_module.py").exists()


def test_an_older_kaggle_client_is_refused_naming_the_fix(monkeypatch):
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.2.4" if name == "kaggle" else real_version(name))
    with pytest.raises(RuntimeError, match=r"kaggle push needs kaggle >= 2.2.5, found 2.2.4: pip install -U kaggle"):
        kaggle_push.kaggle_client()
