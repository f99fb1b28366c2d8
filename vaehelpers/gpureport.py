"""`make gpu-report`: one command that turns a GPU session into one markdown page of evidence: the doctor, the model
benchmark in every precision the GPU has, fp16 headroom per block, the largest batch, a two-process check, the
GPU-only tests and minutes of the reference run's training, with the command and the machine.

    python -m vaehelpers.gpureport --out results/gpu.md   # what `make gpu-report` runs (it aims at under 12 minutes on a GPU)

On a CPU it runs at toy scale (tiny preset, 32 px, seconds of training), so that its tests exercise every section.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vaehelpers.config import REFERENCE_RUN, DataConfig

DEFAULT_OUT = "results/gpu.md"


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big each section's work is."""

    preset: str
    image_size: int
    batch_size: int
    repeats: int  # timed runs per benchmark op
    train_minutes: float  # of the reference run's training
    synthetic_images: int  # for the training section
    doctor_steps: int


# the reference run's model, size and batch (config.REFERENCE_RUN / DOCTOR_GPU_RUN); about 10 minutes on a T4
GPU_SCALE = Scale("sd", 128, 16, 5, 5.0, REFERENCE_RUN["synthetic_count"], 3)
# seconds per section on 2 CPU cores: what CI can afford
TOY_SCALE = Scale("tiny", 32, 4, 2, 0.5, 32, 2)
GPU_TESTS_MARKER = "gpu"  # pytest -m gpu: the tests that skip without CUDA


def precisions_on(device: torch.device) -> list[str]:
    """Every precision this device trains in: fp32 and fp16 everywhere, bf16 from sm_80 on (and on any CPU)."""
    from vaehelpers.runtime import NATIVE_BF16_CAPABILITY

    if device.type == "cuda" and tuple(torch.cuda.get_device_capability(device)) < NATIVE_BF16_CAPABILITY:
        return ["fp32", "fp16"]
    return ["fp32", "bf16", "fp16"]


def _code(text: str) -> str:
    return "```\n" + text.rstrip() + "\n```\n"


