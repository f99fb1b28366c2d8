"""`vaehelpers doctor`: exits 0 with its table on this CPU, and names the fix for an unsupported GPU, bf16 asked on a
T4, and a batch that does not fit (each failure made at the lowest boundary: torch.cuda's queries, F.conv2d)."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vaehelpers import doctor
from vaehelpers.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def fake_gpu(monkeypatch, capability, arch_list, name, memory_gib=16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    # torch.cuda.is_bf16_supported() stays as real torch has it on a T4: True (emulation)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    props = SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=memory_gib * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    # what torch's optimizers ask the visible accelerator before each step (is a CUDA graph being captured?)
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda *a: SimpleNamespace(is_capturing=lambda: False))


@pytest.mark.slow
def test_doctor_on_this_cpu_exits_0_and_prints_the_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vaehelpers", "doctor", "--device", "cpu", "--json", str(tmp_path / "d.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for label in (
        "torch",
        "CUDA / cuDNN",
        "GPUs",
        "precision",
        "train steps",
        "checkpoint + resume",
        "images/s",
        "peak memory",
        "largest batch",
    ):
        assert f"  {label} " in out, label
    assert "read back to the same weights: yes; resumed to step 4: yes" in out and out.rstrip().endswith(
        "OK: ready to train"
    )
    facts = json.loads((tmp_path / "d.json").read_text())
    assert facts["ok"] and facts["preset"] == "tiny" and facts["image_size"] == 64 and facts["batch_size"] == 8
    assert len(facts["losses"]) == 4 and all(loss > 0 for loss in facts["losses"])
    assert facts["speed"]["train_step"]["images_per_s"] > 0 and facts["recommended_batch"] >= 1
    # headroom per block of the live check's model at its precision: the tiny model's 14 blocks, far below 65504
    assert "  headroom " in out and "    decoder.up_blocks.1 " in out
    assert [row["block"] for row in facts["headroom"]][:2] == ["encoder.conv_in", "encoder.down_blocks.0"]
    assert len(facts["headroom"]) == 14 and all(0 < row["fraction"] < 0.01 for row in facts["headroom"])


def test_unsupported_gpu_stops_before_any_work_naming_the_gpu_and_the_fix(monkeypatch):
    fake_gpu(monkeypatch, (6, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], "Tesla P100-PCIE-16GB")
    lines = []
    report = doctor.run(device="auto", log=lines.append)
    assert not report.ok and "P100" in report.reason and "sm_60" in report.reason and "T4" in report.reason
    assert "\n" not in report.reason
    table = report.table()
    assert "Tesla P100-PCIE-16GB, sm_60, 16.0 GiB, kernels in this build: NO" in table
    assert "train steps" not in table and table.endswith(f"FAILED: {report.reason}")
    assert report.facts["gpus"][0]["kernels_in_build"] is False


def test_bf16_asked_on_a_t4_fails_with_the_fix(monkeypatch, capsys):
    fake_gpu(monkeypatch, (7, 5), ["sm_75", "sm_80"], "Tesla T4")
    assert cli(["doctor", "--device", "cuda", "--precision", "bf16"]) == 1
    captured = capsys.readouterr()
    assert "Tesla T4, sm_75, 16.0 GiB, kernels in this build: yes" in captured.out
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1 and "Tesla T4" in error_lines[0] and "--precision fp16" in error_lines[0]


def memory_for(images: int):
    """F.conv2d as on a device with memory for `images` images: bigger batches raise torch.OutOfMemoryError, as the
    CUDA caching allocator does inside the convolution. conv2d is the lowest Python-visible boundary every forward
    of this convolutional model passes first (the allocator itself is C++)."""
    real = F.conv2d

    def conv2d(input, *args, **kwargs):
        if input.shape[0] > images:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {input.shape[0] * 64} MiB")
        return real(input, *args, **kwargs)

    return conv2d


@pytest.mark.slow
def test_out_of_memory_at_the_requested_batch_names_the_batch_that_fits(monkeypatch):
    monkeypatch.setattr(F, "conv2d", memory_for(2))
    report = doctor.run(device="cpu", preset="tiny", image_size=32, batch_size=8, steps=1, log=lambda line: None)
    assert not report.ok and report.facts["largest_batch"] == 2
    assert "out of memory at --batch-size 8" in report.reason and "rerun with --batch-size 2" in report.reason
    monkeypatch.setattr(F, "conv2d", memory_for(0))
    report = doctor.run(device="cpu", preset="tiny", image_size=32, batch_size=4, steps=1, log=lambda line: None)
    assert not report.ok and "not even one image fits" in report.reason


@pytest.mark.slow
def test_largest_batch_search_doubles_then_bisects(monkeypatch):
    monkeypatch.setattr(F, "conv2d", memory_for(5))
    assert doctor.largest_fitting_batch("tiny", 16, torch.device("cpu"), "fp32", start=1) == 5
    assert doctor.largest_fitting_batch("tiny", 16, torch.device("cpu"), "fp32", start=1, limit=4) == 4
    assert doctor.largest_fitting_batch("tiny", 16, torch.device("cpu"), "fp32", start=16) == 4  # halving


def test_an_unsupported_gpu_does_not_fail_a_cpu_check(monkeypatch):
    fake_gpu(monkeypatch, (6, 0), ["sm_75", "sm_80"], "Tesla P100-PCIE-16GB")
    # the real live check (train, checkpoint, resume, timing, batch size) on the CPU, with the GPU reported visible:
    # nothing in it may reach for the GPU (there is no driver here: any CUDA call would fail)
    report = doctor.run(device="cpu", image_size=32, batch_size=4, steps=1, log=lambda line: None)
    assert report.ok, report.reason
    table = report.table()
    assert "kernels in this build: NO" in table and report.facts["device"] == "cpu"
    assert "read back to the same weights: yes; resumed to step 2: yes" in table
    assert len(report.facts["losses"]) == 2 and report.facts["recommended_batch"] >= 1


def test_doctor_refuses_arguments_that_cannot_be_checked(capsys):
    for flags, named in (
        (["--steps", "0"], "--steps 0: the live check needs at least 1 step"),
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--image-size", "30"], "--image-size 30: must be a positive multiple of 8"),
    ):
        assert cli(["doctor", "--device", "cpu", *flags]) == 1
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vaehelpers doctor: error: {named}"), captured.err
        assert "did not read back" not in captured.out + captured.err and "live check" not in captured.out
