"""Several processes (gloo on CPU, 2 ranks): N ranks train like one process, resume exactly, stay in sync, and fail fast."""

import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vaehelpers.config import build_config
from vaehelpers.distributed import Distributed, _bits_sum
from vaehelpers.launch import TrainingProcessError, _failure_message, launch
from vaehelpers.losses import VAELoss
from vaehelpers.model import AutoencoderKL
from vaehelpers.rundir import load_checkpoint
from vaehelpers.sources import make_synthetic
from vaehelpers.train import train

ROOT = Path(__file__).resolve().parents[1]
# children inherit these: one thread per rank on small CPUs, and a collective gives up on a missing rank after 30 s
ENV = {"OMP_NUM_THREADS": "1", "VAEHELPERS_DIST_TIMEOUT": "30"}
# each multi-process test ends in bounded time even if something hangs (about 15-40 s each on 2 busy cores)
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic(folder, count=48, size=32, seed=1)
    return folder


@pytest.fixture(autouse=True)
def small_env(monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)


def tiny(images: Path, run: Path, **overrides):
    settings = {
        "device": "cpu",
        "batch_size": 4,
        "lr": 1e-3,
        "data.data_dir": str(images),
        "data.image_size": 16,
        "data.cache": False,
        "run_dir": str(run),
        "checkpoint_every": 1000,
    }
    settings.update(overrides)
    return build_config("tiny", "pixel", **settings)


def rows(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def poison_rank_1_at_step_1(step: int, images: torch.Tensor) -> torch.Tensor:
    """NaN images at step 1 in rank 1's share only: b[1::2] of the global batch (alone: the same images)."""
    if step != 1:
        return images
    images = images.clone()
    if dist.is_initialized():
        if dist.get_rank() == 1:
            images *= float("nan")
    else:
        images[1::2] *= float("nan")
    return images


def test_loss_divides_by_the_global_batch():
    # the seed recipe's BCE / B: two halves told the global B average to the whole batch's loss, as DDP averages
    loss_fn = VAELoss(build_config("tiny", "seed", **{"loss.perceptual_weight": 0}).loss)
    model = AutoencoderKL(build_config("tiny").model)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():

        def loss(part, **kwargs):
            reconstructions, posterior = model(part)
            return loss_fn(part, reconstructions, posterior, step=0, epoch=100, **kwargs)[0]

        whole = loss(images)
        halves = (loss(images[0::2], batch_size_for_scaling=4) + loss(images[1::2], batch_size_for_scaling=4)) / 2
        wrong = (loss(images[0::2]) + loss(images[1::2])) / 2  # each half divided by its own 2
    assert torch.allclose(halves, whole, rtol=1e-5) and not torch.allclose(wrong, whole, rtol=1e-2)


@pytest.mark.slow
def test_two_processes_train_like_one(images, tmp_path):
    # posterior mode (sample_posterior=False): each rank would draw its own sampling noise, see TrainConfig.
    # Seed recipe's BCE / B (global B), EMA, and a step that is non-finite on rank 1 only: both ranks must skip it.
    # grad_clip 1.0 keeps the gradients near Adam's eps; unclipped (500 x BCE) every near-zero gradient's
    # rounding noise would be normalised up to a full +-lr step and decide the comparison
    # fp32: in bf16 (auto on CPUs with native bf16) a 2 + 2 split rounds differently in every activation
    extra = {
        "max_steps": 4,
        "lr": 1e-4,
        "grad_clip": 1.0,
        "ema_decay": 0.9,
        "sample_posterior": False,
        "precision": "fp32",
        "loss.reconstruction": "bce",
        "loss.batch_scaled_reconstruction": True,
        "loss.seed_scale": 500.0,
    }
    two = launch(tiny(images, tmp_path / "two", **extra), 2, progress=False, on_batch=poison_rank_1_at_step_1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels, so only the batch split changes the rounding
    try:
        one = train(tiny(images, tmp_path / "one", **extra), progress=False, on_batch=poison_rank_1_at_step_1)
    finally:
        torch.set_num_threads(threads)
    assert (two.step, two.bad_steps) == (one.step, one.bad_steps) == (4, 1)
    # rank 0 checked at the checkpoint that both ranks hold bit-identical weights, EMA included (check_in_sync)
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("one", "two"))
    assert len(b["sample_generator"]) == 2
    # the same training up to fp32 rounding (sums over 2 + 2 images instead of 4), which Adam's per-element
    # normalisation amplifies in near-zero gradients: measured 4e-6 at most, 1.2e-4 of the update's norm
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=0, atol=1e-5)
    for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-5)
    torch.manual_seed(0)
    initial = AutoencoderKL(build_config("tiny").model).state_dict()  # train() seeds 0 before building the model
    update_one, update_two = (
        torch.cat([(state["model"][k] - initial[k]).flatten() for k in initial]) for state in (a, b)
    )
    assert (update_two - update_one).norm() < 1e-3 * update_one.norm()
    # log.csv on rank 0 holds the global batch's values, one row per step
    for row_one, row_two in zip(rows(tmp_path / "one"), rows(tmp_path / "two"), strict=True):
        assert row_one["step"] == row_two["step"] and row_one["skipped"] == row_two["skipped"]
        for key in ("train/total_loss", "train/rec_loss", "train/kl_loss"):
            x, y = float(row_one[key]), float(row_two[key])
            assert math.isclose(x, y, rel_tol=1e-4) or (math.isnan(x) and math.isnan(y)), (key, x, y)


