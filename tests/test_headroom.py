"""The fp16 headroom guard (headroom.py), proven on CPU (torch's CPU autocast runs float16): a forward that overflows
fp16 moves the block where it started to fp32 and the step is redone (finite losses, nothing skipped), the fp32 blocks
survive a resume bit-exactly, and a healthy model never moves a block."""

import math
from pathlib import Path

import pytest
import torch
from conftest import fp16_config

from vaehelpers.headroom import FP16_MAX, HeadroomGuard, format_table, measure, named_blocks
from vaehelpers.model import AutoencoderKL
from vaehelpers.rundir import load_checkpoint
from vaehelpers.sources import make_synthetic
from vaehelpers.train import train

HOT_BLOCK = "decoder.up_blocks.1"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic(folder, count=24, size=16, seed=1)
    return folder


def hot_model() -> AutoencoderKL:
    """The tiny model with one decoder ResNet's first conv x1e6: its activations reach about 1e6, past fp16's 65504,
    inside decoder.up_blocks.1 only (the GroupNorm after it scales them back), as the SDXL VAE's do at 3e5."""
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny")
    with torch.no_grad():
        conv = model.decoder.up_blocks[1].resnets[0].conv1
        conv.weight.mul_(1e6)
        conv.bias.mul_(1e6)
    return model


def losses(run: Path) -> list[float]:
    lines = (run / "log.csv").read_text().splitlines()
    column = lines[0].split(",").index("train/total_loss")
    return [float(line.split(",")[column]) for line in lines[1:]]


def test_measure_finds_the_block_that_overflows_and_fp32_there_cures_it():
    model, images = hot_model(), torch.rand(2, 3, 16, 16) * 2 - 1
    rows = {row.name: row for row in measure(model, images, "fp16")}
    assert list(rows) == [name for name, _ in named_blocks(model)]
    assert not math.isfinite(rows[HOT_BLOCK].peak)  # the overflow, and every block after it sees its NaN
    assert all(math.isfinite(rows[name].peak) for name in list(rows)[: list(rows).index(HOT_BLOCK)])
    guard = HeadroomGuard(model, every=0)
    peaks, inputs = [row.peak for row in rows.values()], [1.0] * len(rows)
    inputs[list(rows).index(HOT_BLOCK) + 1 :] = [math.nan] * (len(rows) - list(rows).index(HOT_BLOCK) - 1)
    assert guard.to_upcast(peaks, inputs) == [HOT_BLOCK]  # not the blocks that only received its NaN
    assert guard.set_fp32([HOT_BLOCK]) == [HOT_BLOCK] and guard.set_fp32([HOT_BLOCK]) == []
    cured = {row.name: row for row in measure(model, images, "fp16", guard)}
    assert all(math.isfinite(row.peak) for row in cured.values())
    assert cured[HOT_BLOCK].fp32 and cured[HOT_BLOCK].peak > FP16_MAX  # ~1e6, fine in fp32
    assert "above fp16's range" in format_table(list(cured.values()), "fp16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert torch.isfinite(model(images)[0]).all()
    # non-finite images are not a block's fault: nothing to move, the step is skipped as before
    assert guard.to_upcast([math.inf] * len(rows), [math.inf] * len(rows)) == []


@pytest.mark.slow
def test_an_fp16_overflow_moves_its_block_to_fp32_redoes_the_step_and_resumes_exactly(images, tmp_path, capsys):
    init = tmp_path / "init"
    hot_model().save(init)
    # headroom_every=0: no measurement, so the overflow itself (a non-finite loss) must be caught; split at step 3
    extra = {"max_steps": 6, "init_from": str(init), "headroom_every": 0, "ema_decay": 0.9}
    straight = train(fp16_config(images, tmp_path / "a", **extra), progress=False)
    printed = capsys.readouterr().out
    assert "step 0: the fp16 forward overflowed; now in fp32: decoder.up_blocks.1; redone" in printed
    assert straight.fp32_blocks == (HOT_BLOCK,) and straight.bad_steps == 0 and straight.scaler_skipped == 0
    assert len(losses(tmp_path / "a")) == 6 and all(math.isfinite(x) for x in losses(tmp_path / "a"))

    first = train(fp16_config(images, tmp_path / "b", **extra), until_step=3, progress=False)
    saved = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert first.step == 3 and saved["guard"]["fp32"] == [HOT_BLOCK]
    capsys.readouterr()
    second = train(fp16_config(images, tmp_path / "b", **extra), resume=True, progress=False)
    assert "overflowed" not in capsys.readouterr().out  # restored from the checkpoint, not found again
    assert second.step == 6 and second.fp32_blocks == (HOT_BLOCK,) and second.bad_steps == 0
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("a", "b"))
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]):
        assert torch.equal(x, y)
    assert a["guard"] == b["guard"] and a["scaler"] == b["scaler"]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.slow
