"""Shared test fixtures: the real photos in ../shared/datasets/bsds500 (skipped where absent)."""
from pathlib import Path

import pytest

BSDS500 = (Path(__file__).parents[1] / "../shared/datasets/bsds500").resolve()


@pytest.fixture(scope="session")
def bsds500() -> Path:
    """The BSDS500 folder (train/ 200, val/ 100, test/ 200 JPEGs, 481x321 or 321x481); skips when absent."""
    if not BSDS500.is_dir():
        pytest.skip(f"BSDS500 photos not found at {BSDS500} (see ../shared/README.md)")
    return BSDS500
