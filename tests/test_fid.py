"""rFID: the Frechet arithmetic against scipy, streaming statistics, and the Inception plumbing with stand-in weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from vaehelpers import fid, metrics
from vaehelpers.model import AutoencoderKL


def _scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula (pytorch-fid's): |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy's sqrtm."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def _stats(rows: np.ndarray) -> fid.FeatureStatistics:
    stats = fid.FeatureStatistics()
    stats.update(torch.tensor(rows))
    return stats


@pytest.mark.parametrize("n, dim", [(40, 8), (200, 16), (12, 6)])
def test_frechet_distance_matches_scipy_sqrtm(n, dim):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, dim))
    y = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.7 + 0.3  # other mean and covariance
    a, b = _stats(x), _stats(y)
    ours = fid.frechet_distance(a.mean, a.covariance, b.mean, b.covariance)
    assert ours == pytest.approx(_scipy_frechet(x, y), rel=1e-8, abs=1e-9)
    assert fid.frechet_distance(b.mean, b.covariance, a.mean, a.covariance) == pytest.approx(
        ours, rel=1e-9
    )  # symmetric


def test_fewer_rows_than_features_uses_the_rows_and_agrees_with_the_full_decomposition():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 40)), rng.normal(size=(9, 40)) * 2 + 0.5  # rank-5 and rank-8 covariances
    a, b = _stats(x), _stats(y)
    assert a.covariance_factor.shape == (6, 40) and _stats(rng.normal(size=(41, 40))).covariance_factor is None
    torch.testing.assert_close(a.covariance_factor.T @ a.covariance_factor, a.covariance)
    from_rows = fid.frechet_distance(a.mean, a.covariance, b.mean, b.covariance, factor1=a.covariance_factor)
    from_eigh = fid.frechet_distance(a.mean, a.covariance, b.mean, b.covariance)
    assert from_rows == pytest.approx(from_eigh, rel=1e-9)
    assert from_rows == pytest.approx(
        fid.frechet_distance(b.mean, b.covariance, a.mean, a.covariance, factor1=b.covariance_factor), rel=1e-9
    )


def test_frechet_distance_is_zero_for_one_set_and_exact_for_a_shift_when_singular():
    x = np.random.default_rng(0).normal(size=(5, 32))  # 5 rows in 32 dimensions: a rank-4 covariance
    a, shifted = _stats(x), _stats(x + 1.0)  # shifted by 1 in each of 32 dimensions: distance exactly 32
    for factor in (None, a.covariance_factor):
        assert fid.frechet_distance(a.mean, a.covariance, a.mean, a.covariance, factor1=factor) == pytest.approx(
            0, abs=1e-9
        )
        assert fid.frechet_distance(
            a.mean, a.covariance, shifted.mean, shifted.covariance, factor1=factor
        ) == pytest.approx(32.0, abs=1e-8)


def test_streaming_statistics_equal_numpy_over_uneven_batches():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(23, 5)) * 3 + 100  # a large mean: the pairwise update must not cancel
    stats = fid.FeatureStatistics()
    for start, stop in ((0, 1), (1, 8), (8, 9), (9, 23)):
        stats.update(torch.tensor(rows[start:stop]))
    assert stats.n == 23
    np.testing.assert_allclose(stats.mean.numpy(), rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance.numpy(), np.cov(rows, rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        one = fid.FeatureStatistics()
        one.update(torch.tensor(rows[:1]))
        _ = one.covariance


def test_to_uint8_rounds_8bit_values_back_exactly():
    levels = torch.arange(256, dtype=torch.float32)
    assert torch.equal(fid.to_uint8((levels / 255).view(1, 1, 1, -1)).flatten(), levels.to(torch.uint8))
    assert fid.to_uint8(torch.tensor([-0.5, 1.5])).tolist() == [0, 255]


def test_bias_warning_names_the_count_below_the_threshold():
    assert fid.RFID_MIN_IMAGES == 2048
    assert "12 images" in fid.bias_warning(12) and "2048" in fid.bias_warning(12)
    assert fid.bias_warning(2048) is None


# ----------------------------------------------------------------------------- Inception with stand-in weights
# inception_dir (conftest.py): torch-fidelity's network with random weights under the real file name and keys


@pytest.fixture
def empty_torch_home(monkeypatch, tmp_path):
    """No Inception weights in torch's hub cache, whatever this machine holds."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def _photos(count=6, size=32, seed=0):
    """(count, 3, size, size) in [0, 1]: smooth random colour fields (different enough for Inception to tell)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def test_missing_weights_name_the_file_and_where(empty_torch_home, tmp_path):
    assert fid.find_inception_weights(tmp_path) is None
    with pytest.raises(RuntimeError, match=fid.INCEPTION_WEIGHTS_NAME) as caught:
        fid.load_inception(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message and "hub" in message and "--no-fid" in message


def test_weights_found_in_the_hub_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / fid.INCEPTION_WEIGHTS_NAME).write_bytes(b"x")
    assert fid.find_inception_weights() == tmp_path / "hub" / "checkpoints" / fid.INCEPTION_WEIGHTS_NAME


def test_a_file_with_wrong_contents_is_one_clear_line(empty_torch_home, tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / fid.INCEPTION_WEIGHTS_NAME)
    with pytest.raises(RuntimeError, match="not usable as torch-fidelity's InceptionV3 weights") as caught:
        fid.load_inception(tmp_path)
    assert "\n" not in str(caught.value) and fid.INCEPTION_WEIGHTS_NAME in str(caught.value)


def test_standin_inception_rfid_plumbing(inception_dir, empty_torch_home):
    features = fid.load_inception(inception_dir)
    photos = _photos(3)
    rows = features(photos)
    assert rows.shape == (3, fid.FEATURE_DIM) and rows.dtype == torch.float64 and torch.isfinite(rows).all()
    assert rows.std(0).max() > 0  # the three images have different features

    grey = fid.build_rfid(features)  # the whole chain, for a model that outputs grey
    grey.update(photos, torch.full_like(photos, 0.5))
    far = grey.compute()
    # two identical sets, and a slightly noisy copy, from the same Inception rows (each forward costs seconds here)
    same = fid.FeatureStatistics()
    same.update(rows)
    identical = fid.frechet_distance(
        same.mean, same.covariance, same.mean, same.covariance, factor1=same.covariance_factor
    )
    noise = 0.02 * torch.randn(photos.shape, generator=torch.Generator().manual_seed(1))
    noisy = fid.FeatureStatistics()
    noisy.update(features((photos + noise).clamp(0, 1)))
    slightly_off = fid.frechet_distance(
        same.mean, same.covariance, noisy.mean, noisy.covariance, factor1=same.covariance_factor
    )
    assert all(math.isfinite(v) for v in (identical, slightly_off, far))
    assert identical == pytest.approx(0.0, abs=1e-9)
    assert far > 100 * slightly_off > 0


@pytest.mark.slow
def test_evaluate_reports_rfid_with_the_bias_warning(inception_dir, empty_torch_home, recwarn):
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny").eval()
    images = _photos(3) * 2 - 1  # [-1, 1]
    summary = metrics.evaluate(
        model, list(images), batch_size=2, lpips=False, weights_dir=inception_dir, progress=False
    )
    assert isinstance(summary["rfid"], float) and math.isfinite(summary["rfid"]) and summary["rfid"] > 0
    assert summary["rfid_n_images"] == 3 and summary["n_images"] == 3 and summary["rfid_reason"] is None
    assert "3 images" in summary["rfid_warning"] and "warning: rFID on 3 images" in metrics.format_table(summary)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_evaluate_without_inception_weights_reports_null_with_the_reason(empty_torch_home):
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny").eval()
    images = list(_photos(2) * 2 - 1)
    with pytest.warns(RuntimeWarning, match="rFID not computed"):
        summary = metrics.evaluate(model, images, lpips=False, progress=False)
    assert summary["rfid"] is None and fid.INCEPTION_WEIGHTS_NAME in summary["rfid_reason"]
    assert summary["rfid_warning"] is None
    off = metrics.evaluate(model, images, lpips=False, fid=False, progress=False)
    assert off["rfid"] is None and "turned off" in off["rfid_reason"]
    with pytest.raises(RuntimeError, match=fid.INCEPTION_WEIGHTS_NAME):
        metrics.evaluate(model, images, lpips=False, fid=True, progress=False)
