"""One training per run directory: a second `train` is refused in one line naming the holder; a killed holder
leaves no lock behind. Real processes, real OS locks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vaehelpers.runlock import LOCK_NAME, RunDirInUse, RunLock
from vaehelpers.sources import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_a_held_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with RunLock(tmp_path / "run"):
        holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunDirInUse) as refused:  # a second open file of the same path conflicts, even here
            RunLock(tmp_path / "run").acquire()
        assert f"pid {os.getpid()} on host {socket.gethostname()} since {holder['since']}" in str(refused.value)
    with RunLock(tmp_path / "run"):  # released on exit: it can be taken again
        pass


def train_command(images: Path, run: Path, max_steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vaehelpers",
        "train",
        "--data",
        str(images),
        "--run",
        str(run),
        "--preset",
        "tiny",
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--max-steps",
        str(max_steps),
        "--checkpoint-every",
        "1000",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--no-progress",
        "--resume",
        "--recipe",
        "pixel",
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_second_training_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    images, run = tmp_path / "images", tmp_path / "run"
    make_synthetic(images, count=24, size=16, seed=3)
    first = subprocess.Popen(
        train_command(images, run, 100_000), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=ENV
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and str(first.pid) not in _read(run / LOCK_NAME):
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(0.05)
        assert json.loads(_read(run / LOCK_NAME))["pid"] == first.pid  # the first run holds the directory

        second = subprocess.run(
            train_command(images, run, 2), capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120
        )
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"{run} is in use by another training (pid {first.pid} on host {socket.gethostname()} since" in lines[0]
        assert first.poll() is None  # the refused run did not disturb the first
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)

    # kill -9 gave the holder no chance to clean up: the lock file is still there, but the OS lock is gone
    assert json.loads(_read(run / LOCK_NAME))["pid"] == first.pid
    third = subprocess.run(
        train_command(images, run, 2), capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=180
    )
    assert third.returncode == 0, third.stderr
    assert "reached --max-steps 2" in third.stdout
    assert json.loads(_read(run / LOCK_NAME))["pid"] != first.pid  # the new run took it and wrote its own details
    with RunLock(run):  # and the finished run let it go
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
