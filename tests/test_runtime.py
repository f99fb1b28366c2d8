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
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.resolve_precision("auto", torch.device("cuda", 0)) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    with pytest.raises(ValueError):
        runtime.resolve_precision("fp8", cpu)


def test_cuda_asked_for_without_one_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device cpu"):
        runtime.resolve_device("cuda")