def _quiet(call: Callable[[], Any]) -> tuple[Any, str]:
    """(call's result, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = call()
    return result, printed.getvalue()


def section_machine(device: torch.device) -> str:
    from vaehelpers.bench import machine_info

    info = machine_info(device)
    smi = shutil.which("nvidia-smi")
    listing = (
        subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout
        if smi
        else "nvidia-smi: not found"
    )
    lines = [f"- {key}: {value}" for key, value in info.items()]
    return "## Machine\n\n" + "\n".join(lines) + "\n\n`nvidia-smi -L`:\n\n" + _code(listing or "(no output)")


def section_doctor(device: torch.device, scale: Scale, facts: dict[str, Any]) -> str:
    from vaehelpers import doctor

    lines: list[str] = []
    report = doctor.run(
        device=str(device),
        preset=scale.preset,
        image_size=scale.image_size,
        batch_size=scale.batch_size,
        steps=scale.doctor_steps,
        log=lines.append,
    )
    facts["doctor"] = report.facts
    command = (
        f"vaehelpers doctor --device {device} --preset {scale.preset} --image-size {scale.image_size} "
        f"--batch-size {scale.batch_size} --steps {scale.doctor_steps}"
    )
    return f"## Doctor\n\n`{command}`\n\n" + _code("\n".join(lines))


def section_bench(device: torch.device, scale: Scale, facts: dict[str, Any]) -> str:
    """bench model in every precision, ours vs diffusers, with the headroom-tracking contender."""
    from vaehelpers.bench import bench_model, format_model_table

    parts = ["## Speed: `vaehelpers bench model`, ours vs diffusers\n"]
    costs = []
    for precision in precisions_on(device):
        rows = bench_model(
            scale.preset,
            scale.image_size,
            scale.batch_size,
            device=device,
            precision=precision,
            repeats=scale.repeats,
            warmup=1,
            headroom=True,
        )
        facts.setdefault("bench", []).extend(rows)
        command = (
            f"vaehelpers bench model --device {device} --preset {scale.preset} --image-size {scale.image_size} "
            f"--batch-size {scale.batch_size} --precision {precision} --repeats {scale.repeats} --headroom"
        )
        parts.append(f"### {precision}\n\n`{command}`\n\n" + _code(format_model_table(rows)))
        step = {row["model"]: row["median_ms"] for row in rows if row["op"] == "train_step"}
        plain, tracked = step.get(f"ours {precision}"), step.get(f"ours {precision} headroom")
        if plain and tracked:
            costs.append((precision, plain, tracked))
    facts["headroom_cost"] = [
        {"precision": p, "train_step_ms": a, "measured_step_ms": b, "extra": b / a - 1} for p, a, b in costs
    ]
    lines = [
        f"- {p}: a measured train step {b:.1f} ms vs {a:.1f} ms ({100 * (b / a - 1):+.1f}%); at one measured "
        f"step in 100 (headroom_every) {100 * (b / a - 1) / 100:+.2f}% of training time"
        for p, a, b in costs
    ]
    parts.append("### Cost of headroom tracking (medians above)\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def section_headroom(device: torch.device, scale: Scale, facts: dict[str, Any]) -> str:
    """The preset's freshly initialised model (seed 0) on synthetic images, per precision."""
    from vaehelpers.dataset import ImageFolderDataset
    from vaehelpers.headroom import format_table, iter_rows_as_facts, measure
    from vaehelpers.model import AutoencoderKL
    from vaehelpers.sources import make_synthetic

    with tempfile.TemporaryDirectory(prefix="vaehelpers-gpureport-") as folder:
        make_synthetic(folder, count=scale.batch_size, size=scale.image_size, seed=0)
        dataset = ImageFolderDataset(folder, split="train", image_size=scale.image_size, cache=False, test_fraction=0)
        images = torch.stack([dataset[i] for i in range(len(dataset))]).to(device)
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset(scale.preset).enable_fast_paths().to(device)
    parts = [
        f"## fp16 headroom per block: `{scale.preset}` at initialisation\n\n"
        f"Peak |activation| of each block on {len(images)} synthetic {scale.image_size} px images, as a fraction of "
        "fp16's 65504 (a block at 0.25 or more moves to fp32 in fp16 training; headroom.py).\n"
    ]
    for precision in precisions_on(device):
        rows = measure(model, images, precision)
        facts.setdefault("headroom", {})[precision] = list(iter_rows_as_facts(rows))
        parts.append(f"### {precision}\n\n" + _code(format_table(rows, precision)))
    return "\n".join(parts)


def section_largest_batch(facts: dict[str, Any]) -> str:
    doctor = facts.get("doctor", {})
    if "largest_batch" in doctor:
        text = f"{doctor['largest_batch']} (searched on the GPU: a train step per size, out-of-memory caught)"
    elif "recommended_batch" in doctor:
        text = f"{doctor['recommended_batch']} recommended from memory (CPU: not searched)"
    else:
        text = "not measured (the doctor stopped before it: see above)"
    return (
        f"## Largest batch\n\n{doctor.get('preset')} preset, {doctor.get('image_size')} px, "
        f"{doctor.get('precision')}: {text}\n"
    )


def _train_config(scale: Scale, device: torch.device, data_dir: Path, run_dir: Path, **overrides: Any):
    """The reference run's recipe (ldm) at this scale; the pixel recipe, said so, when its pretrained files are
    missing (the page records which)."""
    from vaehelpers import pretrained
    from vaehelpers.config import build_config
    from vaehelpers.losses import pretrained_files

    settings = {
        "device": str(device),
        "batch_size": scale.batch_size,
        "epochs": REFERENCE_RUN["epochs"],
        "run_dir": str(run_dir),
        "data.data_dir": str(data_dir),
        "data.image_size": scale.image_size,
        "data.cache": False,
        **overrides,
    }
    recipe, why = REFERENCE_RUN["recipe"], "the reference run's"
    needed = pretrained_files(build_config(scale.preset, recipe, **settings).loss)
    if not all(pretrained.find(name) is not None for name in needed):
        recipe, why = (
            "pixel",
            f"the {recipe} recipe's {', '.join(needed)} files are missing: `vaehelpers weights download`",
        )
    return build_config(scale.preset, recipe, **settings), f"{recipe} ({why})"


