"""Tiled encode and decode: whole-image GroupNorm statistics, windows and blend weights, bad settings, the CLI."""

import json

import pytest
import torch
from PIL import Image
from torch import nn

from vaehelpers import tiling
from vaehelpers.cli import main
from vaehelpers.config import ModelConfig
from vaehelpers.model import AutoencoderKL
from vaehelpers.reconstruct import reconstruct_files

# Two levels (downsample factor 2), mid attention on: a second or two at 192x256 on a loaded CPU (float32: float64
# convolutions take a slow path on CPU), and its convolutions' context (about 24 pixels through encoder or decoder)
# fits the outer quarter of a 96 px overlap.
SMALL = ModelConfig(base_channels=8, channel_multipliers=(1, 2), layers_per_block=1, norm_num_groups=4)


def _blend_per_tile(network: nn.Module, images: torch.Tensor, plan: tiling.Tiling) -> torch.Tensor:
    """What plain tiling does: each tile normalised with its own statistics, then the same blend."""
    output = torch.zeros_like(images)
    for tile in tiling.plan_tiles(images.shape[-2], images.shape[-1], plan, factor=1):
        weight = tile.weight_rows[:, None] * tile.weight_cols[None, :]
        part = network(images[..., tile.top : tile.bottom, tile.left : tile.right])
        output[..., tile.top : tile.bottom, tile.left : tile.right] += part * weight
    return output


def test_groupnorm_statistics_are_those_of_the_whole_image():
    torch.manual_seed(0)
    network = nn.Sequential(
        nn.GroupNorm(4, 8), nn.Conv2d(8, 8, 1), nn.SiLU(), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1)
    ).double()
    images = torch.randn(2, 8, 40, 56, dtype=torch.float64) * 3 + 1
    images[..., :20, :] *= 4  # halves of different tone: per-tile statistics would differ
    plan = tiling.Tiling(tile=16, overlap=8)
    assert len(tiling.plan_tiles(40, 56, plan, factor=1)) == 24  # 4 rows x 6 columns
    with torch.no_grad():
        untiled = network(images)
        tiled = tiling.run_tiled(network, network, images, plan, factor_in=1, factor_out=1)
        per_tile = _blend_per_tile(network, images, plan)
    assert (tiled - untiled).abs().max() < 1e-12
    assert (per_tile - untiled).abs().max() > 0.1  # the control: per-tile statistics are visibly off
    assert not any("forward" in vars(m) for m in network.modules())  # the patches are gone afterwards


@pytest.mark.parametrize("length,tile,overlap", [(41, 26, 8), (61, 32, 8), (72, 64, 56), (100, 32, 8), (20, 32, 8)])
def test_windows_cover_the_axis_and_weights_sum_to_one(length, tile, overlap):
    windows = tiling._windows(length, tile, overlap)
    weights = tiling._ramps(windows, overlap)
    total = torch.zeros(length, dtype=torch.float64)
    owned = torch.zeros(length, dtype=torch.int64)
    for (start, end, core_start, core_end), weight in zip(windows, weights, strict=True):
        assert 0 <= start < end <= length and end - start <= tile
        total[start:end] += weight
        owned[core_start:core_end] += 1
        assert start <= core_start < core_end <= end
    assert torch.allclose(total, torch.ones(length, dtype=torch.float64), atol=1e-12)
    assert owned.eq(1).all()  # the cores partition the axis: every pixel counted once in the statistics
    for (_, end, *_), (start, *_) in zip(windows, windows[1:], strict=False):
        assert end - start >= overlap


@pytest.fixture(scope="module")
def small_model() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(SMALL).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    base = torch.rand(1, 3, 32, 40, generator=generator)
    smooth = nn.functional.interpolate(base, size=(192, 256), mode="bilinear")  # photo-like: smooth + detail
    return (smooth + 0.1 * torch.randn(1, 3, 192, 256, generator=generator)).clamp(0, 1) * 2 - 1


