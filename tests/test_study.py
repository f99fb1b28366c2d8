"""The recipe study: equal budgets, held-out evaluation, one table, resumable."""

import json

import pytest

from vaehelpers.cli import main as cli
from vaehelpers.sources import make_synthetic


@pytest.mark.slow
def test_study_trains_each_candidate_on_the_same_budget_and_tables_them(tmp_path, capsys):
    make_synthetic(tmp_path / "train", count=12, size=16, seed=0)
    make_synthetic(tmp_path / "test", count=4, size=16, seed=1)
    args = [
        "study",
        "--train-data",
        str(tmp_path / "train"),
        "--test-data",
        str(tmp_path / "test"),
        "--out",
        str(tmp_path / "out"),
        "--candidates",
        "seed",
        "l1-const-clip",
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--perceptual-weight",
        "0",
        "--device",
        "cpu",
    ]
    assert cli(args) == 0
    table = (tmp_path / "out" / "study.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| seed", "| l1-const-clip"]
    assert "PSNR dB" in table[0]
    for name in ("seed", "l1-const-clip"):
        result = json.loads((tmp_path / "out" / name / "evaluation.json").read_text())
        assert result["images_seen"] == 8 and result["n_images"] == 4 and result["pixel_range"] == "[0,1]"
        assert (tmp_path / "out" / f"{name}_reconstructions.png").stat().st_size > 0
    capsys.readouterr()
    stamp = (tmp_path / "out" / "seed" / "evaluation.json").stat().st_mtime_ns
    assert cli(args) == 0  # finished candidates are kept, not retrained
    assert (tmp_path / "out" / "seed" / "evaluation.json").stat().st_mtime_ns == stamp
