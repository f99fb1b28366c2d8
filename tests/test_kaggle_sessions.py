"""The notebooks run as on Kaggle, against a fake /kaggle under tmp: a read-only input (the images, and from the
second session on the output of the version before, as `kaggle push` attaches it) that must stay byte-for-byte
unchanged, and a fresh working folder per session whose files are that version's output. Papermill, at smoke
scale (a tiny model on the CPU, seconds of training per session)."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import nbformat
import pytest

from vaehelpers import demo, kaggle, sources
from vaehelpers.rundir import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RUN = "folder-tiny-32"  # <workspace>/runs/<data_source>-<preset>-<image_size>: the notebooks' default run_dir
OUTPUT = Path("notebooks") / "bob" / kaggle.TRAINING_SLUG  # where Kaggle mounts 04's output as an input

# The failure of session 2: the optimiser runs out of memory at its first step, as a GPU would (the one fake here,
# at the outermost boundary: imported into the notebook's kernel by Python itself, through PYTHONPATH).
OUT_OF_MEMORY = """\
import torch

calls = []
for optimizer in (torch.optim.Adam, torch.optim.AdamW):
    def step(self, *args, _step=optimizer.step, **kwargs):
        calls.append(1)
        if len(calls) >= 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return _step(self, *args, **kwargs)
    optimizer.step = step
"""


def tree_digest(folder: Path) -> str:
    """A hash of every file's path and bytes under folder."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


class FakeKaggle:
    """/kaggle/input and a /kaggle/working per session, named by the environment variables the package reads."""

    def __init__(self, root: Path, monkeypatch):
        self.root, self.monkeypatch = root, monkeypatch
        self.input = root / "input"
        self.images = self.input / "datasets" / "bob" / "photos"
        sources.make_synthetic(self.images, count=24, size=40, seed=0)
        monkeypatch.setenv(kaggle.INPUT_ENV, str(self.input))
        monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout's vaehelpers
        self.kernel = demo.notebook_kernel()

    def session(self, name: str, number: int, inject: str | None = None, **parameters) -> tuple[Path, list]:
        """Run one notebook as a committed version: returns its working folder (the output) and its code cells."""
        import papermill

        working = self.root / f"working-{name}-{number}"
        working.mkdir()
        self.monkeypatch.setenv(kaggle.WORKING_ENV, str(working))
        if inject:
            folder = self.root / f"inject-{number}"
            folder.mkdir()
            (folder / "sitecustomize.py").write_text(inject)
            self.monkeypatch.setenv("PYTHONPATH", f"{folder}:{ROOT}")
        source = ROOT / "notebooks" / f"{name}.ipynb"
        declared = papermill.inspect_notebook(str(source))
        settings = {
            "smoke": True,
            "interactive": False,
            "data_source": "folder",
            "data_dir": str(self.images),
            "image_size": 32,
            **parameters,
        }
        before = tree_digest(self.input)
        executed = self.root / f"{name}-{number}.ipynb"
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters={key: value for key, value in settings.items() if key in declared},
            kernel_name=self.kernel,
            cwd=str(working),
            progress_bar=False,
        )
        assert tree_digest(self.input) == before, f"{name} session {number} wrote into /kaggle/input"
        self.monkeypatch.setenv("PYTHONPATH", str(ROOT))
        cells = [cell for cell in nbformat.read(executed, as_version=4).cells if cell.cell_type == "code"]
        return working, cells

    def attach(self, output: Path) -> None:
        """Attach a version's output as 04's own input (Kaggle mounts one version of it; read-only)."""
        shutil.rmtree(self.input / OUTPUT, ignore_errors=True)
        shutil.copytree(output, self.input / OUTPUT)


def text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.get("output_type") == "stream")


def log_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "log.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_notebooks_run_as_a_chain_of_kaggle_sessions(tmp_path, monkeypatch):
    fake = FakeKaggle(tmp_path / "kaggle", monkeypatch)

    # 01: the data, its image cache built in the working folder (the images are read-only)
    working, _ = fake.session("01_data", 1)
    assert (working / "cache").is_dir()

    # 04, session 1: stopped by the time limit, with a checkpoint in its output
    first, cells = fake.session("04_training", 1, max_minutes=0.1)
    assert "starts fresh" in "".join(map(text, cells))
    step_1 = load_checkpoint(first / "runs" / RUN / "checkpoints" / "last.pt")["step"]
    assert step_1 > 0 and "stopped='time_limit'" in text(cells[-1])

    # 04, session 2, on session 1's output: out of memory at its first step; the version still ends cleanly with
    # the failure as its last output, and its output keeps the run (session 1's checkpoint: none newer was made)
    fake.attach(first)
    second, cells = fake.session("04_training", 2, inject=OUT_OF_MEMORY, max_minutes=5.0)
    last = text(cells[-1])
    assert last.startswith("training failed in this session: OutOfMemoryError: CUDA out of memory") and (
        "the last good checkpoint" in last
    )
    kept = load_checkpoint(second / "runs" / RUN / "checkpoints" / "last.pt")
    assert kept["step"] == step_1
    assert (second / "cache").is_dir()  # the image cache came along from session 1 and goes on with the output

    # 04, session 3, on session 2's output (the newest holding a checkpoint): resumes from step_1, never from 0
    fake.attach(second)
    third, cells = fake.session("04_training", 3, max_minutes=5.0, max_steps=step_1 + 2)
    out = "".join(map(text, cells))
    assert f"copied the attached run {fake.input / OUTPUT / 'runs' / RUN}" in out and "its image cache" in out
    assert f"step {step_1}, epoch" in out  # where the run stands, printed before training
    step_3 = load_checkpoint(third / "runs" / RUN / "checkpoints" / "last.pt")["step"]
    rows = log_rows(third / "runs" / RUN)
    assert step_3 == step_1 + 2 and [int(row["step"]) for row in rows] == list(range(1, step_3 + 1))
    assert rows[:step_1] == log_rows(first / "runs" / RUN)[:step_1]  # session 1's steps, continued, not redone

    # 05 on session 3's output
    fake.attach(third)
    evaluation, cells = fake.session("05_evaluation", 1)
    assert "copied the attached run" in "".join(map(text, cells))
    assert (evaluation / "runs" / RUN / "evaluation.json").is_file()