def test_tiled_encode_and_decode_equal_untiled_within_float_error(small_model, images):
    with torch.no_grad():
        latents = small_model.encode(images).mode()
        reconstructions = small_model.decode(latents)
        with small_model.tiled(tile=160, overlap=96):
            assert len(tiling.plan_tiles(96, 128, small_model._tiling, factor=2)) == 6
            tiled_latents = small_model.encode(images).mode()
            tiled_reconstructions = small_model.decode(latents)
    assert small_model._tiling is None
    # float32 rounding only (sums in another order); the control below and per-tile statistics are 1e-3 and more off
    assert (tiled_latents - latents).abs().max() < 1e-4 * latents.abs().max()
    assert (tiled_reconstructions - reconstructions).abs().max() < 1e-4 * reconstructions.abs().max()


def test_sampled_statistics_and_per_tile_attention_are_close_but_not_exact(small_model, images):
    with torch.no_grad():
        latents = small_model.encode(images).mode()
        reconstructions = small_model.decode(latents)
        errors = {}
        for name, settings in {"sample": {"stats_tiles": 3}, "tile attention": {"attention": "tile"}}.items():
            with small_model.tiled(tile=160, overlap=96, **settings):
                errors[name] = (small_model.decode(latents) - reconstructions).abs().mean().item()
    for name, error in errors.items():
        assert 1e-4 < error < 0.05, (name, error)


def test_a_tile_as_large_as_the_image_runs_untiled(small_model, images):
    with torch.no_grad():
        expected = small_model.encode(images).mode()
        with small_model.tiled(tile=256, overlap=64):
            assert torch.equal(small_model.encode(images).mode(), expected)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"tile": 101}, "tile must be a positive multiple of 2 pixels, got 101"),
        ({"tile": 0}, "tile must be a positive multiple"),
        ({"tile": 64, "overlap": 64}, "overlap must be"),
        ({"tile": 64, "overlap": 7}, "overlap must be"),
        ({"tile": 64, "overlap": 16, "stats_tiles": 0}, "stats_tiles must be at least 1"),
        ({"tile": 64, "overlap": 16, "attention": "everywhere"}, "attention must be"),
    ],
)
def test_bad_tiling_settings_are_one_clear_error(small_model, settings, message):
    with pytest.raises(ValueError, match=message):
        with small_model.tiled(**settings):
            pass
    assert small_model._tiling is None


def test_global_attention_needs_every_tile(small_model, images):
    with pytest.raises(ValueError, match="global attention needs every tile"):
        with small_model.tiled(tile=160, overlap=96, stats_tiles=2, attention="global"), torch.no_grad():
            small_model.encode(images)


def test_decide_tiles_only_what_does_not_fit(monkeypatch):
    monkeypatch.setattr(tiling, "available_bytes", lambda device: 2 * 2**30)  # the OS's answer, 2 GiB free
    chosen, why = tiling.decide(128, 256, 256, "auto", "cpu")
    assert chosen is None and why.startswith("untiled")
    chosen, why = tiling.decide(128, 3000, 4000, "auto", "cpu")
    assert chosen is not None and chosen.tile % 64 == 0 and chosen.stats_tiles is not None
    assert tiling.untiled_bytes(128, chosen.tile, chosen.tile) * chosen.stats_tiles <= 0.4 * 2 * 2**30
    assert "sample of" in why
    assert tiling.decide(128, 3000, 4000, "off", "cpu") == (None, "untiled (--no-tile)")
    chosen, why = tiling.decide(128, 300, 400, 512, "cpu")
    assert chosen is None and "fits one 512-pixel tile" in why
    chosen, _ = tiling.decide(16, 300, 400, 128, "cpu")
    assert chosen.tile == 128 and chosen.overlap == 32 and chosen.stats_tiles is None


def _save(path, width, height):
    generator = torch.Generator().manual_seed(width * height)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_reconstruct_files_reports_tile_time_memory_and_refuses_tiny_images(tmp_path):
    model = AutoencoderKL.from_preset("tiny")
    photo = _save(tmp_path / "photo.png", 200, 136)
    dot = _save(tmp_path / "dot.png", 1, 1)
    lines = []
    rows = reconstruct_files(model, [photo, dot], tmp_path / "out", tile=64, report=lines.append)
    assert rows[0]["tile"] == 64 and rows[0]["stats_tiles"] is None
    assert rows[0]["seconds"] > 0 and rows[0]["peak_memory_mb"] > 50 and 0 < rows[0]["ssim"] < 1
    assert rows[1]["error"] == "too small (1x1 < 8x8)" and rows[1]["psnr"] is None
    assert lines == [
        "photo.png: 200x136, tiled (--tile 64); 64 px tiles, overlap 16, GroupNorm statistics over all tiles"
    ]
    untiled = reconstruct_files(model, [photo], tmp_path / "out2", tile="off", report=lines.append)
    assert untiled[0]["tile"] is None and abs(untiled[0]["psnr"] - rows[0]["psnr"]) < 0.5