@pytest.mark.slow
def test_launch_brings_rank_0s_log_rows_to_the_caller_in_order(images, tmp_path):
    # a notebook's live loss plot: on_log runs here, in the calling process, with every row rank 0 logged
    received = []

    def on_log(row):  # a closure: it never travels to the spawned processes
        received.append((os.getpid(), row))

    result = launch(
        tiny(images, tmp_path / "run", max_steps=5, log_every=1, precision="fp32"), 2, progress=False, on_log=on_log
    )
    assert result.step == 5
    assert {pid for pid, _ in received} == {os.getpid()}
    logged = rows(tmp_path / "run")
    assert [row["step"] for _, row in received] == [1, 2, 3, 4, 5] == [int(row["step"]) for row in logged]
    for (_, row), written in zip(received, logged, strict=True):  # the same values log.csv holds
        for key in ("train/total_loss", "train/rec_loss", "lr", "epoch"):
            assert math.isclose(row[key], float(written[key]), rel_tol=1e-6), key


@pytest.mark.slow
def test_a_failing_on_log_stops_the_processes_with_a_checkpoint(images, tmp_path):
    from vaehelpers.runlock import RunLock

    def on_log(row):
        if row["step"] == 2:
            raise ValueError("the plot broke")

    with pytest.raises(ValueError, match="the plot broke"):
        launch(tiny(images, tmp_path / "run", max_steps=100_000, log_every=1), 2, progress=False, on_log=on_log)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] >= 2  # stopped as by the stop button
    with RunLock(tmp_path / "run"):  # every process has ended: the lock is free
        pass


def test_launch_refuses_a_run_directory_in_use(images, tmp_path):
    from vaehelpers.runlock import RunDirInUse, RunLock

    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirInUse, match=f"pid {os.getpid()}"):
            launch(tiny(images, tmp_path / "run", max_steps=1), 2, progress=False)
    assert not (tmp_path / "run" / "config.json").exists()  # refused before any process started


def _torchrun(images: Path, run: Path, *extra: str, size: int = 16) -> list[str]:
    # "--" after the module: torchrun's own parser would reject "--run" as an abbreviation of its "--run-path"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "vaehelpers",
        "--",
        "train",
        "--data",
        str(images),
        "--run",
        str(run),
        "--preset",
        "tiny",
        "--image-size",
        str(size),
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--no-progress",
        "--recipe",
        "pixel",
        *extra,
    ]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields[1]: the parent's pid
            found.append(int(stat.parent.name))
    return found


def _rank_of(pid: int) -> int | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(item[5:]) for item in environ if item.startswith(b"RANK=")), None)


