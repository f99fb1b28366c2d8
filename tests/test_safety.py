"""No command destroys a run, validates after acting, waits forever or ends in a bare traceback (issue 22).

Faults at the lowest boundary: a real second process holds the run lock or is killed mid-write, a 1 MB tmpfs is the
full disk (a read-only remount the read-only one), a local TCP server that accepts and never answers is the stalled
network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vaehelpers import pretrained, weights
from vaehelpers.cli import main as cli
from vaehelpers.config import build_config
from vaehelpers.model import AutoencoderKL
from vaehelpers.sources import make_synthetic
from vaehelpers.train import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TINY = ["--preset", "tiny", "--recipe", "pixel", "--image-size", "16", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    make_synthetic(folder, count=24, size=16, seed=3)
    return folder


def train_args(images: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(images), "--run", str(run), *TINY, "--max-steps", "1", "--no-progress", *extra]


def one_error_line(capsys, verb: str) -> str:
    """The one line an expected failure prints (asserting it is one line, without a traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("vaehelpers ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"vaehelpers {verb}: error: "), err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder with its bytes, but the run lock's file (its holder's details change)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# ----------------------------------------------------------------------------- 1. no command destroys a run


@pytest.mark.parametrize("present", ["model.safetensors", "config.json", "log.csv", "checkpoints/last.pt"])
def test_train_refuses_a_directory_holding_any_run_file(images, tmp_path, capsys, present):
    run = tmp_path / "run"
    (run / present).parent.mkdir(parents=True, exist_ok=True)
    (run / present).write_bytes(b"the only copy of something")
    before = snapshot(run)
    assert cli(train_args(images, run)) == 1
    line = one_error_line(capsys, "train")
    assert f"{run} already holds a run ({present.split('/')[0]}" in line
    assert "--resume" in line and "new --run" in line  # the two ways out
    assert snapshot(run) == before  # nothing overwritten, nothing added (the lock file aside)


def test_resume_of_final_weights_without_a_checkpoint_is_refused(images, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(train_args(images, run)) == 0
    for stale in (run / "checkpoints").iterdir():  # a finished run whose checkpoints were pruned
        stale.unlink()
    capsys.readouterr()
    before = snapshot(run)
    assert cli(train_args(images, run, "--resume")) == 1
    line = one_error_line(capsys, "train")
    assert "holds final weights (model.safetensors) but no checkpoints/last.pt" in line and f"--init {run}" in line
    assert snapshot(run) == before


def test_a_failed_resume_leaves_config_json_as_it_was(images, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = build_config("tiny", "pixel", device="cpu", batch_size=4, run_dir=str(run), max_steps=3,
                       **{"data.data_dir": str(images), "data.image_size": 16})  # fmt: skip
    train(cfg, until_step=1, progress=False)
    (run / "config.json").unlink()  # the case: resumed without its config.json, with another preset
    assert cli(train_args(images, run, "--resume", "--preset", "small")) == 1
    line = one_error_line(capsys, "train")
    assert f"settings differ from its checkpoint {run / 'checkpoints' / 'last.pt'}" in line
    assert "preset: saved 'tiny' vs now 'small'" in line
    assert not (run / "config.json").exists()  # not rewritten with the `small` model the checkpoint does not hold


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_writers_refuse_a_run_whose_lock_another_process_holds(images, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(train_args(images, run)) == 0
    holder = subprocess.Popen(  # a real second process holding the run lock, as a training does
        [sys.executable, "-c", f"from vaehelpers.runlock import RunLock; RunLock({str(run)!r}).acquire(); "
         "print('locked', flush=True); import time; time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        before = snapshot(run)
        commands = {
            "scale": ["scale", "--run", str(run), "--data", str(images), "--device", "cpu", "--max-images", "4"],
            "convert": ["convert", str(run), str(run / "sub"), "--to", "vaehelpers"],
            "evaluate": ["evaluate", "--model", str(run), "--data", str(images), "--split", "all", "--no-lpips",
                         "--no-fid", "--json", str(run / "evaluation.json"), "--device", "cpu", "--no-progress"],
        }  # fmt: skip
        for verb, argv in commands.items():
            assert cli(argv) == 1, verb
            line = one_error_line(capsys, verb)
            assert f"is in use by another training (pid {holder.pid} on host" in line, line
        assert snapshot(run) == before  # no scaling factor stored, no evaluation.json written
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert cli(commands["scale"]) == 0  # once the holder is gone the lock is free
    assert json.loads((run / "config.json").read_text())["model"]["scaling_factor"] != 0.18215


def test_training_refuses_while_scale_holds_the_run(images, tmp_path, capsys):
    from vaehelpers.runlock import RunDirInUse, RunLock

    run = tmp_path / "run"
    assert cli(train_args(images, run)) == 0
    cfg = build_config("tiny", "pixel", device="cpu", batch_size=4, run_dir=str(run), max_steps=2,
                       **{"data.data_dir": str(images), "data.image_size": 16})  # fmt: skip
    with RunLock(run, "`vaehelpers scale`"), pytest.raises(RunDirInUse, match="in use by `vaehelpers scale` \\(pid"):
        train(cfg, resume=True, progress=False)


def test_convert_refuses_to_overwrite_a_run(images, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(train_args(images, run)) == 0
    other = tmp_path / "other"
    AutoencoderKL.load(run).save(other)
    capsys.readouterr()
    before = snapshot(run)
    for target in ("vaehelpers", "diffusers"):
        assert cli(["convert", str(other), str(run), "--to", target]) == 1
        assert f"{run} already holds " in one_error_line(capsys, "convert")
    assert snapshot(run) == before


def test_resume_after_scale_says_it_keeps_the_measured_scaling_factor(images, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = build_config("tiny", "pixel", device="cpu", batch_size=4, run_dir=str(run), max_steps=2,
                       **{"data.data_dir": str(images), "data.image_size": 16})  # fmt: skip
    train(cfg, until_step=1, progress=False)
    assert cli(["scale", "--run", str(run), "--data", str(images), "--device", "cpu", "--max-images", "4"]) == 0
    measured = json.loads((run / "config.json").read_text())["model"]["scaling_factor"]
    capsys.readouterr()
    train(cfg, resume=True, progress=False)
    assert f"note: keeping scaling_factor {measured} that `vaehelpers scale` measured on an earlier state" in (
        capsys.readouterr().out
    )


WRITER = """
import sys, time
from pathlib import Path
from vaehelpers.rundir import atomic_write

def write(tmp: Path) -> None:
    tmp.write_bytes(b"x" * 4096)
    print("writing", flush=True)
    time.sleep(120)  # killed here, mid-write

atomic_write(sys.argv[1], write)
"""


@contextlib.contextmanager
def writer_killed_mid_write(path: Path, kill: bool = True) -> Iterator[subprocess.Popen]:
    """A real process in atomic_write(path), stopped mid-write by kill -9 (kill=False: still writing)."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV
    )
    try:
        assert process.stdout.readline().strip() == "writing"
        if kill:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        yield process
    finally:
        process.kill()
        process.wait(timeout=60)


@pytest.mark.slow
def test_temp_files_of_killed_writers_are_cleaned_and_live_ones_kept(images, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(train_args(images, run)) == 0
    # scale's config.json in the run root: the temp file of a killed scale goes at the next write there
    with writer_killed_mid_write(run / "config.json"):
        (stale,) = run.glob(".config.json.*.tmp")
        assert cli(["scale", "--run", str(run), "--data", str(images), "--device", "cpu", "--max-images", "4"]) == 0
        assert not stale.exists()
    # convert's destination: a killed convert's temp file goes when convert writes there again
    dest = tmp_path / "ldm"
    dest.mkdir()
    with writer_killed_mid_write(dest / "vae.safetensors"):
        (stale,) = dest.glob(".vae.safetensors.*.tmp")
        assert cli(["convert", str(run), str(dest / "vae.safetensors"), "--to", "ldm"]) == 0
        assert not stale.exists() and sorted(p.name for p in dest.iterdir()) == ["vae.safetensors"]
    # a writer still writing keeps its temp file
    from vaehelpers.rundir import remove_stale_temps

    with writer_killed_mid_write(dest / "other.safetensors", kill=False):
        (live,) = dest.glob(".other.safetensors.*.tmp")
        assert remove_stale_temps(dest) == [] and live.exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_convert_killed_mid_write_leaves_a_temp_file_the_next_convert_removes(tmp_path):
    source = tmp_path / "sd"
    AutoencoderKL.from_preset("sd").save(source)  # 335 MB: the write takes long enough to be caught in the act
    dest = tmp_path / "dest"
    process = subprocess.Popen(
        [sys.executable, "-m", "vaehelpers", "convert", str(source), str(dest), "--to", "vaehelpers"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(dest.glob(".model.safetensors.*.tmp")) and time.monotonic() < deadline:
            assert process.poll() is None, "convert ended before its temp file was seen"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    leftovers = [p.name for p in dest.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers and all(name.startswith(".model.safetensors.") for name in leftovers)  # ours, recognisable
    assert cli(["convert", str(source), str(dest), "--to", "vaehelpers"]) == 0
    assert sorted(p.name for p in dest.iterdir() if p.name != ".lock") == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------- 2. validate first, then act


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--image-size", "30"], "--image-size (setting data.image_size) = 30: must be a positive multiple of 8"),
        (["--lr", "-1"], "--lr (setting lr) = -1.0: must be positive"),
        (["--batch-size", "0"], "--batch-size (setting batch_size) = 0: must be at least 1"),
        (["--set", "loss.kl_weight=abc"], "setting 'loss.kl_weight': expected float, got 'abc'"),
        (["--set", "schedule=cosin"], "--set schedule = 'cosin': must be one of constant, cosine"),
        (["--max-steps", "-2"], "--max-steps (setting max_steps) = -2: must be 0 (no step limit) or positive"),
    ],
)
def test_invalid_settings_stop_before_the_run_directory_exists(images, tmp_path, capsys, flags, named):
    run = tmp_path / "run"
    argv = train_args(images, run)
    argv[argv.index("--image-size") : argv.index("--image-size") + 2] = ["--image-size", "16"]
    assert cli([*argv, *flags]) == 1
    assert one_error_line(capsys, "train").endswith(named)
    assert not run.exists()


@pytest.mark.parametrize("folder", ["missing", "empty", "no-images"])
def test_an_unusable_data_folder_stops_before_the_run_directory_exists(tmp_path, capsys, folder):
    data = tmp_path / folder
    if folder != "missing":
        data.mkdir()
    if folder == "no-images":
        (data / "notes.txt").write_text("not an image")
    run = tmp_path / "run"
    assert cli(train_args(data, run)) == 1
    line = one_error_line(capsys, "train")
    assert str(data) in line and ("does not exist" in line or "no image files" in line)
    assert not run.exists()


def test_one_image_folder_speaks_the_command_line(tmp_path, capsys):
    from vaehelpers.images import split_of

    data = tmp_path / "one"
    (path,) = make_synthetic(data, count=1, size=16)
    empty = "test" if split_of(path.relative_to(data)) == "train" else "train"
    model = tmp_path / "model"
    AutoencoderKL.from_preset("tiny").save(model)
    assert (
        cli(["evaluate", "--model", str(model), "--data", str(data), "--split", empty, "--no-lpips", "--no-fid"]) == 1
    )
    line = one_error_line(capsys, "evaluate")
    assert f"split {empty!r} of {data} is empty" in line and "use --split all" in line


def test_an_unexpected_error_prints_the_traceback_and_says_it_is_a_bug(monkeypatch, capsys):
    import vaehelpers.model as model_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(model_module, "describe", broken)
    assert cli(["info", "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: division by zero" in err
    assert err.strip().splitlines()[-1].startswith("vaehelpers info: unexpected error: this is a bug in vaehelpers")
    assert "open an issue" in err


# ----------------------------------------------------------------------------- full and read-only disks


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 1 MB tmpfs (a real full disk); skips, saying why, where this machine does not allow mounting one."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a 1 MB tmpfs here ({mounted.stderr.decode().strip()}): needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_convert_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, small_disk, capsys):
    model = tmp_path / "model"
    AutoencoderKL.from_preset("small").save(model)  # 20 MB: more than the disk holds
    assert cli(["convert", str(model), str(small_disk / "vae.safetensors"), "--to", "ldm"]) == 1
    line = one_error_line(capsys, "convert")
    assert f"could not write {small_disk / 'vae.safetensors'}: [Errno 28] No space left on device" in line
    assert list(small_disk.iterdir()) == []  # no temp file, no partial file


def test_train_onto_a_full_disk_is_one_line(images, small_disk, capsys):
    run = small_disk / "run"
    assert cli(train_args(images, run, "--preset", "small")) == 1  # its checkpoint cannot fit in 1 MB
    assert "no space left on device" in one_error_line(capsys, "train").lower()
    assert not [p for p in run.rglob("*.tmp")]


def test_convert_onto_a_read_only_disk_is_one_line(tmp_path, small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    model = tmp_path / "model"
    AutoencoderKL.from_preset("tiny").save(model)
    assert cli(["convert", str(model), str(small_disk / "vae.safetensors"), "--to", "ldm"]) == 1
    assert "Read-only file system" in one_error_line(capsys, "convert")


# ----------------------------------------------------------------------------- 3. nothing waits forever


@contextlib.contextmanager
def stalled_server(lifetime_s: float = 20.0) -> Iterator[str]:
    """http://127.0.0.1:PORT: accepts connections and never answers; closes them all after lifetime_s by itself."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()
    ends = time.monotonic() + lifetime_s

    def serve() -> None:
        while not stop.is_set() and time.monotonic() < ends:
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])
        for connection in accepted:
            connection.close()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.delenv(pretrained.WEIGHTS_ENV, raising=False)
    return home


def test_a_stalled_pretrained_download_times_out_and_leaves_no_partial_file(torch_home, monkeypatch, capsys):
    with stalled_server() as url:
        entry = pretrained.REGISTRY["inception"]
        monkeypatch.setitem(pretrained.REGISTRY, "inception", type(entry)(**{**entry.__dict__, "url": url + "/w.pth"}))
        monkeypatch.setattr(pretrained, "NETWORK_TIMEOUT_S", 1.0)  # the CLI's default, shortened for the test
        started = time.monotonic()
        assert cli(["weights", "download", "--only", "inception"]) == 1
        elapsed = time.monotonic() - started
    assert elapsed < 10, f"waited {elapsed:.0f} s on a connection that never answers"
    line = one_error_line(capsys, "weights")
    assert f"could not download {entry.file} from {url}/w.pth (TimeoutError: no answer within 1 s)" in line
    assert list((torch_home / "hub" / "checkpoints").iterdir()) == []  # no .partial left behind


def test_a_stalled_hub_snapshot_times_out(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with stalled_server() as url:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        monkeypatch.setattr(weights, "NETWORK_TIMEOUT_S", 1.0, raising=False)  # the default, shortened for the test
        started = time.monotonic()
        with pytest.raises(weights.HubDownloadError) as error:
            weights.download_from_hub("owner/stalled-vae")
        elapsed = time.monotonic() - started
    assert elapsed < 10, f"waited {elapsed:.0f} s on a connection that never answers"
    assert "could not download 'owner/stalled-vae'" in str(error.value) and "\n" not in str(error.value)


def test_a_corrupt_cached_file_is_found_by_status_replaced_by_download_and_named_by_train(
    torch_home, images, tmp_path, monkeypatch, capsys
):
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    good = b"the inception stand-in"
    entry = pretrained.REGISTRY["inception"]
    monkeypatch.setitem(
        pretrained.REGISTRY,
        "inception",
        type(entry)(**{**entry.__dict__, "sha256_prefix": hashlib.sha256(good).hexdigest()[:8]}),
    )
    (cache / entry.file).write_bytes(good[:5])  # truncated
    assert cli(["weights", "status", "--only", "inception"]) == 0
    out = capsys.readouterr().out
    assert "does not match its SHA-256" in out and "`vaehelpers weights download` replaces it" in out

    served = []

    class Response:
        def __init__(self, body: bytes) -> None:
            import email.message
            import io

            self.body, self.headers = io.BytesIO(body), email.message.Message()

        def info(self):
            return self.headers

        def read(self, size: int = -1) -> bytes:
            return self.body.read(size)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

    monkeypatch.setattr(torch.hub, "urlopen", lambda request, *a, **k: served.append(request) or Response(good))
    assert cli(["weights", "download", "--only", "inception"]) == 0
    assert "does not match its SHA-256 (corrupt or partial): downloading it again" in capsys.readouterr().out
    assert (cache / entry.file).read_bytes() == good and len(served) == 1

    # train names a cached file that does not load before the run directory exists
    vgg = cache / "vgg16-397923af.pth"
    vgg.write_bytes(b"PK\x03\x04 not really a checkpoint")
    run = tmp_path / "run"
    argv = train_args(images, run)
    argv[argv.index("--recipe") + 1] = "ldm"
    assert cli(argv) == 1
    line = one_error_line(capsys, "train")
    assert f"{vgg} does not load" in line and "vaehelpers weights download" in line
    assert not run.exists()


# ----------------------------------------------------------------------------- 4. clear answers


def test_compare_checks_out_first_and_exits_1_when_nothing_was_measured(images, tmp_path, capsys):
    model = tmp_path / "model"
    AutoencoderKL.from_preset("tiny").save(model)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    # --out is checked before anything is read: here the data folder is missing too, and --out is what is named
    assert cli(["compare", str(model), "--data", str(tmp_path / "missing"), "--out", str(a_file)]) == 1
    assert f"--out {a_file} is a file, not a folder" in one_error_line(capsys, "compare")
    # every model failed: no result, exit status 1 (not 3, "completed"), each failure named
    out = tmp_path / "out"
    argv = ["compare", str(tmp_path / "nothing-here"), "owner/../bad", "--data", str(images), "--out", str(out)]
    assert cli([*argv, "--split", "all", "--no-lpips", "--no-fid", "--device", "cpu", "--no-progress"]) == 1
    line = one_error_line(capsys, "compare")
    assert line.startswith("vaehelpers compare: error: no model could be measured: ")
    assert str(tmp_path / "nothing-here") in line and "owner/../bad" in line