def section_two_processes(device: torch.device, scale: Scale, facts: dict[str, Any]) -> str:
    """Two ranks (NCCL) train a few steps when two GPUs are visible."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2:
        facts["two_processes"] = None
        return f"## Two processes (NCCL)\n\nnot run: {gpus} GPU(s) visible (needs 2)\n"
    from vaehelpers.launch import launch
    from vaehelpers.sources import make_synthetic

    with tempfile.TemporaryDirectory(prefix="vaehelpers-gpureport-") as folder:
        data, run = Path(folder) / "images", Path(folder) / "run"
        make_synthetic(data, count=4 * scale.batch_size, size=scale.image_size, seed=0)
        cfg, recipe = _train_config(scale, device, data, run, max_steps=20, checkpoint_every=10, log_every=5)
        started = time.monotonic()
        result, _ = _quiet(lambda: launch(cfg, nproc=2, progress=False))
        seconds = time.monotonic() - started
    ok = result is not None and result.step == 20 and result.bad_steps == 0
    facts["two_processes"] = {"ok": ok, "steps": result.step if result else None, "seconds": seconds}
    return (
        f"## Two processes (NCCL)\n\n`vaehelpers.launch.launch(cfg, nproc=2)`, {recipe}, 20 steps of global batch "
        f"{scale.batch_size}: {'OK' if ok else 'FAILED'} (step {result.step if result else None}, "
        f"{seconds:.0f} s including start-up)\n"
    )


def section_gpu_tests(device: torch.device, facts: dict[str, Any]) -> str:
    """pytest -m gpu (the tests that need CUDA), when a GPU is here and the tests are (a source checkout)."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    if device.type != "cuda" or not tests.is_dir():
        reason = "no GPU" if device.type != "cuda" else f"no tests folder at {tests}"
        facts["gpu_tests"] = None
        return f"## GPU-only tests\n\nnot run: {reason}\n"
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", GPU_TESTS_MARKER, str(tests)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tests.parent, timeout=600)
    facts["gpu_tests"] = {"returncode": done.returncode}
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
    return f"## GPU-only tests\n\n`{shlex.join(['python', *command[1:]])}`: exit status {done.returncode}\n\n" + _code(
        tail
    )


def section_training(device: torch.device, scale: Scale, facts: dict[str, Any]) -> str:
    """scale.train_minutes of the reference run's training on synthetic images; the 600-epoch flickr8k estimate."""
    from vaehelpers.runtime import resolve_precision
    from vaehelpers.sources import FLICKR8K_IMAGE_COUNT, make_synthetic
    from vaehelpers.train import train

    with tempfile.TemporaryDirectory(prefix="vaehelpers-gpureport-") as folder:
        data, run = Path(folder) / "images", Path(folder) / "run"
        make_synthetic(data, count=scale.synthetic_images, size=scale.image_size, seed=0)
        log_every = 50 if device.type == "cuda" else 2
        cfg, recipe = _train_config(scale, device, data, run, max_minutes=scale.train_minutes, log_every=log_every)
        rows: list[dict[str, Any]] = []
        result, printed = _quiet(lambda: train(cfg, progress=False, on_log=rows.append))
    # the rate once warm: log.csv's images/s over the rows after the first (whose steps include start-up); the
    # session's average when there is no second row
    warm = [row["images_per_s"] for row in rows[1:]]
    images_per_s = sum(warm) / len(warm) if warm else result.images_per_s
    rate_is = f"the mean of log.csv's {len(warm)} rows after the first" if warm else "the session's average"
    train_images = FLICKR8K_IMAGE_COUNT * (1 - DataConfig().test_fraction)  # the hashed split keeps about 90%
    hours = REFERENCE_RUN["epochs"] * train_images / images_per_s / 3600 if images_per_s else math.inf
    facts["training"] = {
        "recipe": recipe,
        "steps": result.step,
        "images_per_s": images_per_s,
        "hours_600_epochs_flickr8k": hours,
        "stopped": result.stopped,
        "bad_steps": result.bad_steps,
        "scaler_skipped": result.scaler_skipped,
        "fp32_blocks": list(result.fp32_blocks),
        "precision": resolve_precision(cfg.precision, device),
    }
    return (
        f"## Reference-run training, {scale.train_minutes:g} minutes on synthetic images\n\n"
        f"`{scale.preset}` preset, {scale.image_size} px, batch {scale.batch_size}, recipe {recipe}, precision "
        f"{facts['training']['precision']}, {scale.synthetic_images} synthetic images: {result.step} steps ({result.stopped}), "
        f"**{images_per_s:.3g} images/s** ({rate_is}), skipped steps {result.bad_steps}, GradScaler "
        f"skips {result.scaler_skipped}, fp32 blocks: {', '.join(result.fp32_blocks) or 'none'}.\n\n"
        f"At that rate the reference run (600 epochs of flickr8k's ~{train_images:.0f} training images) takes "
        f"**{hours:.1f} hours**.\n\nThe trainer's last words:\n\n" + _code(_from_ending(printed))
    )