def test_a_mid_run_overflow_is_redone_and_the_switch_survives_a_resume_bit_exactly(images, tmp_path, capsys):
    # images x1e6 at step 2 overflow the encoder's first convolutions in fp16 (fine in fp32): the blocks where it
    # starts move to fp32, one redo at a time, and stay there; the split at step 4 falls after the switch
    def spike(step: int, batch: torch.Tensor) -> torch.Tensor:
        return batch * 1e6 if step == 2 else batch

    extra = {"max_steps": 6, "headroom_every": 4, "loss.reconstruction": "l2"}
    straight = train(fp16_config(images, tmp_path / "a", **extra), on_batch=spike, progress=False)
    printed = capsys.readouterr().out
    assert "step 2: the fp16 forward overflowed; now in fp32: encoder.conv_in; redone" in printed
    assert straight.fp32_blocks[0] == "encoder.conv_in" and straight.bad_steps == 0
    assert all(name.startswith("encoder.") for name in straight.fp32_blocks)
    first = train(fp16_config(images, tmp_path / "b", **extra), on_batch=spike, until_step=4, progress=False)
    assert first.fp32_blocks == straight.fp32_blocks
    second = train(fp16_config(images, tmp_path / "b", **extra), on_batch=spike, resume=True, progress=False)
    assert second.step == straight.step == 6 and second.fp32_blocks == straight.fp32_blocks
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("a", "b"))
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["guard"] == b["guard"] and a["scaler"] == b["scaler"]
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and all(math.isfinite(x) for x in losses(tmp_path / "a"))


@pytest.mark.slow
def test_a_healthy_model_never_switches_and_the_log_gets_its_worst_block(images, tmp_path, capsys):
    run = tmp_path / "run"
    result = train(fp16_config(images, run, max_steps=6, headroom_every=2), progress=False)
    assert result.fp32_blocks == () and result.bad_steps == 0
    lines = (run / "log.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    assert {"headroom_block", "headroom/worst", "fp32_blocks"} <= set(header)
    measured = [row for row in rows if row["headroom_block"]]
    assert [row["step"] for row in measured] == ["1", "3", "5"]  # steps 0, 2, 4 measured, logged after the step
    for row in measured:
        assert row["fp32_blocks"] == "0" and 0 < float(row["headroom/worst"]) < 0.01  # tiny: peaks of order 10
    printed = capsys.readouterr().out
    assert "now runs in fp32" not in printed and "overflowed" not in printed
    assert "headroom at fp16" in printed and "fp32 blocks: none" in printed
    assert load_checkpoint(run / "checkpoints" / "last.pt")["guard"]["fp32"] == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_redo_the_overflowed_step_together(images, tmp_path, monkeypatch):
    from vaehelpers.launch import launch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("VAEHELPERS_DIST_TIMEOUT", "60")  # a rank left waiting in a collective fails, not hangs
    init = tmp_path / "init"
    hot_model().save(init)
    run = tmp_path / "run"
    cfg = fp16_config(images, run, max_steps=3, init_from=str(init), headroom_every=0, sample_posterior=False)
    result = launch(cfg, nproc=2, progress=False)
    # the checkpoint is written after every rank's weights were checked bit-identical (Distributed.check_in_sync)
    assert result.step == 3 and result.bad_steps == 0 and result.fp32_blocks == (HOT_BLOCK,)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["guard"]["fp32"] == [HOT_BLOCK]
    assert len(losses(run)) == 3 and all(math.isfinite(x) for x in losses(run))
