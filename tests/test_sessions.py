"""sessions.py: the plan of a run across Kaggle sessions, where it stands, and a session that fails cleanly."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vaehelpers import sessions, sources
from vaehelpers.config import build_config


def test_the_reference_plan_in_sessions_and_quota_weeks():
    # 7282 training images x 600 epochs at 40 images/s: 30.3 h of training, 3 sessions of 11.5 h (690 minutes)
    plan = sessions.plan(7282, 600, 40.0, 690.0)
    assert plan.training_hours == pytest.approx(7282 * 600 / 40 / 3600)
    assert plan.sessions == 3 and plan.session_hours == 11.5
    assert plan.quota_hours == pytest.approx(plan.training_hours + 3 * sessions.SETUP_HOURS)
    assert plan.weeks == 2  # 31.1 GPU hours: over one week's 30
    assert str(plan).startswith("at 40.0 images/s the run trains for 30.3 h: 3 session(s) of up to 11.5 h")
    assert sessions.plan(7282, 600, 400.0, 690.0).sessions == 1  # 3 h: one session, one week
    assert sessions.plan(7282, 600, 40.0, 0.0).session_hours == 12.0  # no limit of its own: Kaggle's
    with pytest.raises(ValueError, match="images_per_s must be positive, not 0.0"):
        sessions.plan(7282, 600, 0.0, 690.0)


def write_log(path: Path, rows: list[tuple[int, float, float]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "epoch", "lr", "images_per_s"])
        writer.writerows((step, epoch, 1e-4, speed) for step, epoch, speed in rows)
    return path


def test_standing_says_where_the_run_is_and_what_is_left(tmp_path):
    assert sessions.standing(tmp_path / "log.csv", 600, 7282, 690) == "the run has not started: 600 epochs ahead"
    log = write_log(tmp_path / "log.csv", [(1, 0.0, 10.0), (2, 0.5, 36.0), (45510, 150.0, 40.0)])
    line = sessions.standing(log, 600, 7282, 690)
    # 450 epochs left at the median 36 images/s: 7282 * 450 / 36 / 3600 = 25.3 h, 3 sessions of 11.5 h
    assert line == "step 45510, epoch 150.00 of 600 (25%); 25.3 h of training left, 3 session(s) at 36.0 images/s"
    write_log(log, [(182050, 600.0, 40.0)])
    assert sessions.standing(log, 600, 7282, 690).endswith("the run has finished")


def test_train_images_counts_the_training_split(tmp_path):
    sources.make_synthetic(tmp_path / "images", count=40, size=16, seed=0)
    count = sessions.train_images(tmp_path / "images")
    assert 30 <= count < 40  # about 10% are held out, by a stable hash of each path


def test_doctor_throughput_scales_with_the_processes():
    report = SimpleNamespace(facts={"speed": {"train_step": {"images_per_s": 21.5}}})
    assert sessions.doctor_images_per_s(report, 2) == 43.0 and sessions.doctor_images_per_s(report, 0) == 21.5


def test_a_failed_session_is_returned_and_printed_not_raised(tmp_path, monkeypatch, capsys):
    sources.make_synthetic(tmp_path / "images", count=12, size=16, seed=0)
    cfg = build_config(
        "tiny",
        "pixel",
        run_dir=str(tmp_path / "run"),
        device="cpu",
        max_steps=2,
        **{"data.data_dir": str(tmp_path / "images"), "data.image_size": 16, "batch_size": 4},
    )
    steps = []

    def out_of_memory(self, *args, _step=torch.optim.AdamW.step, **kwargs):  # as a GPU would, at the 2nd step
        steps.append(1)
        if len(steps) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return _step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", out_of_memory)
    monkeypatch.setattr(torch.optim.Adam, "step", out_of_memory)
    failure = sessions.guarded_launch(cfg, 1, resume=True, progress=False)
    assert isinstance(failure, sessions.SessionFailure) and isinstance(failure.error, torch.OutOfMemoryError)
    assert "Traceback" in capsys.readouterr().err
    message = str(failure)
    assert message.startswith("training failed in this session: OutOfMemoryError: CUDA out of memory (test).")
    assert "no checkpoint was written" in message and "batch_size" in message and "--" not in message

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vaehelpers.launch.launch", stopped)
    with pytest.raises(KeyboardInterrupt):  # the stop button still stops
        sessions.guarded_launch(cfg, 1)


def test_a_notebook_error_names_the_parameter_not_the_flag(tmp_path, monkeypatch):
    from vaehelpers import notebook, pretrained
    from vaehelpers.train import check_pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # no VGG16 anywhere
    monkeypatch.delenv(pretrained.WEIGHTS_ENV, raising=False)
    cfg = build_config("tiny", "ldm", run_dir=str(tmp_path / "run"))
    with pytest.raises(pretrained.MissingWeightsError) as raw:
        check_pretrained(cfg)
    assert "--recipe pixel" in str(raw.value) and "--weights-dir" in str(raw.value)  # the CLI's words
    with pytest.raises(pretrained.MissingWeightsError) as missing, notebook.parameter_errors():
        check_pretrained(cfg)
    message = str(missing.value)
    assert 'set os.environ["VAEHELPERS_WEIGHTS"] = DIR' in message and 'set recipe="pixel"' in message
    assert "`vaehelpers weights download`" in message  # a command to run stays as it is
    assert "--" not in message.replace("`vaehelpers weights download`", "")
    assert notebook.in_parameters("out of memory at --batch-size 16: rerun with --batch-size 8; lower --lr") == (
        "out of memory at batch_size=16: rerun with batch_size=8; lower lr"
    )
    with pytest.raises(KeyError, match="plain"), notebook.parameter_errors():  # nothing to rewrite: as it was
        raise KeyError("plain")
