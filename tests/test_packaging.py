"""The install files agree: environment.yml, pyproject.toml, constraints, Makefile and .ci/run."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pip_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict))
    constraints = [
        line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert set(constraints) <= set(pip_section)  # the same torch pair as `make setup`
    assert any(re.fullmatch(r"-e \.\[.*notebooks.*\]", item) for item in pip_section)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "notebooks" in extras
    # kaggle push needs 2.2.5: the version to pin from dataset_status(format=...) (2.1.1 on), and, new in 2.2.5, a
    # kernel version's output listed by number (before, the number was ignored) and kernels_push(no_run=True)
    assert "kaggle>=2.2.5" in pip_section
    assert "kaggle>=2.2.5" in extras["kaggle"] and "kaggle>=2.2.5" in extras["notebooks"]


def test_setup_pins_the_torch_pair_everywhere():
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0 torchvision==0.28.0" in makefile
    # every pip install after the pair goes through the constraints file, so nothing pulls another torch
    installs = [line for line in makefile.splitlines() if "$(PIP) install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_console_script_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["vaehelpers"] == "vaehelpers.cli:main"
