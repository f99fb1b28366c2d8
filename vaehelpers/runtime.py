"""Where code runs: device and precision choice, the CUDA build check, seeding (several processes: distributed.py)."""
from __future__ import annotations

import contextlib
import random

import torch


class UnsupportedGPUError(RuntimeError):
    """The GPU's compute capability has no kernels in this PyTorch build (e.g. a P100 with a cu128 build)."""


def check_cuda_arch(device_index: int = 0) -> None:
    """Stop early when this torch build carries no kernels for the GPU.

    Kaggle's default PyTorch (cu128) lacks sm_60, so on a P100 `torch.cuda.is_available()` is True and the
    first real op fails with "no kernel image is available". Checking here means no work is lost.
    """
    major, minor = torch.cuda.get_device_capability(device_index)
    arch_list = torch.cuda.get_arch_list()
    supported = {int(a.split("_")[1]) for a in arch_list if a.startswith("sm_")}
    capability = major * 10 + minor
    # A build runs on its own archs and on newer minors of the same major (binary compatible SASS).
    if capability in supported or any(s // 10 == major and s <= capability for s in supported):
        return
    name = torch.cuda.get_device_name(device_index)
    raise UnsupportedGPUError(
        f"GPU {name} (compute capability sm_{capability}) is not supported by this PyTorch build "
        f"{torch.__version__} (kernels for: {', '.join(arch_list) or 'none'}). "
        "On Kaggle choose the GPU T4 x2 accelerator (Settings > Accelerator), or, with internet on, install the "
        f"same torch version built for CUDA 12.6, which still ships sm_60 (pip install torch=={torch.__version__.split('+')[0]} "
        "and its torchvision --index-url https://download.pytorch.org/whl/cu126; vaehelpers needs torch >= 2.1), "
        "or run with --device cpu."
    )


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present (after the build check), else CPU; `cuda` without one is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name} was asked for but CUDA is not available; use --device cpu or auto")
        index = device.index if device.index is not None else torch.cuda.current_device()
        check_cuda_arch(index)
        device = torch.device("cuda", index)
    return device


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 convolutions run about
    twice as fast as fp32 ones; elsewhere PyTorch emulates bf16 and it is slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that support it, fp16 (with a GradScaler) on others (T4, P100); on CPU bf16 where
    it is native (cpu_has_native_bf16: the training step measured 1.9x faster, results/benchmarks.md), else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}: choose auto, fp32, bf16 or fp16")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """One mixed-precision context for the forward pass (a no-op in fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed python and torch once; the training code itself passes explicit generators."""
    random.seed(seed)
    torch.manual_seed(seed)
