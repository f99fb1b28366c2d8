"""`vaehelpers doctor`: what this machine is (torch, CUDA, GPUs, kernels, precision) and a one-minute live check of
training on it (a few steps through the real trainer, a checkpoint resumed, speed, memory, the batch that fits)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vaehelpers.config import DOCTOR_CPU_RUN, DOCTOR_GPU_RUN

MAX_BATCH_PROBE = 512  # the largest-batch search on a GPU stops here (a 140 GiB H200 fits more than any run needs)
GIB = 2**30


class DoctorError(RuntimeError):
    """The doctor found a problem; the message is its one-line reason with the fix."""


@dataclasses.dataclass
class DoctorReport:
    """The table (rows of label, value), whether all is well, the one-line reason when not, and every figure."""

    rows: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    ok: bool = True
    reason: str = ""
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def table(self) -> str:
        width = max((len(label) for label, _ in self.rows), default=0)
        lines = [f"  {label:<{width}}  {value}" for label, value in self.rows]
        lines.append("OK: ready to train" if self.ok else f"FAILED: {self.reason}")
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        if not self.ok:
            raise DoctorError(self.reason)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB"


def _available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None elsewhere."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _train_step_fits(preset: str, image_size: int, batch_size: int, device: torch.device, precision: str) -> bool:
    """One training step at this batch (bench.py's step: our model, default loss, AdamW); False on out-of-memory."""
    from vaehelpers.bench import build_contenders, make_calls
    from vaehelpers.config import model_config

    config = model_config(preset)
    contender = None
    try:
        contender = build_contenders(config, device, precision, with_diffusers=False)[0]
        images = torch.rand(batch_size, config.in_channels, image_size, image_size, device=device) * 2 - 1
        size = image_size // config.downsample_factor
        latents = torch.randn(batch_size, config.latent_channels, size, size, device=device)
        make_calls(contender, images, latents, device)["train_step"]()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del contender
        _release(device)


def largest_fitting_batch(
    preset: str, image_size: int, device: torch.device, precision: str, start: int, limit: int = MAX_BATCH_PROBE
) -> int:
    """The largest batch (<= limit) whose training step runs without running out of memory: doubling from `start`
    while it fits, then bisecting; halving from `start` when it does not. 0 when even one image does not fit."""

    def fits(batch: int) -> bool:
        return _train_step_fits(preset, image_size, batch, device, precision)

    if not fits(start):
        batch = start // 2
        while batch >= 1 and not fits(batch):
            batch //= 2
        return batch
    good, bad = start, None
    while bad is None and good < limit:
        trial = min(2 * good, limit)
        if fits(trial):
            good = trial
        else:
            bad = trial
    if bad is None:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def environment(report: DoctorReport, log: Callable[[str], None]) -> None:
    """torch / CUDA / cuDNN, the CPU, every GPU with its capability, memory and whether this build has its kernels."""
    from vaehelpers.runtime import UnsupportedGPUError, check_cuda_arch, cpu_has_native_bf16

    def add(label: str, value: str) -> None:
        report.rows.append((label, value))
        log(f"  {label:<22}  {value}")

    facts = report.facts
    facts["torch"], facts["cuda"] = torch.__version__, torch.version.cuda
    try:
        facts["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except RuntimeError as error:  # torch refuses cuDNN >= 9.11 on a GPU below sm_75 (a P100) with this error
        facts["cudnn"] = None
        facts["cudnn_error"] = str(error).split(". ")[0]
    add("torch", torch.__version__)
    cudnn = facts["cudnn"]  # e.g. 92000 = 9.20.0 (major * 10000 + minor * 100 + patch since cuDNN 9)
    cudnn_text = (
        f"{cudnn // 10000}.{cudnn % 10000 // 100}.{cudnn % 100}"
        if cudnn and cudnn >= 90000
        else str(cudnn or facts.get("cudnn_error", "none"))
    )
    add("CUDA / cuDNN", f"{torch.version.cuda or 'none (CPU-only build)'} / {cudnn_text} (this torch build's)")
    facts["cpu_threads"], facts["cpu_native_bf16"] = torch.get_num_threads(), cpu_has_native_bf16()
    add(
        "CPU",
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, native bf16: "
        f"{'yes' if facts['cpu_native_bf16'] else 'no'}",
    )
    from vaehelpers import pretrained  # the ldm recipe (the default) needs VGG16 and the LPIPS layers

    found = {row["name"]: row["found"] for row in pretrained.status()}
    facts["pretrained"] = found
    add(
        "pretrained files",
        ", ".join(f"{name} {'yes' if ok else 'MISSING'}" for name, ok in found.items())
        + ("" if all(found.values()) else " (`vaehelpers weights download`; --recipe pixel needs none)"),
    )
    facts["gpus"] = []
    if not torch.cuda.is_available():
        add("GPUs", "none visible")
        return
    arch_list = torch.cuda.get_arch_list()
    add("build kernels", ", ".join(arch_list) or "none")
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        major, minor = torch.cuda.get_device_capability(index)
        try:
            check_cuda_arch(index)
            covered = True
        except UnsupportedGPUError:  # resolve_device raises it again, with the fix, if this GPU is the one to use
            covered = False
        facts["gpus"].append(
            {
                "index": index,
                "name": props.name,
                "capability": [major, minor],
                "memory_bytes": props.total_memory,
                "kernels_in_build": covered,
            }
        )
        add(
            f"GPU {index}",
            f"{props.name}, sm_{major}{minor}, {_gib(props.total_memory)}, "
            f"kernels in this build: {'yes' if covered else 'NO'}",
        )


def run(
    device: str = "auto",
    preset: str | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    steps: int = 3,
    json_path: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> DoctorReport:
    """Check this machine for training; returns a DoctorReport (report.ok, report.reason, report.table()).

    preset / image_size / batch_size default to DOCTOR_GPU_RUN on CUDA and DOCTOR_CPU_RUN on CPU. The live check trains
    `steps` steps through vaehelpers.train in a temporary run directory, resumes it for one more, times encode /
    decode / a train step with bench.py, and finds the largest batch that fits (CUDA: searched, out-of-memory
    caught; CPU: recommended from the memory a step needed and the RAM available).
    """
    from vaehelpers.runtime import choose_precision, resolve_device

    check_arguments(image_size, batch_size, steps)
    started = time.monotonic()
    report = DoctorReport()
    log("vaehelpers doctor")
    environment(report, log)

    def add(label: str, value: str) -> None:
        report.rows.append((label, value))
        log(f"  {label:<22}  {value}")

    def finish() -> DoctorReport:
        report.facts.update(ok=report.ok, reason=report.reason, seconds=round(time.monotonic() - started, 1))
        add("doctor took", f"{report.facts['seconds']:.0f} s")
        log("OK: ready to train" if report.ok else f"FAILED: {report.reason}")
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps({**report.facts, "rows": report.rows}, indent=2) + "\n")
        return report

    try:  # a GPU this build has no kernels for, or bf16 asked below sm_80, stops here, before any work
        torch_device = resolve_device(device)
        chosen, why = choose_precision(precision, torch_device)
    except (ValueError, RuntimeError) as error:
        report.ok, report.reason = False, str(error)
        return finish()
    defaults = DOCTOR_GPU_RUN if torch_device.type == "cuda" else DOCTOR_CPU_RUN
    preset = preset or defaults["preset"]
    image_size = image_size or defaults["image_size"]
    batch_size = batch_size or defaults["batch_size"]
    device_name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "CPU"
    report.facts.update(
        device=str(torch_device),
        device_name=device_name,
        precision=chosen,
        precision_why=why,
        preset=preset,
        image_size=image_size,
        batch_size=batch_size,
    )
    add("device", f"{torch_device} ({device_name})")
    add("precision", f"{chosen}: {why}")
    add("live check", f"{preset} preset, {image_size} px, batch {batch_size}, {steps} steps + 1 resumed")
    try:
        live_check(report, add, torch_device, chosen, preset, image_size, batch_size, steps)
    except torch.OutOfMemoryError:
        _release(torch_device)
        fit = largest_fitting_batch(preset, image_size, torch_device, chosen, batch_size)
        report.facts["largest_batch"] = fit
        report.ok = False
        report.reason = (
            f"out of memory at --batch-size {batch_size} ({preset}, {image_size} px, {chosen}) on "
            f"{device_name}: "
            + (
                f"batch {fit} fits, rerun with --batch-size {fit}"
                if fit
                else "not even one image fits: use a smaller --image-size or preset"
            )
        )
    return finish()


def check_arguments(image_size: int | None, batch_size: int | None, steps: int) -> None:
    """ValueError naming the flag before any work: the live check needs a step to resume from and a size the
    model can take (a positive multiple of 8)."""
    if steps < 1:
        raise ValueError(
            f"--steps {steps}: the live check needs at least 1 step (it checkpoints, then resumes one more)"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be at least 1")
    if image_size is not None and (image_size < 8 or image_size % 8):
        raise ValueError(f"--image-size {image_size}: must be a positive multiple of 8")


def headroom_check(
    report: DoctorReport,
    add: Callable[[str, str], None],
    run_dir: Path,
    images: Path,
    device: torch.device,
    precision: str,
    image_size: int,
    batch_size: int,
) -> None:
    """One row per block: the live check's trained model's peak |activation| at the run's precision (its fp32 blocks
    applied) as a fraction of fp16's 65504, on a batch of its images (headroom.py)."""
    from vaehelpers.dataset import ImageFolderDataset
    from vaehelpers.headroom import HeadroomGuard, iter_rows_as_facts, measure
    from vaehelpers.model import AutoencoderKL
    from vaehelpers.rundir import CHECKPOINT, RunDir, load_checkpoint

    dataset = ImageFolderDataset(images, split="train", image_size=image_size, cache=False)
    batch = torch.stack([dataset[i] for i in range(min(batch_size, len(dataset)))]).to(device)
    model = AutoencoderKL.load(run_dir).to(device)
    guard = HeadroomGuard(model, every=0)
    guard.set_fp32((load_checkpoint(RunDir(run_dir).checkpoint).get(CHECKPOINT.guard) or {}).get("fp32", []))
    rows = measure(model, batch, precision, guard)
    report.facts["headroom"] = list(iter_rows_as_facts(rows))
    worst = guard.worst()
    add(
        "headroom",
        f"at {precision}, peak |activation| per block as a fraction of fp16's 65504 (batch of {len(batch)}); "
        f"worst {worst.name} {worst.fraction:.4g}",
    )
    for row in rows:
        add(f"  {row.name}", f"{row.fraction:.4g} (peak {row.peak:.4g}){', fp32' if row.fp32 else ''}")


def live_check(
    report: DoctorReport,
    add: Callable[[str, str], None],
    device: torch.device,
    precision: str,
    preset: str,
    image_size: int,
    batch_size: int,
    steps: int,
) -> None:
    """Train, checkpoint, resume, time and size on `device`; fills report (sets ok/reason on a failed check)."""
    from safetensors.torch import load_file

    from vaehelpers.bench import bench_model
    from vaehelpers.config import build_config
    from vaehelpers.rundir import CHECKPOINT, RunDir, load_checkpoint
    from vaehelpers.sources import make_synthetic
    from vaehelpers.train import train

    def fail(reason: str) -> None:
        if report.ok:
            report.ok, report.reason = False, reason

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="vaehelpers-doctor-") as workdir:
        images, run_dir = Path(workdir) / "images", Path(workdir) / "run"
        # enough images that the hashed ~90% train split holds a full batch (train() trims a smaller one)
        make_synthetic(images, count=max(16, 2 * batch_size), size=image_size, seed=0)
        # the pixel recipe: this checks the runtime, not the pretrained files (their row above says what is there)
        cfg = build_config(
            preset,
            "pixel",
            device=str(device),
            precision=precision,
            batch_size=batch_size,
            max_steps=steps + 1,
            run_dir=str(run_dir),
            checkpoint_every=10_000,
            log_every=1,
            **{"data.data_dir": str(images), "data.image_size": image_size, "data.cache": False},
        )
        rows: list[dict[str, Any]] = []
        chatter = io.StringIO()  # the trainer's own progress lines; the table says what matters
        with contextlib.redirect_stdout(chatter):
            first = train(cfg, until_step=steps, progress=False, on_log=rows.append)
            state = load_checkpoint(RunDir(run_dir).checkpoint)
            final = load_file(RunDir(run_dir).weights)
            second = train(cfg, resume=True, progress=False, on_log=rows.append)
        losses = [row["train/total_loss"] for row in rows]
        finite = all(math.isfinite(x) for x in losses) and first.bad_steps == second.bad_steps == 0
        scale = (
            f", GradScaler scale {rows[-1]['scale']:g} ({second.scaler_skipped} skipped)" if "scale" in rows[-1] else ""
        )
        report.facts.update(losses=losses, scaler_skipped=second.scaler_skipped, scale=rows[-1].get("scale"))
        add(
            "train steps",
            f"{first.step} at {precision}: loss {losses[0]:.4g} -> {losses[-1]:.4g}, "
            f"{'finite' if finite else 'NOT FINITE'}{scale}",
        )
        if not finite:
            fail(f"the loss was not finite in {precision} on {device}: try --precision fp32 and report it")
        same = (
            state[CHECKPOINT.step] == steps
            and set(state[CHECKPOINT.model]) == set(final)
            and all(torch.equal(state[CHECKPOINT.model][k].cpu(), final[k].cpu()) for k in final)
        )
        resumed = second.step == steps + 1 and len(rows) == steps + 1
        add(
            "checkpoint + resume",
            f"step {state[CHECKPOINT.step]} saved and read back to the same weights: "
            f"{'yes' if same else 'NO'}; resumed to step {second.step}: {'yes' if resumed else 'NO'}",
        )
        if not (same and resumed):
            fail(f"the checkpoint in {run_dir} did not read back to the trained weights or did not resume")
        headroom_check(report, add, run_dir, images, device, precision, image_size, batch_size)

    timings = bench_model(
        preset, image_size, batch_size, device=device, precision=precision, repeats=3, warmup=1, with_diffusers=False
    )
    speed = {row["op"]: row for row in timings}
    report.facts["speed"] = {
        op: {"images_per_s": row["images_per_s"], "median_ms": row["median_ms"], "peak_mem_mib": row["peak_mem_mib"]}
        for op, row in speed.items()
    }
    add(
        "images/s",
        ", ".join(f"{op} {row['images_per_s']:.1f}" for op, row in speed.items())
        + f" (bench.py, median of 3, batch {batch_size})",
    )
    step_mib = speed["train_step"]["peak_mem_mib"]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        report.facts["peak_memory_bytes"] = peak
        add("peak memory", f"{_gib(peak)} of {_gib(total)} (torch.cuda.max_memory_allocated)")
        fit = largest_fitting_batch(preset, image_size, device, precision, batch_size)
        report.facts["largest_batch"] = fit
        add(
            "largest batch",
            f"{fit}{'+' if fit >= MAX_BATCH_PROBE else ''} (searched: a train step per size, out-of-memory caught)",
        )
    else:
        available = _available_ram()
        report.facts["peak_memory_bytes"] = step_mib * 2**20 if step_mib is not None else None
        add(
            "peak memory",
            f"{step_mib:.0f} MiB above the baseline for one train step (sampled RSS)"
            if step_mib is not None
            else "n/a (no /proc on this system)",
        )
        if step_mib and available:
            # half the free RAM, so the data cache and the OS keep room; CPU memory is not searched (swapping,
            # not an error, is what a too-large batch does there)
            recommended = max(1, min(MAX_BATCH_PROBE, int(available / 2 / (step_mib * 2**20 / batch_size))))
            report.facts["recommended_batch"] = recommended
            add(
                "largest batch",
                f"{recommended} recommended from memory (half of {_gib(available)} available / "
                f"{step_mib / batch_size:.1f} MiB per image), not searched",
            )
