"""`make gpu-report` at toy scale on this CPU: the page it writes has every section, each with its figures."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# a make of its own, not a sub-make of `make test` (whose MAKEFLAGS would add "Entering directory" lines)
OWN_MAKE = {name: value for name, value in os.environ.items() if name not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def test_the_makefile_target_runs_the_module_with_out(tmp_path):
    def planned(*arguments: str) -> str:  # the command make would run last (a dry run)
        done = subprocess.run(
            ["make", "--no-print-directory", "-n", "gpu-report", *arguments],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=OWN_MAKE,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    out = tmp_path / "x.md"
    assert planned(f"OUT={out}") == (
        f'.venv/bin/python -m vaehelpers.gpureport --out {out} --called-as "make gpu-report OUT={out}"'
    )
    assert planned().startswith(".venv/bin/python -m vaehelpers.gpureport --out results/gpu.md ")


@pytest.mark.slow
def test_gpu_report_on_cpu_writes_every_section(tmp_path):
    out = tmp_path / "x.md"
    done = subprocess.run(
        ["make", "--no-print-directory", "gpu-report", f"OUT={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
        env=OWN_MAKE,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    page = out.read_text()
    headings = re.findall(r"^## (.+)$", page, re.MULTILINE)
    assert headings == [
        "Machine",
        "Doctor",
        "Speed: `vaehelpers bench model`, ours vs diffusers",
        "fp16 headroom per block: `tiny` at initialisation",
        "Largest batch",
        "Two processes (NCCL)",
        "GPU-only tests",
        "Reference-run training, 0.5 minutes on synthetic images",
    ]
    assert page.startswith(f"# GPU report\n\nCommand: `make gpu-report OUT={out}`") and "on CPU (toy scale" in page
    assert "`nvidia-smi -L`" in page and "OK: ready to train" in page
    # the benchmark in fp32, bf16 and fp16, ours against diffusers, with the headroom-tracking contender
    for precision in ("fp32", "bf16", "fp16"):
        assert f"### {precision}\n\n`vaehelpers bench model --device cpu --preset tiny" in page
        assert f"ours {precision} headroom" in page and f"diffusers {precision}" in page
        assert re.search(rf"- {precision}: a measured train step [\d.]+ ms vs [\d.]+ ms \([+-][\d.]+%\)", page)
    # the headroom table per precision: 14 blocks each, fractions far below 0.25 for a fresh model
    tables = re.findall(r"^  (encoder|decoder)\.\S+\s+(fp32|bf16|fp16)\s+\S+\s+(\S+)$", page, re.MULTILINE)
    assert len(tables) >= 3 * 14 and all(float(fraction) < 0.01 for *_, fraction in tables)
    assert re.search(r"tiny preset, 32 px, \w+: \d+ recommended from memory", page)
    assert "not run: 0 GPU(s) visible (needs 2)" in page and "## GPU-only tests\n\nnot run: no GPU" in page
    training = re.search(
        r"\*\*([\d.e+-]+) images/s\*\* \(the mean of log.csv's \d+ rows after the first\).*?takes \*\*([\d.]+) hours\*\*",
        page,
        re.S,
    )
    images_per_s, hours = float(training.group(1)), float(training.group(2))
    assert images_per_s > 0 and hours == pytest.approx(600 * 8091 * 0.9 / images_per_s / 3600, rel=0.02)
    assert "FAILED" not in page
