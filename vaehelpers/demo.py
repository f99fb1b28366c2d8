"""`make demo`: the five notebooks run in order with papermill at smoke scale (synthetic images, tiny model, CPU).

`run_demo` writes the executed copies and their figures under one folder; the settings come from config.py's
smoke run through notebook.py, as when a user runs a notebook with smoke=True.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vaehelpers.config import DEMO_MINUTES, SMOKE_RUN

NOTEBOOKS = ("01_data", "02_architecture", "03_loss", "04_training", "05_evaluation")
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"  # the repository's notebooks/

# ----------------------------------------------------------------------------- running the notebooks


def notebook_kernel() -> str:
    """A Jupyter kernel that runs this interpreter (so the notebooks see this environment's vaehelpers).

    "python3" when it resolves here: jupyter_client runs a kernelspec whose command is plain `python` with
    the current interpreter, and the venv's own spec says just that. Else (a user-level python3 spec pointing
    at another Python shadows it) a spec named "vaehelpers" is installed into this environment's prefix, once.
    """
    import sys

    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()

    def runs_here(name: str) -> bool:
        try:
            command = manager.get_kernel_spec(name).argv[0]
        except NoSuchKernel:
            return False
        plain = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
        return command in plain or os.path.realpath(command) == os.path.realpath(sys.executable)

    if runs_here("python3"):
        return "python3"
    if not runs_here("vaehelpers"):
        from ipykernel.kernelspec import install

        install(kernel_name="vaehelpers", display_name="Python (vaehelpers)", prefix=sys.prefix)
    return "vaehelpers"


def run_demo(
    out: str | Path,
    minutes: float = DEMO_MINUTES,
    *,
    image_size: int = SMOKE_RUN["image_size"],
    synthetic_count: int = SMOKE_RUN["synthetic_count"],
    max_steps: int = 0,
    notebooks: Sequence[str] = NOTEBOOKS,
    fresh: bool = True,
    log_output: bool = False,
) -> dict[str, Any]:
    """Run the notebooks in order with papermill at smoke scale (synthetic images, tiny model, CPU).

    Writes under out/: data/ (the synthetic images), run/ (the training run), figures/ (sample grid,
    reconstructions, latent channels, ...) and notebooks/ (the executed copies). minutes: the training
    budget; max_steps > 0 stops training sooner (the tests use a few steps). fresh: start the run again
    (the images are kept). A failing cell raises papermill's PapermillExecutionError naming it.
    Returns {"notebooks": [...], "figures": [...], "seconds": {name: s}}.
    """
    import shutil

    import papermill

    out = Path(out).resolve()
    if fresh:
        for folder in ("run", "figures", "notebooks"):
            shutil.rmtree(out / folder, ignore_errors=True)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    parameters = {
        "smoke": True,
        "interactive": False,
        "data_dir": str(out / "data"),
        "run_dir": str(out / "run"),
        "figures_dir": str(out / "figures"),
        "image_size": image_size,
        "synthetic_count": synthetic_count,
        "max_minutes": float(minutes),
        "max_steps": int(max_steps),
        "plot_every": 25,
    }
    kernel = notebook_kernel()
    executed, seconds = [], {}
    for name in notebooks:
        source = NOTEBOOK_DIR / f"{name}.ipynb"
        declared = papermill.inspect_notebook(str(source))  # pass each notebook only what it declares
        started = time.perf_counter()
        papermill.execute_notebook(
            str(source),
            str(out / "notebooks" / f"{name}.ipynb"),
            kernel_name=kernel,
            cwd=str(NOTEBOOK_DIR),
            parameters={key: value for key, value in parameters.items() if key in declared},
            progress_bar=False,
            log_output=log_output,
        )
        seconds[name] = round(time.perf_counter() - started, 1)
        executed.append(out / "notebooks" / f"{name}.ipynb")
        print(f"ran {name} in {seconds[name]:.1f} s -> {executed[-1]}", flush=True)
    figures = sorted((out / "figures").glob("*.png"))
    print(f"figures: {', '.join(str(path) for path in figures)}")
    return {"notebooks": executed, "figures": figures, "seconds": seconds}
