"""fp16 with a GradScaler, proven on CPU (torch's CPU autocast runs float16; GradScaler("cpu") exists): it
learns, resumes bit-exactly with the scaler's state, and counts the steps the scaler skips without letting them
touch the EMA or a checkpoint."""

from pathlib import Path

import pytest
import torch
from conftest import fp16_config

from vaehelpers import metrics
from vaehelpers.dataset import ImageFolderDataset
from vaehelpers.model import AutoencoderKL
from vaehelpers.rundir import load_checkpoint
from vaehelpers.sources import make_synthetic
from vaehelpers.train import NonFiniteLossError, train


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic(folder, count=48, size=32, seed=1)
    return folder


def overflow_at(*steps: int):
    """on_batch hook: images x 1e4 at these steps. With the L2 loss the loss stays finite in fp32 (about 3e7) but its
    gradient, 2 * 1e4 / 3072 per pixel times the scale 65536, overflows float16 in the backward pass: a real
    GradScaler skip, not a non-finite loss."""
    return lambda step, batch: batch * 1e4 if step in steps else batch


def log_rows(run: Path) -> list[dict[str, str]]:
    lines = (run / "log.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


@pytest.mark.slow
def test_fp16_training_learns(images, tmp_path):
    # the fp32 learning test's settings (tests/test_train.py) in fp16 with the GradScaler, for 100 steps instead of
    # 200: fp16 convolutions on a CPU take torch's slow reference path (about 5x fp32's time here)
    cfg = fp16_config(images, tmp_path / "run", max_steps=100, batch_size=8, **{"data.image_size": 32})
    torch.manual_seed(cfg.seed)
    test_set = ImageFolderDataset(images, split="test", image_size=32, cache=False)
    before = metrics.evaluate(
        AutoencoderKL(cfg.model).eval(), test_set, batch_size=16, progress=False, lpips=False, fid=False
    )
    result = train(cfg, progress=False)
    after = metrics.evaluate(
        AutoencoderKL.load(tmp_path / "run").eval(), test_set, batch_size=16, progress=False, lpips=False, fid=False
    )
    print(
        f"fp16 held-out PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB, MAE {before['mae']:.4f} -> {after['mae']:.4f}"
    )
    assert result.step == 100 and result.bad_steps == 0
    # measured (2026-12-03, this CPU, 100 steps): 10.59 -> 13.07 dB, MAE 0.2460 -> 0.1992 (x0.810), no scaler skip
    assert after["psnr"] > before["psnr"] + 1.5, (before["psnr"], after["psnr"])
    assert after["mae"] < 0.85 * before["mae"], (before["mae"], after["mae"])
    rows = log_rows(tmp_path / "run")
    assert (
        all(float(row["scale"]) > 0 for row in rows)
        and sum(int(row["scaler_skipped"]) for row in rows) == result.scaler_skipped
    )


@pytest.mark.slow
def test_fp16_resume_is_exact_including_the_scaler(images, tmp_path):
    # a scaler skip at step 3 (scale 65536 -> 32768) before the split at 7: the resumed run must carry the lowered scale
    extra = {"max_steps": 12, "warmup_steps": 3, "schedule": "cosine", "ema_decay": 0.9, "loss.reconstruction": "l2"}
    straight = train(fp16_config(images, tmp_path / "a", **extra), on_batch=overflow_at(3), progress=False)
    first = train(fp16_config(images, tmp_path / "b", **extra), on_batch=overflow_at(3), until_step=7, progress=False)
    assert first.step == 7 and first.scaler_skipped == 1
    second = train(fp16_config(images, tmp_path / "b", **extra), on_batch=overflow_at(3), resume=True, progress=False)
    assert straight.step == second.step == 12 and straight.scaler_skipped == second.scaler_skipped == 1
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("a", "b"))
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] == 32768.0
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]):
        assert torch.equal(x, y)
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 11  # 12 steps, one skipped
    assert [r["step"] for r in log_rows(tmp_path / "b")] == [str(s) for s in range(1, 13)]


@pytest.mark.slow
def test_scaler_skip_lowers_the_scale_is_counted_leaves_ema_and_weights_and_training_goes_on(images, tmp_path):
    run = tmp_path / "run"
    settings = {"max_steps": 6, "ema_decay": 0.9, "loss.reconstruction": "l2"}
    train(fp16_config(images, run, **settings), until_step=2, progress=False)
    good = load_checkpoint(run / "checkpoints" / "last.pt")
    # on_batch sees the step count before the step: step index 2 is the third optimiser step
    skipped = train(
        fp16_config(images, run, **settings), on_batch=overflow_at(2), until_step=3, resume=True, progress=False
    )
    after_skip = load_checkpoint(run / "checkpoints" / "last.pt")
    assert skipped.scaler_skipped == 1 and skipped.bad_steps == 0 and after_skip["scaler_skipped"] == 1
    assert good["scaler"]["scale"] == 65536.0 and after_skip["scaler"]["scale"] == 32768.0
    assert after_skip["ema"]["updates"] == good["ema"]["updates"] == 2
    for x, y in zip(good["ema"]["shadow"], after_skip["ema"]["shadow"]):
        assert torch.equal(x, y)
    for key, tensor in good["model"].items():  # the checkpoint after the skip holds the last good weights
        assert torch.equal(tensor, after_skip["model"][key]), key
    final = train(fp16_config(images, run, **settings), resume=True, progress=False)
    assert final.step == 6 and final.scaler_skipped == 1
    rows = log_rows(run)
    assert [r["scaler_skipped"] for r in rows] == ["0", "0", "1", "0", "0", "0"]
    assert [float(r["scale"]) for r in rows] == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0, 32768.0]
    assert all(r["skipped"] == "0" for r in rows)  # a scaler skip is not a non-finite loss
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["ema"]["updates"] == 5 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_run_of_scaler_skips_stops_like_non_finite_losses(images, tmp_path):
    # x1e4 every step from step 3: the scale must fall below about 1e4 (3 halvings) before the gradient fits
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="GradScaler"):
        train(
            fp16_config(
                images, run, max_steps=20, checkpoint_every=1, max_bad_steps=3, **{"loss.reconstruction": "l2"}
            ),
            on_batch=overflow_at(*range(3, 20)),
            progress=False,
        )
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["scaler"]["scale"] == 65536.0
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the sync debug mode watches CUDA syncs")
def test_fp16_steps_between_log_and_checkpoint_steps_never_sync_the_host(images, tmp_path):
    # torch raises on any synchronizing call (.item(), get_scale(), a blocking copy) while the mode is "error": on
    # for every step after which no row is written, no checkpoint saved and no headroom measured (step 0 measures)
    log_every = 4

    def watch(step: int, batch: torch.Tensor) -> torch.Tensor:
        quiet = step > 0 and (step + 1) % log_every != 0
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")
        return batch

    cfg = fp16_config(images, tmp_path / "run", device="cuda", max_steps=12, log_every=log_every, headroom_every=1000)
    try:
        result = train(cfg, on_batch=watch, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.step == 12 and result.bad_steps == 0
    assert [row["step"] for row in log_rows(tmp_path / "run")] == ["1", "4", "8", "12"]
