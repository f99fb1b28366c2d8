"""`evaluate --model SRC` for every local source kind, and `vaehelpers compare` on models made here."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from PIL import Image

from vaehelpers import weights
from vaehelpers.cli import main
from vaehelpers.config import ModelConfig, model_config
from vaehelpers.model import AutoencoderKL
from vaehelpers.sources import make_synthetic

SIZE = 32


def tiny_model(seed: int, **changes) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(dataclasses.replace(model_config("tiny"), **changes)).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic(folder, count=3, size=SIZE, seed=3)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One small model written as each local kind weights.load reads: run dir, diffusers folder, LDM .safetensors,
    and a full SD-style .ckpt (LDM names under first_stage_model., as {"state_dict": ...})."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    # SD's 32 groups: an LDM .ckpt carries no settings, and a group count is not in the weights (weights.load assumes 32)
    model = AutoencoderKL(ModelConfig(base_channels=32, channel_multipliers=(1, 1, 2), layers_per_block=1)).eval()
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"model": dataclasses.asdict(model.config), "data": {"image_size": SIZE}})
    )
    model.save(run)
    ckpt = root / "sd.ckpt"  # as a full SD checkpoint holds it: LDM names under first_stage_model.
    torch.save(
        {
            "state_dict": {
                f"first_stage_model.{key}": value
                for key, value in weights.rename_keys(model.state_dict(), "ldm").items()
            },
            "global_step": 1,
        },
        ckpt,
    )
    return {
        "run": run,
        "diffusers": weights.export(model, root / "diffusers", "diffusers", sample_size=SIZE),
        "ldm_safetensors": weights.export(model, root / "vae.safetensors", "ldm"),
        "ldm_ckpt": ckpt,
    }


@pytest.fixture
def empty_torch_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def test_evaluate_model_reads_every_local_source_kind_alike(sources, images, tmp_path, empty_torch_home, capsys):
    results = {}
    for kind, src in sources.items():
        out = tmp_path / f"{kind}.json"
        flag = "--run" if kind == "run" else "--model"  # --run stays as an alias
        assert (
            main(
                [
                    "evaluate",
                    flag,
                    str(src),
                    "--data",
                    str(images),
                    "--split",
                    "all",
                    "--image-size",
                    str(SIZE),
                    "--device",
                    "cpu",
                    "--no-lpips",
                    "--no-fid",
                    "--no-progress",
                    "--json",
                    str(out),
                ]
            )
            == 0
        )
        results[kind] = json.loads(out.read_text())
    kinds = {kind: result["model_kind"] for kind, result in results.items()}
    assert kinds == {"run": "vaehelpers", "diffusers": "diffusers", "ldm_safetensors": "ldm", "ldm_ckpt": "ldm"}
    reference = results["run"]
    assert reference["n_images"] == 3 and math.isfinite(reference["psnr"])
    for kind, result in results.items():  # the same weights in four layouts: the same numbers
        assert result["psnr"] == pytest.approx(reference["psnr"], abs=1e-4), kind
        assert result["mse"] == pytest.approx(reference["mse"], rel=1e-5), kind
        assert result["rfid"] is None and "turned off" in result["rfid_reason"]
    # without --image-size the source's own size is used (the run's data.image_size, diffusers' sample_size)
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(sources["diffusers"]),
                "--data",
                str(images),
                "--split",
                "all",
                "--device",
                "cpu",
                "--no-lpips",
                "--no-fid",
                "--no-progress",
                "--json",
                str(tmp_path / "d.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "d.json").read_text())["image_size"] == SIZE


def test_evaluate_model_that_cannot_be_read_is_one_line(tmp_path, images, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert main(["evaluate", "--model", str(broken), "--data", str(images), "--device", "cpu", "--no-progress"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("vaehelpers evaluate: error:") and "\n" not in error


def test_evaluate_with_fid_required_and_missing_weights_stops_with_the_file(sources, images, empty_torch_home, capsys):
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(sources["run"]),
                "--data",
                str(images),
                "--split",
                "all",
                "--device",
                "cpu",
                "--no-lpips",
                "--fid",
                "--no-progress",
            ]
        )
        == 1
    )
    error = capsys.readouterr().err.strip()
    assert "weights-inception-2015-12-05-6726825d.pth" in error and "\n" not in error


@pytest.mark.slow
def test_compare_three_kinds_with_rfid_and_a_broken_source(images, tmp_path, inception_dir, empty_torch_home, capsys):
    ours = tiny_model(0)
    run = tmp_path / "ours"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"model": dataclasses.asdict(ours.config), "data": {"image_size": SIZE}})
    )
    ours.save(run)
    theirs = weights.export(tiny_model(1), tmp_path / "theirs-diffusers", "diffusers", sample_size=SIZE)
    # an LDM file of a model with 8 latent channels: the table must show each model's own latent shape
    ldm = weights.export(tiny_model(2, latent_channels=8), tmp_path / "ldm-vae.safetensors", "ldm")
    missing = tmp_path / "no-such-model"
    out = tmp_path / "C"

    status = main(
        [
            "compare",
            str(run),
            str(theirs),
            str(ldm),
            str(missing),
            "--data",
            str(images),
            "--split",
            "all",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-lpips",
            "--weights-dir",
            str(inception_dir),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 3  # completed, but one model was not compared
    result = json.loads((out / "compare.json").read_text())
    assert result["n_images"] == 3 and result["image_size"] == SIZE  # the first model's size
    rows = {row["name"]: row for row in result["models"]}
    assert list(rows) == ["ours", "theirs-diffusers", "ldm-vae.safetensors"]
    assert [rows[name]["kind"] for name in rows] == ["vaehelpers", "diffusers", "ldm"]
    assert [rows[name]["latent_channels"] for name in rows] == [4, 4, 8]
    for name, row in rows.items():
        assert row["n_images"] == 3 and math.isfinite(row["psnr"]) and 0 < row["ssim"] < 1, name
        assert isinstance(row["rfid"], float) and math.isfinite(row["rfid"]) and row["rfid"] > 0, name
        assert len(row["latents_mean"]) == len(row["latents_std"]) == row["latent_channels"], name
        assert all(std > 0 for std in row["latents_std"]) and row["images_per_second"] > 0, name
        assert row["parameters"] == sum(
            p.numel()
            for p in AutoencoderKL(
                ModelConfig(**{**dataclasses.asdict(model_config("tiny")), "latent_channels": row["latent_channels"]})
            ).parameters()
        )
        assert row["lpips"] is None
    assert rows["ours"]["psnr"] != rows["theirs-diffusers"]["psnr"]  # different weights, different numbers
    assert "3 images" in result["rfid_warning"]
    assert result["failed"] == [
        {"name": "no-such-model", "source": str(missing), "reason": result["failed"][0]["reason"]}
    ]
    assert "no such file or folder" in result["failed"][0]["reason"]

    markdown = (out / "compare.md").read_text()
    assert sum(line.startswith("|") for line in markdown.splitlines()) == 2 + 3  # header, rule, a row per model
    assert "Not compared: no-such-model" in markdown and "Warning: rFID on 3 images" in markdown
    assert "| ours | vaehelpers |" in printed and "no-such-model" in printed

    import shutil

    if os.environ.get("VAEHELPERS_KEEP_COMPARE"):  # to look at the files: VAEHELPERS_KEEP_COMPARE=DIR
        shutil.copytree(out, os.environ["VAEHELPERS_KEEP_COMPARE"], dirs_exist_ok=True)
    figure = Image.open(out / "reconstructions.png")
    assert figure.width > figure.height  # 4 columns (original + 3 models), 4 rows of 32 px images
    assert result["files"]["figure"] == str(out / "reconstructions.png")


def test_compare_labels_per_image_psnr_from_evaluate():
    from vaehelpers.compare import reconstructions_figure

    images = torch.zeros(2, 3, 8, 8)
    figure = reconstructions_figure(images, [("a", images + 0.5, [12.5, 30.0]), ("b", images, [math.inf, math.inf])])
    titles = [ax.get_title() for ax in figure.axes if ax.images]
    assert titles == [
        "original",
        "a\nPSNR 12.50 dB",
        "b\nPSNR inf dB",
        "original",
        "a\nPSNR 30.00 dB",
        "b\nPSNR inf dB",
    ]


def test_notebook_step_is_skipped_with_a_sentence_without_a_second_model(tmp_path, capsys):
    from vaehelpers.compare import compare_in_notebook

    assert compare_in_notebook(None, tmp_path / "run", tmp_path / "data", tmp_path / "out", image_size=32) is None
    assert "compare_with=None" in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_notebook_step_compares_the_run_with_a_second_model(sources, tmp_path, empty_torch_home, monkeypatch, capsys):
    import urllib.error

    import torchvision.models._api as tv_api

    from vaehelpers.compare import compare_in_notebook

    def no_network(url, *args, **kwargs):  # LPIPS's VGG16 download fails as it does offline
        raise urllib.error.URLError("Name or service not known (simulated offline)")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)
    other = weights.export(tiny_model(5), tmp_path / "sd-vae-ft-mse", "diffusers", sample_size=SIZE)
    # the test split of 3 images is empty, so give the notebook step a folder whose test split holds images
    data = tmp_path / "data"
    make_synthetic(data, count=40, size=SIZE, seed=0)
    result = compare_in_notebook(
        other, sources["run"], data, tmp_path / "out", image_size=SIZE, device="cpu", cache_dir=tmp_path / "cache"
    )
    assert list((tmp_path / "cache").iterdir())  # the notebook's cache folder, not one beside the images
    assert [row["name"] for row in result["models"]] == ["run", "sd-vae-ft-mse"] and result["failed"] == []
    assert result["split"] == "test" and 0 < result["n_images"] < 40
    assert (
        tmp_path / "out" / "reconstructions.png"
    ).exists() and "| sd-vae-ft-mse | diffusers |" in capsys.readouterr().out
    assert any("LPIPS not computed" in note for note in result["notes"])
    assert any("rFID not computed" in note for note in result["notes"]) and result["models"][0]["rfid"] is None


def test_evaluate_model_takes_a_hub_id(sources, images, tmp_path, empty_torch_home, hub_snapshot):
    """The network boundary (huggingface_hub.snapshot_download) is faked: it 'downloads' the diffusers folder."""
    hub_snapshot.repos["stabilityai/sd-vae-ft-mse"] = sources["diffusers"]
    out = tmp_path / "hub.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                "stabilityai/sd-vae-ft-mse",
                "--data",
                str(images),
                "--split",
                "all",
                "--device",
                "cpu",
                "--no-lpips",
                "--no-fid",
                "--no-progress",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert [repo_id for repo_id, _ in hub_snapshot.calls] == ["stabilityai/sd-vae-ft-mse"] and result[
        "model"
    ] == "stabilityai/sd-vae-ft-mse"
    assert result["model_kind"] == "diffusers" and result["n_images"] == 3 and result["image_size"] == SIZE
