"""Tests for vaehelpers.bench: the harness runs end to end at a tiny size (plumbing, not speed)."""

from __future__ import annotations

import json

import pytest
import torch

from vaehelpers import bench
from vaehelpers.cli import main
from vaehelpers.config import model_config
from vaehelpers.sources import make_synthetic


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these are plumbing tests, and on a shared 2-core machine a second OpenMP thread
    mostly waits for the first (4x the CPU time for the same work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_model_bench_times_ours_and_diffusers_and_writes_json(tmp_path, capsys):
    pytest.importorskip("diffusers")
    path = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--preset",
            "tiny",
            "--image-size",
            "16",
            "--batch-size",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--precision",
            "bf16",
            "--ablate",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for column in bench.MODEL_COLUMNS:
        assert column in printed
    assert "preset tiny, 16x16, batch 2, cpu" in printed
    report = json.loads(path.read_text())
    assert report["command"].startswith("vaehelpers bench model --preset tiny --image-size 16 --batch-size 2")
    assert "--ablate" in report["command"] and "--precision bf16" in report["command"]
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["cpu_count"] >= 1
    rows = report["model"]
    names = ("ours bf16", "ours fp32", "ours bf16 unfused-up", "diffusers fp32", "diffusers bf16")
    assert {(row["op"], row["model"]) for row in rows} == {(op, name) for op in bench.OPS for name in names}
    for row in rows:
        assert row["median_ms"] > 0 and len(row["times_ms"]) == 1 and row["images_per_s"] > 0
        assert row["gflop"] > 0 and row["tflop_per_s"] > 0
        assert row["mfu"] is None  # CPU: no peak, printed as n/a
        assert row["precision"] == ("fp32" if row["model"].endswith("fp32") else "bf16")
        assert (row["ratio_vs_diffusers_fp32"] is None) == (row["model"] == "diffusers fp32")
        assert (row["ratio_vs_diffusers_same_precision"] is None) == row["model"].startswith("diffusers")
        if row["model"] == "ours fp32":  # its own precision's diffusers is the baseline
            assert row["ratio_vs_diffusers_same_precision"] == row["ratio_vs_diffusers_fp32"]
    flops = {(row["op"], row["model"]): row["gflop"] for row in rows}

    def same(a: float, b: float) -> bool:
        return a == pytest.approx(b, rel=1e-6)

    # the same network; on CPU our upsamplers run as transposed convs with 16/36 of the FLOPs without gradients
    # and in bf16 training, and as diffusers' upsample + conv in fp32 training and when never fused
    for op in bench.OPS:
        assert same(flops[(op, "ours bf16 unfused-up")], flops[(op, "diffusers fp32")])
        assert same(flops[(op, "diffusers bf16")], flops[(op, "diffusers fp32")])
    assert same(flops[("encode", "ours bf16")], flops[("encode", "diffusers fp32")])  # no upsamplers
    for op in ("train_step", "decode"):
        assert 0.5 * flops[(op, "diffusers fp32")] < flops[(op, "ours bf16")] < flops[(op, "diffusers fp32")]
    assert same(flops[("train_step", "ours fp32")], flops[("train_step", "diffusers fp32")])
    assert same(flops[("decode", "ours fp32")], flops[("decode", "ours bf16")])
    assert flops[("train_step", "ours bf16")] > 2 * flops[("encode", "ours bf16")] + flops[("decode", "ours bf16")]
    assert "n/a" in printed

    report = bench.run_bench(
        presets=("tiny",),
        image_sizes=(16,),
        batch_sizes=(1,),
        repeats=1,
        warmup=0,
        device="cpu",
        precision="fp32",
        ops=("decode",),
        log=lambda line: None,
    )
    assert [row["model"] for row in report["model"]] == ["ours fp32", "diffusers fp32"]  # no second diffusers
    assert report["model"][0]["ratio_vs_diffusers_same_precision"] == report["model"][0]["ratio_vs_diffusers_fp32"]


def test_data_bench_on_a_folder_and_on_synthetic_images(tmp_path, capsys):
    make_synthetic(tmp_path / "images", count=12, size=24)
    path = tmp_path / "data.json"
    code = main(
        [
            "bench",
            "--data-path",
            str(tmp_path / "images"),
            "--image-size",
            "16",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "2",
            "--data-repeats",
            "1",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "images/s (median)" in printed and "cache built in" in printed
    report = json.loads(path.read_text())
    assert {(row["mode"], row["workers"]) for row in report["data"]} == {
        (mode, workers) for mode in ("files", "cache") for workers in (0, 2)
    }
    assert all(row["images_per_s"] > 0 and row["n_images"] == 12 for row in report["data"])
    assert report["model"] == []  # --data-path alone times the data path only ("all" does both)
    assert not list((tmp_path / "images").glob(".*"))  # the cache went to a temporary folder, not beside the images

    report = bench.run_bench(
        part="data",
        data_path="synthetic",
        synthetic_count=8,
        image_sizes=(16,),
        batch_sizes=(4,),
        data_workers=(0,),
        data_repeats=1,
        log=lambda line: None,
    )
    assert report["data_info"]["source"].startswith("synthetic") and report["data"][0]["images_per_s"] > 0


def test_peak_flops_table(monkeypatch):
    cpu = torch.device("cpu")
    assert bench.peak_flops_for(cpu, "fp32") is None
    names = {
        "Tesla T4": ("fp16", 65e12),
        "NVIDIA H100 80GB HBM3": ("bf16", 989e12),
        "NVIDIA H200": ("bf16", 989e12),
        "NVIDIA H100 PCIe": ("bf16", 756e12),
        "NVIDIA L4": ("bf16", 121e12),
        "NVIDIA L40S": ("bf16", None),
        "Tesla P100-PCIE-16GB": ("bf16", None),
    }
    for name, (precision, expected) in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bench.peak_flops_for(torch.device("cuda"), precision) == expected, name


def test_headroom_contender_times_a_measured_train_step_and_leaves_no_hooks(tmp_path):
    path = tmp_path / "bench.json"
    arguments = ["bench", "--preset", "tiny", "--image-size", "16", "--batch-size", "2", "--repeats", "1"]
    arguments += ["--warmup", "0", "--device", "cpu", "--precision", "fp16", "--no-diffusers", "--ops", "train_step"]
    assert main([*arguments, "--headroom", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert "--headroom" in report["command"]
    rows = {row["model"]: row for row in report["model"]}
    assert list(rows) == ["ours fp16", "ours fp16 headroom"]
    assert all(row["median_ms"] > 0 for row in rows.values())
    # the same network and step: the measurement adds reductions only, no FLOPs the counter sees
    assert rows["ours fp16 headroom"]["gflop"] == pytest.approx(rows["ours fp16"]["gflop"], rel=1e-6)
    contender = bench.build_contenders(
        model_config("tiny"), torch.device("cpu"), "fp16", with_diffusers=False, headroom=True
    )[1]
    images, latents = torch.rand(1, 3, 16, 16) * 2 - 1, torch.randn(1, 4, 2, 2)
    bench.make_calls(contender, images, latents, torch.device("cpu"))["train_step"]()
    assert contender.headroom and not any(m._forward_hooks or m._forward_pre_hooks for m in contender.model.modules())
