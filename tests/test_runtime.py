"""Device and precision choice, including the check for GPUs this torch build has no kernels for."""

import pytest
import torch

from vaehelpers import runtime


def _fake_gpu(monkeypatch, capability, arch_list, name="Tesla P100-PCIE-16GB"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_p100_on_a_build_without_sm60_stops_with_the_fix(monkeypatch):
    _fake_gpu(monkeypatch, (6, 0), ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    with pytest.raises(runtime.UnsupportedGPUError) as error:
        runtime.resolve_device("auto")
    message = str(error.value)
    assert "P100" in message and "sm_60" in message and "T4" in message and torch.__version__ in message


def test_supported_gpus_pass(monkeypatch):
    _fake_gpu(monkeypatch, (7, 5), ["sm_70", "sm_75", "sm_80"], name="Tesla T4")
    assert runtime.resolve_device("auto") == torch.device("cuda", 0)
    _fake_gpu(monkeypatch, (8, 9), ["sm_80", "sm_86"], name="NVIDIA L4")  # newer minor of a shipped major
    runtime.check_cuda_arch(0)


def test_precision_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"  # bf16 would be emulated: slower than fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert runtime.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError):
        runtime.resolve_precision("fp8", cpu)


GPUS = [
    ((6, 0), "Tesla P100-PCIE-16GB", "fp16"),
    ((7, 0), "Tesla V100-SXM2-16GB", "fp16"),
    ((7, 5), "Tesla T4", "fp16"),
    ((8, 0), "NVIDIA A100-SXM4-40GB", "bf16"),
    ((8, 9), "NVIDIA L4", "bf16"),
    ((9, 0), "NVIDIA H100 80GB HBM3", "bf16"),
]


@pytest.mark.parametrize("capability, name, expected", GPUS)
def test_auto_precision_follows_compute_capability_not_is_bf16_supported(monkeypatch, capability, name, expected):
    # real torch says True on a T4 and a P100 (emulated bf16); the choice must not follow it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    _fake_gpu(monkeypatch, capability, ["sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], name=name)
    cuda = runtime.resolve_device("cuda")
    assert runtime.resolve_precision("auto", cuda) == expected
    precision, why = runtime.choose_precision("auto", cuda)
    assert precision == expected and f"sm_{capability[0]}{capability[1]}" in why
    assert runtime.resolve_precision("fp16", cuda) == "fp16" and runtime.resolve_precision("fp32", cuda) == "fp32"


def test_bf16_asked_below_sm80_is_refused_naming_the_gpu_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    _fake_gpu(monkeypatch, (7, 5), ["sm_75", "sm_80"], name="Tesla T4")
    with pytest.raises(runtime.UnsupportedPrecisionError) as error:
        runtime.resolve_precision("bf16", torch.device("cuda", 0))
    message = str(error.value)
    assert "Tesla T4" in message and "sm_75" in message and "--precision fp16" in message and "\n" not in message
    _fake_gpu(monkeypatch, (8, 0), ["sm_80"], name="NVIDIA A100-SXM4-40GB")
    assert runtime.resolve_precision("bf16", torch.device("cuda", 0)) == "bf16"


def test_tf32_setting_switches_cuda_matmuls_and_convolutions():
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        runtime.set_tf32(torch.device("cuda", 0), True)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
        runtime.set_tf32(torch.device("cuda", 0), False)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("ieee", "ieee")
        runtime.set_tf32(torch.device("cpu"), True)  # CPU work is untouched
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_cuda_asked_for_without_one_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device cpu"):
        runtime.resolve_device("cuda")
