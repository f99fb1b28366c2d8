"""Settings declared once: the train flags, the resumable set and the notebook parameters come from config.py's
fields; `train --resume` needs nothing but the run directory; each verb's defaults live in one place."""

import argparse
import csv
import dataclasses
import inspect
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vaehelpers import cli, notebook
from vaehelpers.config import (
    LossConfig,
    TrainConfig,
    flag_settings,
    notebook_settings,
    resumable_settings,
    setting,
)
from vaehelpers.rundir import CHECKPOINT, RunDir, load_checkpoint
from vaehelpers.sources import make_synthetic


def _subparser(parser: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[verb]


def _new_field_config() -> type:
    """A copy of TrainConfig with one new top-level field and one new nested (loss) field."""
    loss = dataclasses.make_dataclass(
        "LossWithTv",
        [("tv_weight", float, setting(0.0, help="total variation weight", flag=True, notebook=True))],
        bases=(LossConfig,),
    )
    return dataclasses.make_dataclass(
        "TrainWithWarmupImages",
        [
            ("warmup_images", int, setting(7, help="images of warm-up", flag=True, resumable=True, notebook=True)),
            ("loss", loss, dataclasses.field(default_factory=loss)),
        ],
        bases=(TrainConfig,),
    )


def test_a_new_field_appears_in_the_train_flags_the_resumable_set_and_the_notebook_settings():
    extended = _new_field_config()
    parser = argparse.ArgumentParser()
    cli.add_setting_flags(parser, extended)
    args = parser.parse_args(["--warmup-images", "9", "--tv-weight", "0.5"])
    assert (args.warmup_images, args.tv_weight) == (9, 0.5)
    assert parser.parse_args([]).warmup_images is None  # not given: the recipe's or the run's own value
    assert "images of warm-up" in parser.format_help() and "total variation weight" in parser.format_help()
    assert {s.key for s in flag_settings(extended)} - {s.key for s in flag_settings()} == {
        "warmup_images",
        "loss.tv_weight",
    }

    assert resumable_settings(extended) - resumable_settings() == {"warmup_images"}
    assert notebook_settings(extended)["warmup_images"] == "warmup_images"
    assert notebook_settings(extended)["tv_weight"] == "loss.tv_weight"
    given = notebook.settings(True, config_cls=extended, warmup_images=3)
    assert given.warmup_images == 3 and given.tv_weight is None  # None: the recipe's
    with pytest.raises(TypeError, match="warmup_images"):
        notebook.settings(True, warmup_images=3)  # the real TrainConfig has no such setting


def test_train_flags_resumable_set_and_notebook_settings_of_today():
    train = _subparser(cli.build_parser(), "train")
    flags = {option for action in train._actions for option in action.option_strings}
    for flag in (
        "--preset",
        "--recipe",
        "--image-size",
        "--epochs",
        "--max-steps",
        "--max-minutes",
        "--batch-size",
        "--lr",
        "--perceptual-weight",
        "--kl-weight",
        "--seed",
        "--device",
        "--precision",
        "--ema-decay",
        "--num-workers",
        "--checkpoint-every",
        "--reconstruction",
        "--init",
        "--freeze-encoder",
        "--compile",
        "--weights-dir",
        "--data",
        "--run",
        "--run-dir",
        "--resume",
        "--set",
    ):
        assert flag in flags, flag
    assert "image_every" not in resumable_settings() and not hasattr(TrainConfig(), "image_every")
    assert {"epochs", "max_steps", "device", "precision", "data.data_dir", "model.scaling_factor"} <= (
        resumable_settings()
    )
    assert not {"lr", "preset", "recipe", "batch_size", "loss.kl_weight"} & resumable_settings()
    assert set(notebook_settings()) == {
        "image_size",
        "preset",
        "recipe",
        "epochs",
        "device",
        "max_minutes",
        "max_steps",
        "batch_size",
        "lr",
        "perceptual_weight",
    }
    help_text = " ".join(train.format_help().split())
    assert "--max-steps MAX_STEPS stop after this many optimiser steps (0: no limit)" in help_text


# Flags whose default the handler itself owns (no called function declares it): the rest default to None.
CLI_OWNED_DEFAULTS = {
    ("info", "preset"),
    ("evaluate", "split"),
    ("scale", "split"),
    ("scale", "max_images"),
    ("scale", "latents"),
    ("scale", "seed"),
    ("demo", "out"),
    ("kaggle push", "root"),
}


def _verbs(parser: argparse.ArgumentParser, path: str = ""):
    """(verb path, parser) of every verb and sub-verb ("weights status")."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{path} {name}".strip(), sub
                yield from _verbs(sub, f"{path} {name}")


def test_verbs_leave_defaults_to_the_functions_they_call():
    parser = cli.build_parser()
    checked = 0
    for verb, sub in _verbs(parser):
        for action in sub._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
                continue
            checked += 1
            if (verb, action.dest) not in CLI_OWNED_DEFAULTS and action.dest != "set":
                assert action.default is None, f"{verb} --{action.dest} defaults to {action.default!r}"
    assert checked > 80
    study = _subparser(parser, "study").parse_args(["--train-data", "a", "--test-data", "b", "--out", "c"])
    assert study.device is None  # run_study's default decides: auto, as it always did on the command line
    from vaehelpers.compare import compare
    from vaehelpers.study import run_study

    assert inspect.signature(run_study).parameters["device"].default == "auto"
    assert inspect.signature(compare).parameters["device"].default == "auto"


def test_checkpoint_holds_exactly_the_named_keys(tmp_path):
    from vaehelpers.config import build_config
    from vaehelpers.train import train

    images = tmp_path / "images"
    make_synthetic(images, count=12, size=16, seed=0)
    run = tmp_path / "run"
    cfg = build_config(
        "tiny",
        "pixel",
        device="cpu",
        batch_size=4,
        max_steps=1,
        run_dir=str(run),
        **{"data.data_dir": str(images), "data.image_size": 16, "data.cache": False},
    )
    train(cfg, progress=False)
    state = load_checkpoint(RunDir(run).checkpoint)
    assert set(state) == set(dataclasses.astuple(CHECKPOINT))
    assert state[CHECKPOINT.step] == 1 and state[CHECKPOINT.config]["run_dir"] == str(run)


# ------------------------------------------------------------------------------------------- resume from the run


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(RunDir(run).weights)


@pytest.mark.slow
def test_resume_needs_only_the_run_directory(tmp_path, capsys):
    """The done-when of issue 21: a run started with --preset small --image-size 64 --recipe pixel, stopped after
    2 of 4 steps, continued with `train --run R --resume` alone, ends on the exact weights of an unbroken run."""
    from vaehelpers.train import train

    images = tmp_path / "images"
    make_synthetic(images, count=12, size=64, seed=3)
    start = ["train", "--data", str(images), "--preset", "small", "--image-size", "64", "--recipe", "pixel"]
    start += ["--batch-size", "4", "--max-steps", "4", "--device", "cpu", "--no-progress"]
    assert cli.main([*start, "--run", str(tmp_path / "unbroken")]) == 0

    broken = tmp_path / "broken"
    cfg = cli.train_config_from_args(cli.build_parser().parse_args([*start, "--run", str(broken)]))
    assert train(cfg, until_step=2, progress=False).step == 2  # as a session that ran out of time would stop
    assert cli.main(["train", "--run", str(broken), "--resume", "--no-progress"]) == 0

    assert load_checkpoint(RunDir(broken).checkpoint)[CHECKPOINT.step] == 4
    unbroken, resumed = _weights(tmp_path / "unbroken"), _weights(broken)
    assert set(unbroken) == set(resumed)
    assert all(torch.equal(unbroken[key], resumed[key]) for key in unbroken)
    saved = json.loads(RunDir(broken).config.read_text())
    assert (saved["preset"], saved["recipe"], saved["data"]["image_size"]) == ("small", "pixel", 64)


@pytest.fixture
def stopped_run(tmp_path) -> Path:
    """A tiny run of 3 steps stopped after 1 (its data folder beside it)."""
    from vaehelpers.train import train

    images = tmp_path / "images"
    make_synthetic(images, count=12, size=16, seed=0)
    run = tmp_path / "run"
    args = ["train", "--data", str(images), "--run", str(run), "--preset", "tiny", "--image-size", "16"]
    args += ["--recipe", "pixel", "--batch-size", "4", "--max-steps", "3", "--device", "cpu", "--no-progress"]
    train(cli.train_config_from_args(cli.build_parser().parse_args(args)), until_step=1, progress=False)
    return run


def test_resume_refuses_a_changed_setting_by_its_flag_and_allows_a_resumable_one(stopped_run, capsys):
    assert cli.main(["train", "--run", str(stopped_run), "--resume", "--lr", "0.5", "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert "--lr: saved 0.002 vs now 0.5" in error and len(error.strip().splitlines()) == 1
    assert cli.main(["train", "--run", str(stopped_run), "--resume", "--preset", "small"]) == 1
    assert "--preset: saved 'tiny' vs now 'small'" in capsys.readouterr().err
    args = ["train", "--run", str(stopped_run), "--resume", "--recipe", "default", "--max-steps", "2"]
    assert cli.main([*args, "--no-progress"]) == 0
    assert "deprecated" in capsys.readouterr().err  # the old name of pixel: the same run
    assert cli.main(["train", "--run", str(stopped_run), "--resume", "--set", "loss.disc_weight=0.5"]) == 1
    assert "loss.disc_weight: saved 0.0 vs now 0.5" in capsys.readouterr().err
    assert load_checkpoint(RunDir(stopped_run).checkpoint)[CHECKPOINT.step] == 2
    assert cli.main(["train", "--run-dir", str(stopped_run), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    assert load_checkpoint(RunDir(stopped_run).checkpoint)[CHECKPOINT.step] == 4
    assert json.loads(RunDir(stopped_run).config.read_text())["max_steps"] == 4


def test_resume_with_the_data_folder_gone_says_which_folder(stopped_run, capsys):
    images = stopped_run.parent / "images"
    images.rename(stopped_run.parent / "moved")
    assert cli.main(["train", "--run", str(stopped_run), "--resume", "--no-progress"]) == 1
    error = capsys.readouterr().err.strip()
    assert str(images) in error and len(error.splitlines()) == 1 and "Traceback" not in error
    # --data says where the images are now (a location: it may change on resume)
    args = ["train", "--run", str(stopped_run), "--resume", "--data", str(stopped_run.parent / "moved")]
    assert cli.main([*args, "--no-progress"]) == 0


def test_a_new_run_without_data_is_one_line(tmp_path, capsys):
    assert cli.main(["train", "--run", str(tmp_path / "new"), "--resume"]) == 1
    error = capsys.readouterr().err.strip()
    assert "--data is required" in error and len(error.splitlines()) == 1


def test_an_old_run_directory_resumes_from_itself(stopped_run):
    """config.json as versions before this change wrote it: the deprecated recipe name `default`, the retired
    field image_every, and without a field added since (tf32 here) -- it resumes all the same."""
    path = RunDir(stopped_run).config
    saved = json.loads(path.read_text())
    saved.update(recipe="default", image_every=0)
    del saved["tf32"]
    path.write_text(json.dumps(saved, indent=2))
    assert cli.main(["train", "--run", str(stopped_run), "--resume", "--no-progress"]) == 0
    assert load_checkpoint(RunDir(stopped_run).checkpoint)[CHECKPOINT.step] == 3
    rewritten = json.loads(path.read_text())
    assert rewritten["recipe"] == "pixel" and "image_every" not in rewritten and rewritten["tf32"] is True


def test_launch_resumes_a_run_directory_with_its_own_settings(stopped_run):
    from vaehelpers.launch import launch

    with pytest.raises(ValueError, match="resume=True"):
        launch(str(stopped_run), nproc=1)
    result = launch(str(stopped_run), nproc=1, resume=True, progress=False)
    assert result.step == 3 and load_checkpoint(RunDir(stopped_run).checkpoint)[CHECKPOINT.step] == 3


# ------------------------------------------------------------------------------------------ read-only data folders


def test_evaluate_writes_no_cache_into_a_read_only_folder_even_as_root(tmp_path, monkeypatch, capsys):
    """os.access says yes to root for a chmod a-w folder; the write bits decide (here os.access is made to
    answer as it does for root, so the test means the same for any user)."""
    from vaehelpers import dataset
    from vaehelpers.model import AutoencoderKL
    from vaehelpers.weights import export

    images = tmp_path / "images"
    make_synthetic(images, count=8, size=16, seed=0)
    export(AutoencoderKL.from_preset("tiny"), tmp_path / "model", "vaehelpers", sample_size=16)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(dataset.os, "access", lambda path, mode: True)  # what root is told
    images.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        args = [
            "--data",
            str(images),
            "--split",
            "all",
            "--image-size",
            "16",
            "--device",
            "cpu",
            "--no-lpips",
            "--no-fid",
        ]
        args.append("--no-progress")
        assert cli.main(["evaluate", "--model", str(tmp_path / "model"), *args]) == 0
        assert cli.main(["compare", str(tmp_path / "model"), "--out", str(tmp_path / "cmp"), *args]) == 0
        assert not (images / dataset.CACHE_DIRNAME).exists()
        assert list((tmp_path / "xdg" / "vaehelpers").glob("images-all-16-crop-*"))  # the cache went to the user cache
    finally:
        images.chmod(0o755)
    assert dataset.is_writable(images) and not dataset.is_writable(tmp_path / "missing")


@pytest.mark.slow
def test_torchrun_resumes_from_the_run_directory_alone(tmp_path):
    """Two processes under torchrun, then `torchrun ... train --run-dir R --resume --max-steps 3` alone."""
    images = tmp_path / "images"
    make_synthetic(images, count=24, size=16, seed=0)
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    torchrun += ["-m", "vaehelpers", "--", "train", "--run-dir", str(run), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAEHELPERS_DIST_TIMEOUT": "30"}
    root = Path(__file__).resolve().parents[1]
    first = ["--data", str(images), "--preset", "tiny", "--image-size", "16", "--recipe", "pixel"]
    first += ["--batch-size", "4", "--device", "cpu", "--max-steps", "2", "--set", "data.cache=false"]
    for extra in (first, ["--resume", "--max-steps", "3"]):
        done = subprocess.run([*torchrun, *extra], cwd=root, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(run / "log.csv", newline="") as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == ["1", "2", "3"]
    saved = json.loads(RunDir(run).config.read_text())
    assert (saved["preset"], saved["batch_size"], saved["data"]["cache"], saved["max_steps"]) == ("tiny", 4, False, 3)
