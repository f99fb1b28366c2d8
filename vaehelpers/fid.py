"""rFID: the Frechet distance between InceptionV3 pool features of held-out images and of their reconstructions.

The features are torch-fidelity's InceptionV3 (its port of the original TensorFlow FID network; torchmetrics' FID
uses the same one): 2048-d pool3 features, images given as uint8 and resized by the network itself to 299x299
(TensorFlow-1 bilinear), so that numbers compare with FIDs measured the standard way. Its weights file,
weights-inception-2015-12-05-6726825d.pth, is read from disk only (torch's hub cache or a folder you name); where
it is missing, rFID is reported as null with the reason, as LPIPS is.

Statistics stream: each set keeps a running mean and covariance in float64 (Chan et al.'s pairwise update), so
any number of images fits in 2 x 2048^2 doubles. The Frechet distance of N(mu1, S1) and N(mu2, S2) is
|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(sqrt(S1) S2 sqrt(S1)); the last trace comes from the eigenvalues of a
symmetric PSD matrix (round-off below its numerical rank set to 0), so it stays real and finite even when S1 and
S2 are singular (fewer images than 2048 dimensions); frechet_distance says how.

Bias: FID estimated from N images is biased upward, roughly by k/N (Chong & Forsyth, "Effectively Unbiased FID
and Inception Score and where to find them", CVPR 2020), and below 2048 images the covariance of 2048-d features
cannot even be full rank (pytorch-fid's README asks for more samples than feature dimensions). Published rFIDs use
thousands of images (sd-vae-ft-mse: 5,000 COCO images at 256 px); compare rFIDs only at the same N and size.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file; pretrained.py has its URL
FEATURE_DIM = 2048  # InceptionV3 pool3
# Below this many images rFID is biased upward and its covariance singular: the feature dimension (see docstring).
RFID_MIN_IMAGES = FEATURE_DIM
FeatureFn = Callable[[Tensor], Tensor]  # images (B, 3, H, W) in [0, 1] -> features (B, F)


def bias_warning(n_images: int) -> str | None:
    """The sentence the evaluate JSON carries when rFID rests on fewer than RFID_MIN_IMAGES images, else None."""
    if n_images >= RFID_MIN_IMAGES:
        return None
    return (
        f"rFID on {n_images} images is biased upward (FID's bias shrinks as 1/N, Chong & Forsyth 2020) and its "
        f"2048-d covariance is singular below {RFID_MIN_IMAGES} images: compare rFIDs only at the same number "
        f"of images and size (published tables use 5,000 or more)"
    )


# --------------------------------------------------------------------------- the Inception network


def find_inception_weights(weights_dir: str | Path | None = None) -> Path | None:
    """The Inception weights file where pretrained.py looks for it (weights_dir, $VAEHELPERS_WEIGHTS, the torch hub
    cache); None when absent."""
    from vaehelpers import pretrained

    return pretrained.find("inception", weights_dir)


def to_uint8(images01: Tensor) -> Tensor:
    """images (B, 3, H, W) in [0, 1] -> uint8 in [0, 255], rounded (an 8-bit file read as x/255 comes back exactly)."""
    return (images01.float().clamp(0, 1) * 255).round().to(torch.uint8)


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 as images (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048), float64."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    @torch.no_grad()
    def forward(self, images01: Tensor) -> Tensor:
        (features,) = self.network(to_uint8(images01))  # torch-fidelity resizes to 299 itself
        return features.double()


def load_inception(weights_dir: str | Path | None = None, device: torch.device | str = "cpu") -> InceptionFeatures:
    """The FID network with its weights from disk (see find_inception_weights).

    Raises pretrained.MissingWeightsError (a RuntimeError: one line naming the file, where it was looked for and the
    ways out) when it is missing, RuntimeError naming the file when it does not load.
    """
    from vaehelpers import pretrained

    path = pretrained.require("inception", weights_dir, instead="turn rFID off (--no-fid; fid=False)")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        raise RuntimeError(f"rFID needs the torch-fidelity package ({error}): pip install torch-fidelity") from error
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        # torch-fidelity unpickles its weights with weights_only=False: hand it a copy we wrote from plain tensors
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        network = FeatureExtractorInceptionV3(
            "inception-v3-compat", [str(FEATURE_DIM)], feature_extractor_weights_path=buffer
        )
    except Exception as error:  # refused pickle, wrong keys or shapes, truncated file: one line, with the file
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        raise RuntimeError(
            f"{path}: not usable as torch-fidelity's InceptionV3 weights ({type(error).__name__}: {reason})"
        ) from error
    return InceptionFeatures(network).to(device).eval()


# --------------------------------------------------------------------------- statistics and the distance


class FeatureStatistics:
    """Running mean (F,) and covariance (F, F) of feature rows, in float64, one batch at a time.

    While there are no more rows than features (n <= F) the rows are kept too (at most the covariance's size):
    frechet_distance then works in the n-dimensional span of the rows instead of decomposing an F x F matrix.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None  # (F,)
        self._m2: Tensor | None = None  # (F, F) sum of outer products of deviations from the mean
        self._rows: list[Tensor] | None = []  # dropped once n > F

    def update(self, features: Tensor) -> None:
        """features (B, F); merged with Chan et al.'s pairwise formula (no catastrophic cancellation)."""
        features = features.detach().double().cpu().reshape(len(features), -1)
        count = len(features)
        if count == 0:
            return
        batch_mean = features.mean(0)
        centred = features - batch_mean
        batch_m2 = centred.T @ centred  # (F, F)
        if self.n == 0:
            self.n, self.mean, self._m2 = count, batch_mean, batch_m2
        else:
            total = self.n + count
            delta = batch_mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self._m2 = self._m2 + batch_m2 + torch.outer(delta, delta) * (self.n * count / total)
            self.n = total
        if self._rows is not None:
            self._rows.append(features)
            if self.n > features.shape[1]:
                self._rows = None

    @property
    def covariance(self) -> Tensor:
        """Unbiased sample covariance (F, F) (divides by n - 1, as numpy.cov); needs n >= 2."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.n}")
        return self._m2 / (self.n - 1)

    @property
    def covariance_factor(self) -> Tensor | None:
        """A (n, F) with covariance = A^T A, while the rows are kept (n <= F); else None."""
        if self._rows is None or self.n < 2:
            return None
        return (torch.cat(self._rows) - self.mean) / math.sqrt(self.n - 1)


def _clip_round_off(eigenvalues: Tensor) -> Tensor:
    """Eigenvalues of a symmetric PSD matrix with those below its numerical rank threshold set to 0 (numpy's
    matrix_rank tolerance, max|lambda| * F * eps): round-off there would otherwise add sqrt(eps)-sized terms."""
    tolerance = eigenvalues.abs().max() * len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > tolerance, eigenvalues, torch.zeros_like(eigenvalues))


def frechet_distance(
    mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor, *, factor1: Tensor | None = None
) -> float:
    """Frechet distance between N(mean1, cov1) and N(mean2, cov2): means (F,), covariances (F, F); float64 inside.

    tr sqrt(cov1 cov2) = tr sqrt(M), M = sqrt(cov1) cov2 sqrt(cov1), symmetric PSD, so the result is real even for
    singular covariances. M's non-zero eigenvalues are those of the small symmetric matrix B cov2 B^T for any B with
    cov1 = B^T B: factor1 (n, F) when given (fewer images than features), else B = L^1/2 V^T from cov1 = V L V^T
    restricted to its non-zero eigenvalues (one F x F eigendecomposition). The result is clipped at 0 (it is >= 0
    in exact arithmetic).
    """
    mean1, mean2, cov1, cov2 = (t.detach().double().cpu() for t in (mean1, mean2, cov1, cov2))
    if factor1 is None:
        values, vectors = torch.linalg.eigh((cov1 + cov1.T) / 2)
        keep = _clip_round_off(values) > 0
        factor1 = values[keep].sqrt()[:, None] * vectors[:, keep].T  # (r, F)
    factor1 = factor1.detach().double().cpu()
    middle = factor1 @ cov2 @ factor1.T  # (r, r)
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2) if len(middle) else middle.new_zeros(0)
    trace_sqrt = _clip_round_off(eigenvalues).sqrt().sum() if len(eigenvalues) else 0.0
    distance = (mean1 - mean2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_sqrt
    return max(float(distance), 0.0)


class ReconstructionFID:
    """rFID accumulated over batches: update(images, reconstructions) in [0, 1], then compute().

    features: a FeatureFn; InceptionFeatures (load_inception) for the standard number, anything else for tests.
    """

    def __init__(self, features: FeatureFn):
        self.features = features
        self.originals = FeatureStatistics()
        self.reconstructions = FeatureStatistics()

    @property
    def n_images(self) -> int:
        return self.originals.n

    @torch.no_grad()
    def update(self, images01: Tensor, reconstructions01: Tensor) -> None:
        """images, reconstructions: (B, 3, H, W) in [0, 1], the same images in the same order."""
        self.originals.update(self.features(images01))
        self.reconstructions.update(self.features(reconstructions01))

    def compute(self) -> float:
        """The Frechet distance between the two feature sets (needs 2 images or more)."""
        return frechet_distance(
            self.originals.mean,
            self.originals.covariance,
            self.reconstructions.mean,
            self.reconstructions.covariance,
            factor1=self.originals.covariance_factor,
        )


def build_rfid(
    features: bool | nn.Module | FeatureFn = True,
    *,
    weights_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> ReconstructionFID:
    """A ReconstructionFID with the standard Inception features (features=True; RuntimeError with the reason when
    its weights are missing) or the given feature function ((B,3,H,W) in [0, 1] -> (B, F))."""
    if features is True:
        return ReconstructionFID(load_inception(weights_dir, device))
    if isinstance(features, nn.Module):
        features = features.to(device).eval()
    return ReconstructionFID(features)


def rfid_details(n_images: int, reason: str | None = None) -> dict[str, object]:
    """The evaluate JSON's rFID context: how many image pairs it rests on, the bias warning below RFID_MIN_IMAGES,
    and, when rfid is null, why (reason)."""
    return {
        "rfid_n_images": n_images,
        "rfid_min_images": RFID_MIN_IMAGES,
        "rfid_warning": bias_warning(n_images) if reason is None else None,
        "rfid_reason": reason,
    }