def test_cli_reconstruct_tile_flags_and_json(tmp_path, capsys):
    run = tmp_path / "run"
    AutoencoderKL.from_preset("tiny").save(run)
    photo = _save(tmp_path / "photo.png", 120, 80)
    assert main(["reconstruct", "--run", str(run), str(photo), "--out", str(tmp_path / "out"), "--tile", "100"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == "vaehelpers reconstruct: error: tile must be a positive multiple of 8 pixels, got 100"
    report = tmp_path / "rows.json"
    args = ["reconstruct", "--run", str(run), str(photo), "--out", str(tmp_path / "out"), "--tile", "64"]
    assert main([*args, "--json", str(report)]) == 0
    rows = json.loads(report.read_text())
    assert rows[0]["tile"] == 64 and rows[0]["width"] == 120 and rows[0]["psnr"] > 0
    with pytest.raises(SystemExit):
        main([*args, "--no-tile"])  # one or the other


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Three images of different sizes, and one too small to use."""
    folder = tmp_path_factory.mktemp("mixed")
    for name, (width, height) in {"a.png": (120, 80), "b.png": (72, 100), "c.png": (130, 66), "d.png": (4, 4)}.items():
        _save(folder / name, width, height)
    return folder


def test_evaluate_full_size_measures_whole_images_like_reconstruct(mixed_folder, tmp_path, capsys):
    run = tmp_path / "run"
    AutoencoderKL.from_preset("tiny").save(run)
    report = tmp_path / "eval.json"
    args = ["evaluate", "--model", str(run), "--data", str(mixed_folder), "--split", "all", "--full-size"]
    assert main([*args, "--tile", "64", "--no-lpips", "--no-fid", "--no-progress", "--json", str(report)]) == 3
    summary = json.loads(report.read_text())
    assert summary["image_size"] == "full" and summary["n_images"] == 3 and summary["n_skipped"] == 1
    assert summary["skipped"][0]["reason"] == "too small (4x4 < 8x8)"
    rows = reconstruct_files(
        AutoencoderKL.load(run), sorted(mixed_folder.glob("[abc].png")), tmp_path / "out", tile=64, report=print
    )
    by_path = {row["path"]: row["psnr"] for row in summary["per_image"]}
    for row in rows:
        assert by_path[row["path"]] == pytest.approx(row["psnr"], abs=1e-4)


def test_compare_full_size_measures_whole_images(mixed_folder, tmp_path):
    from vaehelpers.compare import compare

    run = tmp_path / "run"
    AutoencoderKL.from_preset("tiny").save(run)
    result = compare(
        [str(run)],
        mixed_folder,
        tmp_path / "out",
        split="all",
        image_size=64,
        lpips=False,
        fid_on=False,
        progress=False,
        full_size=True,
        tile=64,
    )
    assert result["image_size"] == "full" and result["n_images"] == 4
    assert result["models"][0]["n_images"] == 3 and result["models"][0]["n_skipped"] == 1


def test_ssim_in_strips_matches_one_piece():
    from torchmetrics.functional.image import structural_similarity_index_measure

    from vaehelpers import metrics

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 700, 120, generator=generator)
    reconstructions = (images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    whole = structural_similarity_index_measure(reconstructions, images, data_range=1.0, reduction="none")
    assert 700 > metrics.SSIM_STRIP_ROWS
    assert (metrics._ssim(reconstructions, images) - whole.reshape(-1)).abs().max() < 1e-6


def test_tile_threads_keep_the_callers_autocast(small_model, images):
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        with small_model.tiled(tile=160, overlap=96):
            latents = small_model.encode(images).mode()
    assert latents.dtype == torch.bfloat16


def test_evaluate_tile_needs_full_size(mixed_folder, tmp_path, capsys):
    run = tmp_path / "run"
    AutoencoderKL.from_preset("tiny").save(run)
    assert main(["evaluate", "--model", str(run), "--data", str(mixed_folder), "--tile", "64"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "vaehelpers evaluate: error: --tile needs --full-size (cropped images are never tiled)"
    )
