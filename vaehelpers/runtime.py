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


# bf16 runs natively (tensor cores, cuDNN bf16 convolutions) from Ampere, compute capability 8.0, on. Below it
# torch.cuda.is_bf16_supported() still says True (it only checks that bf16 tensors can be made, i.e. emulation).
NATIVE_BF16_CAPABILITY = (8, 0)


class UnsupportedPrecisionError(ValueError):
    """The precision asked for is not computed natively on this device (bf16 on a GPU below sm_80)."""


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def choose_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) for `precision` (auto | fp32 | bf16 | fp16) on `device`.

    auto on a GPU: bf16 when its compute capability is >= 8.0 (A100, L4, H100, H200), else fp16 with a
    GradScaler (T4 7.5, V100 7.0, P100 6.0). auto on a CPU: bf16 where it is native (cpu_has_native_bf16: the
    training step measured 1.9x faster, results/benchmarks.md), else fp32. An explicit bf16 on a GPU below
    sm_80 raises UnsupportedPrecisionError naming the GPU and the fix.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}: choose auto, fp32, bf16 or fp16")
    if device.type == "cuda":
        index = _cuda_index(device)
        capability = tuple(torch.cuda.get_device_capability(index))
        sm = f"sm_{capability[0]}{capability[1]}"
        native_bf16 = capability >= NATIVE_BF16_CAPABILITY
        if precision == "bf16" and not native_bf16:
            raise UnsupportedPrecisionError(
                f"--precision bf16: GPU {torch.cuda.get_device_name(index)} ({sm}) has no native bf16 (it needs "
                f"compute capability 8.0 or newer; here it would be emulated and slow): use --precision fp16 or auto"
            )
        if precision != "auto":
            return precision, f"asked for (--precision {precision})"
        if native_bf16:
            return "bf16", f"{sm} >= sm_80 computes bf16 natively (no GradScaler needed)"
        return "fp16", f"{sm} < sm_80 has no native bf16: fp16 with a GradScaler"
    if precision != "auto":
        return precision, f"asked for (--precision {precision})"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16", "this CPU has native bf16 (AVX512-BF16 or AMX)"
    return "fp32", "no native bf16 on this CPU (emulated bf16 is slower than fp32)"


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to run at: see choose_precision."""
    return choose_precision(precision, device)[0]


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 tensor-core matmuls and convolutions for fp32 work on CUDA (effective on sm_80+; a no-op elsewhere).

    About 8x the fp32 throughput on an A100 with a 10-bit mantissa; exactness checks turn it off. Uses torch's
    fp32_precision settings only: mixing them with the legacy allow_tf32 flags is an error in torch >= 2.9.
    """
    if device.type != "cuda":
        return
    value = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = value
    torch.backends.cudnn.conv.fp32_precision = value


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
