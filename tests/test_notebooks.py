"""The notebook bundle: committed clean and paired with its Jupytext .py source, shaped as a story, with settings that resolve as documented,
and all five run headless with papermill at the smallest scale without a cell failing."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from vaehelpers import demo, kaggle, notebook
from vaehelpers.config import build_config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = list(demo.NOTEBOOKS)
COMMON = [
    "data_source",
    "data_dir",
    "run_dir",
    "figures_dir",
    "image_size",
    "preset",
    "recipe",
    "epochs",
    "device",
    "smoke",
]


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


def python_source(cell) -> str:
    """A code cell as plain Python: IPython magics (`%matplotlib inline`) become comments."""
    return "\n".join("#" + line if line.lstrip().startswith("%") else line for line in cell.source.splitlines())


def assigned_names(source: str) -> list[str]:
    return [target.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for target in node.targets]


def cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str, list[str]]]:
    """What a notebook says: (type, source, tags) per cell."""
    return [(cell.cell_type, cell.source, cell.metadata.get("tags", [])) for cell in notebook.cells]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_clean_and_paired_with_its_py(name):
    notebook = read(name)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: commit notebooks without outputs"
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent", f"{name}.ipynb is not paired"
    source = jupytext.read(ROOT / "notebooks" / f"{name}.py")
    assert source.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert cells(source) == cells(notebook), (
        f"{name}.ipynb and {name}.py differ: run `jupytext --sync notebooks/{name}.py` (or save it in Jupyter)"
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_is_the_tested_one_with_its_parameter(name):
    # the cell that installs the package on Kaggle is kaggle.INSTALL_CELL word for word (test_kaggle runs that
    # text), right after the parameters, which declare the vaehelpers_source it reads
    notebook = read(name)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells[1].source == kaggle.INSTALL_CELL, f"{name}: the install cell is not kaggle.INSTALL_CELL"
    assert "vaehelpers_source" in assigned_names(code_cells[0].source)
    assert sum(cell.source == kaggle.INSTALL_CELL for cell in code_cells) == 1


def test_sync_check_sees_an_edit(tmp_path):
    """An edit made on one side only is caught (the check above can fail)."""
    edited = jupytext.read(ROOT / "notebooks" / "01_data.py")
    edited.cells[-1].source += "\n- One more idea."
    assert cells(edited) != cells(read("01_data"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_tells_a_story(name):
    notebook = read(name)
    first = notebook.cells[1]  # after the title
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", [])
    assert assigned_names(first.source)[: len(COMMON)] == COMMON
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for cell in code_cells[1:]:
        if (
            cell.source == kaggle.INSTALL_CELL
        ):  # runs before the package can be imported: its text, tested in test_kaggle
            continue
        tree = ast.parse(python_source(cell))
        imports_only = all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body)
        assert imports_only or len(cell.source.splitlines()) <= 6, (
            f"{name}: a cell of more than ~5 lines:\n{cell.source}"
        )
        defined = [node for node in ast.walk(tree) if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.Lambda))]
        assert not defined, f"{name}: notebooks call the package; define nothing in them:\n{cell.source}"
    # a sentence of why before every code cell, "Step N" headings, and what to try next at the end
    for before, cell in zip(notebook.cells[1:], notebook.cells[2:]):
        if cell.cell_type == "code":
            assert before.cell_type == "markdown", f"{name}: say why before\n{cell.source}"
    headings = [
        cell.source for cell in notebook.cells if cell.cell_type == "markdown" and cell.source.startswith("## Step")
    ]
    assert len(headings) >= 4
    assert "Now it's your turn" in notebook.cells[-1].source


def test_settings_resolve_to_the_reference_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vaehelpers.kaggle.on_kaggle", lambda: False)
    settings = notebook.settings()
    assert (settings.data_source, settings.preset, settings.image_size, settings.epochs) == ("flickr8k", "sd", 128, 600)
    assert settings.max_minutes == 690.0 and settings.device == "auto" and not settings.smoke
    assert settings.data_dir == tmp_path / "data" / "flickr8k"
    assert settings.run_dir == tmp_path / "runs" / "flickr8k-sd-128"
    assert settings.figures_dir == settings.run_dir / "figures"
    assert "preset             sd" in str(settings)


def test_smoke_shrinks_everything_and_explicit_values_win(tmp_path):
    settings = notebook.settings(
        True, image_size=32, max_steps=3, data_dir=tmp_path / "images", run_dir=tmp_path / "run"
    )
    assert (settings.data_source, settings.preset, settings.device, settings.perceptual_weight) == (
        "synthetic",
        "tiny",
        "cpu",
        0.0,
    )
    assert settings.image_size == 32 and settings.max_steps == 3 and settings.smoke
    with pytest.raises(TypeError, match="unknown notebook parameter"):
        notebook.settings(True, imagesize=32)


def test_settings_make_data_and_a_train_config(tmp_path):
    settings = notebook.settings(
        True, image_size=32, synthetic_count=24, data_dir=tmp_path / "images", run_dir=tmp_path / "run"
    )
    assert len(list((settings.image_folder()).glob("*.png"))) == 24
    cfg = settings.train_config(max_steps=2)
    assert cfg.preset == "tiny" and cfg.data.image_size == 32 and cfg.data.data_dir == str(tmp_path / "images")
    assert (cfg.batch_size, cfg.lr, cfg.loss.perceptual_weight, cfg.max_steps) == (8, 1e-3, 0.0, 2)
    full = notebook.settings(False, data_source="folder", data_dir=tmp_path / "images", run_dir=tmp_path / "run")
    cfg = full.train_config()
    # the reference run trains the ldm recipe; None: the recipe's lr, 4.5e-6 x the batch of 16 (LDM's scale_lr)
    assert (cfg.recipe, cfg.batch_size, cfg.lr, cfg.epochs) == ("ldm", 16, build_config("sd", "ldm").lr, 600)
    assert cfg.lr == pytest.approx(4.5e-6 * 16) and cfg.loss.perceptual_weight == 1.0
    with pytest.raises(FileNotFoundError, match="set data_dir"):
        notebook.settings(data_source="folder", data_dir=tmp_path / "missing").image_folder()


def test_read_only_images_cache_in_the_workspace(tmp_path, monkeypatch):
    monkeypatch.setattr("vaehelpers.kaggle.on_kaggle", lambda: False)
    monkeypatch.chdir(tmp_path)
    settings = notebook.settings(True)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as /kaggle/input is
    assert settings.cache_dir(tmp_path) == tmp_path / "cache"


def test_notebook_kernel_runs_this_interpreter():
    from jupyter_client.kernelspec import KernelSpecManager

    name = demo.notebook_kernel()
    command = KernelSpecManager().get_kernel_spec(name).argv[0]
    assert command in ("python", "python3") or os.path.realpath(command) == os.path.realpath(sys.executable)


def test_a_shadowing_python3_kernel_gets_a_venv_kernel_instead(monkeypatch):
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

    installed = {}

    def get_kernel_spec(self, name):  # a user-level python3 spec that runs another interpreter
        if name == "python3":
            return KernelSpec(argv=["/opt/other/bin/python", "-m", "ipykernel_launcher"], language="python")
        if name in installed:
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher"], language="python")
        raise NoSuchKernel(name)

    def install(kernel_name, display_name, prefix):
        installed[kernel_name] = prefix

    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", get_kernel_spec)
    monkeypatch.setattr(ipykernel.kernelspec, "install", install)
    assert demo.notebook_kernel() == "vaehelpers" and installed == {"vaehelpers": sys.prefix}
    assert demo.notebook_kernel() == "vaehelpers" and len(installed) == 1  # idempotent


@pytest.mark.slow
def test_all_notebooks_run_headless(tmp_path):
    """`make demo` at its smallest: 32 px, 32 images, 3 training steps; any failing cell fails the test."""
    result = demo.run_demo(tmp_path, minutes=1.0, image_size=32, synthetic_count=32, max_steps=3)
    assert [path.stem for path in result["notebooks"]] == NOTEBOOKS
    for path in result["notebooks"]:
        notebook = nbformat.read(path, as_version=4)
        outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
        assert not [output for output in outputs if output.output_type == "error"]
        assert any("image/png" in output.get("data", {}) for output in outputs)
    for figure in ("sample_grid", "reconstructions", "latent_channels", "interpolation", "prior_samples", "loss_curve"):
        data = (tmp_path / "figures" / f"{figure}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text())["n_images"] == 3