def _from_ending(printed: str) -> str:
    """train()'s final line and the headroom table after it (in fp16 or with headroom_any_precision)."""
    lines = printed.strip().splitlines()
    ending = max((i for i, line in enumerate(lines) if "; checkpoint " in line), default=max(len(lines) - 1, 0))
    return "\n".join(lines[ending:])


SECTIONS = ("machine", "doctor", "bench", "headroom", "largest_batch", "two_processes", "gpu_tests", "training")


def run(
    out: str | Path = DEFAULT_OUT,
    device: str = "auto",
    log: Callable[[str], None] = print,
    called_as: str | None = None,
) -> list[str]:
    """Every section in turn (a section that fails says why on the page and the rest still run); writes `out`
    atomically and returns the names of the sections that failed. called_as: the command the page names (default:
    the `python -m vaehelpers.gpureport` line with these arguments)."""
    from vaehelpers.rundir import atomic_write
    from vaehelpers.runtime import resolve_device

    started = time.monotonic()
    torch_device = resolve_device(device)
    scale = GPU_SCALE if torch_device.type == "cuda" else TOY_SCALE
    facts: dict[str, Any] = {}
    builders: dict[str, Callable[[], str]] = {
        "machine": lambda: section_machine(torch_device),
        "doctor": lambda: section_doctor(torch_device, scale, facts),
        "bench": lambda: section_bench(torch_device, scale, facts),
        "headroom": lambda: section_headroom(torch_device, scale, facts),
        "largest_batch": lambda: section_largest_batch(facts),
        "two_processes": lambda: section_two_processes(torch_device, scale, facts),
        "gpu_tests": lambda: section_gpu_tests(torch_device, facts),
        "training": lambda: section_training(torch_device, scale, facts),
    }
    sections, failed = [], []
    for name in SECTIONS:
        log(f"gpu-report: {name} ({time.monotonic() - started:.0f} s so far)")
        try:
            sections.append(builders[name]())
        except Exception as error:  # one failed section must not cost the page: it says what failed, and main exits 1
            failed.append(name)
            sections.append(f"## {name}\n\nFAILED: {type(error).__name__}: {error}\n")
            log(f"gpu-report: {name} FAILED: {type(error).__name__}: {error}")
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
    arguments = ["--out", str(out), *(["--device", device] if device != "auto" else [])]
    command = called_as or shlex.join(["python", "-m", "vaehelpers.gpureport", *arguments])
    where = "GPU" if torch_device.type == "cuda" else "CPU (toy scale: tiny preset, 32 px, seconds of training)"
    head = (
        f"# GPU report\n\nCommand: `{command}`\n\nWritten {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC "
        f"on {where} in {time.monotonic() - started:.0f} s by `python -m vaehelpers.gpureport` "
        f"(vaehelpers/gpureport.py); where a GPU is at hand, `make gpu-report` is the first thing to run.\n"
    )
    page = head + "\n" + "\n".join(sections)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(page))
    log(f"gpu-report: wrote {path} in {time.monotonic() - started:.0f} s")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaehelpers.gpureport", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the markdown page to write (default {DEFAULT_OUT})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (CPU: toy scale)")
    parser.add_argument("--called-as", help="the command to print on the page (the Makefile passes its own)")
    args = parser.parse_args(argv)
    failed = run(args.out, args.device, called_as=args.called_as)
    if failed:
        print(f"gpu-report: error: section(s) failed: {', '.join(failed)} (see {args.out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