def _wait_for(condition, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_and_the_run_resumes_exactly(images, tmp_path):
    # torchrun and the command line; the GAN from step 0 (its grads all-reduced by hand), posterior sampling (one
    # generator per rank, all saved), EMA, and a checkpoint (with its cross-rank weight check) after every step.
    # 32 px for the PatchGAN. A copy of an early checkpoint is resumed with launch() and must log exactly
    # what the original run logged next; then rank 1 of the original is killed.
    run, copy = tmp_path / "run", tmp_path / "copy"
    command = _torchrun(
        images,
        run,
        "--max-steps",
        "1000",
        "--lr",
        "1e-3",
        "--ema-decay",
        "0.9",
        "--checkpoint-every",
        "1",
        "--set",
        "data.cache=false",
        "--set",
        "loss.disc_weight=0.5",
        "--set",
        "loss.disc_start=0",
        size=32,
    )
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for(lambda: (run / "log.csv").exists() and len(rows(run)) >= 2, process)
        (copy / "checkpoints").mkdir(parents=True)
        shutil.copy(run / "config.json", copy)
        shutil.copy(run / "checkpoints" / "last.pt", copy / "checkpoints")  # replaced atomically: a whole one
        saved_at = load_checkpoint(copy / "checkpoints" / "last.pt")["step"]
        _wait_for(lambda: len(rows(run)) >= saved_at + 2, process)
        workers = {_rank_of(pid): pid for pid in _children(process.pid)}
        os.kill(workers[1], signal.SIGKILL)  # as the kernel's out-of-memory killer would
        killed_at = time.monotonic()
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0 and time.monotonic() - killed_at < 45  # rank 0 did not wait for rank 1 forever
    assert "Signal 9 (SIGKILL) received" in output and "rank      : 1" in output, output[-3000:]

    state = load_checkpoint(copy / "checkpoints" / "last.pt")
    assert len(state["sample_generator"]) == 2 and not torch.equal(*state["sample_generator"])  # per-rank noise
    settings = {
        "max_steps": 1000,
        "ema_decay": 0.9,
        "checkpoint_every": 1,
        "loss.disc_weight": 0.5,
        "loss.disc_start": 0,
        "data.image_size": 32,
    }  # config.json must match: the same run
    launch(tiny(images, copy, **settings), 2, resume=True, until_step=saved_at + 2, progress=False)
    original, resumed = rows(run)[saved_at : saved_at + 2], rows(copy)
    assert [row["step"] for row in resumed] == [str(saved_at + 1), str(saved_at + 2)]
    for row_original, row_resumed in zip(original, resumed):
        for key in ("train/total_loss", "train/rec_loss", "train/kl_loss", "train/g_loss", "train/disc_loss"):
            assert row_resumed[key] == row_original[key], key  # exactly: weights, optimisers, noise all restored


def raise_on_rank_1(step: int, images: torch.Tensor) -> torch.Tensor:
    if step == 1 and dist.get_rank() == 1:
        raise MemoryError("rank 1 ran out of memory (a test)")
    return images


@pytest.mark.slow
def test_launch_surfaces_a_rank_error_and_stops_the_others(images, tmp_path):
    started = time.monotonic()
    with pytest.raises(TrainingProcessError, match="training on 2 processes failed") as error:
        launch(tiny(images, tmp_path / "run", max_steps=1000), 2, progress=False, on_batch=raise_on_rank_1)
    message = str(error.value)
    assert "rank 1: exit code 1, MemoryError: rank 1 ran out of memory (a test)" in message, message
    assert "Traceback of rank" in message and "resume=True" in message
    assert time.monotonic() - started < 60


def test_the_weight_check_names_a_tensor_that_drifted(monkeypatch):
    # the comparison alone, with rank 1's copy faked: one flipped bit in one element must be caught
    weights = {"encoder.conv_in.weight": torch.randn(8, 3, 3, 3), "decoder.conv_out.bias": torch.randn(3)}
    drifted = {key: value.clone() for key, value in weights.items()}
    drifted["decoder.conv_out.bias"].view(torch.int32)[1] ^= 1
    ddp = Distributed(rank=0, world_size=2)
    monkeypatch.setattr(ddp, "gather", lambda mine: [mine, torch.stack([_bits_sum(t) for t in drifted.values()])])
    with pytest.raises(RuntimeError, match=r"rank 1's copy of model\.decoder\.conv_out\.bias .*differs"):
        ddp.check_in_sync(model=weights)
    monkeypatch.setattr(ddp, "gather", lambda mine: [mine, mine])
    ddp.check_in_sync(model=weights, ema=list(weights.values()), discriminator=None)  # in sync: silent


def test_a_rank_that_died_without_a_traceback_is_named():
    from types import SimpleNamespace

    from torch.multiprocessing.spawn import ProcessExitedException

    context = SimpleNamespace(
        processes=[SimpleNamespace(exitcode=-15), SimpleNamespace(exitcode=-9)],
        error_files=["/nonexistent/0", "/nonexistent/1"],
    )  # no tracebacks: both were killed
    error = ProcessExitedException("process 1 terminated with signal SIGKILL", 1, 1234, -9, "SIGKILL")
    message = _failure_message(context, error, 2)
    assert "failed, rank 1 first" in message and "rank 0: signal SIGTERM\n" in message
    assert "rank 1: signal SIGKILL, without a Python error: killed (e.g. out of memory)" in message


@pytest.mark.slow
def test_notebook_04_with_two_processes_draws_the_live_plot_in_its_kernel(tmp_path):
    # notebook 04's training cell as a user runs it on a T4 x2, here with gpus=2 on CPU (gloo): the live plot
    # (LiveLossPlot; under papermill, interactive=False, its progress lines) is fed in the notebook's kernel
    import nbformat
    import papermill

    from vaehelpers import demo

    parameters = {
        "smoke": True,
        "interactive": False,
        "gpus": 2,
        "plot_every": 1,
        "max_steps": 4,
        "image_size": 32,
        "synthetic_count": 32,
        "data_dir": str(tmp_path / "data"),
        "run_dir": str(tmp_path / "run"),
        "figures_dir": str(tmp_path / "figures"),
    }
    executed = tmp_path / "04_training.ipynb"
    papermill.execute_notebook(
        str(demo.NOTEBOOK_DIR / "04_training.ipynb"),
        str(executed),
        parameters=parameters,
        kernel_name=demo.notebook_kernel(),
        cwd=str(demo.NOTEBOOK_DIR),
        progress_bar=False,
    )
    cell = next(c for c in nbformat.read(executed, as_version=4).cells if "launch(" in c.source)
    printed = "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")
    plotted = [
        int(line.split()[1]) for line in printed.splitlines() if line.startswith("step ") and "total_loss" in line
    ]
    assert plotted == [1, 2, 3, 4], printed
    assert "no live loss plot" not in printed
    assert [int(row["step"]) for row in rows(tmp_path / "run")] == [1, 2, 3, 4]
